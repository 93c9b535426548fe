"""`phalanx run`: host the coordinator, spawn and supervise workers, respawn the lost ones.

The launcher outlives its workers: it hosts the coordinator (so a worker's death never takes
the job's membership with it), fences workers the coordinator declares lost, prefixes every
output line with the worker's rank, and cleans up shared memory. It tells faults (a worker
killed, stopped, fenced, cut off: recovered) from bugs (an exception: the job fails, whatever
--max-restarts says), names the root cause of a failure on its last line, ends a successful
job with a one-line summary, and stops quietly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import IO

from .. import env
from ..coord.durable import DurableRecord
from ..coord.protocol import new_secret
from ..coord.server import CoordServer
from ..errors import PhalanxError
from ..observe.timeline import merge as merge_timeline
from . import etcdjob, procs, report
from .procs import CHILD, write_join_file
from .remote import AgentFleet
from .runconfig import RunConfig
from .shmfiles import cleanup as shm_cleanup
from .timed_chaos import TimedChaos

__all__ = ["CHILD", "RunConfig", "Supervisor", "write_join_file"]


def _log_to_stderr() -> None:
    """Coordinator log lines go to the launcher's stderr as '[phalanx] ...'."""
    coord_log = logging.getLogger("phalanx.coord")
    if not coord_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[phalanx] %(message)s"))
        coord_log.addHandler(handler)
        coord_log.setLevel(logging.INFO)
        coord_log.propagate = False


