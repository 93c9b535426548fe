"""What runs inside each Spark task: one phalanx worker, started the way `phalanx join` starts
one (see `phalanx.launch.joiner`), except that the worker is this very Python process.

The task sets the PHALANX_* environment `px.init()` reads (coordinator address, secret, job
id, worker id, starter, host, elastic, growth), calls fn, and sends back one `WorkerResult`.
Attempt 0 of task `slot` is worker `w<slot>`; a retry (attempt k) is `w<slot>.<k>`, a new
worker that joins as a replacement and heals from its peers.

An exception raised by fn is a bug, not a fault: it is caught here, reported to the
coordinator (so peers stop waiting for this worker at once) and returned as the task's
result, so Spark never retries it. A fault kills the process instead (SIGKILL, an executor
lost, or the coordinator's fence order below), which fails the task and lets Spark retry it.
An exception that is only the consequence of a lost peer (launch.child's CASCADE: WorkerLost
escaping a fn that does not recover) is a fault too, as under `phalanx run`: in an elastic
job the task fails after reporting it, so Spark retries it as a replacement.

The task is also the worker's starter: a thread long-polls the coordinator for a fence order
(this worker was declared lost, e.g. hung in user code, while its process still runs) and
then kills this process, so peers blocked in a collective fail fast and Spark starts a
replacement. PySpark reuses Python workers between tasks, so the task leaves the job
(`phalanx.shutdown()`) and restores the environment before it returns.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import env
from ..coord.client import CoordClient, parse_address
from ..errors import RendezvousError
from .outcome import WorkerResult

MAX_PICKLED_EXCEPTION = 1 << 20
"""Bytes: a larger pickled exception is not sent back (its type, message and traceback are)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class TaskSpec:
    """What every task of one `run` call needs to join its job (pickled into the task)."""

    job_id: str
    address: str
    """The coordinator's host:port, in the driver."""
    secret: str
    num_workers: int
    timeout: float
    heartbeat_timeout: float
    elastic: bool
    """Survivors re-form after a loss (min_workers < num_workers, or Spark retries tasks)."""
    growth: bool
    """Replacements may join mid-job (Spark retries failed tasks)."""
    forwarded: dict[str, str] = field(default_factory=dict)
    """Job-wide PHALANX_* settings of the driver's environment (see `env.FORWARDED`)."""


def worker_id(slot: int, attempt: int) -> str:
    return f"w{slot}" if attempt == 0 else f"w{slot}.{attempt}"


def entry(spec: TaskSpec, fn: Callable[..., Any], args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> Callable[[Iterable[int]], list[WorkerResult]]:
    """The mapPartitions function of one worker's one-task job (its partition holds the slot)."""
    def run_partition(slots: Iterable[int]) -> list[WorkerResult]:
        from pyspark import TaskContext
        ctx = TaskContext.get()
        attempt = ctx.attemptNumber() if ctx is not None else 0
        return [run_worker(spec, fn, args, kwargs, slot, attempt) for slot in slots]
    return run_partition


def _local_address(coordinator: str) -> str:
    """The address of this host's interface that reaches the coordinator: Gloo binds there."""
    host, port = parse_address(coordinator)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                           socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def run_worker(spec: TaskSpec, fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any], slot: int, attempt: int) -> WorkerResult:
    """Run fn as worker `slot` (attempt `attempt`) of the job; never raises for fn's errors."""
    me = worker_id(slot, attempt)
    starter = f"spark-task-{me}"
    host = socket.gethostname()
    wenv = {**spec.forwarded,
            env.COORD_ADDR: spec.address, env.SECRET: spec.secret, env.JOB_ID: spec.job_id,
            env.WORKER_ID: me, env.STARTER: starter, env.HOST: host, env.RANK: str(slot),
            env.SIZE: str(spec.num_workers), env.TIMEOUT: str(spec.timeout),
            env.HEARTBEAT_TIMEOUT: str(spec.heartbeat_timeout),
            env.ELASTIC: "1" if spec.elastic else "0", env.GROWTH: "1" if spec.growth else "0",
            env.BIND_ADDR: _local_address(spec.address)}
    saved = {k: os.environ.get(k) for k in wenv}
    os.environ.update(wenv)
    result = WorkerResult(slot=slot, attempt=attempt, worker=me, host=host, pid=os.getpid())
    fence = _Fence(spec, starter, me)
    retry = False
    try:
        try:
            _keep(result, fn(*args, **kwargs))
        except SystemExit as e:
            # Code 0: e.g. a replacement that arrived after the last step (nothing to return).
            if e.code not in (0, None):
                _record(result, e)
        except BaseException as e:  # a bug in fn (or one it let through): never retried
            _record(result, e)
            retry = spec.elastic and bool(result.error and result.error.get("cascade")) \
                and not _job_failing()
        _note_place(result)
    finally:
        fence.stop()
        runtime = sys.modules.get("phalanx.runtime")
        if runtime is not None:
            try:  # leave the job: PySpark may reuse this process for other tasks
                runtime.shutdown()
            except Exception:  # raising here would make Spark retry a task that ended
                pass
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if retry:
        record = result.error or {}
        raise PeerLost(f"worker {me} raised {record.get('type')}: {record.get('message')}; a "
                       "consequence of a lost peer, so Spark retries this task as a replacement")
    return result


