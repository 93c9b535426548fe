"""The launcher's workers on many hosts: one `phalanx agent` per host, started by an
`AgentStarter` (over SSH, or directly for the launcher's own host; with srun in a Slurm
allocation, see slurm.py), and their workers' exits as the coordinator hears them.

Each agent gets the job secret on its stdin (never in argv) and keeps stdin open as its
lifeline: when the launcher ends, the SSH session (or srun step) closes and the agent stops its
workers. A host whose agent dies (the host crashed, or its SSH session or srun step broke) loses
all its workers at once: they are declared lost together, so the survivors re-form once, not
once per worker.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import IO, Any

from .. import env
from ..coord.membership import Membership
from . import procs, report
from .hosts import HostSlots, is_local


@dataclass(kw_only=True, slots=True)
class _Agent:
    host: HostSlots
    proc: subprocess.Popen[bytes]
    pumps: list[threading.Thread]
    lost: bool = False


def agent_argv(*, host: HostSlots, address: str, job_id: str, cfg: Any) -> list[str]:
    """The `phalanx agent` command line for one host (no secret in it)."""
    argv = [sys.executable, "-m", "phalanx.launch.cli", "agent", "--coordinator", address,
            "--host-id", host.name, "--slots", str(host.slots), "--rank-base",
            str(host.first_rank), "--job-id", job_id, "--secret-stdin", "--timeout",
            str(cfg.timeout), "--heartbeat-timeout", str(cfg.heartbeat_timeout)]
    if cfg.chaos:
        argv += ["--chaos", cfg.chaos]
    for name, value in sorted(env.forwarded(cfg.extra_env).items()):
        argv += ["--env", f"{name}={value}"]
    if cfg.elastic:
        argv.append("--elastic")
    if cfg.can_grow:
        argv.append("--growth")
    return [*argv, cfg.script, *cfg.args]


def ssh_argv(host: str, argv: list[str], ssh_config: str | None) -> list[str]:
    """Run `argv` on `host` in the launcher's working directory, as horovodrun and mpirun do."""
    remote = f"cd {shlex.quote(os.getcwd())} && exec {shlex.join(argv)}"
    opts = ["-F", ssh_config] if ssh_config else []
    return ["ssh", *opts, "-o", "BatchMode=yes", "-T", host, remote]


class AgentStarter(ABC):
    """How the launcher starts one host's agent: a local process whose stdin reaches the
    agent's stdin, whose output is the agent's, and whose end is the agent's end."""

    @abstractmethod
    def command(self, host: HostSlots, argv: list[str]) -> list[str]:
        """The argv to run locally so that `argv` runs on `host`."""


class SshStarter(AgentStarter):
    """Over SSH (BatchMode, the launcher's working directory); this host's agent directly."""

    def __init__(self, ssh_config: str | None = None) -> None:
        self.ssh_config = ssh_config

    def command(self, host: HostSlots, argv: list[str]) -> list[str]:
        return argv if is_local(host.name) else ssh_argv(host.name, argv, self.ssh_config)


class AgentFleet:
    """Starts the agents, turns the exits they report into `report.Exit`s, orders respawns."""

    def __init__(self, *, hosts: list[HostSlots], membership: Membership, secret: str,
                 job_id: str, cfg: Any, address: str, out: procs.Sink, err: procs.Sink,
                 say: Any) -> None:
        self.hosts, self.m, self.cfg = hosts, membership, cfg
        self._secret, self._job_id, self._address = secret, job_id, address
        self._out, self._err, self._say = out, err, say
        self._starter: AgentStarter = cfg.agent_starter or SshStarter(cfg.ssh_config)
        self.agents: list[_Agent] = []
        self.live: dict[str, int] = {f"w{h.first_rank + i}": h.first_rank + i
                                     for h in hosts for i in range(h.slots)}

    def start(self) -> None:
        for host in self.hosts:
            argv = self._starter.command(host, agent_argv(
                host=host, address=self._address, job_id=self._job_id, cfg=self.cfg))
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
            assert proc.stdin is not None  # PIPE above
            proc.stdin.write(self._secret.encode() + b"\n")
            proc.stdin.flush()
            pumps = [threading.Thread(target=procs.pump, args=(s, k, b""), daemon=True)
                     for s, k in ((proc.stdout, self._out), (proc.stderr, self._err))]
            for t in pumps:
                t.start()
            self.agents.append(_Agent(host=host, proc=proc, pumps=pumps))

    def _host_of(self, slot: int) -> HostSlots:
        for h in self.hosts:
            if h.first_rank <= slot < h.first_rank + h.slots:
                return h
        raise ValueError(f"rank slot {slot} belongs to no host")

    def spawn(self, slot: int, worker_id: str) -> bool:
        """A replacement for rank slot `slot`: on that slot's host if its agent lives, else on
        the live host running the fewest workers. False if no host is left."""
        alive = [a for a in self.agents if not a.lost and a.proc.poll() is None]
        if not alive:
            return False
        home = [a for a in alive if a.host.name == self._host_of(slot).name]
        load = {a.host.name: sum(1 for s in self.live.values()
                                 if a.host.first_rank <= s < a.host.first_rank + a.host.slots)
                for a in alive}
        target = home[0] if home else min(alive, key=lambda a: load[a.host.name])
        self.m.order_spawn(f"agent-{target.host.name}", slot, worker_id)
        self.live[worker_id] = slot
        return True

    def running(self) -> int:
        return len(self.live)

    def reap(self) -> list[report.Exit]:
        """Exits the agents reported, and the workers of hosts whose agent died."""
        ended = []
        for e in self.m.take_exits():
            if self.live.pop(e["worker"], None) is None:
                continue
            ended.append(report.Exit(slot=e["slot"], worker=e["worker"], pid=e["pid"],
                                     code=e["code"], seen=e["seen"], fenced=e["fenced"],
                                     lost=self.m.is_lost(e["worker"]), error=e["error"]))
        for a in self.agents:
            code = a.proc.poll()
            if code is None or a.lost:
                continue
            a.lost = True
            gone = [w for w, s in self.live.items()
                    if a.host.first_rank <= s < a.host.first_rank + a.host.slots]
            why = f"host {a.host.name} lost: its agent {report.describe_exit(code)}"
            self.m.declare_hosts_lost(gone, why)
            for w in gone:
                ended.append(report.Exit(slot=self.live.pop(w), worker=w, pid=-1, code=-9,
                                         seen=time.time(), lost=True, detail=why))
        return ended

    def stop(self, grace: float) -> None:
        """Close every agent's lifeline; they stop their workers. Kill what is left."""
        for a in self.agents:
            _close(a.proc.stdin)
        deadline = time.monotonic() + grace
        for a in self.agents:
            try:
                a.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                procs.kill_group(a.proc.pid, signal.SIGKILL)
                a.proc.wait()
            for t in a.pumps:
                t.join(timeout=2)


def _close(stream: IO[bytes] | None) -> None:
    if stream is not None:
        try:
            stream.close()
        except OSError:
            pass