def _free_port() -> int:
    """A TCP port free on this host now (it may be taken before a worker binds it: rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class Supervisor:
    """Runs one local job to completion; `run()` returns the launcher's exit code."""

    def __init__(self, cfg: RunConfig, *, out: IO[bytes] | None = None,
                 err: IO[bytes] | None = None) -> None:
        self.cfg = cfg
        self.job_id = secrets.token_hex(4)
        self._secret = new_secret()
        self._out = out or sys.stdout.buffer
        self._err = err or sys.stderr.buffer
        self._print_lock = threading.Lock()
        self._workers: dict[str, procs.Worker] = {}
        self._lock = threading.Lock()
        self._signal: int | None = None
        self._quiet = False
        self._errdir = tempfile.mkdtemp(prefix=f"phalanx-{self.job_id}-")
        self.exits: list[report.Exit] = []
        self.restarts = 0
        self.host = socket.gethostname()
        self._master_port = 0 if cfg.hosts else _free_port()
        """MASTER_PORT of a local job: where rank 0 hosts torch's TCPStore (env.torch_vars)."""
        self.server = CoordServer(self._secret, host=cfg.bind, target_np=cfg.np,
                                  min_np=cfg.min_np, max_np=cfg.max_np,
                                  heartbeat_timeout=cfg.heartbeat_timeout, settle=5.0,
                                  fence=self._fence, probe_stopped=self._is_stopped)
        self.server.membership.straggler_timeout = cfg.timeout
        self.server.membership.fail_on_error = cfg.retry_errors == 0
        self.fleet = AgentFleet(hosts=cfg.hosts, membership=self.server.membership,
                                secret=self._secret, job_id=self.job_id, cfg=cfg,
                                address=self.server.address, out=self._sink(self._out),
                                err=self._sink(self._err), say=self._note) if cfg.hosts else None
        self.durable: DurableRecord | None = None
        """With --etcd: the job's record there, written while this coordinator leads."""
        self._summary = ""
        self.chaos_timer = TimedChaos(cfg.chaos, np=cfg.np, pid_of=self._pid_of,
                                      on_fire=lambda _rule, line: self._note(line))

    # ------------------------------------------------------------------ output
    def say(self, msg: str) -> None:
        self._summary = msg  # the last line said is the job's summary (--etcd records it)
        with self._print_lock:
            self._err.write(f"[phalanx] {msg}\n".encode())
            self._err.flush()

    def _note(self, msg: str) -> None:
        """A line from the fleet (lost hosts, placements), unless stopping on purpose."""
        if not self._quiet:
            self.say(msg)

    def _sink(self, stream: IO[bytes]) -> procs.Sink:
        def write(line: bytes) -> None:
            if self._quiet:  # stopping on purpose: per-rank noise helps nobody
                return
            with self._print_lock:
                stream.write(line)
                stream.flush()
        return write

    # ------------------------------------------------------------------ workers
    def _spawn(self, slot: int, restart: int) -> bool:
        """Start a worker for rank slot `slot`; False if there is nowhere to start it."""
        worker_id = f"w{slot}" if restart == 0 else f"w{slot}.{restart}"
        if self.fleet is not None:
            return self.fleet.spawn(slot, worker_id)
        cfg = self.cfg
        error_file = os.path.join(self._errdir, f"{worker_id}.json")
        wenv = {**os.environ, **cfg.extra_env,
                env.RANK: str(slot), env.SIZE: str(cfg.np), env.LOCAL_RANK: str(slot),
                env.LOCAL_SIZE: str(cfg.np), env.WORKER_ID: worker_id,
                env.COORD_ADDR: self.server.address, env.SECRET: self._secret,
                env.JOB_ID: self.job_id, env.HOST: self.host, env.TIMEOUT: str(cfg.timeout),
                env.HEARTBEAT_TIMEOUT: str(cfg.heartbeat_timeout), env.ERROR_FILE: error_file,
                env.ELASTIC: "1" if cfg.elastic else "0", "PYTHONUNBUFFERED": "1",
                env.GROWTH: "1" if cfg.can_grow else "0",
                **env.horovod_vars(slot, cfg.np, slot, cfg.np),
                **env.torch_vars(slot, cfg.np, slot, cfg.np, master_addr="127.0.0.1",
                                 master_port=self._master_port)}
        if cfg.chaos:
            wenv[env.CHAOS] = cfg.chaos
        if cfg.bind not in ("127.0.0.1", "::1", "localhost"):
            # The coordinator listens where other hosts reach it (agents started by hand or a
            # scheduler may join): so must these workers' data plane.
            wenv.setdefault(env.BIND_ADDR, cfg.bind)
        # One worker per core is the right default for CPU training (torchrun does the same).
        wenv.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.np)))
        w = procs.spawn(slot=slot, worker_id=worker_id, prefix=lambda: self._prefix(worker_id),
                        argv=[cfg.script, *cfg.args], env=wenv, error_file=error_file,
                        out=self._sink(self._out), err=self._sink(self._err))
        with self._lock:
            self._workers[worker_id] = w
        return True

    def _prefix(self, worker_id: str) -> str:
        """'[rank2]: ' for worker w2 while it holds rank 2; after a shrink renumbered it, or for
        a replacement, the current rank and the worker id: '[rank1 w2]: ', '[rank2 w2.1]: '."""
        rank = self.server.membership.rank_of(worker_id)
        if rank is None:  # not in a generation (yet): the rank it was started for
            rank = int(worker_id[1:].split(".")[0])
        return f"[rank{rank}]: " if worker_id == f"w{rank}" else f"[rank{rank} {worker_id}]: "

    def _pid_of(self, worker_id: str) -> int | None:
        with self._lock:
            w = self._workers.get(worker_id)
        return w.proc.pid if w is not None and w.proc.poll() is None else None

    def _is_stopped(self, worker_id: str, pid: int) -> bool:
        """Coordinator probe: is this (local) worker's process stopped (state T)?"""
        with self._lock:
            w = self._workers.get(worker_id)
        return w is not None and w.proc.pid == pid and procs.is_stopped(pid)

    def _fence(self, worker_id: str, pid: int, urgent: bool = True) -> None:
        """Coordinator callback: kill a worker declared lost so its peers fail fast."""
        if not urgent:
            # Its heartbeat socket closed: normally it is exiting (an exit finishes well within
            # 0.15 s); if it is still running it was cut off, and is fenced.
            timer = threading.Timer(0.15, self._fence, args=(worker_id, pid, True))
            timer.daemon = True
            timer.start()
            return
        with self._lock:
            w = self._workers.get(worker_id)
        if w is None or w.proc.poll() is not None or procs.exiting(w.proc.pid):
            return
        w.fenced = True
        if not self._quiet:
            self.say(f"fencing worker {worker_id} (pid {w.proc.pid}): declared lost by the "
                     "coordinator")
        procs.kill_group(w.proc.pid, signal.SIGKILL)

    def _all(self) -> list[procs.Worker]:
        with self._lock:
            return list(self._workers.values())

    def _stop_workers(self, grace: float) -> None:
        if self.fleet is not None:
            self.fleet.stop(grace)
        procs.stop_all(self._all(), grace=grace)

    # ------------------------------------------------------------------ main loop
    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signal = signum
        self._quiet = True
        self.server.membership.quiet()
        for w in self._all():
            procs.kill_group(w.proc.pid, signal.SIGTERM)
        if self.fleet is not None:
            for a in self.fleet.agents:
                procs.kill_group(a.proc.pid, signal.SIGTERM)

    def run(self) -> int:
        cfg = self.cfg
        _log_to_stderr()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.server.start()
        self.t0 = time.monotonic()
        if cfg.join_file:
            write_join_file(cfg.join_file, self.server.address, self._secret, self.job_id,
                            self.host)
        rc = 1
        try:
            if cfg.etcd is not None and not self._lead_in_etcd():
                return 2
            if self.fleet is not None:
                self.fleet.start()
            else:
                for slot in range(cfg.np):
                    self._spawn(slot, 0)
            rc = self._supervise()
            return rc
        finally:
            self._stop_workers(grace=2.0)
            if self.durable is not None:
                self.durable.close(outcome=etcdjob.outcome(rc, self._summary))
            self.server.stop()
            for t in [t for w in self._all() for t in w.pumps]:
                t.join(timeout=2)
            shm_cleanup(self.job_id)
            shutil.rmtree(self._errdir, ignore_errors=True)
            if cfg.timeline:
                n = merge_timeline(cfg.timeline)
                self.say(f"timeline: {cfg.timeline} ({n} events; open it in "
                         "https://ui.perfetto.dev or chrome://tracing)")
            if cfg.join_file:
                try:
                    os.unlink(cfg.join_file)
                except FileNotFoundError:
                    pass
            for s, h in old.items():
                signal.signal(s, h)

    def _lead_in_etcd(self) -> bool:
        """--etcd: lead the job there before any worker starts; False (said why) if etcd
        cannot be used."""
        cfg = self.cfg
        assert cfg.etcd is not None
        try:
            self.durable = etcdjob.lead(cfg.etcd, job_id=self.job_id, host=self.host,
                                        address=self.server.address,
                                        job={"np": cfg.np, "min_np": cfg.min_np,
                                             "program": cfg.script})
        except PhalanxError as e:
            self.say(f"job failed: {e}")
            return False
        self.server.membership.durable = self.durable
        self.say(f"job {self.job_id} is recorded in etcd; follow it from any host: "
                 f"phalanx attach --etcd {','.join(cfg.etcd.endpoints)} {self.job_id}")
        return True

    def _reap(self) -> tuple[int, list[report.Exit]]:
        """(workers still running, workers that exited since the last call)."""
        if self.fleet is not None:
            ended = self.fleet.reap()
            self.exits.extend(ended)
            return self.fleet.running(), ended
        running, ended = 0, []
        for wid, w in list(self._workers.items()):
            code = w.proc.poll()
            if code is None:
                running += 1
                continue
            with self._lock:
                del self._workers[wid]
            for t in w.pumps:
                t.join(timeout=2)
            m = self.server.membership
            ended.append(report.Exit(slot=w.slot, worker=wid, pid=w.proc.pid, code=code,
                                     seen=time.time(), fenced=w.fenced, lost=m.is_lost(wid),
                                     error=procs.read_error(w.error_file), oom=w.oom_note(code),
                                     step=m.last_step(wid),
                                     joined=wid in m.formed or not m.formed))
        self.exits.extend(ended)
        return running, ended

    def _supervise(self) -> int:
        cfg = self.cfg
        min_np = cfg.min_np if cfg.min_np is not None else cfg.np
        retries = cfg.retry_errors
        progress = report.Progress(cfg.progress) if cfg.progress else None
        while True:
            if self._signal is not None:
                return self._interrupted()
            if progress is not None:
                self._progress(progress)
            self.chaos_timer.tick()
            running, ended = self._reap()
            if self.server.membership.failed is not None:
                return self._fail()  # a worker reported an exception: no respawn can help
            for e in sorted(ended, key=lambda e: e.is_fault):  # bugs first
                if e.code == 0:
                    continue
                if not e.is_fault and retries > 0:
                    retries -= 1  # the user asked to treat this many exceptions as faults
                elif not e.is_fault or not cfg.elastic:
                    return self._fail()
                self.server.declare_lost(e.worker, e.why())
                if self.restarts < cfg.max_restarts and self._spawn(e.slot, self.restarts + 1):
                    self.restarts += 1
                    self.say(f"{e.why()}; respawning it ({self.restarts}/{cfg.max_restarts} "
                             "restarts)")
                    running += 1
                else:
                    self.say(f"{e.why()}; continuing without it")
            finished = sum(1 for e in self.exits if e.code == 0)
            if running == 0:
                return self._succeed() if finished else self._fail("every worker was lost")
            if cfg.elastic and running + finished < min_np and finished == 0:
                return self._fail(f"{running} worker(s) left, fewer than --min-np {min_np}")
            time.sleep(0.02)

    def _progress(self, progress: report.Progress) -> None:
        m = self.server.membership
        world = m.world
        line = progress.line(time.monotonic(), m.max_step, len(world.workers) if world else 0,
                             world.generation if world else 0,
                             sum(1 for e in self.exits if e.code != 0))
        if line:
            self.say(line)

    def _fail(self, why: str = "") -> int:
        """Stop the job; the last line names the root cause (the first failure in time)."""
        m = self.server.membership
        m.quiet()
        m.fail(why or "a worker failed")  # no generation forms while the job is stopping
        deadline = time.monotonic() + 0.5  # let near-simultaneous exits arrive, to order them
        while self._reap()[0] and time.monotonic() < deadline:
            time.sleep(0.02)
        self._quiet = True
        self._stop_workers(grace=5.0)
        self._reap()
        self._report_chaos()
        self._report_checkpoints()
        failed = [e for e in self.exits if e.code != 0]
        cause = report.root_cause(failed) if failed else None
        text = cause.why() if cause is not None else str(m.failed)
        hint = ""
        if cause is not None and cause.is_fault and not self.cfg.elastic:
            hint = ("; this job is not elastic, so one lost worker ends it: run with --min-np N "
                    "to continue on the survivors (and --max-restarts K to start replacements)")
        self.say(f"job failed: {text}" + (f"; {why}" if why else "") + hint)
        return report.exit_code(cause) if cause is not None else 1

    def _succeed(self) -> int:
        events = self.server.events
        self._report_chaos()
        self._report_checkpoints()
        self.say(report.summary(
            seconds=time.monotonic() - self.t0, started=self.cfg.np, exits=self.exits,
            generations=sum(1 for e in events if e["event"] == "generation"),
            restarts=self.restarts, last_step=self.server.membership.max_step))
        return 0

    def _interrupted(self) -> int:
        assert self._signal is not None  # only called once a signal arrived
        name = signal.Signals(self._signal).name
        n = self.fleet.running() if self.fleet is not None else len(self._all())
        self._stop_workers(grace=5.0)
        self.say(f"received {name}: stopped {n} worker(s) after "
                 f"{time.monotonic() - self.t0:.1f}s (last step "
                 f"{self.server.membership.max_step})")
        return 128 + self._signal

    def _report_checkpoints(self) -> None:
        """A line for checkpoint saves that failed on a worker (a full disk), if any did."""
        from ..elastic.checkpoint_dir import failed_saves_note
        note = failed_saves_note(self.server.events)
        if note is not None:
            self.say(note)

    def _report_chaos(self) -> None:
        if not self.cfg.chaos or self._signal is not None:
            return
        from ..elastic.chaos import parse_chaos
        rules = parse_chaos(self.cfg.chaos)
        fired = {int(e["info"].get("rule", -1)) for e in self.server.events
                 if e["event"] == "worker-chaos"} | self.chaos_timer.fired
        for line in report.unfired_chaos([r.text for r in rules], fired,
                                         self.server.membership.max_step,
                                         time.monotonic() - self.t0):
            self.say(line)
