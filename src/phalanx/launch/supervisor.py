"""`phalanx run`: host the coordinator, spawn and supervise workers, respawn the lost ones.

The launcher outlives its workers: it hosts the coordinator (so a worker's death never takes
the job's membership with it), fences workers the coordinator declares lost, prefixes every
output line with the worker's rank, forwards SIGINT/SIGTERM, and cleans up shared memory.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO

from .. import env
from ..coord.protocol import new_secret
from ..coord.server import CoordServer
from .shmfiles import cleanup as shm_cleanup

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """What `phalanx run` was asked to do."""

    np: int
    """Workers to start."""
    script: str
    """Python script each worker runs."""
    args: list[str] = field(default_factory=list)
    """Arguments passed to the script."""
    min_np: int | None = None
    """Fewest workers the job may continue with (elastic when below np)."""
    max_np: int | None = None
    """Most workers a generation may hold (newcomers beyond it wait)."""
    max_restarts: int = 0
    """How many times lost workers are respawned in total."""
    timeout: float = 30.0
    """Collective timeout in seconds (PHALANX_TIMEOUT for the workers)."""
    heartbeat_timeout: float = 3.0
    """Seconds of heartbeat silence before a worker is declared lost and fenced."""
    chaos: str | None = None
    """Fault-injection spec handed to workers (PHALANX_CHAOS)."""
    bind: str = "127.0.0.1"
    """Address the coordinator listens on."""
    extra_env: dict[str, str] = field(default_factory=dict)
    """More environment for the workers."""
    join_file: str | None = None
    """Write the coordinator address and job secret here (mode 0600) for `phalanx join`."""

    @property
    def can_grow(self) -> bool:
        """Workers may join mid-job (respawns or --max-np above -np)."""
        return self.max_restarts > 0 or (self.max_np is not None and self.max_np > self.np)

    @property
    def elastic(self) -> bool:
        return (self.min_np is not None and self.min_np < self.np) or self.max_restarts > 0 or (
            self.max_np is not None and self.max_np > self.np)


@dataclass(kw_only=True, slots=True)
class _Worker:
    slot: int
    worker_id: str
    proc: subprocess.Popen[bytes]
    pumps: list[threading.Thread]
    fenced: bool = False


def write_join_file(path: str, address: str, secret: str, job_id: str, host: str) -> None:
    """What a worker needs to join this job from outside the launcher; readable by owner only."""
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"address": address, "secret": secret, "job_id": job_id, "host": host}, f)
    os.replace(path + ".tmp", path)


def _proc_state(pid: int) -> str:
    """The process state letter from /proc (R, S, T, Z, ...), or '' if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _exiting(pid: int) -> bool:
    """True if the process is already a zombie or gone (it exited; nothing to fence)."""
    return _proc_state(pid) in ("Z", "X", "")


