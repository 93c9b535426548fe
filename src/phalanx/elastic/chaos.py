"""Worker-side fault injection: `--chaos kill:rank=2,step=40`, `stop:...`, `cut:...`, `term:...`.

Parsing and the firing decisions are pure (the launcher validates a spec with them; no torch).
Workers act on the spec at step boundaries and during recoveries by doing to themselves what
an operator or a broken network would: a real signal (SIGKILL, SIGSTOP, SIGTERM) or severed
coordinator links. Before acting, a worker reports the rule to the coordinator so the launcher
can say at the end which rules never fired.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}
CUT = "cut"
KINDS = (*SIGNALS, CUT)
HELP = {
    "kill": "SIGKILL the worker (a crash: the OS reclaims it at once)",
    "stop": "SIGSTOP the worker (a hang: alive but silent until fenced)",
    "term": "SIGTERM the worker (a polite shutdown by an operator or a scheduler)",
    "cut": "sever the worker's links to the coordinator while it keeps running (a network cut)",
}


@dataclass(kw_only=True, slots=True, frozen=True)
class ChaosRule:
    """One fault: which kind, which rank (or random), at which step, every N steps, or during
    the K-th recovery. `index` is its position in the spec and `text` its spelling there."""

    kind: str
    index: int = 0
    text: str = ""
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
        if kind not in KINDS:
            raise ValueError(f"--chaos {part!r}: kind {kind!r} is not one of {sorted(KINDS)}")
        fields: dict[str, int | None] = {"rank": None, "step": None, "every": None,
                                         "recovery": None, "seed": 0}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if key == "random" and not eq:
                continue
            if key not in fields or not eq or not value.isdigit():
                raise ValueError(f"--chaos {part!r}: bad field {item!r}; expected rank=N, step=N, "
                                 "every=N, recovery=N, seed=N (N >= 0) or random")
            fields[key] = int(value)
        if fields["step"] is None and fields["every"] is None and fields["recovery"] is None:
            raise ValueError(f"--chaos {part!r}: give step=N, every=N or recovery=N")
        if fields["every"] == 0 or fields["recovery"] == 0:
            raise ValueError(f"--chaos {part!r}: every= and recovery= count from 1")
        rules.append(ChaosRule(kind=kind, index=len(rules), text=part, rank=fields["rank"],
                               step=fields["step"], every=fields["every"],
                               recovery=fields["recovery"], seed=fields["seed"] or 0))
    if not rules:
        raise ValueError("--chaos is empty; e.g. kill:rank=2,step=40")
    return rules


def validate(rules: list[ChaosRule], *, max_rank: int) -> None:
    """Refuse rules that can never fire in this job (a rank it will never have)."""
    for rule in rules:
        if rule.rank is not None and rule.rank >= max_rank:
            raise ValueError(f"--chaos {rule.text!r}: rank={rule.rank} does not exist in a job of "
                             f"at most {max_rank} workers; use a rank in 0..{max_rank - 1}")


def should_fire(rule: ChaosRule, *, rank: int, size: int, step: int) -> bool:
    """Pure: does this rule hit this rank at this step?"""
    if rule.recovery is not None:
        return False
    if rule.step is not None:
        hit = step == rule.step
    else:
        hit = rule.every is not None and step > 0 and step % rule.every == 0
    if not hit:
        return False
    if rule.rank is not None:
        return rank == rule.rank
    # Random victim, the same on every rank for a given step so exactly one rank fires.
    return random.Random(rule.seed * 1_000_003 + step).randrange(size) == rank


def fires_in_recovery(rule: ChaosRule, *, rank: int, size: int, recovery: int) -> bool:
    """Pure: does this rule hit this rank during the `recovery`-th recovery (1-based) of the
    worker process it runs in? A random rule picks one rank of the new generation."""
    if rule.recovery is None or rule.recovery != recovery:
        return False
    if rule.rank is not None:
        return rule.rank == rank
    return random.Random(rule.seed * 1_000_003 + 7919 * recovery).randrange(size) == rank


Report = Callable[[ChaosRule, str], bool]


class Injector:
    """Fires a job's rules on this worker. `report(rule, when)` tells the coordinator first and
    says whether the rule is due (False: it already fired at `when`, e.g. before a restart from
    a checkpoint); `sever()` cuts this worker's coordinator links (for `cut`)."""

    def __init__(self, rules: list[ChaosRule], *, report: Report,
                 sever: Callable[[], None]) -> None:
        self.rules = rules
        self._report = report
        self._sever = sever

    @classmethod
    def from_spec(cls, spec: str | None, *, report: Report,
                  sever: Callable[[], None]) -> Injector | None:
        return cls(parse_chaos(spec), report=report, sever=sever) if spec else None

    def at_step(self, *, rank: int, size: int, step: int) -> None:
        """Fire every rule that hits this rank at this step boundary."""
        for rule in self.rules:
            if should_fire(rule, rank=rank, size=size, step=step):
                self._fire(rule, f"rank {rank} (pid {os.getpid()}) at step {step}", f"s{step}")

    def in_recovery(self, *, rank: int, size: int, recovery: int) -> None:
        """Fire every rule that hits this rank in the middle of its `recovery`-th recovery."""
        for rule in self.rules:
            if fires_in_recovery(rule, rank=rank, size=size, recovery=recovery):
                # A random rule fires once per K in the job; a rank's rule once per rank and K.
                key = f"r{recovery}" if rule.rank is None else f"r{recovery}.{rank}"
                self._fire(rule, f"rank {rank} (pid {os.getpid()}) during recovery {recovery}",
                           key)

    def _fire(self, rule: ChaosRule, what: str, when: str) -> None:
        try:
            if not self._report(rule, when):
                return
        except Exception:  # the report is for the summary; the fault matters more
            pass
        if rule.kind == CUT:
            sys.stderr.write(f"[chaos] cutting {what} off from the coordinator\n")
            sys.stderr.flush()
            self._sever()
            return
        sys.stderr.write(f"[chaos] sending {SIGNALS[rule.kind].name} to {what}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), SIGNALS[rule.kind])
