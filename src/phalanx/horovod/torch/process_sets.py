"""Horovod's process sets on phalanx subgroups (`px.new_group`).

`hvd.init(process_sets=[ProcessSet([0, 2]), ...])` or, with `init(process_sets="dynamic")`,
`hvd.add_process_set([0, 2])` registers a set on every rank (both are collective over the whole
job, as in Horovod); collectives given `process_set=` then run among its members only, matched by
name among them (each set negotiates on its own). A rank outside the set that calls one gets
ValueError. `root_rank` of a broadcast within a set is a job rank, as in Horovod.

`hvd.DistributedOptimizer(process_set=...)` reduces gradients among the set's ranks (each set
trains its own replica); on a rank outside the set it steps on the local gradients, as in
Horovod. Difference: a set used after the job re-formed (a lost or added
worker) names ranks of the new generation (phalanx renumbers ranks 0..size-1 and rebuilds every
set over the same numbers; a set naming a rank the job no longer has is refused).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

_state: dict[str, Any] = {"dynamic": False, "sets": {}, "next_id": 1}
"""`sets`: registered ProcessSets by id (the global set is 0 and not listed)."""


class ProcessSet:
    """A set of ranks that runs collectives together."""

    process_set_id: int | None = None
    ranks: list[int] | None = None
    mpi_comm: Any = None

    def __init__(self, ranks_or_comm: Iterable[int]) -> None:
        if isinstance(ranks_or_comm, (str, bytes)) or not isinstance(ranks_or_comm, Iterable):
            raise ValueError(f"ProcessSet({ranks_or_comm!r}): pass a list of ranks (phalanx has "
                             "no MPI communicators)")
        ranks = sorted(ranks_or_comm)
        if any(not isinstance(r, int) or isinstance(r, bool) for r in ranks):
            raise ValueError(f"ProcessSet({ranks!r}): ranks must be ints, e.g. ProcessSet([0, 1])")
        self.ranks = ranks
        self._group: Any = None

    def _invalidate(self) -> None:
        self.process_set_id = None
        self._group = None

    def size(self) -> int | None:
        """Number of ranks in the set, or None if it is not registered."""
        if self.process_set_id is None:
            return None
        return _global_size() if self.process_set_id == 0 else len(self.ranks or ())

    def rank(self) -> int | None:
        """This worker's rank within the set, or None if it is not registered."""
        if self.process_set_id is None:
            return None
        import phalanx as px
        me = int(px.rank())
        if self.process_set_id == 0:
            return me
        if me not in (self.ranks or ()):
            raise ValueError(f"{self}: rank {me} is not part of this process set")
        return (self.ranks or []).index(me)

    def included(self) -> bool | None:
        """Whether this worker belongs to the set (None if the set has no ranks yet)."""
        if self.ranks is None:
            return None
        if self.process_set_id == 0:
            return True
        import phalanx as px
        return int(px.rank()) in self.ranks

    def __str__(self) -> str:
        return (f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks}, "
                f"mpi_comm={self.mpi_comm})")

    __repr__ = __str__


def _global_size() -> int:
    import phalanx as px
    return int(px.size())


global_process_set = ProcessSet([])
global_process_set.process_set_id = 0


def setup(size: int, wanted: list[ProcessSet], dynamic: bool) -> None:
    """Called by `init()`: fill in the global set's ranks and register `wanted` sets."""
    teardown()
    global_process_set.ranks = list(range(size))
    global_process_set.process_set_id = 0
    _state["dynamic"] = dynamic
    for i, ps in enumerate(wanted):
        if not isinstance(ps, ProcessSet):
            raise ValueError(f"init(process_sets=...): entry {i} is {ps!r}, not an "
                             "hvd.ProcessSet")
        _register(ps, size, f"init(process_sets=...) entry {i}")


def teardown() -> None:
    """Called by `shutdown()` and `init()`: forget the registered sets."""
    for ps in list(_state["sets"].values()):
        ps._invalidate()
    _state["sets"] = {}
    _state["next_id"] = 1


