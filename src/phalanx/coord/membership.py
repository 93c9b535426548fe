"""The coordinator's state machine: members, generations, the bootstrap store, job outcome.

No sockets here: `CoordServer` authenticates frames and hands each request to `Membership.handle`,
which answers it. Every request is validated: an authenticated but malformed header gets an
error reply (it never raises into the connection thread), and waits are bounded.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import policy
from .member_ops import MemberOps
from .reports import ReportOps
from .starters import StarterOps
from .store_ops import BadRequest, StoreOps, _int, _str
from .waits import NEWS, WORLD, Answer, Reply, member_topic, starter_topic

if TYPE_CHECKING:
    from .durable import DurableRecord

log = logging.getLogger("phalanx.coord")

FenceFn = Callable[[str, int, bool], None]
FORM_GAP_PER_MEMBER = 5e-6
"""Seconds between formation attempts per member (50 ms at 10,000), each costing O(members)."""


@dataclass(kw_only=True, slots=True)
class World:
    """One generation: who is in it, in rank order."""

    generation: int
    workers: list[str]
    hosts: list[str]
    formed_at: float = field(default_factory=time.monotonic)
    kept: list[int] = field(default_factory=list)
    """Ranks of the previous generation whose workers are in this one (ascending)."""
    spans: dict[str, tuple[int, int]] | None = None
    """Host -> (first rank, ranks there), filled on first use."""


class Membership(MemberOps, StoreOps, StarterOps, ReportOps):
    """Who is in the job, which generation is current, and the generation-scoped store."""

    def __init__(self, *, target_np: int, min_np: int, max_np: int, heartbeat_timeout: float,
                 settle: float, fence: FenceFn | None, stopped_timeout: float,
                 probe_stopped: Callable[[str, int], bool] | None, stop: threading.Event) -> None:
        self.target_np, self.min_np, self.max_np = target_np, min_np, max_np
        self.heartbeat_timeout = heartbeat_timeout
        self.settle = settle
        self.fence = fence
        self.stopped_timeout = stopped_timeout
        self.probe_stopped = probe_stopped
        self.cv = threading.Condition()
        self.kv: dict[str, bytes] = {}
        self.members: dict[str, policy.MemberStatus] = {}
        self.pids: dict[str, int] = {}
        self.tokens: dict[str, str] = {}
        self.world: World | None = None
        self.broken: set[int] = set()
        self.events: list[dict[str, Any]] = []
        self.failed: str | None = None
        self.max_step = -1
        """Newest step any worker reported completing (lowered only by `rebase`)."""
        self.straggler_timeout: float | None = None
        """Seconds peers may wait in a collective for a live worker that never arrives."""
        self.version = 0
        """Bumped on every change a heartbeat should hear of at once (loss, generation...)."""
        self.starters: dict[str, str] = {}
        """Worker id -> the starter (agent, `phalanx join`) that fences it when it is lost."""
        self.orders: dict[str, list[tuple[str, int]]] = {}
        self.spawns: dict[str, list[tuple[int, str]]] = {}
        self.exits: list[dict[str, Any]] = []
        self.stopped_reports: dict[str, float] = {}
        self.starter_seen: dict[str, float] = {}
        self.fail_on_error = True
        """An exception a worker reports fails the job at once (no new generation forms)."""
        self.seen_keys: set[str] = set()
        self.errors: dict[str, dict[str, Any]] = {}
        """Exceptions workers reported before exiting, by worker id."""
        self.formed: set[str] = set()
        """Every worker that was ever in a generation."""
        self.ranks: dict[str, int] = {}
        """Worker id -> rank in the current generation."""
        self._wait_since: float | None = None
        self._stop = stop
        self._quiet = False
        self.wake: Callable[[tuple[str, ...]], None] = lambda topics: None
        """Set by the server: retry the parked requests waiting on these topics."""
        self._form_due = False
        self._left_since_check = False
        self._last_scan = 0.0
        self._last_form_try = 0.0
        self._status_cache: dict[int, dict[str, Any]] = {}
        self._roster: tuple[int, bytes] | None = None
        self.durable: DurableRecord | None = None
        """With --etcd: a generation forms only once its record is written there."""
        self._proposed: World | None = None

    # ----------------------------------------------------------------- decisions from outside
    def fail(self, reason: str) -> None:
        """The job is failing: no new generation forms, rendezvous answers with `reason`."""
        with self.cv:
            if self.failed is None:
                self.failed = reason
                self._event("failed", reason=reason)
            self.wake((WORLD,))  # every parked rendezvous answers with the reason

    def quiet(self) -> None:
        """The job is being stopped on purpose: losses are expected, so log none."""
        self._quiet = True

    def declare_lost(self, worker: str, reason: str, *, urgent: bool = True) -> None:
        """Mark a worker lost, break its generation, and fence it (its starter kills it).

        `urgent` fences at once (a silent but live process); otherwise its starter kills it
        only if it is still running a moment later (its socket closed because it is exiting).
        """
        self.declare_many_lost([worker], reason, urgent=urgent)

    def declare_many_lost(self, workers: list[str], reason: str, *, urgent: bool = True) -> None:
        """`declare_lost` for several workers at once (a host's workers dying together): one
        piece of news for every heartbeat, not one per worker."""
        fenced: list[tuple[str, int]] = []
        with self.cv:
            for worker in workers:
                m = self.members.get(worker)
                if m is None or not m.alive:
                    continue
                m.alive = m.waiting = False
                pid = self.pids.get(worker, -1)
                if worker in self.ranks:
                    self.broken.add(self.world.generation)
                self._event("lost", news=False, worker=worker, reason=reason)
                starter = self.starters.get(worker)
                if starter is not None:
                    self.orders.setdefault(starter, []).append((worker, pid))
                    self.wake((starter_topic(starter),))
                fenced.append((worker, pid))
            if not fenced:
                return
            self._news()
            self._members_changed(*(w for w, _ in fenced))
        for worker, pid in fenced:
            if not self._quiet:
                log.warning("worker %s lost: %s", worker, reason)
            if self.fence is not None:
                try:
                    self.fence(worker, pid, urgent)
                except Exception:  # fencing is best effort; the peer may be gone already
                    log.exception("fencing worker %s failed", worker)

    def declare_hosts_lost(self, workers: list[str], reason: str) -> None:
        """Every worker of a host is gone at once (its agent died): one loss, one new
        generation, not one per worker. Nobody is left there to fence them."""
        with self.cv:
            gone = [w for w in workers if w in self.members and self.members[w].alive]
            for w in gone:
                self.members[w].alive = self.members[w].waiting = False
            if self.world and any(w in self.ranks for w in gone):
                self.broken.add(self.world.generation)
            if gone:
                self._event("lost", workers=gone, reason=reason)
            self._members_changed(*gone)
        if gone and not self._quiet:
            log.warning("%s: worker(s) %s lost", reason, ", ".join(gone))

    def is_lost(self, worker: str) -> bool:
        """True if the coordinator declared this worker lost (not if it left cleanly)."""
        with self.cv:
            m = self.members.get(worker)
            return m is not None and not m.alive and not m.left and worker not in self.errors

    def last_step(self, worker: str) -> int:
        """The last step this worker reported completing (-1: none, or never joined)."""
        with self.cv:
            m = self.members.get(worker)
            return m.step if m is not None else -1

    def rank_of(self, worker: str) -> int | None:
        """The worker's rank in the current generation, if it is in it."""
        return self.ranks.get(worker)  # replaced, never changed in place: no lock needed

    def is_live(self, worker: str) -> bool:
        """True if the worker joined and is neither lost nor departed."""
        with self.cv:
            m = self.members.get(worker)
            return m is not None and m.alive

    def tick(self) -> None:
        """One monitor pass: declare silent workers lost, form a generation if due. The scan
        for silent workers is O(members), so a large job runs it less often."""
        now = time.monotonic()
        decisions: list[policy.Decision] = []
        with self.cv:
            scan = now - self._last_scan >= min(0.25, 0.05 + len(self.members) / 40000)
            lost_after, stopped_after = self.loss_timeouts()
            # Probe only workers already silent for a while: a /proc read each, cheap.
            quiet = [(m.worker, self.pids.get(m.worker, -1)) for m in self.members.values()
                     if m.alive and m.last_heartbeat and now - m.last_heartbeat > stopped_after
                     ] if scan else []
        stopped = ({w for w, pid in quiet if pid > 0 and self.probe_stopped(w, pid)}
                   if self.probe_stopped is not None else set())
        with self.cv:
            if scan:
                self._last_scan = now
                # Starters elsewhere (agents, `phalanx join`) report their stopped workers.
                stopped |= {w for w, t in self.stopped_reports.items() if now - t < 1.0}
                decisions.append(policy.find_lost(list(self.members.values()), time.monotonic(),
                                                  lost_after, stopped=stopped,
                                                  stopped_timeout=stopped_after))
                if self.world is not None and self.straggler_timeout is not None:
                    world = [self.members[w] for w in self.world.workers]
                    decisions.append(policy.find_stragglers(world, self.world.generation,
                                                            self.straggler_timeout))
            if self._wait_since is not None:  # someone waits: the settle time may have passed
                self._maybe_form()
            if self.durable is not None:
                self.durable.note_step(self.max_step)
        for decision in decisions:
            for w in decision.members if decision.act else []:
                self.declare_lost(w, decision.reason)

    def heartbeats_closed(self, workers: list[str]) -> None:
        """Heartbeat connections closed without a goodbye: the processes are exiting or cut
        off (those that closed together are declared lost together)."""
        self.declare_many_lost(workers, "heartbeat connection closed (process exited)",
                               urgent=False)

    def check_token(self, worker: str, token: str) -> bool:
        """Does `token` prove this connection speaks for `worker` (issued at its join)?"""
        with self.cv:
            want = self.tokens.get(worker)
        return want is not None and secrets.compare_digest(want, token)

    def _event(self, kind: str, *, news: bool = True, **info: Any) -> None:
        """Record an event for the launcher; `news` also tells every heartbeat at once."""
        self.events.append({"t": time.time(), "event": kind, **info})
        if news:
            self._news()

    def _news(self) -> None:
        self.version += 1
        self._status_cache.clear()
        self.wake((NEWS,))

    def _members_changed(self, *gone: str) -> None:
        """Who is alive or waiting changed: try forming on the server's next pass; the
        rendezvous of members that are `gone` answer now (lock held). Waking every parked
        rendezvous per arrival would cost O(N^2) while a large job gathers."""
        self._form_due = True
        if gone:
            self.wake(tuple(member_topic(w) for w in gone))

    def form_if_due(self) -> None:
        """Called by the server after each batch of requests: one formation attempt for all
        the rendezvous and losses that arrived together, not one per request."""
        with self.cv:
            now = time.monotonic()
            # An attempt is O(members): in a large job, at most one per FORM_GAP_PER_MEMBER * N
            # seconds while arrivals trickle in (the monitor's tick or a later pass retries).
            if self._form_due and now - self._last_form_try >= min(
                    0.05, len(self.members) * FORM_GAP_PER_MEMBER):
                self._form_due = False
                self._last_form_try = now
                self._maybe_form()
            if self._left_since_check:
                self._left_since_check = False
                if self.world is not None and self._finished(self.world):
                    self.wake((WORLD,))  # newcomers hear that the job is over

    # ----------------------------------------------------------------- requests
    def handle(self, op: str, h: dict[str, Any], payload: bytes) -> Answer:
        """Answer one authenticated request; malformed ones get {'ok': False, 'error': ...}."""
        handler = getattr(self, f"_op_{op}", None) if op.isidentifier() else None
        if handler is None:
            return {"ok": False, "error": f"unknown op {op[:64]!r}"}, b""
        try:
            return handler(h, payload)
        except (BadRequest, KeyError, TypeError, ValueError, OverflowError) as e:
            return {"ok": False, "error": f"bad {op} request: {e}"[:512]}, b""

    def _op_join(self, h: dict[str, Any], _: bytes) -> Reply:
        worker, host = _str(h, "worker", 256), _str(h, "host", 256)
        rank_hint, pid = _int(h, "rank_hint", -1), _int(h, "pid", -1)
        starter = h.get("starter")
        if starter is not None and (not isinstance(starter, str) or len(starter) > 256):
            raise BadRequest("field 'starter' must be a short string")
        with self.cv:
            if self.failed is not None:
                return {"ok": False, "error": f"the job is failing: {self.failed}"}, b""
            m = self.members.get(worker)
            if m is not None and not m.alive:
                return {"ok": False, "error": f"worker {worker} was declared lost; "
                        "a lost worker cannot rejoin under the same id"}, b""
            if m is None:
                m = policy.MemberStatus(worker=worker, host=host, rank_hint=rank_hint)
                self.members[worker] = m
                self.tokens[worker] = secrets.token_hex(16)
                self._event("joined", news=False, worker=worker, host=m.host)
            m.last_heartbeat = time.monotonic()
            self.pids[worker] = pid
            if starter:
                self.starters[worker] = starter
            return {"ok": True, "token": self.tokens[worker]}, b""

    def _op_leave(self, h: dict[str, Any], _: bytes) -> Reply:
        worker, step = _str(h, "worker", 256), _int(h, "step", -1)
        with self.cv:
            m = self.members.get(worker)
            if m is not None and m.alive:
                m.step = max(m.step, step)  # its final step, newer than its last heartbeat's
                self.max_step = max(self.max_step, step)
                m.alive = False
                m.left = True
                m.waiting = False
                self._event("left", worker=worker)
                self._left_since_check = True
                self._members_changed(worker)
        return {"ok": True}, b""

    def _finished(self, w: World) -> bool:
        """Every member of the current generation left cleanly: the job is over."""
        return all(self.members[x].left for x in w.workers)

    def _maybe_form(self) -> None:
        """Form the next generation if the policy says so (caller holds the lock)."""
        members = list(self.members.values())
        if self.failed is not None or not any(m.waiting for m in members):
            return
        if self.world is not None and self._finished(self.world):
            return  # the job is over; newcomers are told so by rendezvous
        waited = time.monotonic() - (self._wait_since or time.monotonic())
        decision = policy.should_form(members, first=self.world is None, target_np=self.target_np,
                                      min_np=self.min_np, max_np=self.max_np, waited=waited,
                                      settle=self.settle,
                                      current=self.world.workers if self.world else None)
        if not decision.act:
            return
        prev = self.world.workers if self.world else []
        chosen = [self.members[w] for w in decision.members]
        # Live members of the last generation that did not come within the settle time (hung
        # in user code, say) are lost: fence them, or they would linger and hold the job.
        picked = set(decision.members)
        late = [w for w in prev if self.members[w].alive and w not in picked]
        order = policy.order_world(chosen, prev)
        gen = (self.world.generation if self.world else 0) + 1
        world = World(generation=gen, workers=order, hosts=[self.members[w].host for w in order],
                      kept=[r for r, w in enumerate(prev) if w in picked])
        if self.durable is not None:
            self._propose(world, late, decision.reason)
        else:
            self._install(world, late, decision.reason)

    def _propose(self, world: World, late: list[str], reason: str) -> None:
        """--etcd: write the generation's record first; it forms once the write lands, so
        while etcd is away survivors wait and nothing forms (lock held)."""
        durable = self.durable
        if self._proposed is not None or durable is None or durable.fenced:
            return
        self._proposed = world

        def written(ok: bool) -> None:
            with self.cv:
                self._proposed = None
                if ok and self.failed is None and all(
                        self.members[w].alive for w in world.workers):
                    self._install(world, late, reason)
                else:
                    self._form_due = True  # the next pass proposes afresh

        durable.propose({"generation": world.generation, "workers": world.workers,
                         "hosts": world.hosts, "kept": world.kept, "reason": reason}, written)

    def _install(self, world: World, late: list[str], reason: str) -> None:
        """Make `world` the current generation and answer its members (lock held)."""
        gen, order = world.generation, world.workers
        self.world = world
        for w in order:
            self.members[w].waiting = False
        self.formed.update(order)
        self.ranks = {w: r for r, w in enumerate(order)}
        self._wait_since = None
        # Bootstrap keys of older generations are dead weight now.
        for k in [k for k in self.kv if k.startswith("g") and k.split("/", 1)[0][1:].isdigit()
                  and int(k.split("/", 1)[0][1:]) < gen - 1]:
            del self.kv[k]
        self._event("generation", generation=gen, workers=order, reason=reason)
        log.info("generation %d formed with %d workers: %s", gen, len(order), reason)
        self.wake((WORLD,))
        for w in late:
            self.declare_lost(w, f"did not re-form with its peers within {self.settle:.1f}s; "
                              f"generation {gen} formed without it")
