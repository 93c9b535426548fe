"""The durable part of a job's membership, kept in etcd by the coordinator that leads the job.

With `phalanx run --etcd`, the coordinator first wins the job's leader election (the key
`<prefix>leader`, held with a lease), then writes, each through a write fenced by its leadership
(so a coordinator that lost leadership can never write):

    <prefix>job          what was started: np, min_np, the launcher's host, when
    <prefix>generation   each generation as it forms: number, workers, hosts, kept ranks
    <prefix>step         the newest step any worker completed (the job's watermark)
    <prefix>outcome      how the job ended

Membership changes wait for etcd: the coordinator forms a generation only once its record is
written (`propose`), so while etcd has no quorum, losses are noticed and survivors wait, but no
new generation forms until it returns. Training itself never waits for etcd: heartbeats,
collectives and the step watermark go on (the watermark catches up later). The job's secret is
never written to etcd. All writes go through one thread, so no caller blocks on etcd.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, EtcdUnavailable, LeadershipLost
from .election import Election, Leadership
from .etcd import EtcdClient

log = logging.getLogger("phalanx.coord")

JOBS_PREFIX = "/phalanx/jobs/"
"""Every job's keys live under JOBS_PREFIX + <job id> + '/'."""
STEP_EVERY = 0.5
"""Seconds between writes of the step watermark while it changes."""


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    """Where the job's etcd is and how to reach it (`phalanx run --etcd ...`)."""

    endpoints: tuple[str, ...]
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    ttl: float = 2.0
    """Seconds the leader's lease outlives its last keepalive."""
    timeout: float = 5.0
    """Seconds an etcd request may take, across endpoints, before etcd counts as unavailable."""

    def client(self, job_id: str) -> EtcdClient:
        """A client confined to this job's keys."""
        return EtcdClient(list(self.endpoints), prefix=f"{JOBS_PREFIX}{job_id}/",
                          timeout=self.timeout, cacert=self.cacert, cert=self.cert,
                          key=self.key)


def parse_endpoints(text: str) -> tuple[str, ...]:
    """`host:port[,host:port...]` as given to --etcd (schemes allowed), checked."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts:
        raise ConfigError(f"--etcd {text!r}: give host:port[,host:port...], e.g. "
                           "--etcd 10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379")
    return parts


class DurableRecord:
    """The job's durable record in etcd, written by this coordinator while it leads."""

    def __init__(self, client: EtcdClient, *, ttl: float) -> None:
        self.client = client
        self.election = Election(client, "leader", ttl)
        self.ttl = ttl
        self.leadership: Leadership | None = None
        self._jobs: queue.Queue[tuple[str, bytes, Callable[[bool], None] | None] | None] = \
            queue.Queue()
        self._step = (-1, -1)  # (newest noted, newest written)
        self._step_at = 0.0
        self._stop = threading.Event()
        self._fenced = threading.Event()
        self._thread: threading.Thread | None = None
        self._me = b""

    # ---- start and stop ----
    def start(self, leader: dict[str, Any], job: dict[str, Any], timeout: float) -> None:
        """Check etcd answers, win the job's leadership, write the job record; raises
        EtcdUnavailable (etcd unreachable, naming the endpoints) or LeadershipLost (another
        coordinator leads this job)."""
        self.client.status()
        self._me = json.dumps(leader).encode()
        self.leadership = self.election.campaign(self._me, timeout=timeout)
        self.election.fenced_put(self.leadership, "job", json.dumps(job).encode())
        self._thread = threading.Thread(target=self._write_loop, name="phalanx-etcd",
                                        daemon=True)
        self._thread.start()
        log.info("leading the job in etcd (token %d, lease ttl %gs)", self.leadership.revision,
                 self.ttl)

    def close(self, outcome: str | None = None) -> None:
        """Write the outcome (best effort), stop writing, and give up leadership."""
        if self._thread is None:
            return
        if outcome is not None:
            done = threading.Event()
            self._jobs.put(("outcome", outcome.encode(), lambda ok: done.set()))
            done.wait(self.client.timeout)
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(self.client.timeout + 1)
        self._thread = None
        if self.leadership is not None:
            try:
                self.leadership.resign()
            except (EtcdUnavailable, LeadershipLost) as e:
                log.warning("could not resign the job's leadership in etcd: %s", e)

    # ---- what membership asks ----
    @property
    def fenced(self) -> bool:
        """Another coordinator leads this job now: this one must not change membership."""
        return self._fenced.is_set()

    def propose(self, record: dict[str, Any], done: Callable[[bool], None]) -> None:
        """Write a generation record; `done(True)` once it is durable, `done(False)` if this
        coordinator lost its leadership (the generation must not form)."""
        self._jobs.put(("generation", json.dumps(record).encode(), done))

    def note_step(self, step: int) -> None:
        """The newest step a worker completed (written at most every STEP_EVERY seconds)."""
        if step > self._step[0]:
            self._step = (step, self._step[1])
        now = time.monotonic()
        if self._step[0] > self._step[1] and now - self._step_at >= STEP_EVERY:
            self._step_at = now
            self._jobs.put(("step", str(self._step[0]).encode(), None))

    # ---- the writer ----
    def _write_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            key, value, done = job
            ok = self._write(key, value)
            if key == "step" and ok:
                self._step = (self._step[0], max(self._step[1], int(value)))
            if done is not None:
                done(ok)

    def _write(self, key: str, value: bytes) -> bool:
        """Write until it lands (retrying while etcd is unavailable, winning the leadership
        back if its lease ran out meanwhile), or another coordinator leads the job."""
        warned = False
        while not self._fenced.is_set() and (not self._stop.is_set() or key == "outcome"):
            lead = self.leadership
            assert lead is not None
            try:
                if lead.lost.is_set():
                    self._regain(lead)
                    continue
                self.election.fenced_put(lead, key, value)
                if warned:
                    log.warning("etcd is back: membership changes resume")
                return True
            except LeadershipLost:
                continue
            except EtcdUnavailable as e:
                if not warned:
                    log.warning("etcd unavailable (%s); training goes on, membership changes "
                                "wait for it", str(e).splitlines()[0][:300])
                    warned = True
                if key == "outcome":
                    return False
                self._stop.wait(0.2)
        return False

    def _regain(self, lost: Leadership) -> None:
        """Our lease ran out (etcd was away longer than its ttl): campaign again, unless the
        leader key now names another coordinator (then this one is fenced for good)."""
        current = self.election.leader()
        if current is not None and current[0] != self._me:
            log.error("another coordinator leads this job in etcd now (%r); this one stops "
                      "changing membership (%s)", current[0][:200], lost.reason)
            self._fenced.set()
            return
        log.warning("the job's leadership in etcd lapsed (%s); campaigning again", lost.reason)
        try:
            lost.resign()
        except (EtcdUnavailable, LeadershipLost):
            pass
        self.leadership = self.election.campaign(self._me, timeout=self.ttl * 4)
        log.warning("leading the job in etcd again (token %d)", self.leadership.revision)
