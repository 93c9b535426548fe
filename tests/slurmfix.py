"""A real Slurm cluster on simulated hosts (tests/simhosts.py), for tests of `phalanx run`
inside an allocation.

    with SimHosts(2, prefix="phxs") as hosts, SlurmCluster(hosts) as slurm:
        slurm.env                   # os.environ without SLURM_*, plus SLURM_CONF: for clients
        slurm.run(["sinfo"])        # a client command (srun, salloc, sbatch, scontrol) on it
        slurm.nodes                 # ["phxs1", "phxs2"]: NodeName = the host's hostname
        slurm.logs()                # the tail of every daemon's log, for failure messages
        slurm.crash_node(1)         # that host crashes, its slurmd with it; 2-3 SlurmdTimeouts
        slurm.job_nodes("7")        #   (10 s) later Slurm sets it DOWN and drops it from job 7

munged (a generated key; its socket in the cluster's temporary directory) and slurmctld run
on the machine, slurmctld on a free port, reached at the bridge address (NoCtldInAddrAny would
bind the address the machine's hostname resolves to, not that one), so two clusters never
collide. One slurmd runs inside each
simulated host's namespaces (NodeAddr = its address). Pathname Unix sockets work across network
namespaces and the hosts share the file system, so every daemon and client reaches the one
munged. Plugins need no cgroups: proctrack/linuxproc, task/affinity, select/cons_tres, no
accounting. Each node has `cpus` CPUs whatever the machine has (SlurmdParameters=
config_overrides).

Every daemon runs in the foreground under `setpriv --pdeathsig KILL`, so it dies with the test
process even when that is killed (only the directory, /tmp/slurmfix-*, then stays). close()
stops them all and removes the directory; the simulated hosts' own teardown then kills whatever
the jobs left on them (slurmstepd, tasks).

In tests, use the module-scoped `slurm_cluster` fixture (2 hosts), or `own_slurm_cluster` (2
hosts for one test, ~1.5 s to start) for a test that breaks its cluster (crashes a node). They
skip when the machine cannot (no root, no Slurm: .ci/setup-slurm.sh installs it), unless
SLURM_REQUIRE=1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from simhosts import Host, SimHosts

DAEMONS = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged", "mungekey")
CLIENTS = ("srun", "salloc", "sbatch", "scontrol", "sinfo")


class SlurmError(RuntimeError):
    """The cluster did not come up (the message holds the daemons' logs)."""


class SlurmCluster:
    """munged + slurmctld here, one slurmd per simulated host; see the module docstring."""

    def __init__(self, hosts: SimHosts, *, cpus: int = 4, start_timeout: float = 30) -> None:
        self.hosts, self.cpus, self.start_timeout = hosts, cpus, start_timeout
        self.nodes = [h.name for h in hosts]
        self.dir = Path()
        self.env: dict[str, str] = {}
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._setpriv = shutil.which("setpriv")

    @staticmethod
    def unsupported() -> str | None:
        """Why this machine cannot run a Slurm cluster of simulated hosts, or None."""
        reason = SimHosts.unsupported()
        if reason:
            return reason
        missing = [os.path.basename(t) for t in DAEMONS + CLIENTS + ("setpriv",)
                   if shutil.which(t) is None]
        if missing:
            return (f"a Slurm test cluster needs {', '.join(missing)} "
                    "(run .ci/setup-slurm.sh: slurmctld slurmd munge slurm-client)")
        return None

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup
    def start(self) -> SlurmCluster:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self) -> None:
        # munged needs its socket's directory (and those above it) searchable by everyone.
        self.dir = Path(tempfile.mkdtemp(prefix=f"slurmfix-{self.hosts.tag}-"))
        os.chmod(self.dir, 0o755)
        private = self.dir / "munge"
        private.mkdir(mode=0o700)
        for d in ("state", "spool", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.dir / d).mkdir()
        self.socket = self.dir / "munge.socket"
        self.conf = self.dir / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)
        subprocess.run(["mungekey", "--create", "--keyfile", str(private / "munge.key")],
                       check=True, capture_output=True, timeout=30)
        self._daemon("munged", ["/usr/sbin/munged", "--foreground", "--key-file",
                                str(private / "munge.key"), "--socket", str(self.socket),
                                "--pid-file", str(private / "munged.pid"), "--seed-file",
                                str(private / "seed"), "--log-file", str(self.dir / "munged.log")])
        self._wait(lambda: self.socket.exists(), "munged did not create its socket")
        self.conf.write_text(self._slurm_conf(self._free_port()))
        # slurmd 22.05 always loads a cgroup plugin; `ip netns exec` left the hosts a /sys
        # without cgroup mounts, so autodetection fails. v1, named, loads without them (no
        # plugin configured here uses cgroups).
        (self.dir / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        self._daemon("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run(["scontrol", "ping"]).returncode == 0,
                   "slurmctld did not answer scontrol ping")
        for h in self.hosts:
            self._slurmd(h)
        self._wait(self._all_idle, "the nodes did not become idle")

    def _slurmd(self, h: Host) -> None:
        with open(self.dir / "log" / f"slurmd-{h.name}.out", "ab") as out:
            p = h.popen(["/usr/sbin/slurmd", "-D", "-N", h.name, "-f", str(self.conf)],
                        env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                        stderr=subprocess.STDOUT)
        self._procs.append((f"slurmd {h.name}", p))

    def _daemon(self, name: str, argv: list[str]) -> None:
        pdeath = [self._setpriv, "--pdeathsig", "KILL", "--"] if self._setpriv else []
        with open(self.dir / "log" / f"{name}.out", "wb") as out:
            p = subprocess.Popen([*pdeath, *argv], env=self.env, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append((name, p))

    def _free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def _all_idle(self) -> bool:
        out = self.run(["sinfo", "--noheader", "--Node", "--format=%N %t"]).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            dead = [n for n, p in self._procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"{self.start_timeout}s passed"
                raise SlurmError(f"{what} ({why})\n{self.logs()}")
            time.sleep(0.1)

    def _slurm_conf(self, port: int) -> str:
        d = self.dir
        nodes = [f"NodeName={h.name} NodeAddr={h.addr} CPUs={self.cpus} Boards=1 "
                 f"SocketsPerBoard=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 "
                 "RealMemory=1000 State=UNKNOWN" for h in self.hosts]
        return "\n".join([
            f"ClusterName=phx{self.hosts.tag}",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}({self.hosts.bridge_addr})",
            f"SlurmctldPort={port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'spool'}/%n.pid",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'log'}/slurmd-%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/affinity",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin", "SwitchType=switch/none", "MpiDefault=none",
            "SlurmdParameters=config_overrides", "ReturnToService=2", "MailProg=/bin/true",
            "KillWait=2", "InactiveLimit=0", "MinJobAge=10", "SlurmdTimeout=10",
            *nodes,
            "PartitionName=phx Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    # -- use
    def run(self, argv: Sequence[str], *, timeout: float = 30,
            **kw) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster (its env unless env= is given)."""
        kw.setdefault("env", self.env)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(list(argv), timeout=timeout, check=False, **kw)

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon's log and output."""
        out = []
        for p in sorted(self.dir.glob("log/*")) + sorted(self.dir.glob("*.log")):
            text = p.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {p.name}\n" + "\n".join(text))
        return "\n".join(out)

    def job_nodes(self, job_id: str) -> str:
        """The nodes job `job_id` holds now, in Slurm's hostlist syntax ('' once it ended)."""
        return self.run(["squeue", "--noheader", "--jobs", job_id, "--format=%N"]).stdout.strip()

    def crash_node(self, index: int) -> None:
        """The host crashes (simhosts' crash(): every process of it, its slurmd too)."""
        self.hosts[index].crash()
        self._procs = [(n, p) for n, p in self._procs if p.poll() is None]

    def daemon_pids(self) -> list[int]:
        return [p.pid for _, p in self._procs if p.poll() is None]

    # -- teardown
    def close(self) -> None:
        """Stop every daemon (SIGTERM, then SIGKILL after 5 s) and remove the directory."""
        for _, p in reversed(self._procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # HostPopen: to slurmd itself, not nsenter
        deadline = time.monotonic() + 5
        for _, p in reversed(self._procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self._procs.clear()
        if self.dir != Path() and self.dir.is_dir():
            shutil.rmtree(self.dir, ignore_errors=True)


def _cluster(prefix: str) -> Iterator[SlurmCluster]:
    reason = SlurmCluster.unsupported()
    if reason:
        if os.environ.get("SLURM_REQUIRE") == "1":
            pytest.fail(f"SLURM_REQUIRE=1 but {reason}")
        pytest.skip(reason)
    with SimHosts(2, prefix=prefix) as hosts, SlurmCluster(hosts) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A started 2-node cluster (each node 4 CPUs) on 2 simulated hosts, for a whole module.
    Skips when the machine cannot run one (fails instead if SLURM_REQUIRE=1)."""
    yield from _cluster("phxs")


@pytest.fixture
def own_slurm_cluster() -> Iterator[SlurmCluster]:
    """The same, for one test that may break it (crash a node): nodes phxk1 and phxk2."""
    yield from _cluster("phxk")
