"""Collectives among a subset of one generation's ranks: torch's `new_group`, Horovod's
process sets.

A subgroup is a full `Group` of its own (Gloo process group, shared memory when its members
share a host, NCCL for CUDA) whose rank i is the i-th smallest member's job rank. Its keys and
segment names are scoped by a tag derived from the member list, so subgroups never collide with
the generation's own group or with each other. Only members build it, and building is
collective among them (each member waits for the others to connect): build a job's subgroups in
the same order on every rank (`Runtime` does, at each re-formation). It is closed with its
generation's group.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .group import Group, Placement


def sub_placement(place: Placement, members: Sequence[int]) -> Placement:
    """Where this rank sits among `members` (sorted job ranks that include it)."""
    me = place.hosts[place.rank]
    here = [m for m in members if place.hosts[m] == me]
    return Placement(generation=place.generation, rank=list(members).index(place.rank),
                     size=len(members), local_rank=here.index(place.rank), local_size=len(here),
                     hosts=[place.hosts[m] for m in members], pids=[place.pids[m] for m in members])


def open_subgroup(parent: Group, members: tuple[int, ...]) -> Group:
    """The subgroup of `members` (cached on `parent`); this rank must be one of them."""
    sub = parent.subgroups.get(members)
    if sub is not None:
        return sub
    tag = "set" + hashlib.sha256(repr(members).encode()).hexdigest()[:12]
    sub = Group(sub_placement(parent.place, members), parent._sub_store(tag), parent.config,
                job_id=f"{parent.job_id}-{tag}", secret=parent._secret,
                abort_check=parent._abort_check,
                status=parent._lost_ranks, recorder=parent.recorder, scope=f"{tag}/")
    sub.members = members
    parent.subgroups[members] = sub
    return sub
