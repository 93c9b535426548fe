"""Pure decision policies of the coordinator: who is lost, when a new world forms, rank order.

Functions here take plain status objects and return decisions with a reason string, so they
are unit-tested without processes and the coordinator can log why it did what it did.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class MemberStatus:
    """What the coordinator knows about one worker."""

    worker: str
    """Stable worker id (the launcher's, or one a joining worker made up)."""
    host: str
    """Host name the worker runs on; ranks on one host share memory."""
    rank_hint: int = -1
    """Rank the launcher asked for (used to order the first generation), -1 if none."""
    last_heartbeat: float = 0.0
    """Coordinator clock time of the last heartbeat."""
    alive: bool = True
    """False once declared lost or departed."""
    left: bool = False
    """True if it departed cleanly (finished); such a member is never called lost."""
    waiting: bool = False
    """True while blocked in rendezvous for a newer generation."""
    step: int = -1
    """Last training step the worker reported completed (used to pick who heals whom)."""
    generation: int = 0
    """Generation the worker last reported being in."""
    collectives: int = 0
    """Collectives it has started in that generation (from its heartbeat)."""
    blocked: float = 0.0
    """Seconds it has been waiting inside its current collective (0 when not in one)."""


@dataclass(kw_only=True, slots=True)
class Decision:
    """A decision plus the reason it was taken, for the log."""

    act: bool
    reason: str
    members: list[str] = field(default_factory=list)


def find_lost(members: list[MemberStatus], now: float, heartbeat_timeout: float, *,
              stopped: set[str] | None = None, stopped_timeout: float | None = None) -> Decision:
    """Workers alive in our books whose last heartbeat is older than the timeout.

    A long timeout tolerates a busy interpreter delaying the heartbeat thread; a worker whose
    process is known to be stopped (SIGSTOP, state T) is declared lost after the much shorter
    `stopped_timeout`, since it cannot come back on its own.
    """
    stopped = stopped or set()
    fast = stopped_timeout if stopped_timeout is not None else heartbeat_timeout
    lost, why = [], []
    for m in members:
        if not (m.alive and m.last_heartbeat):
            continue
        silent = now - m.last_heartbeat
        if silent > heartbeat_timeout:
            lost.append(m.worker)
            why.append(f"{m.worker}: no heartbeat for {silent:.2f}s (> {heartbeat_timeout:.2f}s)")
        elif m.worker in stopped and silent > fast:
            lost.append(m.worker)
            why.append(f"{m.worker}: process stopped and silent for {silent:.2f}s")
    if not lost:
        return Decision(act=False, reason="all heartbeats fresh")
    return Decision(act=True, members=lost, reason="; ".join(why))


def order_world(members: list[MemberStatus], previous: list[str]) -> list[str]:
    """Rank order for a new generation.

    Survivors keep their relative order (so rank 0 stays rank 0 when it survives); newcomers
    follow, ordered by rank hint then id. Workers of one host are kept together so local ranks
    are contiguous, which the intra-host shared-memory path relies on.
    """
    prev_pos = {w: i for i, w in enumerate(previous)}
    def key(m: MemberStatus) -> tuple[int, int, str]:
        if m.worker in prev_pos:
            return (0, prev_pos[m.worker], m.worker)
        return (1, m.rank_hint if m.rank_hint >= 0 else 1 << 30, m.worker)
    by_host: dict[str, list[str]] = {}  # insertion order: hosts by their first member
    for m in sorted(members, key=key):
        by_host.setdefault(m.host, []).append(m.worker)
    return [w for workers in by_host.values() for w in workers]


def should_form(members: list[MemberStatus], *, first: bool, target_np: int, min_np: int,
                max_np: int, waited: float, settle: float,
                current: list[str] | None = None) -> Decision:
    """Whether to form the next generation now, and of whom.

    The first generation waits for `target_np` workers. Later ones form once every live member
    of the `current` generation is waiting and at least `min_np` workers are; a newcomer that
    is still starting up never holds the survivors back (it joins at the next boundary), and
    newcomers beyond `max_np` wait outside. `settle` seconds after the first worker began
    waiting, live members that have not come are left out if enough are waiting, but never
    all of them for newcomers alone (those hold no training state).
    """
    alive = [m for m in members if m.alive]
    waiting = [m for m in alive if m.waiting]
    if first:
        if len(waiting) >= target_np:
            chosen = sorted(waiting, key=lambda m: (m.rank_hint, m.worker))[:max_np]
            return Decision(act=True, members=[m.worker for m in chosen],
                            reason=f"{len(waiting)} of {target_np} workers joined")
        return Decision(act=False, reason=f"waiting for workers: {len(waiting)} of {target_np}")
    if len(waiting) < min_np:
        return Decision(act=False, reason=f"{len(waiting)} waiting, fewer than min_np={min_np}")
    members_now = set(current) if current is not None else {m.worker for m in alive}
    blocking = [m for m in alive if m.worker in members_now and not m.waiting]
    if blocking and not any(m.worker in members_now for m in waiting):
        # Only newcomers wait: they hold no training state, so forming without the live
        # members of the current generation would lose the job's progress.
        return Decision(act=False, reason=f"{len(waiting)} newcomer(s) waiting for the "
                                          f"{len(blocking)} live member(s) of the current "
                                          "generation, which hold the training state")
    if not blocking or waited >= settle:
        # Members of the current world first, so survivors are never displaced by newcomers.
        chosen = sorted(waiting, key=lambda m: m.worker not in members_now)[:max_np]
        why = "every live member is waiting" if not blocking else (
            f"settle time {settle:.1f}s passed with {len(waiting)} of {len(alive)} waiting")
        return Decision(act=True, members=[m.worker for m in chosen], reason=why)
    return Decision(act=False, reason=f"{len(waiting)} of {len(alive)} live workers waiting")


def find_stragglers(world: list[MemberStatus], generation: int, timeout: float) -> Decision:
    """Live members of `generation` that never reached the collective their peers have waited
    on for more than `timeout` seconds: hung in user code (a heartbeat thread keeps beating
    while the main thread is stuck), so they are lost. If every member is blocked, nobody is
    singled out (a network problem is the collective timeout's to handle).
    """
    current = [m for m in world if m.alive and m.generation == generation]
    waiting = [m for m in current if m.blocked > timeout]
    if not waiting:
        return Decision(act=False, reason="no collective has waited past the timeout")
    target = max(m.collectives for m in waiting)
    late = [m for m in current if m.collectives < target and m.blocked <= timeout]
    if not late:
        return Decision(act=False, reason="every member reached the waited-on collective")
    longest = max(m.blocked for m in waiting)
    why = (f"{', '.join(m.worker for m in late)} did not reach collective #{target} of "
           f"generation {generation}, which its peers have waited on for {longest:.1f}s "
           f"(> {timeout:.1f}s): hung")
    return Decision(act=True, members=[m.worker for m in late], reason=why)
