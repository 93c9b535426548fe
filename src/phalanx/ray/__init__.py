"""Run a phalanx job on a Ray cluster: each worker is a Ray actor, the coordinator is the driver.

    import ray
    import phalanx as px
    import phalanx.ray

    def train(lr):
        px.init()                  # joins the job; px.rank(), px.size() as under `phalanx run`
        ...
        return px.rank()

    ray.init()
    ranks = phalanx.ray.run(train, num_workers=4, min_workers=2, max_restarts=1, args=(0.1,))

Faults are recovered as under `phalanx run`: an actor that dies (killed, `ray.kill`, its node
lost) is a lost worker; the survivors re-form and continue without rollback, and up to
`max_restarts` replacement actors join the running job and heal from their peers. An exception
raised by `fn` is a bug: the call fails with `WorkerError`, naming the rank and carrying the
original exception. Nothing here imports Ray or torch until `run` is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import HEARTBEAT_TIMEOUT, TIMEOUT
from ..errors import JobFailed, WorkerError

__all__ = ["JobFailed", "WorkerError", "run"]


def run(fn: Callable[..., Any], *, num_workers: int, min_workers: int | None = None,
        max_restarts: int = 0, resources_per_worker: dict[str, float] | None = None,
        args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
        timeout: float = TIMEOUT, heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        placement_timeout: float = 120.0) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on `num_workers` Ray actors as one phalanx job.

    Each actor holds one bundle of a placement group (`resources_per_worker`, one CPU by
    default; ask for GPUs there, e.g. ``{"CPU": 4, "GPU": 1}``). `fn` calls ``px.init()`` to
    join the job, whose coordinator runs in this (the driver's) process; Ray must be
    initialised here (``ray.init()``) and `fn` must pickle (cloudpickle).

    Returns the values `fn` returned on the workers that finished, in their final rank order.
    With `min_workers` below `num_workers`, or `max_restarts` > 0, the job is elastic: a lost
    worker (its actor died) is fenced, survivors continue, and up to `max_restarts`
    replacements join. `timeout` is the collective timeout, `heartbeat_timeout` how long a
    silent worker is waited for before it is declared lost, `placement_timeout` how long Ray
    may take to place the workers.

    Raises `WorkerError` when `fn` raised on a worker (whatever `max_restarts` says),
    `JobFailed` when fewer than `min_workers` workers remain or a worker of a job that is not
    elastic is lost, and `phalanx.ConfigError` for a bad argument or when Ray is missing or
    not initialised.
    """
    from .spec import RunSpec, check_call, require_ray
    spec = RunSpec(num_workers=num_workers, min_workers=min_workers, max_restarts=max_restarts,
                   resources_per_worker=resources_per_worker, timeout=timeout,
                   heartbeat_timeout=heartbeat_timeout, placement_timeout=placement_timeout)
    check_call(fn, args, kwargs)
    ray = require_ray()
    from .driver import RayJob
    return RayJob(ray, spec, fn, tuple(args), dict(kwargs or {})).run()
