"""Horovod's process sets. phalanx reduces over the whole job only, so `global_process_set`
is fully supported and any other set is refused with NotImplementedError, naming the set.

Building a set (`ProcessSet([0, 1])`) works as in Horovod; registering it (`init(process_sets=
[...])`, `add_process_set`) or passing it to a collective is what raises. A set holding every
rank duplicates the global set and is refused with ValueError, as Horovod does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_UNSUPPORTED = ("phalanx runs collectives over the whole job only (no sub-groups yet); use "
                "hvd.global_process_set, or start a separate job for the subset")


class ProcessSet:
    """A set of ranks that runs collectives together (only the global set is supported)."""

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

    def _invalidate(self) -> None:
        self.process_set_id = None

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


def setup(size: int, wanted: list[ProcessSet]) -> None:
    """Called by `init()`: fill in the global set's ranks and register `wanted` sets."""
    global_process_set.ranks = list(range(size))
    global_process_set.process_set_id = 0
    for i, ps in enumerate(wanted):
        if not isinstance(ps, ProcessSet):
            raise ValueError(f"init(process_sets=...): entry {i} is {ps!r}, not an "
                             "hvd.ProcessSet")
        _refuse(ps, size, f"init(process_sets=...) entry {i}")


def teardown() -> None:
    """Called by `shutdown()`: nothing to free (there are no sub-groups)."""


def _refuse(ps: ProcessSet, size: int, what: str) -> None:
    if ps.ranks == list(range(size)):
        ps._invalidate()
        raise ValueError(f"{what}: {ps} holds every rank, which duplicates "
                         "hvd.global_process_set; use hvd.global_process_set")
    raise NotImplementedError(f"{what}: process set with ranks {ps.ranks}: {_UNSUPPORTED}")


def add_process_set(process_set: ProcessSet | Iterable[int]) -> ProcessSet:
    """Refused for every set (see the module docstring); never returns."""
    from .basics import require_init
    require_init("add_process_set")
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    _refuse(ps, _global_size(), "add_process_set")
    raise AssertionError("unreachable")  # _refuse always raises


def remove_process_set(process_set: ProcessSet) -> bool:
    """False, as in Horovod for the global set or a set that is not registered."""
    return False


def check(process_set: Any, what: str) -> None:
    """Refuse any process set but the global one, naming the operation."""
    if process_set is global_process_set or (
            isinstance(process_set, ProcessSet) and process_set.process_set_id == 0):
        n = _global_size()
        if len(global_process_set.ranks or ()) != n:   # the job re-formed with another size
            global_process_set.ranks = list(range(n))
        return
    if not isinstance(process_set, ProcessSet):
        raise ValueError(f"{what}(process_set={process_set!r}): pass an hvd.ProcessSet, "
                         "normally hvd.global_process_set")
    raise NotImplementedError(f"{what}(process_set={process_set}): {_UNSUPPORTED}")
