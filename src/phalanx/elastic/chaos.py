"""Fault injection: `--chaos kill:rank=2,step=40`, `stop:...`, `cut:...`, `term:...`.

Parsing and the firing decisions are pure (the launcher validates a spec with them; no torch).
Workers act on step rules at step boundaries and during recoveries by doing to themselves what
an operator or a broken network would: a real signal (SIGKILL, SIGSTOP, SIGTERM) or severed
coordinator links. Before acting, a worker reports the rule to the coordinator so the launcher
can say at the end which rules never fired. Wall-clock rules (`after=5s`) need no cooperation
from the program: the worker's starter (the launcher, or a host's agent) sends the signal.

A rule aims at a rank (`rank=R`: whoever holds rank R at that moment; ranks are renumbered
after a loss) or at one worker process (`worker=wK`: the worker started as rank K, whatever
rank it holds later; replacements have ids like `wK.1`).
"""

from __future__ import annotations

import os
import random
import re
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
    worker: str | None = None
    step: int | None = None
    every: int | None = None
    recovery: int | None = None
    after: float | None = None
    """Seconds after the job started (wall clock); fired by the worker's starter."""
    seed: int = 0


def parse_chaos(spec: str) -> list[ChaosRule]:
    """Parse ';'-separated rules like 'kill:rank=2,step=40'; ValueError names the bad part."""
    rules = [_parse_rule(part, index)
             for index, part in enumerate(filter(None, (s.strip() for s in spec.split(";"))))]
    if not rules:
        raise ValueError("--chaos is empty; e.g. kill:rank=2,step=40 or kill:rank=1,after=5s")
    return rules


_FIELDS_HELP = ("expected rank=N, worker=wN, step=N, every=N, recovery=N, after=SECONDSs, "
                "seed=N (N >= 0) or random")


def _parse_rule(part: str, index: int) -> ChaosRule:
    kind, _, rest = part.partition(":")
    if kind not in KINDS:
        raise ValueError(f"--chaos {part!r}: kind {kind!r} is not one of {sorted(KINDS)}")
    ints: dict[str, int | None] = {"rank": None, "step": None, "every": None, "recovery": None,
                                   "seed": 0}
    worker: str | None = None
    after: float | None = None
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key == "random" and not eq:
            continue
        if key == "worker" and eq:
            worker = _worker_id(part, value)
        elif key == "after" and eq:
            after = _seconds(part, value)
        elif key in ints and eq and value.isdigit():
            ints[key] = int(value)
        else:
            raise ValueError(f"--chaos {part!r}: bad field {item!r}; {_FIELDS_HELP}")
    when = [k for k in ("step", "every", "recovery") if ints[k] is not None]
    if after is not None:
        when.append("after")
    if len(when) != 1:
        raise ValueError(f"--chaos {part!r}: give exactly one of step=N, every=N, recovery=N "
                         f"or after=SECONDSs (got {when or 'none'})")
    if ints["every"] == 0 or ints["recovery"] == 0:
        raise ValueError(f"--chaos {part!r}: every= and recovery= count from 1")
    if worker is not None and ints["rank"] is not None:
        raise ValueError(f"--chaos {part!r}: give rank=N (whoever holds that rank) or worker=wN "
                         "(the worker started as rank N), not both")
    if after is not None and kind == CUT:
        raise ValueError(f"--chaos {part!r}: cut needs the worker's cooperation at a step "
                         "boundary; use step=N with cut, or kill/stop/term with after=")
    return ChaosRule(kind=kind, index=index, text=part, rank=ints["rank"], worker=worker,
                     step=ints["step"], every=ints["every"], recovery=ints["recovery"],
                     after=after, seed=ints["seed"] or 0)


def _worker_id(part: str, value: str) -> str:
    """'w2', 'w2.1' or '2' (the worker started as rank 2) -> a worker id."""
    text = value if value.startswith("w") else f"w{value}"
    if not re.fullmatch(r"w\d+(\.\d+)?", text):
        raise ValueError(f"--chaos {part!r}: worker={value!r} is not a worker id; use wN for the "
                         "worker started as rank N (wN.K for its K-th replacement)")
    return text


def _seconds(part: str, value: str) -> float:
    """'5s', '1.5s' or '5' -> seconds."""
    text = value[:-1] if value.endswith("s") else value
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"--chaos {part!r}: after={value!r} is not a duration; use e.g. "
                         "after=5s or after=0.5s")
    return seconds


def worker_slot(worker: str) -> int | None:
    """The rank a worker id was started for ('w2.1' -> 2), or None for other ids."""
    m = re.fullmatch(r"w(\d+)(\.\d+)?", worker)
    return int(m.group(1)) if m else None


