"""How ranks agree on which queued Horovod operations to run: one negotiation round.

Horovod's coordinator runs a named operation once every rank has submitted it, whatever the
order of submission. phalanx has no background coordinator: a rank negotiates when it needs
a result (`synchronize`, `poll`, the synchronous forms; see `handles`), once every rank of
the set has arrived at the round in the coordinator (`gate`). A round is:

1. fast path: every rank hashes its queue (kind, name and signature of each queued
   operation, in submission order) and one small allreduce (max of the digest and of its
   negation) tells whether all queues are identical; if so, they all run, in that order;
2. otherwise every rank's queue is exchanged (`allgather_object`) and the operations queued
   on every rank run in rank 0's submission order; an operation whose signature (dtype,
   shape, op, root...) differs between ranks fails with `MismatchError` instead;
3. ranks that called `join()` (their queue holds `JOIN`) stand in for the others: an
   operation queued on every rank still working runs, and a joined rank that lacks it
   takes part with zeros of the signature it was sent (allreduces and DistributedOptimizer
   steps, as in Horovod; other kinds fail with `JoinedError` on the ranks that submitted
   them). `join()` itself runs once every rank has joined;
4. a round where nothing is common to every rank is idle. After
   HOROVOD_STALL_CHECK_TIME_SECONDS (default 60) of idle rounds a warning names the missing
   operations; after HOROVOD_STALL_SHUTDOWN_TIME_SECONDS (default 120; the smallest value
   of any rank counts) every rank raises `StallError` naming, per rank, what is missing.
   Horovod's 0 ("wait forever") is refused: phalanx never hangs.

Every decision is computed from data every rank holds after the exchange, so all ranks take
the same path, run the same operations and raise the same errors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ... import env
from ...errors import CollectiveMismatch, ConfigError
from . import announce

STALL_CHECK_TIME = "HOROVOD_STALL_CHECK_TIME_SECONDS"
STALL_SHUTDOWN_TIME = "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"
DEFAULT_STALL_CHECK_S = 60.0
DEFAULT_STALL_SHUTDOWN_S = 120.0
_MASK = (1 << 62) - 1
_LISTED = 8
"""How many missing operations a message lists per rank."""

Key = tuple[str, str]
JOIN: Key = ("join", "join")
"""The operation `hvd.join()` queues: its rank has joined."""
STAND_IN_KINDS = ("allreduce", "grouped_allreduce", "optimizer")
"""Kinds a joined rank takes part in with zeros (Horovod: allreduces only)."""
STAND_IN_COMPRESSIONS = ("none", "fp16", "bf16")
"""DistributedOptimizer compressions whose reduction a joined rank can mirror."""
Desc = tuple[str, str, tuple[Any, ...]]
"""(kind, name, signature) of a queued operation; the signature is ((field, value), ...)."""


class MismatchError(CollectiveMismatch):
    """Ranks submitted an operation of the same kind and name with different dtype, shape,
    op, root... (Horovod's coordinator reports these as "Mismatched ...")."""


class JoinedError(CollectiveMismatch):
    """An operation other than an allreduce was submitted while some rank had joined: joined
    ranks stand in only for allreduces (Horovod raises "... is not supported with Join")."""


class StallError(CollectiveMismatch):
    """No queued operation was submitted by every rank within the stall time: ranks wait for
    operations that other ranks never submit (a deadlock under Horovod)."""


def show(key: Key) -> str:
    """An operation as messages name it, e.g. ``allreduce 'grad.w'``."""
    return f"{key[0]} {key[1]!r}"


def stall_limits() -> tuple[float, float]:
    """(seconds before the stall warning, seconds before StallError), from the environment."""
    warn = env.get_float(STALL_CHECK_TIME, DEFAULT_STALL_CHECK_S)
    limit = env.get_float(STALL_SHUTDOWN_TIME, DEFAULT_STALL_SHUTDOWN_S)
    if limit <= 0:
        raise ConfigError(f"{STALL_SHUTDOWN_TIME}={limit:g}: phalanx never waits forever for a "
                          f"stalled operation; set a positive number of seconds (default "
                          f"{DEFAULT_STALL_SHUTDOWN_S:g}) or unset it")
    return warn, limit


@dataclass(slots=True)
class Plan:
    """What one round decided, the same on every rank."""

    run: list[Key] = field(default_factory=list)
    """Operations to start now, in this order."""
    sigs: dict[Key, tuple[Any, ...]] = field(default_factory=dict)
    """The signature of each operation in `run` (a joined rank that lacks one stands in
    with zeros of this shape)."""
    errors: dict[Key, Exception] = field(default_factory=dict)
    """Operations that fail instead (mismatched signatures)."""
    stall: str | None = None
    """Set on an idle round past the stall limit: the StallError message."""
    warning: str | None = None
    """Set on an idle round past the warning time: what to log."""
    announced: dict[str, Any] | None = None
    """Set when the other ranks were in a DistributedOptimizer step (`announce.decode`): a
    joined rank stands in for it, any other rank has a mismatch."""


def digest(descs: Sequence[Desc]) -> tuple[int, int]:
    """Two 62-bit words hashing a queue (kind, name, signature, in order)."""
    h = hashlib.blake2b(repr(list(descs)).encode(), digest_size=16).digest()
    return int.from_bytes(h[:8], "little") & _MASK, int.from_bytes(h[8:], "little") & _MASK


def first_words(descs: Sequence[Desc], px: Any) -> list[int]:
    """A round's first allreduce (max over `px`): the queues' digests, and an optimizer step's
    announcement if the other ranks are in one (see `announce`)."""
    return px.allreduce(announce.round_payload(*digest(descs)), op="max").tolist()


def all_same(top: list[int]) -> bool:
    """True when every rank's queue hashed the same (from `first_words`)."""
    return top[0] == -top[2] and top[1] == -top[3]


def exchange(descs: list[Desc], target: Key, idle_s: float, comm: Any = None) -> Plan:
    """One negotiation round (a collective over `comm`, a process set's communicator; None:
    the whole job): every rank with a queued operation calls it."""
    if comm is None:
        import phalanx as comm
    px = comm
    if px.size() == 1:
        return Plan(run=[(k, n) for k, n, _ in descs])
    top = first_words(descs, px)
    step = announce.decode(top)
    if step is not None:
        return Plan(announced=step)
    if all_same(top):
        return Plan(run=[(k, n) for k, n, _ in descs])
    warn, limit = stall_limits()
    infos = px.allgather_object({"ops": descs, "target": target, "idle": idle_s,
                                 "limit": limit})
    plan = decide([i["ops"] for i in infos])
    if plan.run or plan.errors:
        return plan
    waited, limit = max(i["idle"] for i in infos), min(i["limit"] for i in infos)
    if waited >= min(warn, limit):
        text = stall_text(infos, waited)
        if waited >= limit:
            plan.stall = (f"hvd: stalled for {waited:.1f}s ({STALL_SHUTDOWN_TIME}={limit:g}): "
                          f"{text}")
        else:
            plan.warning = f"hvd: stalled for {waited:.1f}s: {text}"
    return plan


def decide(queues: Sequence[Sequence[Desc]]) -> Plan:
    """Which operations run and which fail. Pure: every rank computes the same.

    An operation runs when every rank that has not joined queued it (in the first such rank's
    order) and the signatures agree; it fails when they differ, or when joined ranks lack it
    and cannot stand in for its kind. `JOIN` runs once every rank has joined."""
    sigs = [{(k, n): s for k, n, s in q} for q in queues]
    working = [r for r, s in enumerate(sigs) if JOIN not in s]
    required = working or list(range(len(sigs)))   # once all joined, what all of them queued
    lead = required[0]
    plan = Plan()
    for kind, name, _ in queues[lead]:
        key = (kind, name)
        if key == JOIN or any(key not in sigs[r] for r in required):
            continue
        holders = [r for r, s in enumerate(sigs) if key in s]
        error: CollectiveMismatch | None = mismatch(key, [sigs[r][key] for r in holders],
                                                    holders)
        absent = [r for r in range(len(sigs)) if r not in holders]
        if error is None and absent and not can_stand_in(kind, sigs[lead][key]):
            verb = "has" if len(absent) == 1 else "have"
            error = JoinedError(
                f"{show(key)} cannot run while {_ranks(absent)} {verb} joined: joined ranks "
                "stand in (with zeros) only for allreduces, grouped "
                "allreduces and DistributedOptimizer steps without 1-bit/top-k compression, as "
                "in Horovod; submit it before hvd.join() on every rank")
        if error is None:
            plan.run.append(key)
            plan.sigs[key] = sigs[lead][key]
        else:
            plan.errors[key] = error
    if not working:
        plan.run.append(JOIN)
        plan.sigs[JOIN] = ()
    return plan


def can_stand_in(kind: str, sig: tuple[Any, ...]) -> bool:
    """Whether a joined rank can take part in this operation with zeros."""
    if kind not in STAND_IN_KINDS:
        return False
    return kind != "optimizer" or dict(sig).get("compression") in STAND_IN_COMPRESSIONS


def mismatch(key: Key, sigs: Sequence[tuple[Any, ...]],
             ranks: Sequence[int] | None = None) -> MismatchError | None:
    """MismatchError naming the first signature field that differs between ranks (`ranks[i]`
    submitted `sigs[i]`; by default rank i), or None."""
    if all(s == sigs[0] for s in sigs):
        return None
    fields = [dict(s) for s in sigs]
    for f in dict.fromkeys(name for s in sigs for name, _ in s):
        values = [d.get(f, "<absent>") for d in fields]
        if any(v != values[0] for v in values):
            break
    groups: dict[str, list[int]] = {}
    for r, v in zip(ranks if ranks is not None else range(len(values)), values):
        groups.setdefault(repr(v), []).append(r)
    seen = "; ".join(f"{_ranks(rs)}: {v}" for v, rs in groups.items())
    return MismatchError(f"Mismatched {show(key)}: the {f} differs between ranks ({seen}); "
                         f"every rank must submit {show(key)} with the same {f}, or use "
                         "different names for different operations")


def stall_text(infos: Sequence[dict[str, Any]], waited: float) -> str:
    """Which rank waits for what, and which operations each rank is missing."""
    keys = [[(k, n) for k, n, _ in i["ops"]] for i in infos]
    union = list(dict.fromkeys(k for q in keys for k in q))
    waits = "; ".join(f"rank {r} waits for {show(i['target'])}" for r, i in enumerate(infos))
    parts = []
    for r, q in enumerate(keys):
        have = set(q)
        missing = [k for k in union if k not in have]
        if missing:
            listed = ", ".join(show(k) + _same_name(k, q) for k in missing[:_LISTED])
            more = f" and {len(missing) - _LISTED} more" if len(missing) > _LISTED else ""
            parts.append(f"ops missing on rank {r}: {listed}{more}")
    return (f"no queued operation was submitted by every rank ({waits}). " + "; ".join(parts)
            + ". Every rank must submit the same operations (same kind and name); check the "
            "names, and that no rank skips or adds a call")


def _same_name(key: Key, have: Sequence[Key]) -> str:
    other = [k for k in have if k[1] == key[1] and k[0] != key[0]]
    return f" (it has {show(other[0])} under that name)" if other else ""


def _ranks(rs: list[int]) -> str:
    return f"rank {rs[0]}" if len(rs) == 1 else "ranks " + ", ".join(map(str, rs))


def tensor_sig(t: torch.Tensor, *, dim0_free: bool = False) -> tuple[tuple[str, Any], ...]:
    """The fields of a tensor that must agree across ranks: dtype, device type and shape
    (without dim 0 for allgather and alltoall, where ranks may send different row counts)."""
    shape = ("shape after dim 0", tuple(t.shape[1:])) if dim0_free else ("shape", tuple(t.shape))
    return (("dtype", str(t.dtype).removeprefix("torch.")), ("device", t.device.type), shape)


def tensors_sig(ts: Sequence[torch.Tensor], *,
                dim0_free: bool = False) -> tuple[tuple[str, Any], ...]:
    """`tensor_sig` of each tensor of a grouped operation, as one field."""
    return (("tensors", tuple(tuple(v for _, v in tensor_sig(t, dim0_free=dim0_free))
                              for t in ts)),)
