"""Where a rank waits for its peers before a negotiation round: in the coordinator's store,
not inside a collective.

Horovod's ranks wait for each other's operations as long as it takes (a stall only warns),
and `poll()` never blocks. A negotiation round (`negotiate.exchange`) is a collective, and a
rank blocked in a collective for longer than the job's collective timeout makes the
coordinator take the peers it waits for as hung. So a rank first *arrives* at the round, and
enters the collective only once every rank of the process set has arrived:

- arriving is one atomic increment of the round's counter; the rank whose increment reaches
  the set's size closes the round (it sets a key the others wait for), after which nobody
  leaves it;
- `synchronize()` and the synchronous operations arrive and wait, in short slices (checking
  for lost peers and the stall limits); `poll()` arrives, waits a couple of milliseconds and,
  if the round is not closed, leaves it again (a decrement under a per-round lock, so a
  departure never races a closing), so a rank never holds its peers in a collective while it
  computes;
- a rank that called `join()` arrives and enters the collective at once: that is how it
  stands in for the working ranks' operations (see `joining`).

A round where every rank arrives together costs each rank two coordinator requests. Keys are
scoped by generation and by the process set's ranks; the first rank to arrive at round k
deletes round k-2's keys (every rank has passed it) when it next has to wait anyway. Without a
coordinator (one process) there is no gate.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

from ...errors import RendezvousError, WorkerLost

_SLICE_S = 0.25
"""Longest single wait in the coordinator, so lost peers and stall limits are noticed."""
POLL_WINDOW_S = 0.002
"""How long `poll()` waits at a round for the other ranks before leaving it."""
_QUICK_S = 0.001
"""A first, short wait: rounds the peers reach at once close within it."""
_STALE_MAX = 32
"""Rounds whose keys may wait for deletion before a rank deletes them without idling."""


class Gate:
    """One process set's negotiation rounds as seen by this rank (`rank` of `size`)."""

    def __init__(self, client: Any, prefix: str, rank: int, size: int) -> None:
        self.client, self.prefix, self.rank, self.size = client, prefix, rank, size
        self.round = 0
        self.arrived = False
        self.closed = False
        self.since: float | None = None
        """When this rank began waiting for the current round (kept across poll() calls)."""
        self.warned = False
        """Whether this round's stall warning was logged."""
        self._flagged = False
        """Whether this rank published that it waits (for other ranks' stall messages)."""
        self._stale: list[int] = []
        """Rounds whose keys this rank deletes when it next has to wait."""

    def _key(self, k: int, what: str) -> str:
        return f"{self.prefix}/{k}/{what}"

    def arrive(self) -> None:
        """Join the current round (idempotent); closes it if this rank completes the set."""
        if self.arrived:
            return
        if self.since is None:
            self.since = time.monotonic()
        count = self.client.add(self._key(self.round, "in"), 1)
        self.arrived = True
        if count == self.size:
            self.closed = True
            self.client.set(self._key(self.round, "closed"), b"1")
        elif count == 1 and self.round >= 2:   # every rank has passed round k-2
            self._stale.append(self.round - 2)

    def _tidy(self, limit: int = 0) -> None:
        """Delete the keys of rounds everyone passed, if more than `limit` are pending."""
        if len(self._stale) > limit:
            stale, self._stale = self._stale, []
            for k in stale:
                for what in ("in", "closed", "lock"):
                    self.client.delete(self._key(k, what))

    def ready(self, wait_s: float = 0.0) -> bool:
        """Whether every rank has arrived (waiting up to `wait_s` in the coordinator)."""
        if self.closed:
            return True
        keys = [self._key(self.round, "closed")]
        if wait_s > 0:
            try:
                self.client.wait(keys, timeout=wait_s)
                self.closed = True
                return True
            except RendezvousError:
                pass   # timed out (a lost coordinator fails the check below)
        self.closed = bool(self.client.check(keys))
        return self.closed

    def leave(self) -> bool:
        """Take back this rank's arrival; False if the round closed meanwhile (then it must
        run)."""
        if not self.arrived:
            return True
        if self.ready():
            return False
        lock, me = self._key(self.round, "lock"), str(self.rank).encode()
        while self.client.compare_set(lock, b"", me) != me:   # one departure at a time
            time.sleep(0.0005)
        try:
            if self.client.add(self._key(self.round, "in"), -1) == self.size - 1:
                self.client.add(self._key(self.round, "in"), 1)   # it had closed: stay
                self.closed = True
                return False
            self.arrived = False
            return True
        finally:
            self.client.compare_set(lock, me, b"")

    def meet(self, *, wait: bool, eager: bool, stall: Callable[[], None]) -> bool:
        """Arrive and return True once the round is closed; `eager` (a joined rank) returns
        at once. With wait=False (poll) wait only `POLL_WINDOW_S`, then leave and return
        False; else wait in slices, calling `check_live()` and `stall()` (which may raise or
        leave the round, returning False) between them."""
        self.arrive()
        if eager or self.ready(_QUICK_S):
            return True
        self._tidy()   # would wait anyway
        if not wait:
            if self.ready(POLL_WINDOW_S) or not self.leave():
                return True
            stall()
            return False
        while not self.ready(_SLICE_S):
            if not self._flagged:
                self._flagged = True
                self.client.set(self._key(self.round, f"w{self.rank}"), b"1")
            check_live()
            stall()
            if not self.arrived:
                return False
        return True

    def passed(self) -> None:
        """The round ran: move to the next one."""
        self._tidy(limit=_STALE_MAX)
        if self._flagged:
            self.client.delete(self._key(self.round, f"w{self.rank}"))
        self.round += 1
        self.arrived = self.closed = self.warned = self._flagged = False
        self.since = None

    def waited(self) -> float:
        """Seconds since this rank began waiting for the current round."""
        return 0.0 if self.since is None else time.monotonic() - self.since

    def waiting(self) -> list[int]:
        """Ranks (of the set) that have waited at the current round for a while."""
        return [r for r in range(self.size)
                if r == self.rank or self.client.check([self._key(self.round, f"w{r}")])]

    def stall_text(self, waits_for: str, ranks: list[int]) -> str:
        """Who waits for what, and who is missing (`ranks`: the set's job ranks; [] for the
        whole job)."""
        def job_rank(i: int) -> int:
            return ranks[i] if i < len(ranks) else i
        here = self.waiting()
        missing = [job_rank(i) for i in range(self.size) if i not in here]
        return (f"rank {job_rank(self.rank)} waits for {waits_for}, but rank(s) {missing} have "
                "not reached an hvd negotiation (a synchronous hvd operation, synchronize(), "
                "barrier() or join()) since; every rank must submit and synchronize the same "
                "operations (same kind and name), or call hvd.join() when out of data")


def gate_for(comm: Any, members: tuple[int, ...]) -> Gate | None:
    """This rank's gate for the process set of job ranks `members` (() for the whole job),
    whose communicator is `comm`, in the current generation; None without a coordinator."""
    from ... import runtime
    rt = runtime.active()
    if rt is None or rt.client is None or comm.size() == 1:
        return None
    scope = "all" if not members else "s" + hashlib.blake2b(
        repr(members).encode(), digest_size=8).hexdigest()
    prefix = f"g{rt.group.place.generation}/hvd/{scope}"
    return Gate(rt.client, prefix, int(comm.rank()), int(comm.size()))


def check_live() -> None:
    """Raise WorkerLost if a peer of this generation was declared lost (while waiting at a
    gate no collective would notice)."""
    from ... import runtime
    rt = runtime.active()
    reason = rt.client.abort_reason() if rt is not None and rt.client is not None else None
    if reason:
        raise WorkerLost(f"hvd negotiation: {reason}", generation=rt.group.place.generation)
