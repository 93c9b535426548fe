"""`RayJob`: one phalanx job whose workers are Ray actors, supervised from the Ray driver.

The driver plays the part `phalanx run` plays for local children. It hosts the coordinator (an
actor's death never takes the job's membership with it), places one actor per worker in a
placement group, hands each actor the PHALANX_* environment its `px.init()` reads, fences
(`ray.kill`) a worker the coordinator declares lost so its peers fail fast, and starts up to
`max_restarts` replacement actors that join the running job as new workers (Ray's own actor
restarts stay off). It tells faults from bugs as `phalanx run` does: an actor that dies is a
fault, recovered while enough workers remain; an exception raised by the user's function is a
bug and fails the call. It logs one line per generation, and leaves nothing behind: no actor,
no placement group, no coordinator thread, no shared memory.

The coordinator listens on loopback only when every bundle was placed on the driver's node,
else on the node's address (a cluster may grow after the call). A lost worker whose node does
not answer is reported as a node loss naming the node, and cleanup does not wait on that node.
"""

from __future__ import annotations

import logging
import secrets
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..coord.protocol import new_secret
from ..coord.server import CoordServer
from ..errors import ConfigError
from ..launch import procs, report
from . import records
from .cluster import Cluster
from .records import ActorRecord
from .spec import RunSpec
from .worker import Outcome, WorkerActor

log = logging.getLogger("phalanx.ray")

ACTOR_PREFIX = "phalanx-"
"""Every actor of a job is named phalanx-<job id>-<worker id> (in the driver's namespace)."""
POLL = 0.05
"""Seconds the supervision loop waits for an actor's news before it looks at the coordinator."""
SETTLE = 5.0
"""Seconds survivors wait for live members that have not come back before re-forming without
them (the coordinator's `settle`, as `phalanx run` sets it)."""


def _show_progress() -> None:
    """Progress lines reach the user even when nobody configured logging."""
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    if not log.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[phalanx] %(message)s"))
        log.addHandler(handler)


