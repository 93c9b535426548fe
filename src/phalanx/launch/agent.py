"""`phalanx agent`: one host's starter. It spawns and supervises that host's workers for a
coordinator that runs elsewhere (the launcher, over SSH or srun, or a scheduler).

It streams each worker's output rank-prefixed, reports each worker's exit (with the exception
it raised, if any) and stopped workers (SIGSTOP, visible only on this host), kills a worker when
the coordinator orders it fenced, spawns replacements when ordered, and kills its workers when
it loses the coordinator for longer than the heartbeat timeout or when its own stdin closes
(the launcher's SSH session ended): no orphan training on a cut-off host.

The job secret comes from PHALANX_SECRET, a 0600 file (`--secret-file`), or the first line of
stdin (`--secret-stdin`, what the launcher uses): never from argv, which `ps` shows to all.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

from .. import env
from ..coord.client import CoordClient
from ..errors import RendezvousError
from . import procs
from .hosts import route_address


def _sink(stream: Any) -> procs.Sink:
    lock = threading.Lock()

    def write(line: bytes) -> None:
        with lock:
            stream.write(line)
            stream.flush()
    return write


class Agent:
    """Runs one host's share of a job (see the module docstring)."""

    def __init__(self, a: argparse.Namespace, secret: str) -> None:
        self.a = a
        self.secret = secret
        self.starter = f"agent-{a.host_id}"
        self.client = CoordClient(a.coordinator, secret, self.starter,
                                  connect_timeout=max(10.0, a.heartbeat_timeout),
                                  reply_timeout=a.heartbeat_timeout)
        host = a.coordinator.rpartition(":")[0].strip("[]")
        self.bind = a.bind or route_address(host)
        self.workers: dict[str, procs.Worker] = {}
        self.errdir = tempfile.mkdtemp(prefix="phalanx-agent-")
        self.out, self.err = _sink(sys.stdout.buffer), _sink(sys.stderr.buffer)
        self.lifeline = threading.Event()

    def _env(self, slot: int, worker_id: str, error_file: str) -> dict[str, str]:
        a = self.a
        wenv = {**os.environ, env.RANK: str(slot), env.WORKER_ID: worker_id,
                env.COORD_ADDR: a.coordinator, env.SECRET: self.secret, env.JOB_ID: a.job_id,
                env.HOST: a.host_id, env.STARTER: self.starter, env.BIND_ADDR: self.bind,
                env.TIMEOUT: str(a.timeout), env.HEARTBEAT_TIMEOUT: str(a.heartbeat_timeout),
                env.ERROR_FILE: error_file, env.ELASTIC: "1" if a.elastic else "0",
                env.GROWTH: "1" if a.growth else "0", "PYTHONUNBUFFERED": "1",
                **env.horovod_vars(slot, a.np or a.rank_base + a.slots, slot - a.rank_base,
                                   a.slots)}
        if a.chaos:
            wenv[env.CHAOS] = a.chaos
        wenv.update(a.env)
        wenv.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.slots)))
        return wenv

    def spawn(self, slot: int, worker_id: str) -> None:
        error_file = os.path.join(self.errdir, f"{worker_id}.json")
        suffix = worker_id[len(f"w{slot}"):] if worker_id.startswith(f"w{slot}") else ""
        self.workers[worker_id] = procs.spawn(
            slot=slot, worker_id=worker_id, prefix=f"[rank{slot}{suffix}]: ",
            argv=[self.a.script, *self.a.args], env=self._env(slot, worker_id, error_file),
            error_file=error_file, out=self.out, err=self.err)

    def run(self) -> int:
        for i in range(0 if self.a.idle else self.a.slots):
            self.spawn(self.a.rank_base + i, f"w{self.a.rank_base + i}")
        last_contact = time.monotonic()
        while not self.lifeline.is_set():
            self._report_exits()
            stopped = [w for w, p in self.workers.items() if procs.is_stopped(p.proc.pid)]
            try:
                reply = self.client.watch(self.starter, stopped, timeout=0.25 if stopped else 0.5)
                last_contact = time.monotonic()
            except RendezvousError:
                if time.monotonic() - last_contact > self.a.heartbeat_timeout:
                    self._say("lost the coordinator; stopping this host's workers")
                    return self.stop(1)
                time.sleep(0.2)
                continue
            for wid, _pid in reply.get("fence", []):
                w = self.workers.get(wid)
                if w is not None and w.proc.poll() is None:
                    w.fenced = True
                    procs.kill_group(w.proc.pid, signal.SIGKILL)
            for slot, wid in reply.get("spawn", []):
                self.spawn(int(slot), str(wid))
        return self.stop(0)

    def _report_exits(self) -> None:
        for wid, w in list(self.workers.items()):
            code = w.proc.poll()
            if code is None:
                continue
            del self.workers[wid]
            for t in w.pumps:
                t.join(timeout=2)
            try:
                self.client.request({"op": "exited", "starter": self.starter, "of": wid,
                                     "slot": w.slot, "pid": w.proc.pid, "code": code,
                                     "fenced": w.fenced, "error": procs.read_error(w.error_file)})
            except RendezvousError:
                pass  # the coordinator is gone; the loop above notices and stops

    def stop(self, code: int) -> int:
        procs.stop_all(list(self.workers.values()), grace=2.0)
        self._report_exits()
        self.client.close(leave=False)
        shutil.rmtree(self.errdir, ignore_errors=True)
        return code

    def _say(self, msg: str) -> None:
        self.err(f"[phalanx agent {self.a.host_id}] {msg}\n".encode())


