"""What a Spark task reports back about its worker, and what the driver makes of the reports:
the order of the results, and the root cause of a failure with the message that names it.

Pure functions over plain records (no Spark, no torch), like `phalanx.launch.report`. The
errors are `phalanx.ray`'s (one contract for every engine): `WorkerError` when fn raised (a
bug), `JobFailed` when the job could not go on (too few workers, a loss it cannot recover).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

from ..errors import JobFailed, WorkerError

__all__ = ["JobFailed", "WorkerError", "WorkerResult", "failure", "in_rank_order", "root_cause",
           "value"]


@dataclass(kw_only=True, slots=True)
class WorkerResult:
    """How one Spark task attempt's worker ended (sent back as the task's only record)."""

    slot: int
    """Which of the `num_workers` tasks ran it (the partition index)."""
    attempt: int
    """Spark's attempt number of that task: 0 first, >0 a retry joining as a replacement."""
    worker: str
    """Its phalanx worker id."""
    host: str
    pid: int
    returned: bool = False
    """fn returned normally; `payload` is what it returned, pickled."""
    payload: bytes | None = None
    rank: int = -1
    """Its rank in the last generation it belonged to (-1: it never joined one)."""
    generation: int = 0
    error: dict[str, Any] | None = None
    """The exception fn raised: type, message, where, time, cascade, traceback."""
    exception: bytes | None = None
    """The exception itself, pickled, when it pickles (re-raised as the failure's cause)."""

    @property
    def label(self) -> str:
        rank = f"rank {self.rank}" if self.rank >= 0 else f"worker slot {self.slot}"
        return f"{rank} (worker {self.worker} on {self.host}, pid {self.pid})"

    def why(self) -> str:
        """One phrase: what this worker raised, and where."""
        e = self.error or {}
        first = str(e.get("message", "")).strip().splitlines()
        text = f": {first[0][:300]}" if first and first[0] else ""
        return f"{self.label} raised {e.get('type')}{text} (at {e.get('where')})"


def root_cause(errors: list[WorkerResult]) -> WorkerResult | None:
    """The exception that started it: the first, in time, that is not a consequence of a
    peer's failure (WorkerLost, RendezvousError ...); else the first consequence."""
    if not errors:
        return None

    def when(r: WorkerResult) -> float:
        return float((r.error or {}).get("time", 0.0))
    bugs = [r for r in errors if not (r.error or {}).get("cascade")]
    return min(bugs or errors, key=when)


RECOVER_HINT = ("Workers are replaced only if fn recovers from a lost peer: decorate its "
                "training loop with @phalanx.elastic.run")
HEAD = "phalanx job on Spark failed: "


def failure(cause: WorkerResult | None, losses: list[str], why: str, *,
            hint: str = RECOVER_HINT) -> JobFailed:
    """The driver's error for a failed call.

    An exception fn raised is a `WorkerError` naming the rank, with its remote traceback and
    the original exception as `__cause__` (when it unpickles here). A consequence of a peer's
    loss (WorkerLost escaping fn) is a fault: `JobFailed` naming the loss first, then `hint`
    (how to recover from it), not the rank that reported it."""
    if cause is None:
        lost = f" ({'; '.join(losses[:3])})" if losses else ""
        return JobFailed(HEAD + why + lost, cause=losses[0] if losses else "")
    e = cause.error or {}
    if e.get("cascade"):
        text = f"{losses[0]}; then {cause.why()}" if losses else cause.why()
        return JobFailed(f"{HEAD}{text}. {hint}", cause=losses[0] if losses else cause.why())
    tb = str(e.get("traceback") or "").rstrip()
    message = HEAD + cause.why() + (f"\n\nTraceback of {cause.label}:\n{tb}" if tb else "")
    err = WorkerError(message, rank=cause.rank if cause.rank >= 0 else cause.slot,
                      worker=cause.worker, exc_type=str(e.get("type")),
                      exc_message=str(e.get("message", "")), where=str(e.get("where", "?")),
                      remote_traceback=tb)
    if cause.exception is not None:
        try:
            original = pickle.loads(cause.exception)
        except Exception:  # a class the driver cannot import: the message still names it
            original = None
        if isinstance(original, BaseException):
            err.__cause__ = original
    return err


def value(result: WorkerResult) -> Any:
    """What a worker's fn returned, unpickled in the driver."""
    try:
        return pickle.loads(result.payload) if result.payload is not None else None
    except Exception as e:
        why = (f"{result.label} returned a value the driver cannot unpickle "
               f"({type(e).__name__}: {e})")
        raise JobFailed(f"{HEAD}{why}; return plain data (numbers, arrays, tensors, dicts) or "
                        "make its classes importable in the driver", cause=why) from e


def in_rank_order(results: list[WorkerResult], final: list[str]) -> list[WorkerResult]:
    """Results of the workers that returned: members of the final generation in its rank
    order, then any that finished earlier, by their last rank."""
    done = [r for r in results if r.returned]
    place = {w: i for i, w in enumerate(final)}
    return sorted(done, key=lambda r: (r.worker not in place, place.get(r.worker, r.rank),
                                       r.rank, r.worker))
