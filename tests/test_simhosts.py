"""The simulated-hosts fixture (tests/simhosts.py): each host is its own machine as far as
hostname, /dev/shm, PIDs, address and sshd go; crash, cut and shape do what they say; and nothing
is ever left behind. Skipped where the machine cannot do it (run .ci/setup-hosts.sh)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import simhosts as sh
from simhosts import SimHosts

simhosts = sh.simhosts  # the fixture: found by pytest here, no conftest needed

PREFIX = "phxt"

RECEIVER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen(8)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        n, t0 = 0, None
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            t0 = t0 or time.monotonic()
            n += len(b)
        c.sendall(f"{n} {time.monotonic() - t0 if t0 else 0.0}".encode())
        c.close()
        if len(sys.argv) > 3:
            break
""")

CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        addr, timeout = (sys.argv[1], int(sys.argv[2])), float(sys.argv[3])
        with socket.create_connection(addr, timeout=timeout) as c:
            c.sendall(b"x" * int(sys.argv[4]) if len(sys.argv) > 4 else b"hello")
            c.shutdown(socket.SHUT_WR)
            print(c.recv(100).decode())
    except OSError as e:
        print("FAIL", type(e).__name__, e)
        sys.exit(1)
""")


@pytest.fixture(autouse=True)
def nothing_left(monkeypatch):
    """Every SimHosts a test starts leaves no namespace, link, process or directory behind.
    (Checked per instance, so that another run of these tests at the same time is no leak.)"""
    made: list[SimHosts] = []
    start = SimHosts.start

    def recording_start(self):
        made.append(self)
        return start(self)
    monkeypatch.setattr(SimHosts, "start", recording_start)
    yield
    for hosts in made:
        if not hasattr(hosts, "tag"):
            continue  # never got as far as making anything
        assert hosts.leftovers() == [], f"{hosts.tag}: left behind"
        assert not any(hosts.tag in x for x in sh.leftovers(PREFIX))
        assert not hosts.tmpdir.exists()
        assert all(not h.alive and h.pids() == [] for h in hosts)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _need_support() -> None:
    reason = SimHosts.unsupported()
    if reason:
        if os.environ.get("SIMHOSTS_REQUIRE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def _listen(host: sh.Host, port: int, once: bool = True) -> sh.HostPopen:
    """A TCP receiver inside host on addr:port; it answers "<bytes> <seconds>" per connection."""
    argv = [sys.executable, "-c", RECEIVER, host.addr, str(port), *(["once"] if once else [])]
    p = host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return p


def _connect(host: sh.Host, addr: str, port: int, timeout: float = 5,
             nbytes: int | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", CONNECT, addr, str(port), str(timeout)]
    return host.run(argv + ([str(nbytes)] if nbytes else []), timeout=timeout + 60)


# ----------------------------------------------------------------------------- no root needed
@pytest.mark.timeout(10)
def test_unsupported_says_why(monkeypatch):
    supported = SimHosts.unsupported() is None
    monkeypatch.setattr(sh, "sshd_binary", lambda: None)
    if supported:
        assert "sshd" in SimHosts.unsupported() and "setup-hosts.sh" in SimHosts.unsupported()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in SimHosts.unsupported()
    with pytest.raises(sh.SimHostsUnavailable, match="root"):
        SimHosts(1).start()


@pytest.mark.timeout(10)
def test_arguments_checked():
    with pytest.raises(ValueError):
        SimHosts(1, prefix="much-too-long")
    with pytest.raises(ValueError):
        SimHosts(0)
    assert sh._parse_rate("100mbit") == 100e6 / 8
    assert sh._parse_rate("2gbit") == 2e9 / 8
    assert sh._parse_rate("10mbps") == 10e6
    with pytest.raises(ValueError):
        sh._parse_rate("fast")


# ----------------------------------------------------------------------------- hosts
@pytest.mark.timeout(60)
def test_hosts_are_distinct_machines(simhosts):
    hosts = simhosts(3, prefix=PREFIX)
    assert [h.name for h in hosts] == ["phxt1", "phxt2", "phxt3"]
    net = ipaddress.ip_network("198.18.0.0/15")
    assert hosts.subnet.subnet_of(net) and hosts.subnet.prefixlen == 24
    assert all(ipaddress.ip_address(h.addr) in hosts.subnet for h in hosts)
    assert hosts.bridge_addr == str(hosts.subnet[254])
    assert len({h.addr for h in hosts}) == 3
    assert all(len(x) <= 15 for x in [hosts.bridge] + [h.veth for h in hosts])
    own_pidns = os.readlink("/proc/self/ns/pid")
    seen = set()
    for h in hosts:
        r = h.run("hostname; readlink /proc/self/ns/pid; cat /proc/1/comm", check=True)
        name, pidns, init = r.stdout.split()
        assert name == h.name and init == "sshd"
        assert pidns != own_pidns
        seen.add(pidns)
    assert len(seen) == 3
    assert socket.gethostname() not in {h.name for h in hosts}


@pytest.mark.timeout(60)
def test_popen_signals_reach_the_command(simhosts):
    hosts = simhosts(1, prefix=PREFIX)
    p = hosts[0].popen(["sleep", "1000"])
    deadline = time.monotonic() + 5
    while "sleep" not in hosts[0].run("cat /proc/*/comm").stdout and time.monotonic() < deadline:
        time.sleep(0.02)
    p.terminate()
    assert p.wait(timeout=5) == -signal.SIGTERM
    assert "sleep" not in hosts[0].run("cat /proc/*/comm").stdout


@pytest.mark.timeout(60)
def test_dev_shm_is_private(simhosts):
    hosts = simhosts(2, prefix=PREFIX)
    name = f"simhosts-probe-{os.getpid()}"
    hosts[0].run(f"echo hello > /dev/shm/{name}", check=True)
    assert hosts[0].run(["cat", f"/dev/shm/{name}"]).stdout == "hello\n"
    assert hosts[0].ssh(["cat", f"/dev/shm/{name}"]).stdout == "hello\n"  # sshd is in it too
    assert hosts[0].path(f"/dev/shm/{name}").read_text() == "hello\n"
    assert hosts[1].run(["test", "-e", f"/dev/shm/{name}"]).returncode == 1
    assert hosts[1].ssh(["test", "-e", f"/dev/shm/{name}"]).returncode == 1
    assert not os.path.exists(f"/dev/shm/{name}")
    assert "tmpfs" in hosts[1].run("grep ' /dev/shm ' /proc/self/mounts").stdout


@pytest.mark.timeout(60)
def test_ssh_to_each_host_passes_phalanx_env(simhosts):
    hosts = simhosts(2, prefix=PREFIX)
    env = {**os.environ, "PHALANX_TEST": "from-root", "OTHER_TEST": "kept-out"}
    for h in hosts:
        for target in (h.addr, h.name):  # by address, and by name through the ssh_config
            r = subprocess.run(
                ["ssh", "-F", str(hosts.ssh_config), target,
                 ('hostname; echo "$PHALANX_TEST"; echo "x$OTHER_TEST"; '
                  'python3 -c "import sys; print(sys.executable)"')],
                env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                check=False)
            assert r.returncode == 0, r.stderr
            name, phx, other, exe = r.stdout.split()
            assert (name, phx, other) == (h.name, "from-root", "x")
            assert os.path.realpath(exe) == os.path.realpath(sys.executable)
    config = hosts.ssh_config.read_text()
    assert "BatchMode yes" in config and "User root" in config


@pytest.mark.timeout(60)
def test_hosts_reach_each_other_and_the_bridge(simhosts):
    hosts = simhosts(2, prefix=PREFIX)
    listener = _listen(hosts[1], 7000)
    r = _connect(hosts[0], hosts[1].addr, 7000)
    assert r.returncode == 0 and r.stdout.split()[0] == "5", r.stdout + r.stderr
    assert listener.wait(timeout=10) == 0
    listener.stdout.close()
    listener.stderr.close()

    # a coordinator in the root namespace, bound to the bridge address
    with socket.socket() as srv:
        srv.bind((hosts.bridge_addr, 0))
        srv.listen(4)
        port = srv.getsockname()[1]
        for h in hosts:
            code = (f"import socket; socket.create_connection(({hosts.bridge_addr!r}, {port}),"
                    f" timeout=5).sendall(socket.gethostname().encode())")
            p = h.popen([sys.executable, "-c", code])
            srv.settimeout(10)
            c, (peer, _) = srv.accept()
            with c:
                assert (peer, c.recv(100).decode()) == (h.addr, h.name)
            assert p.wait(timeout=10) == 0


@pytest.mark.timeout(60)
def test_crash_kills_everything_in_a_host(simhosts):
    hosts = simhosts(2, prefix=PREFIX)
    h = hosts[0]
    direct = h.popen(["sleep", "1000"])
    assert h.ssh("nohup sleep 1001 >/dev/null 2>&1 &", timeout=30).returncode == 0
    h.run("echo x > /dev/shm/before-crash", check=True)
    deadline = time.monotonic() + 5
    while h.run("cat /proc/*/comm").stdout.count("sleep") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    before = h.pids()
    assert len(before) >= 4  # sshd, two sleeps, nsenter
    other = hosts[1].pids()

    h.crash()
    assert h.pids() == [] and not h.alive
    assert direct.wait(timeout=5) == -signal.SIGKILL
    assert not any(_running(pid) for pid in before)
    r = h.ssh("true", "-o", "ConnectTimeout=3", timeout=30)
    assert r.returncode == 255
    assert hosts[1].pids() == other and hosts[1].ssh("hostname").stdout.strip() == "phxt2"
    with pytest.raises(sh.SimHostsError, match="down"):
        h.run("true")

    h.restart()  # a reboot: same name and address, fresh /dev/shm
    assert h.ssh("hostname; ls /dev/shm | wc -l").stdout.split() == ["phxt1", "0"]


@pytest.mark.timeout(60)
def test_cut_makes_a_host_unreachable_until_uncut(simhosts):
    hosts = simhosts(2, prefix=PREFIX)
    listener = _listen(hosts[0], 7000)
    hosts[0].cut()
    r = _connect(hosts[1], hosts[0].addr, 7000, timeout=1)
    assert r.returncode == 1 and "FAIL" in r.stdout
    assert hosts[0].ssh("true", "-o", "ConnectTimeout=1", timeout=30).returncode == 255
    assert listener.poll() is None  # its processes live on
    hosts[0].uncut()  # returns when traffic flows again: no retries needed
    r = _connect(hosts[1], hosts[0].addr, 7000, timeout=0.5)
    assert r.returncode == 0, r.stdout
    assert listener.wait(timeout=10) == 0
    listener.stdout.close()
    listener.stderr.close()
    assert hosts[0].ssh("hostname").stdout.strip() == "phxt1"


@pytest.mark.timeout(90)
def test_shape_limits_throughput(simhosts):
    hosts = simhosts(2, prefix=PREFIX)
    nbytes, limit = 20 * 2**20, 100e6 / 8  # 20 MiB at 100 mbit/s: about 1.7 s

    def rate() -> float:
        r = _connect(hosts[0], hosts[1].addr, 7000, timeout=30, nbytes=nbytes)
        assert r.returncode == 0, r.stdout + r.stderr
        got, secs = r.stdout.split()
        assert int(got) == nbytes
        return nbytes / float(secs)

    listener = _listen(hosts[1], 7000, once=False)
    try:
        free = rate()
        hosts.shape("100mbit")
        assert "tbf" in subprocess.run(["tc", "qdisc", "show", "dev", hosts[1].veth],
                                       capture_output=True, text=True, check=True).stdout
        assert "tbf" in hosts[0].run("tc qdisc show dev eth0").stdout
        shaped = rate()
        print(f"unshaped {free / 1e6:.0f} MB/s, shaped at 100mbit {shaped / 1e6:.1f} MB/s")
        assert shaped < 2 * limit
        assert shaped > 0.3 * limit
        assert free > 2 * limit
        hosts.shape(None)
        assert "tbf" not in hosts[0].run("tc qdisc show dev eth0").stdout
    finally:
        listener.kill()
        listener.wait()
        listener.stdout.close()
        listener.stderr.close()


# ----------------------------------------------------------------------------- teardown
@pytest.mark.timeout(60)
def test_two_at_once_and_teardown_on_interrupt():
    _need_support()
    with pytest.raises(KeyboardInterrupt), SimHosts(1, prefix=PREFIX, verify_ssh=False) as a, \
                SimHosts(1, prefix=PREFIX, verify_ssh=False) as b:
        assert a.subnet != b.subnet and a.bridge != b.bridge
        assert a[0].run("hostname").stdout == b[0].run("hostname").stdout == "phxt1\n"
        raise KeyboardInterrupt
    assert a.leftovers() == [] and b.leftovers() == []
    assert not a.tmpdir.exists() and not b.tmpdir.exists()


@pytest.mark.timeout(60)
def test_reaper_cleans_up_when_the_owner_is_killed():
    _need_support()
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from simhosts import SimHosts
            h = SimHosts(2, prefix={PREFIX!r}, verify_ssh=False).start()
            h[0].popen(["sleep", "1000"])
            print(h.tag, h.tmpdir, flush=True)
            time.sleep(1000)
        """)], stdout=subprocess.PIPE, text=True)
    tag, tmpdir = owner.stdout.readline().split()
    assert any(tag in x for x in sh.leftovers(PREFIX))
    owner.kill()  # no close(), no atexit: only the reaper can clean up now
    owner.wait()
    owner.stdout.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not any(tag in x for x in sh.leftovers(PREFIX)) and not os.path.exists(tmpdir):
            break
        time.sleep(0.1)
    assert not any(tag in x for x in sh.leftovers(PREFIX)), sh.leftovers(PREFIX)
    assert not os.path.exists(tmpdir)