def _register(ps: ProcessSet, size: int, what: str) -> ProcessSet:
    import phalanx as px
    ranks = ps.ranks or []
    if ranks == list(range(size)):
        ps._invalidate()
        raise ValueError(f"{what}: {ps} holds every rank, which duplicates "
                         "hvd.global_process_set; use hvd.global_process_set")
    if not ranks or ranks[0] < 0 or ranks[-1] >= size or len(set(ranks)) != len(ranks):
        raise ValueError(f"{what}: process set ranks {ranks} must be distinct ranks of this "
                         f"job (0..{size - 1})")
    if any(other.ranks == ranks for other in _state["sets"].values()):
        raise ValueError(f"{what}: a process set with ranks {ranks} is already registered; "
                         "use that one")
    ps._group = px.new_group(ranks)     # collective over the job: every rank registers it
    ps.process_set_id = _state["next_id"]
    _state["next_id"] += 1
    _state["sets"][ps.process_set_id] = ps
    return ps


def add_process_set(process_set: ProcessSet | Iterable[int]) -> ProcessSet:
    """Register a set after `init(process_sets="dynamic")` (collective over the job: every
    rank calls it with the same ranks) and return it."""
    from .basics import require_init
    require_init("add_process_set")
    if not _state["dynamic"]:
        raise ValueError("add_process_set: process sets can be added after init() only with "
                         "hvd.init(process_sets='dynamic') (Horovod: "
                         "HOROVOD_DYNAMIC_PROCESS_SETS=1); or list them in "
                         "hvd.init(process_sets=[...])")
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    return _register(ps, _global_size(), "add_process_set")


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregister a set and close its subgroup (collective, as in Horovod); False for the
    global set or a set that is not registered."""
    from ...subgroups import release
    if (not isinstance(process_set, ProcessSet) or process_set.process_set_id in (None, 0)
            or _state["sets"].get(process_set.process_set_id) is not process_set):
        return False
    del _state["sets"][process_set.process_set_id]
    release(process_set._group)
    process_set._invalidate()
    return True


class SetComm:
    """phalanx's collective API bound to one process set: `rank()`/`size()` within the set,
    every collective with `group=` its subgroup (roots stay job ranks)."""

    def __init__(self, ps: ProcessSet) -> None:
        self.process_set, self.group = ps, ps._group

    def size(self) -> int:
        return int(self.group.size())

    def rank(self) -> int:
        return int(self.group.rank())

    def __getattr__(self, name: str) -> Any:
        import phalanx as px
        return functools.partial(getattr(px, name), group=self.group)


def check(process_set: Any, what: str) -> Any:
    """The communicator of `process_set` for `what`: the phalanx module for the global set, a
    `SetComm` for a registered set this rank belongs to; ValueError otherwise."""
    import phalanx as px
    if process_set is global_process_set or (
            isinstance(process_set, ProcessSet) and process_set.process_set_id == 0):
        n = _global_size()
        if len(global_process_set.ranks or ()) != n:   # the job re-formed with another size
            global_process_set.ranks = list(range(n))
        return px
    if not member(process_set, what):
        raise ValueError(f"{what}(process_set={process_set}): rank {px.rank()} is not in this "
                         "process set; call it only on the set's ranks (process_set.included())")
    return SetComm(process_set)


def member(process_set: Any, what: str) -> bool:
    """Whether this worker belongs to `process_set`, a registered set (ValueError otherwise)."""
    if process_set is global_process_set or (
            isinstance(process_set, ProcessSet) and process_set.process_set_id == 0):
        return True
    if not isinstance(process_set, ProcessSet):
        raise ValueError(f"{what}(process_set={process_set!r}): pass an hvd.ProcessSet, "
                         "normally hvd.global_process_set")
    if _state["sets"].get(process_set.process_set_id) is not process_set:
        raise ValueError(f"{what}(process_set={process_set}): the set is not registered; pass "
                         "it to hvd.init(process_sets=[...]) or hvd.add_process_set() first")
    return bool(process_set.included())


def set_of(comm: Any) -> ProcessSet:
    """The process set a communicator from `check` belongs to."""
    return getattr(comm, "process_set", global_process_set)


def set_id(comm: Any) -> int:
    """Its process set id (0: global), which keys name matching."""
    return int(set_of(comm).process_set_id or 0)
