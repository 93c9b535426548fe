"""This process's membership in a job: coordinator link, current generation and its `Group`.

`init()` joins the job that `phalanx run` started (reading the environment it wrote), or, run
as a plain script, forms a one-worker job with the same API. `reform()` is the elastic path:
drop the broken group, rendezvous for the next generation, and build a fresh group.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import socket
import threading
import time

import torch.distributed as dist

from . import env, static
from .comm.group import Group, Placement
from .comm.store import CoordStore
from .config import Config
from .coord.client import CoordClient
from .coord.server import raise_fd_limit
from .errors import ConfigError, JobFinished, RendezvousError
from .observe import Recorder
from .observe import merge as merge_timeline

log = logging.getLogger("phalanx")


class Runtime:
    """Everything one worker process holds about the job it belongs to."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.host = env.get_str(env.HOST) or socket.gethostname()
        self.job_id = env.get_str(env.JOB_ID) or f"solo{os.getpid()}"
        self.worker = env.get_str(env.WORKER_ID) or f"{self.host}-{os.getpid()}"
        self.client: CoordClient | None = None
        self.group: Group
        self.kept: list[int] = []
        """Ranks of the previous generation still in the current one (from the rendezvous)."""
        self.job_step = -1
        """Newest step any worker of the job reported (from the last rendezvous; -1 unknown)."""
        self.subgroup_members: list[tuple[int, ...]] = []
        """Member ranks of each subgroup the job made (`px.new_group`), in creation order:
        every generation rebuilds, in this order, those whose ranks it still has."""
        self.recorder = Recorder(worker=self.worker, timeline_path=env.timeline_path(),
                                 metrics_path=env.get_str(env.METRICS))
        """Timeline events and step metrics of this worker (observe.Recorder)."""
        raise_fd_limit()
        addr = env.get_str(env.COORD_ADDR)
        if addr:
            secret = env.get_str(env.SECRET) or ""
            if not secret:
                raise ConfigError(f"{env.COORD_ADDR} is set but {env.SECRET} is not; start "
                                  "workers with `phalanx run`, which sets both")
            self.object_key = hashlib.sha256(b"phalanx-objects" + secret.encode()).digest()
            _warm_imports()
            self.client = CoordClient(addr, secret, self.worker)
            self.client.join(host=self.host, rank_hint=env.get_int(env.RANK, -1), pid=os.getpid(),
                             starter=env.get_str(env.STARTER))
            self.client.progress = self._progress
            self.client.start_heartbeat(config.heartbeat_interval, config.heartbeat_timeout)
            try:
                self.group = self._form(after=0)
            except JobFinished:
                # A replacement that arrives after the last step: exit cleanly, not as a failure.
                log.warning("the job finished before this worker could join; exiting")
                self.client.close(leave=True)
                raise SystemExit(0) from None
        elif (found := static.detect()) is not None:
            self.group = self._static(found)
        else:
            self.object_key = os.urandom(32)
            place = Placement(generation=1, rank=0, size=1, local_rank=0, local_size=1,
                              hosts=[self.host], pids=[os.getpid()])
            self.group = Group(place, dist.HashStore(), config, job_id=self.job_id,
                               secret=self.object_key, recorder=self.recorder)

    def _static(self, e: static.StaticEnv) -> Group:
        """A fixed-membership job started by torchrun & co. (see `phalanx.static`)."""
        store = static.store(e, self.config.timeout)
        hosts, pids, self.object_key = static.exchange(store, e, self.host)
        self.job_id = "".join(c for c in e.run_id if c.isalnum())[:24]
        mine = [r for r, h in enumerate(hosts) if h == self.host]
        place = Placement(generation=1, rank=e.rank, size=e.size, local_rank=mine.index(e.rank),
                          local_size=len(mine), hosts=hosts, pids=pids)
        if env.get_str(env.BIND_ADDR) is None:
            self.config.bind_addr = static.bind_address(e)
        return Group(place, store, self.config, job_id=self.job_id, secret=self.object_key,
                     recorder=self.recorder)

    def _form(self, after: int) -> Group:
        assert self.client is not None  # only called for launched jobs
        a = self.client.rendezvous(after=after, step=self.client.step,
                                   timeout=max(60.0, self.config.timeout))
        self.job_step = int(a.get("job_step", -1))
        place = Placement(generation=a["generation"], rank=a["rank"], size=a["size"],
                          local_rank=a["local_rank"], local_size=a["local_size"],
                          hosts=a["hosts"], pids=a["pids"])
        self.kept = list(a.get("kept", []))
        store = CoordStore(self.client, f"g{place.generation}/gloo", timeout=self.config.timeout,
                           abort_check=self.client.abort_reason)
        self.recorder.place(place.rank, place.generation)
        return Group(place, store, self.config, job_id=self.job_id, secret=self.object_key,
                     abort_check=self.client.abort_reason, status=self._lost_ranks,
                     recorder=self.recorder)

    def _progress(self) -> tuple[int, float]:
        progress = getattr(getattr(self, "group", None), "progress", None)
        return progress() if progress is not None else (0, 0.0)

    def _lost_ranks(self) -> list[int]:
        if self.client is None:
            return []
        # The coordinator learns of a death from the heartbeat socket closing; give it a moment.
        deadline = time.monotonic() + min(1.0, self.config.heartbeat_timeout)
        while True:
            try:
                reply, _ = self.client.request({"op": "status",
                                                "generation": self.group.place.generation})
            except RendezvousError:
                return []
            lost = list(reply.get("lost_ranks", []))
            if lost or time.monotonic() >= deadline:
                return lost
            time.sleep(0.02)

    def reform(self) -> Group:
        """Leave the current generation and join the next one (elastic recovery)."""
        if self.client is None:
            raise RendezvousError("reform() needs a job started by `phalanx run`")
        old = self.group
        old.close()
        self.group = self._form(after=old.place.generation)
        self.open_subgroups()
        return self.group

    def open_subgroups(self) -> None:
        """Build this generation's subgroups that include this rank, in creation order (on
        every rank, so members connect in the same order and never wait on each other)."""
        from .comm.subgroup import open_subgroup
        place = self.group.place
        for members in self.subgroup_members:
            if place.rank in members and max(members) < place.size:
                open_subgroup(self.group, members)

    def report_step(self, step: int) -> None:
        """The State completed `step`: the coordinator hears it with the next heartbeat."""
        self.recorder.state_step = step
        if self.client is None:
            return
        first = self.client.step < 0 < step
        self.client.step = step
        if first:
            # Heartbeats carry the step every ~0.25 s; a job whose workers all die before
            # their first beat after step 1 would otherwise look untrained and restart
            # silently from step 0. One request per process closes that window.
            self.client.request({"op": "progress", "worker": self.worker, "step": step})

    def rebase_step(self, step: int) -> None:
        """The job resumed from a checkpoint at `step`: newer steps are gone for good."""
        if self.client is not None:
            self.client.step = step
            self.job_step = step
            self.client.request({"op": "rebase", "step": step})

    def event(self, kind: str, info: dict[str, object], key: str | None = None) -> bool:
        """Tell the launcher something for its end-of-job report (e.g. a chaos rule fired).
        With a `key`, returns False if any worker already reported that key."""
        if self.client is None:
            return True
        reply, _ = self.client.request({"op": "event", "worker": self.worker, "kind": kind,
                                        "info": info, "key": key})
        return bool(reply.get("first", True))

    def report_failure(self, record: dict[str, object]) -> None:
        """This worker is exiting on an exception: tell the coordinator (not as a clean
        leave, and not as a silent loss) so peers stop waiting for it at once."""
        if self.client is not None:
            keep = {k: record[k] for k in ("type", "message", "where", "cascade") if k in record}
            self.client.request({"op": "failed", "worker": self.worker, "error": keep})

    def sever(self) -> None:
        """Drop the coordinator links without a goodbye (chaos: a network cut)."""
        if self.client is not None:
            self.client.sever()

    def shutdown(self) -> None:
        try:
            self.group.close()
        finally:
            if self.client is not None:
                self.client.close(leave=True)
            self.recorder.close()
            timeline = env.timeline_path()
            if timeline and self.client is None and self.group.place.size == 1:
                merge_timeline(timeline)   # a one-worker job has no launcher to merge it


def _warm_imports() -> None:
    """Import, before joining, what a training script's first optimizer imports lazily
    (torch._dynamo: seconds). A replacement joins at a step boundary and its peers wait for it
    until it heals, so it must not pay this cost after it joined."""
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # an optional speed-up; never a reason to fail
        pass


_runtime: Runtime | None = None
_lock = threading.Lock()


def init(config: Config | None = None) -> Runtime:
    """Join the job (idempotent). Reads PHALANX_* variables written by `phalanx run`."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime(config or Config.from_env())
            atexit.register(shutdown)
        return _runtime


def active() -> Runtime | None:
    """The runtime if `init()` was called, else None (never initialises)."""
    return _runtime


def current() -> Runtime:
    """The runtime, initialising on first use."""
    return _runtime if _runtime is not None else init()


def is_initialized() -> bool:
    return _runtime is not None


def shutdown() -> None:
    """Leave the job and free its resources; safe to call twice."""
    global _runtime
    with _lock:
        rt, _runtime = _runtime, None
    if rt is not None:
        rt.shutdown()
