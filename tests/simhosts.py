"""Simulated hosts on one machine, for multi-host tests.

Each host is a network namespace on a private bridge, with its own address in 198.18.0.0/15 (the
range reserved for network benchmarks, RFC 2544), its own hostname (UTS namespace), its own
/dev/shm (a private tmpfs in its own mount namespace), its own PID and SysV IPC namespaces, and a
real sshd that accepts a generated key. The file system is otherwise shared with the machine.

    with SimHosts(n=2, rate=None, prefix="phxt") as hosts:
        hosts[0].name, hosts[0].addr       # "phxt1", "198.18.x.1"
        hosts.bridge_addr                  # "198.18.x.254": the root namespace, seen from the hosts
        hosts.ssh_config                   # ssh -F <it> 198.18.x.1 hostname  (or: ... phxt1 ...)
        hosts[0].run(["hostname"])         # inside host 0's namespaces; a CompletedProcess
        hosts[0].popen([...])              # same, non-blocking; terminate()/kill() reach the cmd
        hosts[0].ssh("echo $PHALANX_X")    # through its sshd, as a launcher would
        hosts[0].crash()                   # SIGKILL every process of that host; restart() boots it
        hosts[0].cut(); hosts[0].uncut()   # its link down / up
        hosts.shape("2gbit")               # tbf on every host's link, both directions; None removes

In tests, use the `simhosts` fixture (a factory; it skips when the machine cannot do this, unless
SIMHOSTS_REQUIRE=1, and tears everything down even when the test fails):

    from simhosts import simhosts  # noqa: F401  (the fixture; or `simhosts = mod.simhosts`,
    def test_x(simhosts):          #  which ruff's F811 does not flag)
        hosts = simhosts(3, rate="1gbit")
        hosts[1].ssh(["python3", "-c", "..."], env={**os.environ, "PHALANX_X": "1"})

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), iproute2 (ip, tc), util-linux (unshare, nsenter) and
openssh (sshd, ssh, ssh-keygen); .ci/setup-hosts.sh installs them on Debian.

Teardown kills every process of every host, deletes the namespaces, veths and bridge and removes
the temporary directory; it runs on close()/__exit__, and a small reaper process does it if the
process that made the hosts dies without closing them (even by SIGKILL). Nothing is written to
/etc/hosts or ~/.ssh. Left on the machine, as any use of these tools leaves them: the empty
runtime directories /run/netns (iproute2 bind-mounts it onto itself on first use) and /run/sshd
(sshd's privilege-separation directory).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

try:
    import pytest
except ImportError:  # usable without pytest
    pytest = None  # type: ignore[assignment]

from simhosts_net import (  # noqa: F401 - the plumbing, shared with the reaper script
    BENCH_NET, BRIDGE_HOST, IFNAMSIZ, SSHD_CANDIDATES, SimHostsError, SimHostsUnavailable,
    _PREFIX_RE, _children, _ip_batch, _kill_members, _leftovers, _link_names, _members,
    _netns_inode, _netns_names, _ns_id, _parse_rate, _reaper_main, _root_locked, _sh, _tbf,
    _teardown, leftovers, sshd_binary)

__all__ = ["Host", "HostPopen", "SimHosts", "SimHostsError", "SimHostsUnavailable", "leftovers",
           "simhosts"]

class HostPopen(subprocess.Popen):
    """A process run inside a host through nsenter. send_signal()/terminate()/kill() go to the
    command itself (nsenter does not forward signals); if nsenter dies, the command gets SIGKILL."""

    def send_signal(self, sig: int) -> None:
        self.poll()
        if self.returncode is None:
            for child in _children(self.pid):
                try:
                    os.kill(child, sig)
                    return
                except ProcessLookupError:
                    pass
        super().send_signal(sig)


class Host:
    """One simulated host. Attributes: index (0-based), name (its hostname), addr, netns, veth
    (its link's end in the root namespace), pid (its init, sshd, in the root PID namespace)."""

    def __init__(self, hosts: SimHosts, index: int, name: str, addr: str, netns: str, veth: str):
        self.hosts, self.index, self.name, self.addr = hosts, index, name, addr
        self.netns, self.veth = netns, veth
        self.pid: int | None = None
        self.pidns: int | None = None
        self._unshare: subprocess.Popen | None = None
        self._popens: weakref.WeakSet[HostPopen] = weakref.WeakSet()
        self._log = hosts.tmpdir / f"{name}.log"

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.addr} {'up' if self.alive else 'down'}>"

    # -- life
    @property
    def alive(self) -> bool:
        return self.pid is not None and _ns_id(self.pid, "pid") == self.pidns

    def _boot(self) -> None:
        """Start its init (sshd) in fresh UTS, mount, PID and IPC namespaces inside its netns."""
        h = self.hosts
        conf = h.tmpdir / f"sshd_{self.name}.conf"
        conf.write_text(h._sshd_config(self))
        opts = "mode=1777,nosuid,nodev" + (f",size={h.shm_size}" if h.shm_size else "")
        shm = f"mount -t tmpfs -o {shlex.quote(opts)} tmpfs /dev/shm"
        mask = ""
        if not h.user_rc:  # no ~/.bashrc in ssh sessions: SetEnv PATH holds, and no slow rc
            rc = shlex.quote(os.path.join(pwd.getpwuid(0).pw_dir, ".bashrc"))
            mask = f"{{ [ ! -f {rc} ] || mount --bind /dev/null {rc}; }} && "
        script = (f"hostname {shlex.quote(self.name)} && {shm} && {mask}"
                  f"exec {shlex.quote(h._sshd)} -D -e -f {shlex.quote(str(conf))}")
        with open(self._log, "ab") as log:
            self._unshare = subprocess.Popen(
                ["ip", "netns", "exec", self.netns,
                 "unshare", "--uts", "--mount", "--pid", "--ipc", "--fork", "--mount-proc",
                 "--propagation", "private", "--kill-child=SIGKILL", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self.pid = self.pidns = None

    def _find_init(self, deadline: float) -> None:
        assert self._unshare is not None
        mine = _ns_id("self", "pid")
        while time.monotonic() < deadline:
            for c in _children(self._unshare.pid):
                ns = _ns_id(c, "pid")
                if ns is not None and ns != mine:
                    self.pid, self.pidns = c, ns
                    return
            if self._unshare.poll() is not None:
                break
            time.sleep(0.005)
        raise SimHostsError(f"{self.name}: its init did not start\n{self.log_tail()}")

    def _wait_sshd(self, deadline: float) -> None:
        """Until its sshd sends its banner on addr:22 (that is, after hostname and /dev/shm)."""
        while time.monotonic() < deadline:
            if not self.alive:
                break
            try:
                with socket.create_connection((self.addr, 22), timeout=0.5) as s:
                    s.settimeout(1)
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise SimHostsError(f"{self.name}: sshd did not answer on {self.addr}:22 "
                            f"({'alive' if self.alive else 'dead'})\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def crash(self, cut: bool = False) -> None:
        """SIGKILL every process of this host: all of its PID namespace and anything else inside
        its network namespace (e.g. nsenter wrappers). Its address still answers (with RST, as a
        machine whose processes died); cut=True also takes its link down, as a power loss.
        restart() boots it again with a fresh /dev/shm."""
        if cut:
            self.cut()
        inits = [self.pid] if self.pid is not None else []
        if self._unshare is not None:
            inits += _children(self._unshare.pid)
        for pid in inits:  # an init: the kernel kills its whole PID namespace
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        net = {i for i in [_netns_inode(self.netns)] if i}
        pidns = {self.pidns} if self.pidns else set()
        _kill_members(set(), pidns)
        if self._unshare is not None:  # it reaps the init, then exits
            try:
                self._unshare.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        left = _kill_members(net, pidns)
        if self._unshare is not None:
            self._unshare.wait(timeout=5)
        self._reap()
        self.pid = self.pidns = None
        self.hosts._save_manifest()
        if left:
            raise SimHostsError(f"{self.name}: processes {left} would not die")

    def restart(self, timeout: float = 10) -> None:
        """Boot a crashed host again (new PID/UTS/mount namespaces, empty /dev/shm, sshd)."""
        if self.alive:
            raise SimHostsError(f"{self.name} is running; crash() it first")
        self._boot()
        deadline = time.monotonic() + timeout
        self._find_init(deadline)
        self.hosts._save_manifest()
        self._wait_sshd(deadline)

    def cut(self) -> None:
        """Network cut: its link goes down (packets both ways are dropped; processes live on)."""
        _sh("ip", "link", "set", self.veth, "down")

    def uncut(self, timeout: float = 10) -> None:
        """Its link up again; returns once both ends are operationally up (the kernel applies a
        carrier change up to a second late), so traffic flows when this returns."""
        _sh("ip", "link", "set", self.veth, "up")
        deadline = time.monotonic() + timeout
        while True:
            out = (_sh("ip", "-o", "link", "show", "dev", self.veth, check=False).stdout
                   + _sh("ip", "-n", self.netns, "-o", "link", "show", "dev", "eth0",
                         check=False).stdout)
            if out.count("state UP") == 2:
                break
            if time.monotonic() > deadline:
                raise SimHostsError(f"{self.name}: link not up {timeout}s after uncut():\n{out}")
            time.sleep(0.01)
        # ARP entries that went stale or failed during the cut would hold traffic up to ~1 s more
        _ip_batch([f"neigh flush to {self.addr}"], force=True)
        for h in self.hosts:
            _ip_batch(["neigh flush all"] if h is self else [f"neigh flush to {self.addr}"],
                      netns=h.netns, force=True)

    def shape(self, rate: str | int | None, *, burst: int | None = None,
              latency: str = "50ms") -> None:
        """tbf at `rate` on this host's link, both directions (None removes it)."""
        if rate is None:
            _ip_batch([f"qdisc del dev {self.veth} root"], force=True, tool="tc")
            _ip_batch(["qdisc del dev eth0 root"], netns=self.netns, force=True, tool="tc")
        else:
            spec = _tbf(rate, burst, latency)
            _ip_batch([f"qdisc replace dev {self.veth} {spec}"], tool="tc")
            _ip_batch([f"qdisc replace dev eth0 {spec}"], netns=self.netns, tool="tc")

    # -- running things
    def command(self, cmd: str | Sequence[str]) -> list[str]:
        """argv that runs cmd (a list, or a string for sh -c) inside this host's namespaces."""
        if self.pid is None:
            raise SimHostsError(f"{self.name} is down")
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return (["nsenter", "-t", str(self.pid), "-u", "-m", "-p", "-n", "-i", "--"]
                + self.hosts._pdeath + argv)

    def popen(self, cmd: str | Sequence[str], **kw) -> HostPopen:
        kw.setdefault("start_new_session", True)
        p = HostPopen(self.command(cmd), **kw)
        self._popens.add(p)
        return p

    def _reap(self) -> None:
        """Collect the exit status of popen()s that crash()/close() killed (no zombies left)."""
        for p in list(self._popens):
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass

    def run(self, cmd: str | Sequence[str], *, timeout: float | None = 60, check: bool = False,
            **kw) -> subprocess.CompletedProcess:
        """subprocess.run inside the host; output captured as text unless told otherwise."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("start_new_session", True)
        return subprocess.run(self.command(cmd), timeout=timeout, check=check, **kw)

    def ssh_command(self, cmd: str | Sequence[str], *ssh_opts: str) -> list[str]:
        remote = cmd if isinstance(cmd, str) else shlex.join(cmd)
        return ["ssh", "-F", str(self.hosts.ssh_config), *ssh_opts, self.addr, remote]

    def ssh(self, cmd: str | Sequence[str], *ssh_opts: str, timeout: float | None = 60,
            check: bool = False, **kw) -> subprocess.CompletedProcess:
        """Run cmd through this host's sshd (PHALANX_* variables of env= are passed on)."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.ssh_command(cmd, *ssh_opts), timeout=timeout, check=check, **kw)

    def pids(self) -> list[int]:
        """Root-namespace pids of every process of this host."""
        net = {i for i in [_netns_inode(self.netns)] if i}
        return _members(net, {self.pidns} if self.pidns else set())

    def path(self, p: str | os.PathLike) -> Path:
        """A path as this host sees it, reachable from the root namespace (e.g. its /dev/shm)."""
        if self.pid is None:
            raise SimHostsError(f"{self.name} is down")
        return Path(f"/proc/{self.pid}/root") / Path(p).relative_to("/")


class SimHosts:
    """n simulated hosts on a bridge; see the module docstring. Use as a context manager (or
    start()/close()).

    rate: tbf rate of every link from the start (tc units: "2gbit"), None for none.
    prefix: 1-8 characters [a-z0-9]; the hostnames are prefix1..prefixN (the same in every run:
        each host has its own UTS namespace). Link and namespace names are prefix + the subnet's
        number in hex + "br" / "v<i>" / "-<i>", unique per run and at most 15 characters.
    shm_size: size= of each host's /dev/shm tmpfs (default: the kernel's, half of RAM).
    boot_timeout: seconds for all sshds to answer. verify_ssh: also log in once to each host
        before returning (about 0.2 s; a wrong setup then fails here, with sshd's log).
    user_rc: False (default) hides root's ~/.bashrc from the hosts, so that ssh sessions keep
        sshd's PATH (whose first entry is this interpreter's directory) and start fast.

    After start(): hosts (list of Host), subnet, bridge (its name), bridge_addr (.254: the root
    namespace as the hosts see it), ssh_config, key (the identity file), tmpdir, tag, timings
    (seconds from start: network, sshd, ssh, start)."""

    def __init__(self, n: int = 2, rate: str | int | None = None, prefix: str = "phxt", *,
                 shm_size: str | None = None, boot_timeout: float = 15,
                 verify_ssh: bool = True, user_rc: bool = False):
        if not 1 <= n <= 200:
            raise ValueError("n must be 1..200")
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError("prefix must be 1-8 characters [a-z0-9], starting with a letter")
        self.n, self.rate, self.prefix, self.shm_size = n, rate, prefix, shm_size
        self.boot_timeout, self.verify_ssh, self.user_rc = boot_timeout, verify_ssh, user_rc
        self.hosts: list[Host] = []
        self.tmpdir = Path()
        self.timings: dict[str, float] = {}
        self._manifest: dict = {}
        self._reaper: subprocess.Popen | None = None
        self._started = self._closed = False

    # -- checks
    @staticmethod
    def unsupported() -> str | None:
        """Why this machine cannot run SimHosts, or None."""
        if not sys.platform.startswith("linux"):
            return "simulated hosts need Linux namespaces"
        if os.geteuid() != 0:
            return "simulated hosts need root (network namespaces, mounts)"
        try:
            with open("/proc/self/status") as f:
                cap = int(re.search(r"^CapEff:\s*([0-9a-f]+)", f.read(), re.MULTILINE).group(1), 16)
        except (OSError, AttributeError):
            cap = 0
        if not (cap >> 12) & 1 or not (cap >> 21) & 1:
            return ("simulated hosts need CAP_NET_ADMIN and CAP_SYS_ADMIN "
                    "(an unprivileged container?)")
        missing = [t for t in ("ip", "tc", "unshare", "nsenter", "ssh", "ssh-keygen")
                   if shutil.which(t) is None]
        if sshd_binary() is None:
            missing.append("sshd")
        if missing:
            return (f"simulated hosts need {', '.join(missing)} "
                    "(run .ci/setup-hosts.sh: openssh-server iproute2 util-linux)")
        return None

    # -- context
    def __enter__(self) -> SimHosts:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __repr__(self) -> str:
        return f"<SimHosts {self.prefix} {getattr(self, 'subnet', '?')} {self.hosts}>"

    # -- setup
    def start(self) -> SimHosts:
        if self._started:
            return self
        reason = self.unsupported()
        if reason:
            raise SimHostsUnavailable(reason)
        self._started = True
        t0 = time.monotonic()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def _setup(self) -> None:
        t0 = time.monotonic()
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"simhosts-{self.prefix}-"))
        os.chmod(self.tmpdir, 0o700)
        self._sshd = sshd_binary() or "/usr/sbin/sshd"
        setpriv = shutil.which("setpriv")
        self._pdeath = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        key, host_key = self.tmpdir / "id_ed25519", self.tmpdir / "host_ed25519"
        keygens = [subprocess.Popen(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                                     f"simhosts-{self.prefix}", "-f", str(k)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE) for k in (key, host_key)]
        self.key = key
        with self._subnet_lock():
            idx = self._pick_subnet(self.prefix)
            net = ipaddress.ip_network((int(BENCH_NET.network_address) + 256 * idx, 24))
            tag = f"{self.prefix}{idx:03x}"
            self.subnet, self.tag = net, tag
            self.bridge = f"{tag}br"
            self.bridge_addr = str(net[BRIDGE_HOST])
            for i in range(self.n):
                self.hosts.append(Host(self, i, f"{self.prefix}{i + 1}", str(net[i + 1]),
                                       f"{tag}-{i + 1}", f"{tag}v{i + 1}"))
            assert all(len(x) <= IFNAMSIZ for x in [self.bridge] + [h.veth for h in self.hosts])
            self._manifest = {"bridge": self.bridge, "veths": [h.veth for h in self.hosts],
                              "netns": [h.netns for h in self.hosts], "pidns": [],
                              "tmpdir": str(self.tmpdir)}
            self._save_manifest()
            self._start_reaper()
            _ip_batch([f"link add name {self.bridge} type bridge",
                       f"addr add {self.bridge_addr}/24 dev {self.bridge}",
                       f"link set {self.bridge} up"])
        root = []
        for h in self.hosts:
            root += [f"netns add {h.netns}",
                     f"link add {h.veth} type veth peer name eth0 netns {h.netns}",
                     f"link set {h.veth} master {self.bridge} up"]
        _ip_batch(root)
        for h in self.hosts:
            _ip_batch([f"addr add {h.addr}/24 dev eth0", "link set eth0 up", "link set lo up"],
                      netns=h.netns)
        if self.rate is not None:
            self.shape(self.rate)
        for k in keygens:
            if k.wait(timeout=30) != 0:
                raise SimHostsError(f"ssh-keygen failed: {k.stderr.read().decode().strip()}")
            k.stderr.close()
        (self.tmpdir / "authorized_keys").write_text((self.tmpdir / "id_ed25519.pub").read_text())
        self.ssh_config = self.tmpdir / "ssh_config"
        self.ssh_config.write_text(self._ssh_config())
        self.timings["network"] = time.monotonic() - t0
        for h in self.hosts:
            h._boot()
        deadline = time.monotonic() + self.boot_timeout
        for h in self.hosts:
            h._find_init(deadline)
        self._save_manifest()
        for h in self.hosts:
            h._wait_sshd(deadline)
        self.timings["sshd"] = time.monotonic() - t0
        if self.verify_ssh:
            self._verify_ssh(deadline + 15)
            self.timings["ssh"] = time.monotonic() - t0

    def _subnet_lock(self):
        """An flock held while a subnet is chosen and its bridge address added, so two runs
        (any prefix) never take the same /24."""
        os.makedirs("/run/netns", exist_ok=True)
        fd = os.open("/run/netns", os.O_RDONLY | os.O_DIRECTORY)

        class _Lock:
            def __enter__(self_):
                fcntl.flock(fd, fcntl.LOCK_EX)

            def __exit__(self_, *exc):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        return _Lock()

    @staticmethod
    def _pick_subnet(prefix: str) -> int:
        """A random free /24 of 198.18.0.0/15: no address or route of the root namespace in it,
        and no link or namespace already named after it. 198.18.0.0/24 is left to
        /work/shared/tools/hosts.sh."""
        names = _link_names() | {n.split("-")[0] for n in _netns_names()}
        used: list[ipaddress.IPv4Network] = []
        for what in (["addr", "show"], ["route", "show", "table", "all"]):
            for item in json.loads(_sh("ip", "-j", "-4", *what).stdout or "[]"):
                nets = [f"{a['local']}/{a['prefixlen']}" for a in item.get("addr_info", [])]
                nets += [item["dst"]] if item.get("dst", "default") != "default" else []
                for x in nets:
                    try:
                        used.append(ipaddress.ip_network(x, strict=False))
                    except ValueError:
                        pass

        def free(i: int) -> bool:
            net = ipaddress.ip_network((int(BENCH_NET.network_address) + 256 * i, 24))
            return (f"{prefix}{i:03x}br" not in names and f"{prefix}{i:03x}" not in names
                    and not any(u.overlaps(net) for u in used))
        candidates = [i for i in range(1, 512) if free(i)]
        if not candidates:
            raise SimHostsError("no free /24 left in 198.18.0.0/15")
        return random.SystemRandom().choice(candidates)

    def _start_reaper(self) -> None:
        self._reaper = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.join(os.path.dirname(os.path.abspath(__file__)), "simhosts_net.py"), "--reap",
             str(self.tmpdir / "manifest.json")],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True, cwd="/")

    def _save_manifest(self) -> None:
        if not self._manifest:
            return
        # only the living ones: the kernel reuses the numbers of dead namespaces
        self._manifest["pidns"] = sorted(h.pidns for h in self.hosts if h.pidns is not None)
        tmp = self.tmpdir / "manifest.json.tmp"
        tmp.write_text(json.dumps(self._manifest))
        os.replace(tmp, self.tmpdir / "manifest.json")

    def _sshd_config(self, h: Host) -> str:
        exe_dir = os.path.dirname(sys.executable)
        path = ":".join(dict.fromkeys([exe_dir] + os.environ.get("PATH", os.defpath).split(":")))
        return "\n".join([
            f"ListenAddress {h.addr}",
            "Port 22",
            f"HostKey {self.tmpdir / 'host_ed25519'}",
            f"AuthorizedKeysFile {self.tmpdir / 'authorized_keys'}",
            "PidFile none",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            f"UsePAM {'yes' if _root_locked() else 'no'}",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "MaxStartups 200",
            "MaxSessions 200",
            "AcceptEnv PHALANX_*",
            f'SetEnv "PATH={path}"',
            "Subsystem sftp internal-sftp",
            "",
        ])

    def _ssh_config(self) -> str:
        lines = []
        for h in self.hosts:
            lines += [f"Host {h.name} {h.addr}", f"  HostName {h.addr}"]
        lines += ["Host *",
                  "  User root",
                  f"  IdentityFile {self.key}",
                  "  IdentitiesOnly yes",
                  "  IdentityAgent none",
                  "  StrictHostKeyChecking no",
                  "  UserKnownHostsFile /dev/null",
                  "  GlobalKnownHostsFile /dev/null",
                  "  CheckHostIP no",
                  "  BatchMode yes",
                  "  LogLevel ERROR",
                  "  ConnectTimeout 5",
                  "  ServerAliveInterval 5",
                  "  ServerAliveCountMax 3",
                  "  ControlMaster no",
                  "  SendEnv PHALANX_*",
                  "  KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org",
                  ""]
        return "\n".join(lines)

    def _verify_ssh(self, deadline: float) -> None:
        procs = [(h, subprocess.Popen(h.ssh_command("hostname"), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                 for h in self.hosts]
        errors = []
        for h, p in procs:
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                err += " (timed out)"
            if p.returncode != 0 or out.strip() != h.name:
                errors.append(f"{h.name}: ssh -F {self.ssh_config} {h.addr} hostname -> "
                              f"rc={p.returncode} out={out.strip()!r} err={err.strip()!r}\n"
                              f"sshd log:\n{h.log_tail()}")
        if errors:
            raise SimHostsError("ssh to the simulated hosts failed:\n" + "\n".join(errors))

    # -- whole-cluster operations
    def shape(self, rate: str | int | None, *, burst: int | None = None,
              latency: str = "50ms") -> None:
        """tbf at `rate` on every host's link, both directions (None removes it)."""
        if rate is not None:
            _parse_rate(rate)
        for h in self.hosts:
            h.shape(rate, burst=burst, latency=latency)
        self.rate = rate

    def close(self) -> None:
        """Tear everything down (idempotent); raises SimHostsError if something was left."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        problems: list[str] = []
        done = False
        try:
            if self._manifest:
                self._save_manifest()
                unshares = [h._unshare for h in self.hosts if h._unshare is not None]
                problems = _teardown(self._manifest, unshares)
            elif self.tmpdir != Path() and self.tmpdir.is_dir():
                shutil.rmtree(self.tmpdir, ignore_errors=True)
            done = not problems
        finally:
            for h in self.hosts:
                h.pid = h.pidns = None
                h._reap()
            if self._reaper is not None:
                try:  # "done" only when all went well; otherwise the reaper tries again
                    if done:
                        self._reaper.stdin.write(b"done\n")
                    self._reaper.stdin.close()
                except OSError:
                    pass
                try:
                    self._reaper.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
        if problems:
            raise SimHostsError(f"simulated hosts left behind: {problems}")

    def leftovers(self) -> list[str]:
        """What of this SimHosts still exists (empty after close())."""
        return _leftovers(self._manifest) if self._manifest else []


# ----------------------------------------------------------------------------- pytest fixture
if pytest is not None:
    @pytest.fixture
    def simhosts():
        """Factory: simhosts(n=2, rate=None, prefix="phxt", **kw) -> started SimHosts, torn down
        at the end of the test. Skips when the machine cannot (fails if SIMHOSTS_REQUIRE=1)."""
        made: list[SimHosts] = []

        def make(n: int = 2, rate: str | int | None = None, prefix: str = "phxt", **kw) -> SimHosts:
            reason = SimHosts.unsupported()
            if reason:
                if os.environ.get("SIMHOSTS_REQUIRE") == "1":
                    pytest.fail(f"SIMHOSTS_REQUIRE=1 but {reason}")
                pytest.skip(reason)
            hosts = SimHosts(n, rate=rate, prefix=prefix, **kw)
            made.append(hosts)
            return hosts.start()

        try:
            yield make
        finally:
            errors = []
            for hosts in reversed(made):
                try:
                    hosts.close()
                except SimHostsError as e:
                    errors.append(str(e))
            if errors:
                raise SimHostsError("; ".join(errors))
else:
    simhosts = None  # type: ignore[assignment]
