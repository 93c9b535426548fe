"""`phalanx.spark.run`: a phalanx job whose workers are Spark tasks, coordinated from the driver.

Execution mode: plain tasks, never barrier mode, one task per worker, each task its own
one-task Spark job submitted from a driver thread, all jobs in one job group.

- Not barrier mode: a barrier stage relaunches every task when one fails, the restart-everything
  recovery phalanx exists to avoid.
- A Python worker or an executor killed mid-training fails only its own task; the survivors'
  tasks keep running and their phalanx workers re-form without it (no rollback).
- Spark's own task retry (spark.task.maxFailures; `local[N]` never retries, `local[N,F]` does)
  runs the failed task again: the new attempt joins as a phalanx replacement and heals from
  its peers at a step boundary.
- One job per worker, not one job of N tasks: a task that exhausts its retries aborts its job,
  and Spark would kill the survivors' tasks with it. Alone in its job it fails only itself;
  the call goes on if at least `min_workers` workers are left.
- An exception raised by fn is a bug, not a fault: the task catches it, reports it to the
  coordinator and returns it as its result, so Spark never retries it, and the call raises
  `WorkerError` naming the rank and the exception (see `phalanx.spark.task`). An exception
  that is only the consequence of a lost peer (WorkerLost escaping a fn that does not
  recover) is a fault, as under `phalanx run`: in an elastic job its task fails and Spark
  retries it; otherwise the call raises `JobFailed` naming the loss.

The coordinator runs in the driver (threads of this process), so losing an executor never
takes the job's membership with it. However the call ends, it leaves nothing behind: the job
group is cancelled (Spark kills what still runs), the coordinator is stopped, and the job's
shared-memory segments on the driver's host are removed. The driver logs one line per
generation (logger ``phalanx.spark``); the workers' own output stays in the executors' logs.

Limits: every worker must run at once, so the call first waits (up to `slot_timeout`, logging
'waiting for N task slots, have M') until the cluster has `num_workers` task slots: executors
of a cluster that just started register one by one. A worker hung with its whole process
(SIGSTOP) is declared lost and left behind by its peers, but only the end of the call kills it
(no starter on its host can see it). Segments of workers killed on other hosts are left to those hosts (workers
remove their own when they leave). The job secret travels inside the pickled tasks: enable
Spark's RPC encryption (spark.network.crypto.enabled) on networks you do not trust.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import ConfigError
from . import cluster
from .job import SparkJob
from .outcome import JobFailed, WorkerError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["JobFailed", "WorkerError", "run"]


def run(fn: Callable[..., Any], *, num_workers: int, min_workers: int | None = None,
        args: tuple[Any, ...] | list[Any] = (), kwargs: dict[str, Any] | None = None,
        spark: SparkSession | None = None, timeout: float = 30.0,
        heartbeat_timeout: float = 3.0, slot_timeout: float = cluster.SLOT_WAIT) -> list[Any]:
    """Run `fn(*args, **kwargs)` as `num_workers` phalanx workers, one per Spark task.

    `px.init()` inside fn joins the job. Returns what the workers that finished returned, in
    their final rank order. Survives lost workers (killed Python workers, lost executors):
    survivors continue without rollback when at least `min_workers` (default `num_workers`)
    are left, and Spark's task retries join as replacements. `timeout` is the collective
    timeout (PHALANX_TIMEOUT); `heartbeat_timeout` the silence after which a worker is
    declared lost. `slot_timeout` is how long the call waits, before starting any worker, for
    executors to register until the cluster has `num_workers` task slots (a local master that
    can never have them fails at once).

    Raises `WorkerError` when fn raised on a worker (whatever spark.task.maxFailures allows),
    `JobFailed` when fewer than `min_workers` workers remain or a job that cannot recover lost
    a worker, and `phalanx.ConfigError` for a bad argument, no SparkSession, or fewer task
    slots than `num_workers` after `slot_timeout` seconds.
    """
    _check(fn, num_workers, min_workers, args, kwargs, timeout, heartbeat_timeout, slot_timeout)
    kwargs = dict(kwargs or {})
    sc = cluster.session(spark).sparkContext
    cluster.wait_for_slots(sc, num_workers, timeout=float(slot_timeout))
    _restore_datasets(args, kwargs)
    _check_pickles(fn, tuple(args), kwargs)
    job = SparkJob(sc, fn, tuple(args), kwargs, num_workers=num_workers,
                   min_workers=num_workers if min_workers is None else min_workers,
                   timeout=float(timeout), heartbeat_timeout=float(heartbeat_timeout))
    return job.run()


def _check(fn: Any, num_workers: Any, min_workers: Any, args: Any, kwargs: Any,
           timeout: Any, heartbeat_timeout: Any, slot_timeout: Any) -> None:
    if not callable(fn):
        raise ConfigError(f"fn={fn!r} is not callable; pass the function each worker runs")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"num_workers={num_workers!r} must be an integer >= 1 (one Spark "
                          "task per worker)")
    if min_workers is not None and (isinstance(min_workers, bool) or not isinstance(
            min_workers, int) or not 1 <= min_workers <= num_workers):
        raise ConfigError(f"min_workers={min_workers!r} must be an integer in 1..num_workers="
                          f"{num_workers}, or None for num_workers (no shrinking)")
    if not isinstance(args, (tuple, list)):
        raise ConfigError(f"args={args!r} must be a tuple of positional arguments for fn")
    if kwargs is not None and not (isinstance(kwargs, dict) and all(
            isinstance(k, str) for k in kwargs)):
        raise ConfigError(f"kwargs={kwargs!r} must be a dict of keyword arguments for fn, or None")
    for name, value in (("timeout", timeout), ("heartbeat_timeout", heartbeat_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{name}={value!r} must be a positive number of seconds")
    if isinstance(slot_timeout, bool) or not isinstance(slot_timeout, (int, float)) or not (
            slot_timeout >= 0):
        raise ConfigError(f"slot_timeout={slot_timeout!r} must be a number of seconds >= 0 (how "
                          f"long to wait for executors to register; default {cluster.SLOT_WAIT:g})")
    # What every worker's px.init() will check, checked once here (e.g. against the interval).
    Config.from_env(timeout=float(timeout), heartbeat_timeout=float(heartbeat_timeout))


def _restore_datasets(args: Any, kwargs: dict[str, Any]) -> None:
    """Lineage, before the workers hold every task slot: rewrite the missing split files of
    any SparkDataset passed to fn from its DataFrame's partitions."""
    mod = sys.modules.get("phalanx.spark.dataset")
    if mod is None:  # never imported: no SparkDataset can exist
        return
    for value in (*args, *kwargs.values()):
        value = getattr(value, "source", value)  # a PartitionedDataset over one
        if isinstance(value, mod.SparkDataset):
            value.ensure()


def _check_pickles(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    from pyspark import cloudpickle
    try:
        cloudpickle.dumps((fn, args, kwargs))
    except Exception as e:
        raise ConfigError(f"fn, args or kwargs cannot be pickled to send to the executors: "
                          f"{type(e).__name__}: {e}") from e