class PeerLost(RuntimeError):
    """Fails a task whose fn raised only because a peer was lost, so that Spark retries it."""


def _job_failing() -> bool:
    """The coordinator said the job is failing (a retry would only be turned away)."""
    runtime = sys.modules.get("phalanx.runtime")
    rt = runtime.active() if runtime is not None else None
    client = getattr(rt, "client", None)
    return bool(client is not None and client.status.get("failed"))


def _keep(result: WorkerResult, value: Any) -> None:
    """Pickle fn's return value here, so one that cannot travel is fn's bug (reported like an
    exception) rather than a failed task that Spark would retry."""
    from pyspark import cloudpickle
    try:
        result.payload = cloudpickle.dumps(value)
    except Exception as e:
        raise TypeError(f"fn returned a {type(value).__name__} that cannot be pickled back to "
                        f"the driver: {type(e).__name__}: {e}") from e
    result.returned = True


def _note_place(result: WorkerResult) -> None:
    runtime = sys.modules.get("phalanx.runtime")
    rt = runtime.active() if runtime is not None else None
    place = getattr(getattr(rt, "group", None), "place", None)
    if place is not None:
        result.rank, result.generation = int(place.rank), int(place.generation)


def _record(result: WorkerResult, exc: BaseException) -> None:
    """Keep the exception in the result and tell the coordinator this worker failed."""
    from ..launch.child import error_record
    _note_place(result)
    record = error_record(exc)
    record["rank"] = result.rank
    result.error = record
    try:
        data = pickle.dumps(exc)
        result.exception = data if len(data) <= MAX_PICKLED_EXCEPTION else None
    except Exception:  # an exception holding a lock, a socket ...: the record names it
        result.exception = None
    runtime = sys.modules.get("phalanx.runtime")
    rt = runtime.active() if runtime is not None else None
    if rt is not None:
        try:
            rt.report_failure(record)
        except Exception:  # the coordinator may be gone; the task's result still says it
            pass


class _Fence:
    """Kills this process when the coordinator orders its worker fenced (declared lost)."""

    def __init__(self, spec: TaskSpec, starter: str, worker: str) -> None:
        self._starter, self._worker = starter, worker
        self._done = threading.Event()
        self._client: CoordClient | None = None
        self._thread: threading.Thread | None = None
        try:
            self._client = CoordClient(spec.address, spec.secret, starter)
        except RendezvousError:
            return  # the coordinator is unreachable: px.init() will say so in fn
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name="phalanx-spark-fence")
        self._thread.start()

    def _watch(self) -> None:
        assert self._client is not None  # the thread starts only with a client
        while not self._done.is_set():
            try:
                reply = self._client.watch(self._starter, [], timeout=1.0)
            except RendezvousError:
                return  # stop() closed the link, or the driver ended the job
            if any(order and order[0] == self._worker for order in reply.get("fence", [])):
                os.kill(os.getpid(), signal.SIGKILL)

    def stop(self) -> None:
        self._done.set()
        if self._client is not None:
            self._client.close(leave=False)  # also wakes the long poll
        if self._thread is not None:
            self._thread.join(timeout=2)