class RayJob:
    """Runs `fn(*args, **kwargs)` on `spec.num_workers` actors; `run()` returns the values."""

    def __init__(self, ray: ModuleType, spec: RunSpec, fn: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.ray = ray
        self.spec = spec
        self.job_id = secrets.token_hex(4)
        self._secret = new_secret()
        try:  # put once: every actor, replacements too, gets the same reference
            self._call = ray.put((fn, tuple(args), dict(kwargs)))
        except Exception as e:  # cloudpickle could not serialise something fn refers to
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ConfigError(f"fn={fn!r:.120} or its args/kwargs cannot be sent to Ray actors "
                              f"({type(e).__name__}: {first}); everything fn uses must pickle "
                              "(cloudpickle): create files, locks and sockets inside fn") from e
        self.cluster = Cluster(ray)
        self._runtime_env = self.cluster.runtime_env()
        self._remote = ray.remote(WorkerActor)
        self._lock = threading.Lock()
        self._actors: dict[str, ActorRecord] = {}
        self._timers: list[threading.Timer] = []
        self._outcomes: dict[str, Outcome] = {}
        self.exits: list[report.Exit] = []
        self.restarts = 0
        self._seen_events = 0
        self._stopping = False
        self._pg: Any = None
        self._placed_at = self.t0 = 0.0
        self._local = True
        """Every worker is on the driver's node: loopback only (known once placed)."""
        self._server: CoordServer | None = None
        self._lost_nodes: dict[str, str] = {}
        """Node id -> why it is lost (unreachable, or dead for Ray): nothing waits on it."""

    @property
    def server(self) -> CoordServer:
        """The job's coordinator, listening once the workers are placed."""
        if self._server is None:  # cannot happen: only used once run() placed the workers
            raise RuntimeError("the coordinator is not started yet")
        return self._server

    def _serve(self) -> None:
        """Start the coordinator where every placed worker can reach it."""
        spec = self.spec
        self._local = self.cluster.only_here(self._pg)
        server = CoordServer(self._secret, host=self.cluster.bind_address(self._local),
                             target_np=spec.num_workers, min_np=spec.min_np,
                             max_np=spec.num_workers, heartbeat_timeout=spec.heartbeat_timeout,
                             settle=SETTLE, fence=self._fence, probe_stopped=self._is_stopped)
        server.membership.straggler_timeout = spec.timeout
        server.membership.fail_on_error = True
        self._server = server.start()

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> list[Any]:
        _show_progress()
        self.t0 = time.monotonic()
        try:
            spec = self.spec
            self._pg = self.cluster.place(spec.bundle, spec.num_workers,
                                          timeout=spec.placement_timeout,
                                          name=f"{ACTOR_PREFIX}{self.job_id}")
            self._placed_at = time.monotonic()
            self._serve()
            for slot in range(spec.num_workers):
                self._spawn(slot, 0)
            return self._supervise()
        finally:
            self._teardown()

    def _teardown(self) -> None:
        if self._server is not None:
            self._server.membership.quiet()
        with self._lock:
            actors = list(self._actors.values())
            timers, self._timers = self._timers, []
        for t in timers:
            t.cancel()
        for a in actors:
            self._kill(a)
        gone = self._skipped_nodes(actors)
        reachable = [a for a in actors if a.where is None or a.where.node_id not in gone]
        self.cluster.wait_gone([self._name(a) for a in reachable])
        if self._pg is not None:
            self.cluster.release(self._pg)
        if self._server is not None:
            self._server.stop()
        self.cluster.clean_shm(self.job_id, {a.where.node_id for a in reachable if a.where},
                               self._runtime_env)

    def _skipped_nodes(self, actors: list[ActorRecord]) -> set[str]:
        """The job's nodes that cleanup must not wait on: lost during the job, or dead for
        Ray now (an actor there cannot be seen to die, a cleanup task there never runs)."""
        lost = dict(self._lost_nodes)
        for node in self.cluster.dead_nodes() - set(lost):
            lost[node] = "Ray reports it dead"
        where = {a.where.node_id: a.where for a in actors if a.where is not None}
        for node in sorted(lost.keys() & where.keys()):
            w = where[node]
            log.info("cleanup does not wait on node %s (%s): %s", w.ip, w.hostname, lost[node])
        return set(lost)

    def _name(self, a: ActorRecord) -> str:
        return f"{ACTOR_PREFIX}{self.job_id}-{a.worker}"

    def _kill(self, a: ActorRecord) -> None:
        a.ended = True
        self.cluster.kill(a.handle)

    # ------------------------------------------------------------------ workers
    def _spawn(self, slot: int, restart: int) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        a = ActorRecord(slot=slot, restart=restart, handle=None, where_ref=None)
        opts: dict[str, Any] = {
            **self.spec.actor_options(), "name": self._name(a),
            "max_restarts": 0, "max_task_retries": 0,  # replacements join as new workers
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self._pg, placement_group_bundle_index=slot)}
        if self._runtime_env is not None:
            opts["runtime_env"] = self._runtime_env
        a.handle = self._remote.options(**opts).remote(a.label)
        a.where_ref = a.handle.where.remote()
        with self._lock:
            self._actors[a.worker] = a

    def _environ(self, a: ActorRecord) -> dict[str, str]:
        if a.where is None:  # cannot happen: called once the actor said where it is
            raise RuntimeError(f"actor {a.label} has not started")
        node = a.where.node_id
        with self._lock:  # the GPUs of this job's live workers on the actor's node
            gpus = {g for b in self._actors.values() if not b.ended and b.where is not None
                    and b.where.node_id == node for g in b.where.gpu_ids}
        return records.worker_env(self.spec, a, address=self.server.address,
                                  secret=self._secret, job_id=self.job_id,
                                  bind=not self._local, gpus=gpus)

    def _start_runs(self) -> None:
        """Call the function on every actor that is up. With GPUs, the first actors wait for
        each other, so each sees all of its node's GPUs of the job."""
        if self._stopping:
            return
        with self._lock:
            actors = list(self._actors.values())
        if self.spec.gpus > 0 and any(a.where is None and not a.ended and a.restart == 0
                                      for a in actors):
            return
        for a in actors:
            if a.where is not None and a.run_ref is None and not a.ended:
                a.run_ref = a.handle.run.remote(self._call, self._environ(a))

    def _is_stopped(self, worker: str, pid: int) -> bool:
        """Coordinator probe: is this worker's process stopped (state T)? Only on our node."""
        with self._lock:
            a = self._actors.get(worker)
        return (a is not None and a.where is not None and a.where.node_id == self.cluster.node
                and a.where.pid == pid and procs.is_stopped(pid))

    def _fence(self, worker: str, pid: int, urgent: bool = True) -> None:
        """Coordinator callback: kill a worker declared lost so its peers fail fast."""
        if not urgent:
            # Its heartbeat socket closed: normally it is exiting; if it still runs a moment
            # later it was cut off, and is fenced.
            timer = threading.Timer(0.15, self._fence, args=(worker, pid, True))
            timer.daemon = True
            with self._lock:
                self._timers = [t for t in self._timers if t.is_alive()] + [timer]
            timer.start()
            return
        with self._lock:
            a = self._actors.get(worker)
        if a is None or a.ended:
            return
        w = a.where
        if w is not None and w.node_id == self.cluster.node and w.pid == pid \
                and procs.exiting(pid):
            return  # it died on its own; Ray will say so
        a.fenced = True
        log.warning("fencing worker %s (%s): declared lost by the coordinator", worker, a.label)
        self.cluster.kill(a.handle)

    # ------------------------------------------------------------------ supervision
    def _pending(self) -> dict[Any, tuple[ActorRecord, str]]:
        with self._lock:
            actors = [a for a in self._actors.values() if not a.ended]
        out: dict[Any, tuple[ActorRecord, str]] = {}
        for a in actors:
            if a.run_ref is not None:
                out[a.run_ref] = (a, "run")
            elif a.where is None:
                out[a.where_ref] = (a, "where")
        return out

    def _reap(self) -> list[report.Exit]:
        """Start the actors that came up; return the workers that ended since the last call."""
        pending = self._pending()
        if not pending:
            time.sleep(POLL)
            return []
        refs = list(pending)
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=POLL)
        if ready:
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        ended: list[report.Exit] = []
        for ref in ready:
            a, what = pending[ref]
            e = self._took(a, what, ref)
            if e is not None:
                self._kill(a)  # its process is done with the job; free its bundle
                ended.append(e)
        self._start_runs()
        self.exits.extend(ended)
        return ended

    def _took(self, a: ActorRecord, what: str, ref: Any) -> report.Exit | None:
        """Read one ready reference of actor `a`; an Exit if the worker ended."""
        errors = self.ray.exceptions
        try:
            value = self.ray.get(ref)
        except errors.RayActorError as e:
            return records.died(a, str(e), node_lost=self._node_loss(a))
        except errors.RayError as e:  # e.g. fn could not be unpickled in the actor
            cause = getattr(e, "cause", None) or e
            return records.call_failed(a, type(cause).__name__, str(cause), str(e))
        if what == "where":
            a.where = value
            return None
        self._outcomes[a.worker] = value
        return records.returned(a, value)

    def _node_loss(self, a: ActorRecord) -> str:
        """Why the node of dead actor `a` is lost, or "" when it is the driver's or answers."""
        w = a.where
        if w is None or w.node_id == self.cluster.node:
            return ""
        if w.node_id not in self._lost_nodes:
            why = self.cluster.node_lost(w.node_id)
            if why is None:
                return ""
            self._lost_nodes[w.node_id] = why
            log.warning("node %s (%s) lost: %s; its workers are lost with it", w.ip,
                        w.hostname, why)
        return self._lost_nodes[w.node_id]

    def _supervise(self) -> list[Any]:
        spec, m = self.spec, self.server.membership
        while True:
            ended = self._reap()
            self._log_generations()
            if m.failed is not None:
                self._fail()  # a worker reported an exception: no replacement can help
            for e in sorted(ended, key=lambda e: e.is_fault):  # bugs first
                if e.code == 0:
                    continue
                if not e.is_fault or not spec.elastic:
                    self._fail()
                self.server.declare_lost(e.worker, e.why())
                if self.restarts < spec.max_restarts:
                    self.restarts += 1
                    self._spawn(e.slot, self.restarts)
                    log.info("%s; starting a replacement (%d/%d restarts)", e.why(),
                             self.restarts, spec.max_restarts)
                else:
                    log.info("%s; continuing without it", e.why())
            with self._lock:
                running = sum(1 for a in self._actors.values() if not a.ended)
            finished = sum(1 for e in self.exits if e.code == 0)
            if self._world_finished() or (running == 0 and finished):
                return self._succeed()
            if running == 0:
                self._fail("every worker was lost")
            if spec.elastic and running + finished < spec.min_np and finished == 0:
                self._fail(f"{running} worker(s) left, fewer than min_workers={spec.min_np}")
            if time.monotonic() - self._placed_at > spec.placement_timeout:
                self._check_started()

    def _check_started(self) -> None:
        """First actors that never came up (a runtime_env that does not build, a node that
        never came): fail rather than wait forever for the first generation."""
        with self._lock:
            late = [a.label for a in self._actors.values()
                    if a.restart == 0 and a.where is None and not a.ended]
        if late:
            self._fail(f"actor(s) {', '.join(late)} did not start within placement_timeout="
                       f"{self.spec.placement_timeout:g}s")

    def _world_finished(self) -> bool:
        """Every member of the newest generation returned: the job is over, and a replacement
        still starting would only be told so."""
        world = self.server.world()
        return world is not None and all(
            (o := self._outcomes.get(w)) is not None and o.error is None for w in world.workers)

    def _log_generations(self) -> None:
        events = self.server.events
        new, self._seen_events = events[self._seen_events:], len(events)
        for ev in new:
            if ev.get("event") == "generation":
                workers = list(ev.get("workers", []))
                log.info("generation %d: %d worker(s) [%s] (%s)", ev.get("generation"),
                         len(workers), ", ".join(workers), ev.get("reason"))

    def _fail(self, why: str = "") -> None:
        """Stop the job and raise; the message names the root cause (the first failure)."""
        m = self.server.membership
        self._stopping = True
        m.quiet()
        m.fail(why or "a worker failed")  # no generation forms while the job is stopping
        deadline = time.monotonic() + 0.5  # let near-simultaneous exits arrive, to order them
        while self._pending() and time.monotonic() < deadline:
            self._reap()
        error = records.failure(self.exits, self._outcomes, fallback=str(m.failed), why=why,
                                elastic=self.spec.elastic)
        log.error("job failed: %s%s", error.cause, f"; {why}" if why else "")
        raise error

    def _succeed(self) -> list[Any]:
        world = self.server.world()
        with self._lock:
            slots = {a.worker: a.slot for a in self._actors.values()}
        done = records.in_rank_order(list(self._outcomes.values()),
                                     world.workers if world is not None else None, slots)
        log.info("%s", report.summary(
            seconds=time.monotonic() - self.t0, started=self.spec.num_workers,
            finished=len(done), exits=self.exits,
            generations=sum(1 for e in self.server.events if e["event"] == "generation"),
            restarts=self.restarts))
        return [o.value for o in done]
