"""The launcher's workers on many hosts: one `phalanx agent` per host, started by an
`AgentStarter` (over SSH, or directly for the launcher's own host; with srun in a Slurm
allocation, see slurm.py), and their workers' exits as the coordinator hears them.

Each agent gets the job secret and its workers' environment on its stdin (never in argv, which
`ps` shows to every user) and keeps stdin open as its lifeline: when the launcher ends, the SSH
session (or srun step) closes and the agent stops its workers. A host whose agent dies (the host
crashed, or its SSH session or srun step broke), or whose agent falls silent while every worker
there is lost (it crashed, or its network is cut), loses all its workers at once: they are
declared lost together, so the survivors re-form once, not once per worker.
The host is then blacklisted for a cooldown (blacklist.py): replacements go to the other hosts,
and to it again only once the cooldown is over, by starting its agent anew.
"""

from __future__ import annotations

import json
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
from .blacklist import HostBlacklist, HostView, place_replacement
from .hosts import HostSlots, check_host, is_local

AGENT_START_GRACE_S = 30.0
"""How long a newly started agent may take to first reach the coordinator (SSH, Python's
start) before its silence counts; an agent that cannot start at all ends, which counts at once."""

NOT_FORWARDED = frozenset({
    "HOSTNAME", "HOST", "HOME", "USER", "LOGNAME", "MAIL", "SHELL", "PWD", "OLDPWD", "SHLVL",
    "_", "TERM", "TERMCAP", "COLUMNS", "LINES", "DISPLAY", "XAUTHORITY", "TMUX", "TMUX_PANE",
    "STY", "WINDOW", "PS1", "PS2", "PROMPT_COMMAND", "XDG_RUNTIME_DIR", "XDG_SESSION_ID",
    "XDG_SESSION_TYPE", "XDG_SESSION_CLASS", "DBUS_SESSION_BUS_ADDRESS", env.SECRET})
"""Variables of the launcher's environment that describe its own machine, login, terminal or
session rather than the job: they are not forwarded to other hosts' workers, which get their
own from their login (`-x NAME` forwards one anyway). The job secret never travels this way."""
NOT_FORWARDED_PREFIXES = ("SSH_", "BASH_FUNC_", "SLURM_")
"""Prefixes of the same: SSH connection details, exported shell functions, and the launcher's
own Slurm step (srun sets each agent's)."""
SSH_LOST = 255
"""ssh's exit status when the connection fails or drops (the remote command's status otherwise)."""


def forwardable(name: str) -> bool:
    """True if the launcher's variable `name` reaches other hosts' workers by default."""
    return name not in NOT_FORWARDED and not name.startswith(NOT_FORWARDED_PREFIXES)


def remote_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment every agent gives its workers on top of its host's own, as horovodrun
    does: the launcher's environment less NOT_FORWARDED, then `extra` (-x NAME=VALUE, and the
    job-wide settings the launcher makes)."""
    out = {k: v for k, v in os.environ.items() if forwardable(k)}
    out.update(env.forwarded(extra))  # refuses PHALANX_SECRET
    return out


@dataclass(kw_only=True, slots=True)
class _Agent:
    host: HostSlots
    proc: subprocess.Popen[bytes]
    pumps: list[threading.Thread]
    started: float
    """time.monotonic() when it was started."""
    lost: bool = False


def agent_argv(*, host: HostSlots, address: str, job_id: str, cfg: Any,
               idle: bool = False) -> list[str]:
    """The `phalanx agent` command line for one host (no secret and no environment in it: both
    go on its stdin); an `idle` agent (one started again on a host that came back) starts only
    the replacements it is sent."""
    argv = [sys.executable, "-m", "phalanx.launch.cli", "agent", "--coordinator", address,
            "--host-id", host.name, "--slots", str(host.slots), "--rank-base",
            str(host.first_rank), "--np", str(cfg.np), "--job-id", job_id, "--secret-stdin",
            "--env-stdin", "--timeout", str(cfg.timeout), "--heartbeat-timeout",
            str(cfg.heartbeat_timeout)]
    if cfg.chaos:
        argv += ["--chaos", cfg.chaos]
    if idle:
        argv.append("--idle")
    if cfg.elastic:
        argv.append("--elastic")
    if cfg.can_grow:
        argv.append("--growth")
    return [*argv, cfg.script, *cfg.args]


def ssh_argv(host: str, argv: list[str], ssh_config: str | None) -> list[str]:
    """Run `argv` on `host` in the launcher's working directory, as horovodrun and mpirun do.
    The host is checked (hosts.check_host) and comes after `--`: never read as an option."""
    remote = f"cd {shlex.quote(os.getcwd())} && exec {shlex.join(argv)}"
    opts = ["-F", ssh_config] if ssh_config else []
    return ["ssh", *opts, "-o", "BatchMode=yes", "-T", "--", check_host(host, "ssh"), remote]


class AgentStarter(ABC):
    """How the launcher starts one host's agent: a local process whose stdin reaches the
    agent's stdin, whose output is the agent's, and whose end is the agent's end."""

    @abstractmethod
    def command(self, host: HostSlots, argv: list[str]) -> list[str]:
        """The argv to run locally so that `argv` runs on `host`."""

    def channel(self, host: HostSlots) -> str:
        """What that local process is, for the line that reports its end ('its ssh session')."""
        return "its agent"

    def why_ended(self, host: HostSlots, code: int) -> str:
        """'its ssh session exited with code 255 (...)': why the host was lost."""
        return f"{self.channel(host)} {report.describe_exit(code)}"


