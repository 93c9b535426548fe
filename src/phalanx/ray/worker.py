"""The Ray actor that hosts one phalanx worker, and what it hands back to the driver.

The driver creates one actor per worker (a plain class made remote by `ray.remote` in the
driver, so this module imports neither Ray nor torch). `where()` says where the actor landed;
`run()` writes the PHALANX_* environment the driver computed, calls the user's function, whose
`px.init()` joins the job, and returns an `Outcome`: the function's value, or the exception it
raised as an error record (type, message, file:line, traceback), which is also reported to the
coordinator so peers stop waiting for this worker at once. An exception is a bug: the worker
does not leave the job cleanly, and the driver fails the call.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import env
from ..errors import PhalanxError
from ..launch.child import error_record


@dataclass(kw_only=True, slots=True)
class Where:
    """Where an actor runs, as the actor itself sees it."""

    node_id: str
    """Ray node id."""
    ip: str
    """The node's IP address (Ray's name for the node)."""
    hostname: str
    pid: int
    """The actor's process id."""
    gpu_ids: list[str] = field(default_factory=list)
    """GPUs Ray assigned to this actor (ids as CUDA_VISIBLE_DEVICES lists them)."""


@dataclass(kw_only=True, slots=True)
class Outcome:
    """How one worker's call of the user's function ended."""

    worker: str
    """Its worker id."""
    returned: bool = False
    """The function returned; `value` is its result."""
    value: Any = None
    error: dict[str, Any] | None = None
    """The exception it raised (see `phalanx.launch.child.error_record`), if any."""
    exception: bytes | None = None
    """That exception pickled, when it pickles (the driver chains it as the cause)."""
    rank: int = -1
    """Its rank in the last generation it belonged to; -1 if unknown."""
    generation: int = 0
    """That generation's number; 0 if it never joined one."""


def _runtime() -> Any:
    """phalanx.runtime, only if the user's function imported it (never imports torch)."""
    return sys.modules.get("phalanx.runtime")


def _placement() -> tuple[int, int]:
    """(rank, generation) of this worker's newest generation; (-1, 0) if it is not in one."""
    rt = _runtime()
    active = rt.active() if rt is not None else None
    if active is None:
        return -1, 0
    place = active.group.place
    return int(place.rank), int(place.generation)


def _pickled(exc: BaseException) -> bytes | None:
    try:
        from ray import cloudpickle
        data = cloudpickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:  # noqa: BLE001 - anything may fail to pickle; the record still tells
        return None


class WorkerActor:
    """One phalanx worker as a Ray actor (made remote by the driver)."""

    def __init__(self, label: str) -> None:
        self._label = label

    def __repr__(self) -> str:
        # Ray prefixes the lines this actor prints with its repr: "(rank1 pid=...) ...".
        return self._label

    def where(self) -> Where:
        import ray
        ctx = ray.get_runtime_context()
        return Where(node_id=ctx.get_node_id(), ip=ray.util.get_node_ip_address(),
                     hostname=socket.gethostname(), pid=os.getpid(),
                     gpu_ids=[str(g) for g in ctx.get_accelerator_ids().get("GPU", [])])

    def run(self, call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]],
            environ: dict[str, str]) -> Outcome:
        """Call `fn(*args, **kwargs)`, with `call` = (fn, args, kwargs), as worker
        `environ[PHALANX_WORKER_ID]` of the job."""
        fn, args, kwargs = call
        for name in env.ALL:  # whatever the raylet's environment held is not this job's
            os.environ.pop(name, None)
        os.environ.update(environ)
        worker = environ[env.WORKER_ID]
        exc: BaseException
        try:
            value = fn(*args, **kwargs)
        except SystemExit as e:
            if e.code in (None, 0):
                # A clean exit without a value: e.g. a replacement that arrived after the
                # others finished (px.init() exits it), or fn called sys.exit(0).
                rank, generation = _placement()
                self._leave()
                return Outcome(worker=worker, rank=rank, generation=generation)
            exc = e
        except BaseException as e:  # noqa: BLE001 - every exception of user code is reported
            exc = e
        else:
            rank, generation = _placement()
            self._leave()
            return Outcome(worker=worker, returned=True, value=value, rank=rank,
                           generation=generation)
        return self._failed(worker, exc)

    def _failed(self, worker: str, exc: BaseException) -> Outcome:
        record = error_record(exc)
        rt = _runtime()
        active = rt.active() if rt is not None else None
        if active is not None:
            try:  # not a clean leave, not a silent loss: peers stop waiting for us at once
                active.report_failure(record)
            except (PhalanxError, OSError):  # the coordinator is gone; the driver gets it anyway
                pass
        # A consequence of a peer's failure gets one line; the root cause its whole traceback.
        sys.stderr.write(f"{record['type']}: {record['message']}\n" if record["cascade"]
                         else record["traceback"])
        sys.stderr.flush()
        rank, generation = _placement()
        return Outcome(worker=worker, error=record, exception=_pickled(exc), rank=rank,
                       generation=generation)

    def _leave(self) -> None:
        """Leave the job cleanly (fn finished), as atexit does for `phalanx run` workers."""
        sys.stdout.flush()
        rt = _runtime()
        if rt is not None:
            rt.shutdown()
