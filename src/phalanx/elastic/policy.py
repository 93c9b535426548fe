"""Pure healing decisions: which rank is the source of truth after a membership change."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True, frozen=True)
class HealPlan:
    """Who broadcasts its state, who receives it, and why."""

    source: int
    behind: list[int]
    step: int
    reason: str


def choose_source(steps: list[int]) -> HealPlan:
    """The most advanced rank (lowest rank among ties) is the source; ranks behind it heal.
    Before the first step (every rank at step 0 or -1) all other ranks take the source's state.

    `steps[r]` is the number of optimizer steps rank r has applied (-1 for a newcomer with no
    state). Nobody rolls back: ranks ahead of others are never overwritten by older state.
    """
    if not steps:
        raise ValueError("choose_source needs at least one rank's step")
    best = max(steps)
    source = steps.index(best)
    if best <= 0 and len(steps) > 1:
        # Nobody has trained yet: ranks may hold different initial models (an unseeded
        # init), so every rank takes the source's, as broadcast_parameters does at start.
        behind = [r for r in range(len(steps)) if r != source]
        return HealPlan(source=source, behind=behind, step=best,
                        reason=f"no rank has trained yet; every rank takes rank {source}'s "
                               "initial state")
    behind = [r for r, s in enumerate(steps) if s < best]
    if not behind:
        why = f"all {len(steps)} ranks are at step {best}"
    else:
        why = (f"rank {source} is the most advanced (step {best}); ranks {behind} at steps "
               f"{[steps[r] for r in behind]} heal from it")
    return HealPlan(source=source, behind=behind, step=best, reason=why)


def progress_lost(best_step: int, job_step: int) -> bool:
    """Pure: has every holder of the job's newest steps been lost?

    `best_step` is the most advanced step among the workers of the new generation and
    `job_step` the newest step the coordinator heard any worker complete (-1: unknown).
    Continuing from `best_step` would then silently redo (or skip) training.
    """
    return job_step >= 0 and best_step < job_step
