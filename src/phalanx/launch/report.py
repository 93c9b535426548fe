"""What the launcher says about a job: why a worker exited, whether that is a fault or a bug,
the root cause of a failure, the one-line summary of a success, chaos rules that never fired.

Pure functions over plain records, so every message is unit-tested without processes.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any


def describe_exit(code: int) -> str:
    """'exited with code 3' / 'was killed by SIGKILL'."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass(kw_only=True, slots=True)
class Exit:
    """One worker process that ended, as the launcher saw it."""

    slot: int
    """Rank slot the worker was started for."""
    worker: str
    """Its worker id."""
    pid: int
    code: int
    """Exit status as Popen reports it (negative: killed by that signal)."""
    seen: float
    """When the launcher noticed (time.time())."""
    fenced: bool = False
    """The launcher killed it because the coordinator declared it lost."""
    lost: bool = False
    """The coordinator had declared it lost before it exited."""
    error: dict[str, Any] | None = field(default=None)
    """The exception it reported (type, message, where, time, cascade), if any."""
    detail: str = ""
    """What else is known, e.g. 'host b lost: its agent exited with code 255'."""
    oom: str = ""
    """Why a SIGKILL came, when the kernel's OOM killer dealt it (see launch/oom.py)."""
    step: int = -1
    """The last step it reported completing (-1: none)."""
    joined: bool = True
    """It was in a generation of the job at some point (a replacement may never get in)."""
    host_lost: bool = False
    """Lost with its whole host (crash, cut, SSH session or srun step ended): a fault; its own
    status is unknown, and `code` is its agent's."""

    @property
    def label(self) -> str:
        pid = f", pid {self.pid}" if self.pid > 0 else ""  # unknown: it never reported one
        return f"rank {self.slot} (worker {self.worker}{pid})"

    @property
    def is_fault(self) -> bool:
        """Killed by a signal, or fenced: recoverable. An exception, or a non-zero exit status
        the script chose (`sys.exit(3)`, `os._exit(3)`), is a bug, even when the coordinator
        saw the worker go before its status arrived; an error phalanx raised only because a
        peer failed (WorkerLost, say) is a consequence, so a fault."""
        if self.code == 0:
            return False
        if self.fenced or self.host_lost or self.code < 0:
            return True
        return bool(self.error and self.error.get("cascade"))

    def why(self) -> str:
        """One phrase: what happened to this worker."""
        if self.error and not self.error.get("cascade"):
            msg = str(self.error.get("message", "")).strip().splitlines()
            text = f": {msg[0][:300]}" if msg and msg[0] else ""
            return (f"{self.label} raised {self.error.get('type')}{text} "
                    f"(at {self.error.get('where')})")
        if self.detail:
            return f"{self.label}: {self.detail}"
        why = f"{self.label} {describe_exit(self.code)}"
        if self.oom:
            why += f" ({self.oom})"
        if self.fenced:
            why += " (fenced by the launcher)"
        elif self.code > 0 and not self.error:
            why += " (an exit status the program chose: a bug, not a fault)"
        return why


def root_cause(exits: list[Exit]) -> Exit:
    """The failure that started it: the first bug in time; else the first fault that is not a
    consequence of another (a peer's WorkerLost); else the first exit."""
    failed = [e for e in exits if e.code != 0] or exits

    def when(e: Exit) -> float:
        return float(e.error["time"]) if e.error and "time" in e.error else e.seen
    bugs = [e for e in failed if not e.is_fault]
    if bugs:
        return min(bugs, key=when)
    primary = [e for e in failed if not (e.error and e.error.get("cascade"))]
    return min(primary or failed, key=when)


def exit_code(cause: Exit) -> int:
    """The launcher's exit status for a job that failed with `cause`."""
    if cause.code > 0:
        return cause.code
    return 128 - cause.code if cause.code < 0 else 1


def left_early(e: Exit, last_step: int) -> bool:
    """A worker that exited 0 while the job went on training: it joined, reported steps, and
    its last step is behind the job's last."""
    return e.code == 0 and e.joined and 0 <= e.step < last_step


def summary(*, seconds: float, started: int, exits: list[Exit], generations: int,
            restarts: int, last_step: int = -1, finished: int | None = None) -> str:
    """The last line of a job that succeeded: who finished (counted from `exits`, unless the
    engine counts them itself), who left early, who never got in, and the faults recovered."""
    done = [e for e in exits if e.code == 0]
    early = [e for e in done if left_early(e, last_step)]
    never = [e for e in done if not e.joined]
    if finished is None:
        finished = len(done) - len(early) - len(never)
    text = (f"job finished in {seconds:.1f}s: {finished} worker(s) finished "
            f"(started with {started}), ")
    if early:
        gone = _listed([f"{e.label} exited with code 0 at step {e.step}" for e in early])
        text += f"{len(early)} left early ({gone}; the job went on to step {last_step}), "
    if never:
        text += f"{len(never)} replacement(s) never joined (the job ended first), "
    text += f"{generations} generation(s), "
    faults = [e.why() for e in exits if e.code != 0]
    if not faults:
        return text + "no faults"
    more = f", {restarts} replacement(s) started" if restarts else ""
    return text + f"{len(faults)} fault(s) recovered ({_listed(faults)}){more}"


def _listed(items: list[str]) -> str:
    return "; ".join(items[:3]) + (f"; and {len(items) - 3} more" if len(items) > 3 else "")


def unfired_chaos(texts: list[str], fired: set[int], last_step: int,
                  seconds: float | None = None) -> list[str]:
    """One line per chaos rule that never fired (the user believes a fault was injected), with
    what may explain it: the job ended first, no step (step rules need the elastic API),
    renumbered ranks, a victim already gone."""
    steps = f"the job's last step was {last_step}" if last_step >= 0 else (
        "no step completed: step= rules fire at the elastic State's step boundaries; "
        "after=SECONDSs fires in any program")
    ended = f"the job ended {seconds:.1f}s in" if seconds is not None else "the job ended"
    lines = []
    for i, t in enumerate(texts):
        if i in fired:
            continue
        if "after=" in t:
            why = f"{ended}, before it was due or after its worker had gone"
        elif "rank=" in t:
            why = (f"{steps}; rank=R means whoever holds rank R then (ranks are renumbered "
                   "after a loss): worker=wR aims at the worker started as rank R")
        else:
            why = steps
        lines.append(f"chaos rule {t!r} never fired ({why})")
    return lines


class Progress:
    """`phalanx run --progress SEC`: a line every SEC seconds with the step rate since the
    last line, the workers of the current generation and the faults so far."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._last: tuple[float, int] | None = None

    def line(self, now: float, step: int, workers: int, generation: int,
             faults: int) -> str | None:
        """The progress line if one is due at `now` (monotonic seconds), else None."""
        if self._last is None:
            self._last = (now, step)
            return None
        t, s = self._last
        if now - t < self.every:
            return None
        self._last = (now, step)
        rate = max(step - s, 0) / (now - t)
        return (f"progress: step {max(step, 0)} ({rate:.1f} steps/s), {workers} worker(s) in "
                f"generation {generation}, {faults} fault(s) so far")