def describe_exit(code: int) -> str:
    """'exited with code 3' / 'was killed by SIGKILL'."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _log_to_stderr() -> None:
    """Coordinator log lines go to the launcher's stderr as '[phalanx] ...'."""
    coord_log = logging.getLogger("phalanx.coord")
    if not coord_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[phalanx] %(message)s"))
        coord_log.addHandler(handler)
        coord_log.setLevel(logging.INFO)
        coord_log.propagate = False


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
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self._signal: int | None = None
        self.restarts = 0
        self.host = socket.gethostname()
        self.server = CoordServer(self._secret, host=cfg.bind, target_np=cfg.np,
                                  min_np=cfg.min_np, max_np=cfg.max_np,
                                  heartbeat_timeout=cfg.heartbeat_timeout, settle=5.0,
                                  fence=self._fence, probe_stopped=self._is_stopped)

    # ------------------------------------------------------------------ output
    def say(self, msg: str) -> None:
        with self._print_lock:
            self._err.write(f"[phalanx] {msg}\n".encode())
            self._err.flush()

    def _pump(self, stream: IO[bytes], sink: IO[bytes], prefix: bytes) -> None:
        for line in iter(stream.readline, b""):
            with self._print_lock:
                sink.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
                sink.flush()
        stream.close()

    # ------------------------------------------------------------------ workers
    def _spawn(self, slot: int, restart: int) -> None:
        worker_id = f"w{slot}" if restart == 0 else f"w{slot}.{restart}"
        cfg = self.cfg
        wenv = dict(os.environ)
        wenv.update(cfg.extra_env)
        wenv.update({
            env.RANK: str(slot), env.SIZE: str(cfg.np), env.LOCAL_RANK: str(slot),
            env.LOCAL_SIZE: str(cfg.np), env.WORKER_ID: worker_id,
            env.COORD_ADDR: self.server.address, env.SECRET: self._secret, env.JOB_ID: self.job_id,
            env.HOST: self.host, env.TIMEOUT: str(cfg.timeout),
            env.ELASTIC: "1" if cfg.elastic else "0", "PYTHONUNBUFFERED": "1",
            env.GROWTH: "1" if cfg.can_grow else "0",
        })
        if cfg.chaos:
            wenv[env.CHAOS] = cfg.chaos
        # One worker per core is the right default for CPU training (torchrun does the same).
        wenv.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.np)))
        proc = subprocess.Popen([sys.executable, CHILD, cfg.script, *cfg.args], env=wenv,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        prefix = f"[rank{slot}]: ".encode() if restart == 0 else f"[rank{slot}.{restart}]: ".encode()
        pumps = [threading.Thread(target=self._pump, args=(s, k, prefix), daemon=True)
                 for s, k in ((proc.stdout, self._out), (proc.stderr, self._err))]
        for t in pumps:
            t.start()
        with self._lock:
            self._workers[worker_id] = _Worker(slot=slot, worker_id=worker_id, proc=proc, pumps=pumps)

    def _is_stopped(self, worker_id: str, pid: int) -> bool:
        """Coordinator probe: is this (local) worker's process stopped (state T)?"""
        with self._lock:
            w = self._workers.get(worker_id)
        return w is not None and w.proc.pid == pid and _proc_state(pid) in ("T", "t")

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
        if w is None or w.proc.poll() is not None or _exiting(w.proc.pid):
            return
        w.fenced = True
        self.say(f"fencing worker {worker_id} (pid {w.proc.pid}): declared lost by the coordinator")
        try:
            os.killpg(w.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _signal_all(self, sig: int) -> None:
        with self._lock:
            procs = [w.proc for w in self._workers.values() if w.proc.poll() is None]
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass

    def _stop_all(self, grace: float = 5.0) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        with self._lock:
            procs = [w.proc for w in self._workers.values()]
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._signal_all(signal.SIGKILL)
        for p in procs:
            p.wait()

    # ------------------------------------------------------------------ main loop
    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signal = signum
        self._signal_all(signum)

    def run(self) -> int:
        cfg = self.cfg
        _log_to_stderr()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.server.start()
        if cfg.join_file:
            write_join_file(cfg.join_file, self.server.address, self._secret, self.job_id,
                            self.host)
        try:
            for slot in range(cfg.np):
                self._spawn(slot, 0)
            return self._supervise()
        finally:
            self._stop_all(grace=2.0)
            self.server.stop()
            with self._lock:
                pumps = [t for w in self._workers.values() for t in w.pumps]
            for t in pumps:
                t.join(timeout=2)
            shm_cleanup(self.job_id)
            if cfg.join_file:
                try:
                    os.unlink(cfg.join_file)
                except FileNotFoundError:
                    pass
            for s, h in old.items():
                signal.signal(s, h)

    def _supervise(self) -> int:
        cfg = self.cfg
        min_np = cfg.min_np if cfg.min_np is not None else cfg.np
        finished_ok = 0
        while True:
            if self._signal is not None:
                name = signal.Signals(self._signal).name
                self.say(f"received {name}; stopping the workers")
                self._stop_all()
                return 128 + self._signal
            with self._lock:
                items = list(self._workers.items())
            running = 0
            for wid, w in items:
                code = w.proc.poll()
                if code is None:
                    running += 1
                    continue
                with self._lock:
                    del self._workers[wid]
                for t in w.pumps:
                    t.join(timeout=2)
                if code == 0:
                    finished_ok += 1
                    continue
                why = f"rank {w.slot} (worker {wid}, pid {w.proc.pid}) {describe_exit(code)}"
                if w.fenced and code == -signal.SIGKILL:
                    why += " (fenced by the launcher)"
                if not cfg.elastic:
                    self.say(f"job failed: {why}")
                    self._stop_all()
                    return code if code > 0 else 128 - code
                self.server.declare_lost(wid, why)
                if self.restarts < cfg.max_restarts:
                    self.restarts += 1
                    self.say(f"{why}; respawning it ({self.restarts}/{cfg.max_restarts} restarts)")
                    self._spawn(w.slot, self.restarts)
                    running += 1
                else:
                    self.say(f"{why}; continuing without it")
            if running == 0:
                if finished_ok:
                    return 0
                self.say("job failed: every worker was lost")
                return 1
            if cfg.elastic and running + finished_ok < min_np and finished_ok == 0:
                self.say(f"job failed: {running} worker(s) left, fewer than --min-np {min_np}")
                self._stop_all()
                return 1
            time.sleep(0.02)