def _read_secret(a: argparse.Namespace) -> str:
    if a.secret_stdin:
        return sys.stdin.readline().strip()
    if a.secret_file:
        st = os.stat(a.secret_file)
        if st.st_mode & 0o077:
            raise ValueError(f"--secret-file {a.secret_file!r} is readable by others (mode "
                             f"{oct(st.st_mode & 0o777)}); chmod 600 it")
        with open(a.secret_file) as f:
            return f.read().strip()
    return env.get_str(env.SECRET) or ""


def _env_pair(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name.replace("_", "").isalnum() or name[0].isdigit():
        raise argparse.ArgumentTypeError(f"--env {text!r} is not NAME=VALUE (NAME: letters, "
                                         "digits and underscores)")
    if name == env.SECRET:
        raise argparse.ArgumentTypeError(f"--env may not carry {env.SECRET}: argv is visible "
                                         "to every user; use --secret-file or --secret-stdin")
    return name, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phalanx agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    p.add_argument("--host-id", default=os.uname().nodename, help="this host's name in the job")
    p.add_argument("--slots", type=int, default=1, help="workers to start on this host")
    p.add_argument("--rank-base", type=int, default=0, help="rank of this host's first worker")
    p.add_argument("--np", type=int, default=0, help="workers in the whole job (for HOROVOD_SIZE; "
                   "default: rank base + slots)")
    p.add_argument("--idle", action="store_true", help="start no worker by itself, only the "
                   "replacements the coordinator orders (how the launcher starts an agent "
                   "again on a host that came back after being lost)")
    p.add_argument("--job-id", required=True)
    p.add_argument("--bind", default=None, help="data-plane address (default: the interface "
                   "that routes to the coordinator)")
    p.add_argument("--secret-stdin", action="store_true", help="read the secret from stdin")
    p.add_argument("--secret-file", default=None, help="read the secret from this 0600 file")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--heartbeat-timeout", type=float, default=3.0)
    p.add_argument("--chaos", default=None)
    p.add_argument("--env", action="append", default=[], type=_env_pair, metavar="NAME=VALUE",
                   help="set this variable for the workers (repeatable; the launcher forwards "
                   "job-wide PHALANX_* settings this way)")
    p.add_argument("--elastic", action="store_true")
    p.add_argument("--growth", action="store_true")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    try:
        secret = _read_secret(a)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"phalanx agent: error: {e}\n")
        return 2
    if not secret:
        sys.stderr.write("phalanx agent: error: no job secret: set PHALANX_SECRET, or pass "
                         "--secret-file FILE (mode 0600) or --secret-stdin\n")
        return 2
    agent = Agent(a, secret)
    if a.secret_stdin:  # stdin stays open as the launcher's lifeline
        def watch_stdin() -> None:
            while sys.stdin.readline():
                pass
            agent.lifeline.set()
        threading.Thread(target=watch_stdin, daemon=True, name="phalanx-lifeline").start()
    signal.signal(signal.SIGTERM, lambda *_: agent.lifeline.set())
    return agent.run()
