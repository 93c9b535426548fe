"""`@phalanx.elastic.run`: run the training function; on a lost or joining worker, re-form,
heal from the most advanced rank, and call it again. Surviving processes are never restarted.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .. import env, runtime
from ..launch import chaos
from ..errors import JobFinished, RendezvousError, WorkerLost
from . import policy
from .state import MembershipChanged, State, record_recovery

log = logging.getLogger("phalanx.elastic")
R = TypeVar("R")


def elastic_enabled() -> bool:
    """True when the launcher runs this job elastically (--min-np, --max-restarts, --max-np)."""
    return env.get_bool(env.ELASTIC, False)


def recover(state: State, cause: BaseException, max_attempts: int = 20) -> None:
    """Re-form the group and heal; retried if another worker is lost during recovery."""
    rt = runtime.current()
    t0 = time.monotonic()
    for attempt in range(1, max_attempts + 1):
        old = rt.group.place
        old_workers = list(rt.workers)
        try:
            rt.step = state.step
            rt.reform()
            new = rt.group.place
            state.reform_attempts += 1
            rules = chaos.rules_from_env()
            if rules:
                chaos.maybe_inject_in_recovery(rules, rank=new.rank,
                                               recovery=state.reform_attempts)
            plan = state.sync()
        except WorkerLost as e:
            log.warning("rank %d: lost another worker during recovery (%s); retrying", old.rank, e)
            cause = e
            continue
        kept = policy.survivors(old_workers, rt.workers)
        elapsed = time.monotonic() - t0
        record_recovery(state, cause=type(cause).__name__, seconds=elapsed, attempts=attempt,
                        old_size=old.size, new_size=new.size, generation=new.generation,
                        survivors=kept, heal=plan.reason, step=state.step)
        if new.rank == 0:
            log.warning("recovered in %.3fs: generation %d with %d workers (was %d); %s",
                        elapsed, new.generation, new.size, old.size, plan.reason)
        if new.size != old.size:
            state.on_reset()
        return
    raise RendezvousError(f"could not recover after {max_attempts} attempts: {cause}")


def run(func: Callable[..., R]) -> Callable[..., R]:
    """Decorate `train(state, ...)` so it survives lost workers and admits new ones.

    The decorated function first heals every rank from the most advanced one (so replacements
    start from their peers' state), then runs. On `WorkerLost` or `MembershipChanged` it
    re-forms the group, heals, and calls the function again: a loop written as
    ``for state.epoch in range(state.epoch, E): for batch in loader: ...`` resumes where the
    job is, with no rollback. Without an elastic launcher the function simply runs.
    """
    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> R:
        if not isinstance(state, State):
            raise TypeError(f"@phalanx.elastic.run expects a phalanx.elastic.State as the first "
                            f"argument, got {type(state).__name__}")
        if state.checkpointer is not None and state.step == 0:
            resumed = state.checkpointer.load_latest(state)
            if resumed is not None:
                log.warning("resumed from checkpoint at step %d", resumed)
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
    return wrapper