@pytest.mark.timeout(500)
@pytest.mark.xfail(strict=False, reason="flaky only inside the full suite on this machine (3 of "
                   "3 full runs on 2026-11-26: a 30 s and a 60 s timeout, then the child exiting 0 "
                   "with no output after SIGINT); never reproduced alone in 25+ tries. Open.")
def test_interrupted_setup_leaves_nothing():
    _need_support()
    code = textwrap.dedent(f"""
        import faulthandler, json, signal, sys, time
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks, if it ever hangs
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from simhosts import SimHosts
        hosts = SimHosts(3, prefix={PREFIX!r})
        print("go", flush=True)
        try:
            with hosts:
                time.sleep(100)
        except KeyboardInterrupt:
            print(json.dumps([getattr(hosts, "tag", ""), str(hosts.tmpdir), hosts.leftovers()]))
    """)
    for delay in (0.02, 0.15, 0.3):  # while making links, booting sshds, logging in
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "go\n"
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        # Teardown is bounded but slow at worst (10 s of kills, 5 s per host for its unshare,
        # twice, then up to 30 s for the reaper): seen above 60 s once in a full CI run.
        try:
            out, err = p.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGUSR1)
            time.sleep(1)
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"interrupted setup (delay {delay}) still tearing down after 150 s; "
                        f"its stacks:\n{err[-8000:]}")
        assert p.returncode == 0, out + err[-3000:]
        tag, tmpdir, left = json.loads(out)
        assert left == []
        assert not tag or not any(tag in x for x in sh.leftovers(PREFIX))
        assert tmpdir == "." or not os.path.exists(tmpdir)
