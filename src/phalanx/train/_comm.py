"""The seam between `phalanx.train` and the collective runtime.

Every collective the training layer issues goes through these few functions, which import
`phalanx.api` (never the root package) lazily so that importing `phalanx.train` has no side
effects and unit tests can replace this module's functions with an in-process fake (see
`tests/test_train_unit.py`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Handle(Protocol):
    """An in-flight collective; `wait()` blocks until it is done and returns its result."""

    def wait(self) -> Any: ...


def rank() -> int:
    """This worker's rank in the current job."""
    from .. import api as px
    return int(px.rank())


def size() -> int:
    """The number of workers in the current job."""
    from .. import api as px
    return int(px.size())


def allreduce_async_(t: torch.Tensor, op: str, name: str | None = None,
                     group: Any = None) -> Handle:
    """Start an in-place allreduce of `t` (among `group`'s ranks, a `px.new_group` subgroup;
    None: the whole job); handles complete in issue order."""
    from .. import api as px
    return px.allreduce_async_(t, op=op, name=name, group=group)


class _Finished:
    """The handle of a collective that already ran."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def wait(self) -> Any:
        return self._value


def allreduce_now_(t: torch.Tensor, op: str, name: str | None = None,
                   group: Any = None) -> Handle:
    """In-place allreduce of `t` on the calling thread (after any queued async work, in
    order); returns an already finished handle."""
    from .. import api as px
    return _Finished(px.allreduce_(t, op=op, name=name, group=group))


def cores_per_worker() -> float:
    """CPU cores this worker can count on: its affinity when pinned, else the host's cores
    shared among the job's workers on this host."""
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if cores < (os.cpu_count() or cores):
        return float(cores)
    from .. import runtime
    rt = runtime.active()
    local = rt.group.place.local_size if rt is not None and rt.group is not None else 1
    return cores / max(1, local)


def allgather_async(t: torch.Tensor, group: Any = None) -> Handle:
    """Start an allgather of `t` along dim 0; `wait()` returns the concatenation."""
    from .. import api as px
    return px.allgather_async(t, group=group)


def allreduce(t: torch.Tensor, op: str, name: str | None = None) -> torch.Tensor:
    """Blocking out-of-place allreduce."""
    from .. import api as px
    return px.allreduce(t, op=op, name=name)


def broadcast_(t: torch.Tensor, root: int) -> torch.Tensor:
    """Blocking in-place broadcast of `t` from `root`."""
    from .. import api as px
    return px.broadcast_(t, root=root)


def broadcast_object(obj: Any, root: int) -> Any:
    """Broadcast a picklable object from `root`; every rank returns root's object."""
    from .. import api as px
    return px.broadcast_object(obj, root=root)


def allgather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's picklable object, in rank order."""
    from .. import api as px
    return px.allgather_object(obj, group=group)


def generation() -> int:
    """The current membership generation (changes when workers leave or join)."""
    from .. import api as px
    return int(px.generation())


def shared_buffers(group: Any = None) -> Any:
    """The current generation's `comm.shmbuf.SharedBuffers` of `group` (None: the whole job)
    for buffers reduced every step, or None where there are none (several hosts, no runtime)."""
    from .. import runtime
    if runtime.active() is None:
        return None
    from ..subgroups import resolve
    return resolve(group, "DistributedOptimizer").shared_buffers()


def recorder() -> Any:
    """This process's observe.Recorder (timeline and step metrics), or None before init()."""
    from .. import runtime
    rt = runtime.active()
    return rt.recorder if rt is not None else None


def check_live() -> None:
    """Raise WorkerLost if this generation can no longer complete a step: a peer was declared
    lost, or this worker was fenced or cut off from the coordinator."""
    from .. import runtime
    from ..errors import WorkerLost
    rt = runtime.active()
    if rt is None or rt.client is None:
        return
    reason = rt.client.abort_reason()
    if reason:
        raise WorkerLost(f"not starting this step: {reason}", generation=rt.group.place.generation)
