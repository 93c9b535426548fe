"""Recovery: `reform()` (the one routine every elastic loop uses) and `@phalanx.elastic.run`.

`reform(cause, heal)` leaves the broken generation, joins the next one and runs `heal`, retrying
if another worker is lost meanwhile. `@run` wraps a training function: on a lost or joining
worker it re-forms, heals the State from the most advanced rank, and calls the function again.
Surviving processes are never restarted. `fit_elastic` (data.ml) uses the same `reform`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .. import env, runtime
from ..comm.group import Placement
from ..errors import JobFinished, MembershipChanged, RendezvousError, WorkerLost
from .state import State, record_recovery

log = logging.getLogger("phalanx.elastic")
R = TypeVar("R")


def elastic_enabled() -> bool:
    """True when the launcher runs this job elastically (--min-np, --max-restarts, --max-np)."""
    return env.get_bool(env.ELASTIC, False)


def reform(cause: BaseException, heal: Callable[[Placement], str], *, max_attempts: int = 20,
           on_reformed: Callable[[Placement], None] | None = None) -> dict[str, Any]:
    """Re-form the group and run `heal(origin)`, where `origin` is this worker's place in the
    generation that failed; retried if another worker is lost while re-forming or healing.

    Returns what happened (sizes, generation, survivors, the heal's reason, seconds taken)."""
    rt = runtime.current()
    rec = rt.recorder
    t0, p0 = time.monotonic(), rec.now()
    rec.instant("elastic", "fault detected", {"cause": f"{type(cause).__name__}: {cause}"[:300]})
    origin = rt.group.place
    alive = list(range(origin.size))  # origin ranks still present, generation by generation
    for attempt in range(1, max_attempts + 1):
        try:
            p1 = rec.now()
            rt.reform()
            alive = [alive[k] for k in rt.kept if k < len(alive)]
            p2 = rec.now()
            rec.span("elastic", "re-form", p1, p2, lane="elastic", args={"attempt": attempt})
            if on_reformed is not None:
                on_reformed(rt.group.place)
            reason = heal(origin)
            rec.span("elastic", "heal", p2, rec.now(), lane="elastic", args={"plan": reason})
        except WorkerLost as e:
            log.warning("rank %d: lost another worker during recovery (%s); retrying",
                        origin.rank, e)
            cause = e
            continue
        new = rt.group.place
        rec.span("elastic", "recovery", p0, rec.now(), lane="elastic",
                 args={"old_size": origin.size, "new_size": new.size})
        rec.recovered(time.monotonic() - t0)
        return {"cause": type(cause).__name__, "seconds": time.monotonic() - t0,
                "attempts": attempt, "old_size": origin.size, "new_size": new.size,
                "generation": new.generation, "heal": reason,
                "survivors": alive}
    raise RendezvousError(f"could not recover after {max_attempts} attempts: {cause}")


def recover(state: State, cause: BaseException, max_attempts: int = 20) -> None:
    """Re-form the group and heal `state` from the most advanced rank."""
    rt = runtime.current()

    def chaos_in_recovery(place: Placement) -> None:
        state.reform_attempts += 1
        chaos = state.chaos(rt)
        if chaos is not None:
            chaos.in_recovery(rank=place.rank, size=place.size, recovery=state.reform_attempts)

    info = reform(cause, lambda _origin: state.sync().reason, max_attempts=max_attempts,
                  on_reformed=chaos_in_recovery)
    record_recovery(state, step=state.step, **info)
    if rt.group.place.rank == 0:
        log.warning("recovered in %.3fs: generation %d with %d workers (was %d); %s",
                    info["seconds"], info["generation"], info["new_size"], info["old_size"],
                    info["heal"])
    if info["new_size"] != info["old_size"]:
        state.on_reset()


def run(func: Callable[..., R]) -> Callable[..., R]:
    """Decorate `train(state, ...)` so it survives lost workers and admits new ones.

    With a checkpointer, the State first resumes from its newest checkpoint (see
    `Checkpointer.at_start`). The function then heals every rank from the most advanced one
    (so replacements start from their peers' state), and runs. On `WorkerLost` or
    `MembershipChanged` it re-forms the group, heals, and calls the function again: a loop
    written as ``for state.epoch in range(state.epoch, E): for batch in loader: ...``
    resumes where the job is, with no rollback. Any other exception is a bug and propagates
    (the launcher fails the job with it). Without an elastic launcher the function simply runs.
    """
    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> R:
        if not isinstance(state, State):
            raise TypeError(f"@phalanx.elastic.run expects a phalanx.elastic.State as the first "
                            f"argument, got {type(state).__name__}")
        if state.checkpointer is not None and state.step == 0:
            # Fails if the directory is another job's, or holds checkpoints none of which
            # loads (unless started with --fresh / resume=False): never a silent step 0.
            resumed = state.checkpointer.at_start(state)
            if resumed is not None:
                log.warning("resumed from checkpoint at step %d", resumed)
        state._in_loop += 1
        try:
            return _loop(func, state, args, kwargs)
        finally:
            state._in_loop -= 1
    return wrapper


def _loop(func: Callable[..., R], state: State, args: Any, kwargs: Any) -> R:
    synced = False
    while True:
        try:
            if not synced:
                state.sync()  # replacements heal from their peers before the first step
                synced = True
            return func(state, *args, **kwargs)
        except (WorkerLost, MembershipChanged) as e:
            if not elastic_enabled():
                raise
            log.warning("rank %d: %s: %s; re-forming", runtime.current().group.place.rank,
                        type(e).__name__, e)
            try:
                recover(state, e)
                synced = True
            except JobFinished:
                # The others finished the job while this worker was cut off: nothing is lost.
                log.warning("the job finished while this worker was re-forming; exiting")
                raise SystemExit(0) from None
