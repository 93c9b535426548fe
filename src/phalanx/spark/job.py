"""The driver side of one `phalanx.spark.run` call (see `phalanx.spark.driver` for the
execution mode): the coordinator, one driver thread per worker submitting that worker's
one-task Spark job, the supervision loop that tells a finished call from a failed one, and
the cleanup that leaves no job, thread or shared-memory segment behind.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import env
from ..coord.protocol import new_secret
from ..coord.server import CoordServer
from ..launch.shmfiles import cleanup as shm_cleanup
from . import cluster, outcome, task
from .outcome import WorkerResult

if TYPE_CHECKING:
    from pyspark import SparkContext

log = logging.getLogger("phalanx.spark")

__all__ = ["SparkJob"]

FAIL_GRACE = 2.0
"""Seconds a failing call waits for the failing workers' own reports (their tracebacks)."""
END_WAIT = 30.0
"""Seconds the call waits, after cancelling its job group, for Spark to end its tasks."""


class _NoCoordGenerationLines(logging.Filter):
    """The driver says one line per generation itself (with hosts), so the coordinator's own
    'generation formed' line is dropped while a call runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("generation %d formed")


class SparkJob:
    """One `run` call: the coordinator, one driver thread (and Spark job) per worker."""

    def __init__(self, sc: SparkContext, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], *, num_workers: int, min_workers: int, timeout: float,
                 heartbeat_timeout: float) -> None:
        self.sc = sc
        self.job_id = secrets.token_hex(4)
        self.group = f"phalanx-{self.job_id}"
        self.n, self.min_workers = num_workers, min_workers
        attempts = cluster.max_task_attempts(sc)
        self.elastic = min_workers < num_workers or attempts > 1
        secret = new_secret()
        bind, advertise = cluster.coordinator_addresses(sc)
        self.server = CoordServer(secret, host=bind, target_np=num_workers,
                                  min_np=min_workers, max_np=num_workers,
                                  heartbeat_timeout=heartbeat_timeout, settle=5.0)
        self.server.membership.straggler_timeout = timeout
        self.server.membership.fail_on_error = True
        host = f"[{advertise}]" if ":" in advertise else advertise
        spec = task.TaskSpec(job_id=self.job_id, address=f"{host}:{self.server.port}",
                             secret=secret, num_workers=num_workers, timeout=timeout,
                             heartbeat_timeout=heartbeat_timeout, elastic=self.elastic,
                             growth=attempts > 1, forwarded=env.forwarded({}))
        self.entry = task.entry(spec, fn, args, kwargs)
        self.threads: list[threading.Thread] = []
        self.ended: queue.Queue[tuple[int, WorkerResult | None, str | None]] = queue.Queue()
        self.results: list[WorkerResult] = []
        self.pending = set(range(num_workers))
        self.losses: list[str] = []
        self._seen = 0
        self._world: list[str] = []
        self._generations = 0

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> list[Any]:
        coord_log = logging.getLogger("phalanx.coord")
        quiet = _NoCoordGenerationLines()
        coord_log.addFilter(quiet)
        self.server.start()
        self.t0 = time.monotonic()
        try:
            for slot in range(self.n):
                self._submit(slot)
            return self._supervise()
        finally:
            try:
                self._end()
            finally:
                coord_log.removeFilter(quiet)

    def _submit(self, slot: int) -> None:
        from pyspark import InheritableThread
        t = InheritableThread(target=self._job, args=(slot,), daemon=True,
                              name=f"phalanx-spark-{self.job_id}-w{slot}")
        t.start()
        self.threads.append(t)

    def _job(self, slot: int) -> None:
        """One worker's one-task Spark job (a driver thread; ends when the task ends)."""
        try:
            self.sc.setJobGroup(self.group, f"phalanx job {self.job_id}: worker slot {slot}",
                                interruptOnCancel=True)
            out = self.sc.parallelize([slot], 1).mapPartitions(self.entry).collect()
            self.ended.put((slot, out[0] if out else None, None))
        except BaseException as e:  # the task failed for good, or the group was cancelled
            self.ended.put((slot, None, _spark_error(e)))

    def _end(self) -> None:
        """Leave nothing behind: no job of ours running, no coordinator, no segments."""
        self.server.membership.quiet()
        self.sc.cancelJobGroup(self.group)
        deadline = time.monotonic() + END_WAIT
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._wait_tasks_ended(deadline)
        self.server.stop()
        shm_cleanup(self.job_id)
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:
            log.warning("Spark had not ended the jobs of %s %.0fs after they were cancelled",
                        ", ".join(stuck), END_WAIT)

    def _wait_tasks_ended(self, deadline: float) -> None:
        """Cancelled jobs end at once; their tasks end when the executors have killed them."""
        tracker = self.sc.statusTracker()
        while time.monotonic() < deadline:
            stages = [s for j in tracker.getJobIdsForGroup(self.group)
                      for s in (getattr(tracker.getJobInfo(j), "stageIds", None) or [])]
            infos = [tracker.getStageInfo(s) for s in stages]
            if not any(i is not None and i.numActiveTasks > 0 for i in infos):
                return
            time.sleep(0.1)

    # ------------------------------------------------------------------ supervision
    def _supervise(self) -> list[Any]:
        while True:
            self._follow_events()
            self._drain(wait=0.05)
            errors = [r for r in self.results if r.error is not None]
            if errors or self.server.membership.failed is not None:
                return self._fail("a worker raised an exception")
            finished = sum(1 for r in self.results if r.error is None)
            if not self.pending:
                if finished:
                    return self._succeed()
                return self._fail("every worker was lost")
            if self.losses and not self.elastic:
                return self._fail("a worker was lost and this job cannot recover")
            if len(self.pending) + finished < self.min_workers and finished == 0:
                return self._fail(f"{len(self.pending)} worker(s) left, fewer than "
                                  f"min_workers={self.min_workers}")

    def _drain(self, wait: float) -> None:
        try:
            item = self.ended.get(timeout=wait)
        except queue.Empty:
            return
        while True:
            slot, result, failure = item
            self.pending.discard(slot)
            if result is not None:
                self.results.append(result)
            else:
                why = f"worker slot {slot}'s Spark task failed for good: {failure}"
                self.losses.append(why)
                log.warning("%s", why)
            try:
                item = self.ended.get_nowait()
            except queue.Empty:
                return

    def _follow_events(self) -> None:
        """One log line per new generation; remember losses for the failure message."""
        events = self.server.events
        while self._seen < len(events):
            e = events[self._seen]
            self._seen += 1
            if e["event"] == "generation":
                self._generations += 1
                self._world = list(e["workers"])
                world = self.server.membership.world
                hosts = sorted(set(world.hosts)) if world is not None else []
                log.info("generation %d: %d worker(s) %s on %d host(s) (%s)", e["generation"],
                         len(self._world), ", ".join(self._world), len(hosts), e["reason"])
            elif e["event"] == "lost":
                who = e.get("worker") or ", ".join(e.get("workers", []))
                rank = self._world.index(who) if who in self._world else -1
                self.losses.append(f"{f'rank {rank} ' if rank >= 0 else ''}(worker {who}) was "
                                   f"lost: {e.get('reason')}")

    def _fail(self, why: str) -> list[Any]:
        m = self.server.membership
        m.quiet()
        m.fail(why)  # no generation forms while the call stops; rendezvous says why
        deadline = time.monotonic() + FAIL_GRACE
        while self.pending and time.monotonic() < deadline:
            with m.cv:
                reported = set(m.errors)
            if reported and reported <= {r.worker for r in self.results if r.error is not None}:
                break  # every exception the coordinator heard of came with its traceback
            self._drain(wait=0.05)
        self._follow_events()
        errors = [r for r in self.results if r.error is not None]
        with m.cv:
            heard = dict(m.errors)
        for worker, error in heard.items():  # reported, but the task never answered
            if worker not in {r.worker for r in errors}:
                rank = self._world.index(worker) if worker in self._world else -1
                errors.append(WorkerResult(slot=-1, attempt=0, worker=worker, host="?", pid=-1,
                                           rank=rank, error=dict(error)))
        hint = outcome.RECOVER_HINT if self.elastic else (
            f"This job cannot recover from a lost worker: min_workers = num_workers and Spark "
            f"does not retry tasks with master {self.sc.master!r} (use local[N,F], a cluster "
            "with spark.task.maxFailures > 1, or min_workers < num_workers)")
        raise outcome.failure(outcome.root_cause(errors), self.losses, why, hint=hint)

    def _succeed(self) -> list[Any]:
        world = self.server.world()
        ordered = outcome.in_rank_order(self.results, world.workers if world else [])
        log.info("job %s finished in %.1fs: %d worker(s) returned, %d generation(s), %d "
                 "loss(es) recovered", self.job_id, time.monotonic() - self.t0, len(ordered),
                 self._generations, len(self.losses))
        return [outcome.value(r) for r in ordered]


def _spark_error(e: BaseException) -> str:
    """The line of a failed job's error that says why (Spark's are pages long)."""
    lines = [ln.strip().lstrip(": ") for ln in str(e).splitlines() if ln.strip(" :")]
    for key in ("Job aborted", "cancelled", "SparkException", "Exception", "Error"):
        for ln in lines:
            if key in ln:
                return ln[:500]
    return (lines[0] if lines else type(e).__name__)[:500]
