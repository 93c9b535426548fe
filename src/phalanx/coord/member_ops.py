"""The ops a worker's own process calls about its place in the job: heartbeat (held until
there is news), status, and rendezvous with its assignment. Guarded by the membership's `cv`.

A beat's reply is computed once per piece of news and shared; an assignment carries the
worker's own numbers in its header and the generation's roster (hosts, worker ids, pids) as a
payload encoded once per generation, so neither costs O(N) per worker.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from . import policy
from .protocol import MAX_HOLD
from .store_ops import _int, _seconds, _str
from .waits import NEWS, WORLD, Answer, Reply, Wait, member_topic

BEAT_BUDGET = 4000.0
"""Heartbeats per second the coordinator plans for: past BEAT_BUDGET * interval workers each
beat is held longer (`scaled_hold`), so the rate stays bounded; the loss timeout grows with it."""



class MemberOps:
    """Heartbeats and rendezvous, answered under the membership's lock."""

    cv: threading.Condition
    _stop: threading.Event
    members: dict[str, policy.MemberStatus]
    pids: dict[str, int]
    ranks: dict[str, int]
    world: Any
    broken: set[int]
    failed: str | None
    max_step: int
    version: int
    heartbeat_timeout: float
    stopped_timeout: float
    target_np: int
    min_np: int
    _wait_since: float | None
    _status_cache: dict[int, dict[str, Any]]
    _roster: tuple[int, bytes] | None

    _news: Callable[[], None]
    """Membership's: tell every heartbeat at once."""
    _members_changed: Callable[..., None]
    """Membership's: rendezvous and formation look again."""
    _finished: Callable[[Any], bool]
    """Membership's: every member of this generation left cleanly."""

    def _op_heartbeat(self, h: dict[str, Any], _: bytes) -> Answer:
        """A beat; with `hold`, the reply waits up to that long for news (a loss, a new
        generation), so every worker hears of a loss within milliseconds. A beat that says
        which news it `seen` (the `version` of its last reply) and missed some is answered at
        once. Past BEAT_BUDGET beats per second the hold grows with the job."""
        worker, generation = _str(h, "worker", 256), _int(h, "generation", 0)
        step, hold = _int(h, "step", -1), min(_seconds(h, "hold", 0.0), 5.0)
        with self.cv:
            m = self.members.get(worker)
            if m is None or not m.alive:
                return {"ok": False, "fenced": True,
                        "error": f"worker {worker} is not a live member"}, b""
            m.last_heartbeat = time.monotonic()
            m.step, m.generation = step, generation
            m.collectives, m.blocked = _int(h, "coll", 0), _seconds(h, "blocked", 0.0)
            self.max_step = max(self.max_step, step)
            seen = _int(h, "seen", self.version)
            if hold > 0:
                hold = max(hold, self.scaled_hold())

        def answer() -> Reply:
            with self.cv:
                if not m.alive:
                    return {"ok": False, "fenced": True,
                            "error": f"worker {worker} was declared lost"}, b""
                return self._status_reply(generation), b""

        def retry() -> Reply | None:
            return answer() if self.version != seen or self._stop.is_set() else None

        if hold <= 0 or seen != self.version:
            return answer()
        return Wait(retry, answer, time.monotonic() + hold, (NEWS,))

    def scaled_hold(self) -> float:
        """How long a beat is held at least, for this many members (0 in small jobs)."""
        return min(len(self.members) / BEAT_BUDGET, MAX_HOLD)

    def loss_timeouts(self) -> tuple[float, float]:
        """(silence that makes a worker lost, silence after which a stopped one is): the
        configured ones, stretched to three held beats in a large job."""
        hold = self.scaled_hold()
        return max(self.heartbeat_timeout, 3 * hold), max(self.stopped_timeout, hold + 0.1)

    def _status_reply(self, generation: int) -> dict[str, Any]:
        """What a heartbeat hears (lock held): computed once per news, not once per beat."""
        cached = self._status_cache.get(generation)
        if cached is not None:
            return cached
        world = self.world
        current = world.generation if world else 0
        lost: list[int] = []
        if world and world.generation == generation:
            lost = [r for r, w in enumerate(world.workers)
                    if not self.members[w].alive and not self.members[w].left]
        waiting_outside = sum(1 for m in self.members.values() if m.alive and m.waiting
                              and m.worker not in self.ranks)
        reply = {"ok": True, "generation": current, "asked": generation, "lost_ranks": lost,
                 "broken": generation in self.broken, "newcomers": waiting_outside,
                 "version": self.version, "hold": round(self.scaled_hold(), 3),
                 "failed": self.failed}
        if len(self._status_cache) < 64:
            self._status_cache[generation] = reply
        return reply

    def _op_status(self, h: dict[str, Any], _: bytes) -> Reply:
        generation = _int(h, "generation", 0)
        with self.cv:
            return self._status_reply(generation), b""

    def _op_rendezvous(self, h: dict[str, Any], _: bytes) -> Answer:
        worker, after = _str(h, "worker", 256), _int(h, "after", 0)
        step = _int(h, "step", -1)
        deadline = time.monotonic() + _seconds(h, "timeout", 60.0)
        with self.cv:
            m = self.members.get(worker)
            if m is None or not m.alive:
                return {"ok": False, "error": f"worker {worker} is not a live member; join first"}, b""
            m.waiting = True
            m.step = step
            self.max_step = max(self.max_step, step)
            if self._wait_since is None:
                self._wait_since = time.monotonic()
            if self.world is not None and worker not in self.ranks:
                self._news()  # a newcomer: members leave for it at their next step boundary
            self._members_changed()

        def retry() -> Reply | None:
            with self.cv:
                return self._placed(m, after)

        def expire() -> Reply:
            with self.cv:
                m.waiting = False
                n = sum(1 for x in self.members.values() if x.alive and x.waiting)
                need = self.target_np if self.world is None else self.min_np
                return {"ok": False, "error": f"rendezvous timed out: {n} worker(s) waiting, "
                        f"need {need}"}, b""

        # Answered now if it can be (the job finished, or failed, before this worker came).
        return retry() or Wait(retry, expire, deadline, (WORLD, member_topic(worker)))

    def _placed(self, m: policy.MemberStatus, after: int) -> Reply | None:
        """A waiting worker's answer once there is one (lock held): its place in a newer
        generation, or why it has none."""
        w, worker = self.world, m.worker
        if w is not None and w.generation > after and worker in self.ranks:
            return self._assignment(w, worker)
        if not m.alive:
            return {"ok": False, "error": f"worker {worker} was declared lost"}, b""
        if self.failed is not None:
            m.waiting = False
            return {"ok": False, "failed": True,
                    "error": f"the job is failing: {self.failed}"}, b""
        if w is not None and worker not in self.ranks and self._finished(w):
            m.waiting = False
            return {"ok": False, "finished": True,
                    "error": "the job finished before this worker could join"}, b""
        return None

    def _assignment(self, w: Any, worker: str) -> Reply:
        """A worker's place: its own numbers and its host's pids in the header; the
        generation's roster, the same for every rank, as a payload encoded once. The roster
        is O(hosts), not O(workers): hosts as runs of ranks (ranks of a host are contiguous)
        and the previous generation's ranks kept, as ranges."""
        rank = self.ranks[worker]
        host = w.hosts[rank]
        first, count = self._host_span(w, host)
        return {"ok": True, "generation": w.generation, "rank": rank, "size": len(w.workers),
                "local_rank": rank - first, "local_size": count, "job_step": self.max_step,
                "version": self.version,
                "local_pids": [self.pids.get(x, -1) for x in w.workers[first:first + count]]
                }, self._roster_bytes(w)

    def _host_span(self, w: Any, host: str) -> tuple[int, int]:
        """First rank and number of ranks on `host` (contiguous: see `policy.order_world`)."""
        if w.spans is None:
            spans: dict[str, tuple[int, int]] = {}
            for r, hst in enumerate(w.hosts):
                first, n = spans.get(hst, (r, 0))
                spans[hst] = (first, n + 1)
            w.spans = spans
        return w.spans[host]

    def _roster_bytes(self, w: Any) -> bytes:
        if self._roster is None or self._roster[0] != w.generation:
            runs: list[list[Any]] = []
            for h in w.hosts:
                if runs and runs[-1][0] == h:
                    runs[-1][1] += 1
                else:
                    runs.append([h, 1])
            roster = {"host_runs": runs, "kept": _ranges(w.kept)}
            self._roster = (w.generation, json.dumps(roster, separators=(",", ":")).encode())
        return self._roster[1]


def _ranges(ranks: list[int]) -> list[list[int]]:
    """Ascending ranks as [first, last] ranges: survivors of a loss are a few runs."""
    out: list[list[int]] = []
    for r in ranks:
        if out and out[-1][1] == r - 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return out
