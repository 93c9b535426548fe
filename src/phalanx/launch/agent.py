"""`phalanx agent`: one host's starter. It spawns and supervises that host's workers for a
coordinator that runs elsewhere (the launcher, over SSH or srun, or a scheduler).

It streams each worker's output rank-prefixed, reports each worker's exit (with the exception
it raised, if any) and stopped workers (SIGSTOP, visible only on this host), kills a worker when
the coordinator orders it fenced, spawns replacements when ordered, and kills its workers when
it loses the coordinator for longer than the heartbeat timeout or when its own stdin closes
(the launcher's SSH session ended): no orphan training on a cut-off host.

The job secret comes from PHALANX_SECRET, a 0600 file (`--secret-file`), or the first line of
stdin (`--secret-stdin`, what the launcher uses): never from argv, which `ps` shows to all.
With `--env-stdin` the next line is a JSON object of variables for the workers (the launcher's
environment, forwarded as horovodrun does: see remote.remote_env), kept out of argv likewise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

from .. import env
from ..coord.client import CoordClient
from ..elastic.chaos import ChaosRule
from ..errors import RendezvousError
from . import procs
from .timed_chaos import TimedChaos
from .hosts import route_address

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _sink(stream: Any) -> procs.Sink:
    lock = threading.Lock()

    def write(line: bytes) -> None:
        with lock:
            stream.write(line)
            stream.flush()
    return write


class Agent:
    """Runs one host's share of a job (see the module docstring)."""

    def __init__(self, a: argparse.Namespace, secret: str,
                 forwarded: dict[str, str] | None = None) -> None:
        self.a = a
        self.secret = secret
        self.forwarded = forwarded or {}
        """The launcher's environment for the workers (`--env-stdin`)."""
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
        self.ranks: dict[str, int] = {}
        """Worker id -> its rank in the newest generation this agent heard of."""
        self.generation = -1
        self.chaos = TimedChaos(a.chaos, np=a.np or a.rank_base + a.slots, pid_of=self._pid_of,
                                on_fire=self._fired)

    def _env(self, slot: int, worker_id: str, error_file: str) -> dict[str, str]:
        a = self.a
        wenv = {**os.environ, **self.forwarded, env.RANK: str(slot), env.WORKER_ID: worker_id,
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
        self.workers[worker_id] = procs.spawn(
            slot=slot, worker_id=worker_id, prefix=lambda: self._prefix(worker_id, slot),
            argv=[self.a.script, *self.a.args], env=self._env(slot, worker_id, error_file),
            error_file=error_file, out=self.out, err=self.err)

    def _prefix(self, worker_id: str, slot: int) -> str:
        """As the launcher's own: '[rank2]: ', or '[rank1 w2]: ' once rank and id differ."""
        rank = self.ranks.get(worker_id, slot)
        return f"[rank{rank}]: " if worker_id == f"w{rank}" else f"[rank{rank} {worker_id}]: "

    def _pid_of(self, worker_id: str) -> int | None:
        w = self.workers.get(worker_id)
        return w.proc.pid if w is not None and w.proc.poll() is None else None

    def _fired(self, rule: ChaosRule, line: str) -> None:
        """A timed chaos rule fires here: say so, and tell the launcher (for its summary)."""
        self._say(line)
        try:
            self.client.request({"op": "event", "worker": self.starter, "kind": "chaos",
                                 "info": {"rule": rule.index, "text": rule.text},
                                 "key": f"{rule.index}@timed"})
        except RendezvousError:
            pass  # the summary may call it unfired; the fault itself matters more

    def run(self) -> int:
        for i in range(0 if self.a.idle else self.a.slots):
            self.spawn(self.a.rank_base + i, f"w{self.a.rank_base + i}")
        last_contact = time.monotonic()
        while not self.lifeline.is_set():
            self._report_exits()
            self.chaos.tick()
            stopped = [w for w, p in self.workers.items() if procs.is_stopped(p.proc.pid)]
            try:
                reply = self.client.watch(self.starter, stopped, timeout=0.25 if stopped else 0.5,
                                          workers=list(self.workers), generation=self.generation)
                last_contact = time.monotonic()
                if "ranks" in reply:
                    self.ranks, self.generation = reply["ranks"], int(reply["generation"])
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
                                     "fenced": w.fenced, "error": procs.read_error(w.error_file),
                                     "oom": w.oom_note(code)})
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
        return procs.read_private(a.secret_file, "--secret-file").strip()
    return env.get_str(env.SECRET) or ""


def _read_env(a: argparse.Namespace) -> dict[str, str]:
    """--env-stdin: the workers' variables, one JSON object on the line after the secret."""
    if not a.env_stdin:
        return {}
    line = sys.stdin.readline()
    try:
        found = json.loads(line)
    except ValueError as e:
        raise ValueError(f"--env-stdin: the line after the secret is not JSON ({e}); the "
                         "launcher sends one object of NAME: VALUE strings") from None
    if not isinstance(found, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _NAME.fullmatch(k)
            for k, v in found.items()):
        raise ValueError("--env-stdin: the line after the secret must be one JSON object of "
                         "NAME: VALUE strings (NAME: letters, digits and underscores)")
    if env.SECRET in found:
        raise ValueError(f"--env-stdin may not carry {env.SECRET}; it comes on the line before")
    return found


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
                   help="set this variable for the workers (repeatable; visible in ps: the "
                   "launcher uses --env-stdin)")
    p.add_argument("--env-stdin", action="store_true", help="with --secret-stdin: read the "
                   "workers' variables from the next line of stdin, a JSON object")
    p.add_argument("--elastic", action="store_true")
    p.add_argument("--growth", action="store_true")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    if a.env_stdin and not a.secret_stdin:
        sys.stderr.write("phalanx agent: error: --env-stdin reads the line after the secret: "
                         "give --secret-stdin too\n")
        return 2
    try:
        secret = _read_secret(a)
        forwarded = _read_env(a)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"phalanx agent: error: {e}\n")
        return 2
    if not secret:
        sys.stderr.write("phalanx agent: error: no job secret: set PHALANX_SECRET, or pass "
                         "--secret-file FILE (mode 0600) or --secret-stdin\n")
        return 2
    agent = Agent(a, secret, forwarded)
    if a.secret_stdin:  # stdin stays open as the launcher's lifeline
        def watch_stdin() -> None:
            while sys.stdin.readline():
                pass
            agent.lifeline.set()
        threading.Thread(target=watch_stdin, daemon=True, name="phalanx-lifeline").start()
    signal.signal(signal.SIGTERM, lambda *_: agent.lifeline.set())
    return agent.run()
