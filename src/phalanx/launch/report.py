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

    @property
    def label(self) -> str:
        return f"rank {self.slot} (worker {self.worker}, pid {self.pid})"

    @property
    def is_fault(self) -> bool:
        """Killed, stopped, fenced or cut off: recoverable. An exception (or a non-zero exit
        the script chose) is a bug, unless the worker had already been declared lost."""
        if self.code == 0:
            return False
        if self.fenced or self.lost or self.code < 0:
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
        if self.fenced:
            why += " (fenced by the launcher)"
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


def summary(*, seconds: float, started: int, finished: int, generations: int,
            faults: list[str], restarts: int) -> str:
    """The last line of a job that succeeded."""
    text = (f"job finished in {seconds:.1f}s: {finished} worker(s) finished "
            f"(started with {started}), {generations} generation(s), ")
    if not faults:
        return text + "no faults"
    shown = "; ".join(faults[:3]) + (f"; and {len(faults) - 3} more" if len(faults) > 3 else "")
    more = f", {restarts} replacement(s) started" if restarts else ""
    return text + f"{len(faults)} fault(s) recovered ({shown}){more}"


def unfired_chaos(texts: list[str], fired: set[int], last_step: int) -> list[str]:
    """One line per chaos rule that never fired (the user believes a fault was injected)."""
    where = f"the job's last step was {last_step}" if last_step >= 0 else "no step completed"
    return [f"chaos rule {t!r} never fired ({where})" for i, t in enumerate(texts)
            if i not in fired]


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