def validate(rules: list[ChaosRule], *, max_rank: int) -> None:
    """Refuse rules that can never fire in this job (a rank it will never have)."""
    for rule in rules:
        slot = worker_slot(rule.worker) if rule.worker is not None else None
        for name, value in (("rank", rule.rank), ("worker", slot)):
            if value is not None and value >= max_rank:
                raise ValueError(f"--chaos {rule.text!r}: {name}={value} does not exist in a job "
                                 f"of at most {max_rank} workers; use 0..{max_rank - 1}")


def _aims_at(rule: ChaosRule, rank: int, worker: str) -> bool | None:
    """True/False when the rule names a rank or a worker; None when its victim is random."""
    if rule.worker is not None:
        return worker == rule.worker
    if rule.rank is not None:
        return rank == rule.rank
    return None


def should_fire(rule: ChaosRule, *, rank: int, size: int, step: int, worker: str = "") -> bool:
    """Pure: does this rule hit this rank (running worker id `worker`) at this step?"""
    if rule.recovery is not None or rule.after is not None:
        return False
    if rule.step is not None:
        hit = step == rule.step
    else:
        hit = rule.every is not None and step > 0 and step % rule.every == 0
    if not hit:
        return False
    aimed = _aims_at(rule, rank, worker)
    if aimed is not None:
        return aimed
    # Random victim, the same on every rank for a given step so exactly one rank fires.
    return random.Random(rule.seed * 1_000_003 + step).randrange(size) == rank


def fires_in_recovery(rule: ChaosRule, *, rank: int, size: int, recovery: int,
                      worker: str = "") -> bool:
    """Pure: does this rule hit this rank during the `recovery`-th recovery (1-based) of the
    worker process it runs in? A random rule picks one rank of the new generation."""
    if rule.recovery is None or rule.recovery != recovery:
        return False
    aimed = _aims_at(rule, rank, worker)
    if aimed is not None:
        return aimed
    return random.Random(rule.seed * 1_000_003 + 7919 * recovery).randrange(size) == rank


Report = Callable[[ChaosRule, str], bool]


class Injector:
    """Fires a job's step and recovery rules on this worker (id `worker`). `report(rule, when)`
    tells the coordinator first and says whether the rule is due (False: it already fired at
    `when`, e.g. before a restart from a checkpoint); `sever()` cuts this worker's coordinator
    links (for `cut`). Wall-clock rules are its starter's (`timed_victims`)."""

    def __init__(self, rules: list[ChaosRule], *, report: Report,
                 sever: Callable[[], None], worker: str = "") -> None:
        self.rules = [r for r in rules if r.after is None]
        self.worker = worker
        self._report = report
        self._sever = sever

    @classmethod
    def from_spec(cls, spec: str | None, *, report: Report, sever: Callable[[], None],
                  worker: str = "") -> Injector | None:
        return cls(parse_chaos(spec), report=report, sever=sever, worker=worker) if spec else None

    def _who(self, rank: int) -> str:
        return f"rank {rank} (worker {self.worker}, pid {os.getpid()})" if self.worker else \
            f"rank {rank} (pid {os.getpid()})"

    def at_step(self, *, rank: int, size: int, step: int) -> None:
        """Fire every rule that hits this rank at this step boundary."""
        for rule in self.rules:
            if should_fire(rule, rank=rank, size=size, step=step, worker=self.worker):
                self._fire(rule, f"{self._who(rank)} at step {step}", f"s{step}")

    def in_recovery(self, *, rank: int, size: int, recovery: int) -> None:
        """Fire every rule that hits this rank in the middle of its `recovery`-th recovery."""
        for rule in self.rules:
            if fires_in_recovery(rule, rank=rank, size=size, recovery=recovery,
                                 worker=self.worker):
                # A random rule fires once per K in the job; a rank's rule once per rank and K.
                key = f"r{recovery}" if rule.rank is None else f"r{recovery}.{rank}"
                self._fire(rule, f"{self._who(rank)} during recovery {recovery}", key)

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


def timed_victims(rules: list[ChaosRule], *, elapsed: float, fired: set[int],
                  np: int) -> list[tuple[ChaosRule, str]]:
    """Pure: the wall-clock rules due `elapsed` seconds into the job that have not fired yet,
    each with the worker id it hits: `worker=` as given, `rank=R` the worker started as rank R
    (a starter knows launch ranks, not the current ones), a random one picked by the seed."""
    due = []
    for rule in rules:
        if rule.after is None or rule.index in fired or elapsed < rule.after:
            continue
        if rule.worker is not None:
            victim = rule.worker
        elif rule.rank is not None:
            victim = f"w{rule.rank}"
        else:
            victim = f"w{random.Random(rule.seed * 1_000_003 + 104729).randrange(np)}"
        due.append((rule, victim))
    return due
