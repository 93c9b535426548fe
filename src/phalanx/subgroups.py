"""Subgroups: collectives among some of the job's ranks (`px.new_group`, as torch's
`new_group`; the Horovod facade's process sets use it).

    evens = px.new_group([0, 2])          # every rank calls it, with the same ranks
    if evens.included():
        px.allreduce(x, group=evens)      # only ranks 0 and 2 take part

Ranks are job ranks of the current generation. After a re-formation (a lost or added worker)
the job's ranks are renumbered 0..size-1 and every subgroup is rebuilt over the same rank
numbers, now naming the new generation's workers; a subgroup that names a rank the job no
longer has is refused when used. A `root` passed with `group=` is a job rank, as in torch.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import runtime
from .comm import collectives as C
from .comm.group import Group, Placement
from .comm.subgroup import open_subgroup
from .errors import ConfigError


class Subgroup:
    """Some of the job's ranks, running collectives among themselves (`new_group`)."""

    def __init__(self, members: tuple[int, ...]) -> None:
        self.members = members

    @property
    def ranks(self) -> list[int]:
        """The member job ranks, ascending."""
        return list(self.members)

    def included(self) -> bool:
        """Whether this worker is a member."""
        return runtime.current().group.place.rank in self.members

    def rank(self) -> int:
        """This worker's rank within the subgroup (ConfigError if it is not a member)."""
        return self.members.index(_check_member(self, "Subgroup.rank()").rank)

    def size(self) -> int:
        """Number of member ranks."""
        return len(self.members)

    def __repr__(self) -> str:
        return f"Subgroup(ranks={list(self.members)})"


def new_group(ranks: Iterable[int]) -> Subgroup:
    """Make a subgroup of `ranks` (job ranks). A collective over the whole job: every rank
    calls it with the same ranks, in the same order as its other `new_group` calls (ConfigError
    on every rank otherwise); the members connect before it returns."""
    rt = runtime.current()
    g = rt.group
    members = _check_ranks(ranks, g.place.size)
    seen = g.run("new_group", lambda: C.allgather_object(g, members, rt.object_key))
    if any(m != members for m in seen):
        per_rank = "; ".join(f"rank {r}: {list(m)}" for r, m in enumerate(seen))
        raise ConfigError(f"new_group: ranks asked for different groups ({per_rank}); every "
                          "rank must call new_group with the same ranks, in the same order")
    if members not in rt.subgroup_members:
        rt.subgroup_members.append(members)
    if g.place.rank in members:
        open_subgroup(g, members)
    return Subgroup(members)


def resolve(group: Subgroup | None, op: str) -> Group:
    """The communicator for `op`: the job's group, or this generation's subgroup."""
    if group is None:
        return runtime.current().group
    if not isinstance(group, Subgroup):
        raise ConfigError(f"{op}(group={group!r}): pass a group made by px.new_group(ranks), "
                          "or None for the whole job")
    _check_member(group, op)
    return open_subgroup(runtime.current().group, group.members)


def root_in(group: Subgroup | None, root: int, op: str) -> int:
    """Job rank `root` as a rank of `group` (unchanged without a group)."""
    if group is None:
        return root
    if root not in group.members:
        raise ConfigError(f"{op}(root={root}, group={group}): the root must be one of the "
                          "group's ranks (a job rank)")
    return group.members.index(root)


def release(group: Subgroup) -> None:
    """Forget `group` (collective, like `new_group`): later generations no longer rebuild it
    and this rank's process group for it closes now."""
    rt = runtime.current()
    if group.members in rt.subgroup_members:
        rt.subgroup_members.remove(group.members)
    sub = rt.group.subgroups.pop(group.members, None)
    if sub is not None:
        sub.close()


def _check_member(group: Subgroup, op: str) -> Placement:
    """This rank's placement in the job, if it is a member of `group` in this generation."""
    place = runtime.current().group.place
    if max(group.members) >= place.size:
        raise ConfigError(f"{op}: {group} names rank {max(group.members)} but generation "
                          f"{place.generation} has {place.size} rank(s) (the job re-formed "
                          "smaller); make a new group of ranks it has")
    if place.rank not in group.members:
        raise ConfigError(f"{op}: rank {place.rank} is not in {group}; call it on the "
                          "members only (group.included())")
    return place


def _check_ranks(ranks: Iterable[int], size: int) -> tuple[int, ...]:
    try:
        members = tuple(sorted(set(ranks)))
    except TypeError as e:
        raise ConfigError(f"new_group(ranks={ranks!r}): pass a list of job ranks, e.g. "
                          "[0, 2]") from e
    bad = [r for r in members if isinstance(r, bool) or not isinstance(r, int)
           or not 0 <= r < size]
    if not members or bad:
        raise ConfigError(f"new_group(ranks={ranks!r}): ranks must be a non-empty list of "
                          f"ints in [0, {size}) (the job has {size} rank(s)); got {bad or '[]'}")
    return members