class SshStarter(AgentStarter):
    """Over SSH (BatchMode, the launcher's working directory); this host's agent directly."""

    def __init__(self, ssh_config: str | None = None) -> None:
        self.ssh_config = ssh_config

    def command(self, host: HostSlots, argv: list[str]) -> list[str]:
        return argv if is_local(host.name) else ssh_argv(host.name, argv, self.ssh_config)

    def channel(self, host: HostSlots) -> str:
        return "its agent" if is_local(host.name) else "its ssh session"

    def why_ended(self, host: HostSlots, code: int) -> str:
        why = super().why_ended(host, code)
        if code == SSH_LOST and not is_local(host.name):
            why += " (ssh's status when the connection fails or drops)"
        return why


class AgentFleet:
    """Starts the agents, turns the exits they report into `report.Exit`s, places respawns
    (never on a blacklisted host), and notices lost hosts."""

    def __init__(self, *, hosts: list[HostSlots], membership: Membership, secret: str,
                 job_id: str, cfg: Any, address: str, out: procs.Sink, err: procs.Sink,
                 say: Any) -> None:
        self.hosts, self.m, self.cfg = hosts, membership, cfg
        self._secret, self._job_id, self._address = secret, job_id, address
        self._out, self._err, self._say = out, err, say
        self._starter: AgentStarter = cfg.agent_starter or SshStarter(cfg.ssh_config)
        self._env = json.dumps(remote_env(cfg.extra_env)).encode()
        self.blacklist = HostBlacklist(cfg.host_cooldown)
        self.agents: list[_Agent] = []
        self.live: dict[str, int] = {f"w{h.first_rank + i}": h.first_rank + i
                                     for h in hosts for i in range(h.slots)}
        self.where: dict[str, str] = {f"w{h.first_rank + i}": h.name
                                      for h in hosts for i in range(h.slots)}
        """Worker id -> the host it runs on (a replacement may run on another slot's host)."""
        self._stopping = False

    def start(self) -> None:
        for host in self.hosts:
            self._start_agent(host)

    def _start_agent(self, host: HostSlots, *, idle: bool = False) -> None:
        argv = self._starter.command(host, agent_argv(
            host=host, address=self._address, job_id=self._job_id, cfg=self.cfg, idle=idle))
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        assert proc.stdin is not None  # PIPE above
        try:  # one line each: the secret, then the workers' environment
            proc.stdin.write(self._secret.encode() + b"\n" + self._env + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # it ended at once: reap() reports the host lost with its status
        pumps = [threading.Thread(target=procs.pump, args=(s, k, lambda: b""), daemon=True)
                 for s, k in ((proc.stdout, self._out), (proc.stderr, self._err))]
        for t in pumps:
            t.start()
        self.agents.append(_Agent(host=host, proc=proc, pumps=pumps, started=time.monotonic()))

    def _host_of(self, slot: int) -> HostSlots:
        for h in self.hosts:
            if h.first_rank <= slot < h.first_rank + h.slots:
                return h
        raise ValueError(f"rank slot {slot} belongs to no host")

    def _has_agent(self, host: str) -> bool:
        return any(a.host.name == host and not a.lost and a.proc.poll() is None
                   for a in self.agents)

    def _workers_on(self, host: str) -> list[str]:
        return [w for w, h in self.where.items() if h == host]

    def spawn(self, slot: int, worker_id: str) -> bool:
        """A replacement for rank slot `slot`, placed by `blacklist.place_replacement`: its own
        host if that lives, else another (a lost host only once past its cooldown, its agent
        started again). False if no host may take it."""
        home = self._host_of(slot)
        views = [HostView(name=h.name, slots=h.slots, load=len(self._workers_on(h.name)),
                          agent=self._has_agent(h.name)) for h in self.hosts]
        choice = place_replacement(home.name, views, self.blacklist, time.monotonic())
        if choice.host is None:
            self._say(f"no host for a replacement of rank slot {slot}: {choice.reason}")
            return False
        if choice.restart:
            target = next(h for h in self.hosts if h.name == choice.host)
            self.m.forget_starter(f"agent-{target.name}")
            self._start_agent(target, idle=True)
        if choice.host != home.name or choice.restart:
            self._say(f"replacement {worker_id} for rank slot {slot} goes to host "
                      f"{choice.host}: {choice.reason}")
        self.m.order_spawn(f"agent-{choice.host}", slot, worker_id)
        self.live[worker_id] = slot
        self.where[worker_id] = choice.host
        return True

    def running(self) -> int:
        return len(self.live)

    def reap(self) -> list[report.Exit]:
        """Exits the agents reported, and the workers of hosts lost since the last call."""
        ended = []
        for e in self.m.take_exits():
            if self.live.pop(e["worker"], None) is None:
                continue
            self.where.pop(e["worker"], None)
            w = e["worker"]
            ended.append(report.Exit(slot=e["slot"], worker=w, pid=e["pid"], code=e["code"],
                                     seen=e["seen"], fenced=e["fenced"], lost=self.m.is_lost(w),
                                     error=e["error"], oom=e.get("oom", ""),
                                     step=self.m.last_step(w),
                                     joined=w in self.m.formed or not self.m.formed))
        now = time.monotonic()
        for a in self.agents:
            if a.lost:
                continue
            code = a.proc.poll()
            if code is not None:
                ended += self._host_lost(a, self._starter.why_ended(a.host, code), code or 1)
            elif self._cut_off(a, now):
                ended += self._host_lost(a, "its agent has been silent for more than "
                                            f"{self.cfg.heartbeat_timeout:g}s and every worker "
                                            "there is lost: the host crashed or its network is "
                                            "cut", -signal.SIGKILL)
                # Its lifeline: should the link come back, the agent stops what is left there.
                procs.kill_group(a.proc.pid, signal.SIGKILL)
        if not self._stopping:
            for host in self.blacklist.cooled(now):
                self._say(f"host {host} is usable again (its cooldown is over): a replacement "
                          "may start its agent again")
        return ended

    def _cut_off(self, a: _Agent, now: float) -> bool:
        """Silent past the heartbeat timeout, and its workers were lost (by their heartbeats)
        with none left live: the host's network is cut. A silent agent whose workers are
        still starting, or live, or finished, is not judged by this."""
        last = self.m.last_contact(f"agent-{a.host.name}")
        since = last if last is not None and last >= a.started else a.started + AGENT_START_GRACE_S
        if now - since <= self.cfg.heartbeat_timeout:
            return False
        workers = self._workers_on(a.host.name)
        return any(self.m.is_lost(w) for w in workers) and \
            not any(self.m.is_live(w) for w in workers)

    def _host_lost(self, a: _Agent, why: str, code: int) -> list[report.Exit]:
        """Declare the host's workers lost at once and blacklist it. Their own exit statuses
        are unknown: each exit carries `code`, the agent's (SIGKILL: the launcher cut it off)."""
        a.lost = True
        gone = [w for w in self._workers_on(a.host.name) if w in self.live]
        why = f"host {a.host.name} lost: {why}"
        self.m.declare_hosts_lost(gone, why)
        if not self._stopping:
            cooldown = self.blacklist.mark_lost(a.host.name, time.monotonic(), why)
            self._say(f"host {a.host.name} blacklisted for {cooldown:g}s (lost "
                      f"{self.blacklist.losses(a.host.name)} time(s) in this job): no "
                      "replacement goes there before that")
        ended = []
        for w in gone:
            self.where.pop(w, None)
            ended.append(report.Exit(slot=self.live.pop(w), worker=w, pid=self.m.pids.get(w, -1),
                                     code=code, seen=time.time(), lost=True, host_lost=True,
                                     detail=why))
        return ended

    def stop(self, grace: float) -> None:
        """Close every agent's lifeline; they stop their workers. Kill what is left."""
        self._stopping = True
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
