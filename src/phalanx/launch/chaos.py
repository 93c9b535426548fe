"""Fault injection specs: `--chaos kill:rank=2,step=40`, `stop:rank=1,step=10`, `kill:random,every=50`.

Parsing is pure; workers act on the spec at step boundaries by sending a real signal to
themselves (SIGKILL, or SIGSTOP which the coordinator then detects by missing heartbeats).
"""

from __future__ import annotations

import os
import random
import signal
import sys
from dataclasses import dataclass

KINDS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}
CUT = "cut"
"""Not a signal: sever the worker's coordinator connections (a network cut-off); it keeps
running until the coordinator declares it lost and its launcher fences it."""


@dataclass(kw_only=True, slots=True, frozen=True)
class ChaosRule:
    """One fault: which signal, which rank (or random), at which step or every N steps."""

    kind: str
    rank: int | None = None
    step: int | None = None
    every: int | None = None
    recovery: int | None = None
    seed: int = 0


def parse_chaos(spec: str) -> list[ChaosRule]:
    """Parse ';'-separated rules like 'kill:rank=2,step=40'; ValueError names the bad part."""
    rules: list[ChaosRule] = []
    for part in filter(None, (s.strip() for s in spec.split(";"))):
        kind, _, rest = part.partition(":")
        if kind not in KINDS and kind != CUT:
            raise ValueError(f"--chaos {part!r}: kind {kind!r} is not one of "
                             f"{sorted([*KINDS, CUT])}")
        fields: dict[str, int | None] = {"rank": None, "step": None, "every": None,
                                         "recovery": None, "seed": 0}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if key == "random" and not eq:
                continue
            if key not in fields or not eq or not value.lstrip("-").isdigit():
                raise ValueError(f"--chaos {part!r}: bad field {item!r}; expected rank=N, step=N, "
                                 "every=N, recovery=N, seed=N or random")
            fields[key] = int(value)
        if fields["step"] is None and fields["every"] is None and fields["recovery"] is None:
            raise ValueError(f"--chaos {part!r}: give step=N, every=N or recovery=N")
        rules.append(ChaosRule(kind=kind, rank=fields["rank"], step=fields["step"],
                               every=fields["every"], recovery=fields["recovery"],
                               seed=fields["seed"] or 0))
    if not rules:
        raise ValueError("--chaos is empty; e.g. kill:rank=2,step=40")
    return rules


def should_fire(rule: ChaosRule, *, rank: int, size: int, step: int) -> bool:
    """Pure: does this rule hit this rank at this step?"""
    if rule.recovery is not None:
        return False
    if rule.step is not None:
        hit = step == rule.step
    else:
        assert rule.every is not None  # parse_chaos guarantees one of the two
        hit = step > 0 and step % rule.every == 0
    if not hit:
        return False
    if rule.rank is not None:
        return rank == rule.rank
    # Random victim, the same on every rank for a given step so exactly one rank fires.
    return random.Random(rule.seed * 1_000_003 + step).randrange(size) == rank


def fires_in_recovery(rule: ChaosRule, *, rank: int, recovery: int) -> bool:
    """Pure: does this rule hit this rank during its `recovery`-th recovery (1-based)?"""
    return rule.recovery is not None and rule.recovery == recovery and (
        rule.rank is None or rule.rank == rank)


_cached: tuple[str, list[ChaosRule]] | None = None


def rules_from_env() -> list[ChaosRule]:
    """The rules in PHALANX_CHAOS (parsed once per value); empty when unset."""
    global _cached
    spec = os.environ.get("PHALANX_CHAOS", "")
    if not spec:
        return []
    if _cached is None or _cached[0] != spec:
        _cached = (spec, parse_chaos(spec))
    return _cached[1]


def _fire(kind: str, what: str) -> None:
    if kind == CUT:
        sys.stderr.write(f"[chaos] cutting {what} off from the coordinator\n")
        sys.stderr.flush()
        from .. import runtime
        rt = runtime._runtime
        if rt is not None and rt.client is not None:
            rt.client.sever()
        return
    sys.stderr.write(f"[chaos] sending {KINDS[kind].name} to {what}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), KINDS[kind])


def maybe_inject(rules: list[ChaosRule], *, rank: int, size: int, step: int) -> None:
    """Fire a rule that hits now: a real signal to ourselves, as an operator would send."""
    for rule in rules:
        if should_fire(rule, rank=rank, size=size, step=step):
            _fire(rule.kind, f"rank {rank} (pid {os.getpid()}) at step {step}")


def maybe_inject_in_recovery(rules: list[ChaosRule], *, rank: int, recovery: int) -> None:
    """Send ourselves the rule's signal in the middle of a recovery (after re-forming)."""
    for rule in rules:
        if fires_in_recovery(rule, rank=rank, recovery=recovery):
            _fire(rule.kind, f"rank {rank} (pid {os.getpid()}) during recovery {recovery}")
