"""A real etcd cluster on loopback, for tests of phalanx's etcd control plane (coord/etcd*.py).

    with EtcdCluster(3) as cluster:
        cluster.endpoints        # ["127.0.0.1:PORT", ...] client URLs, one per member
        cluster.kill(0)          # SIGKILL member 0; cluster.restart(0) brings it back (same data)
        cluster.stop_quorum()    # SIGKILL two members (writes stall); cluster.restart_all() heals
        cluster.leader()         # index of the raft leader (asks every live member)
        cluster.logs()           # the tail of every member's log, for failure messages

Every member has its own data directory, free client and peer ports on 127.0.0.1, and raft timings
of 50 ms heartbeat / 250 ms election timeout, so a lost leader is replaced in well under a second.
Members run under `setpriv --pdeathsig KILL`, so they die with the test process even when it is
killed; close() kills every member, waits for it, and removes the temporary directory (only that
directory can remain if the test process itself is SIGKILLed).

`EtcdCluster(1, tls=True)` serves HTTPS only, with client certificate authentication, from a CA
made by openssl for the test: `cluster.cacert`, `cluster.cert`, `cluster.key` are the client's
files (etcdctl's --cacert/--cert/--key).

In tests, use the module-scoped `etcd_cluster` fixture (3 members; do not break it), or
`own_etcd_cluster` (3 members for one test, ~1-2 s to start) for a test that kills members. They
skip when etcd is not installed (.ci/setup-etcd.sh installs it), unless ETCD_REQUIRE=1.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ETCD = "etcd"


class EtcdFixError(RuntimeError):
    """The cluster did not come up (the message holds the members' logs)."""


def unavailable_reason() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if shutil.which(ETCD) is None:
        return "etcd is not installed (bash .ci/setup-etcd.sh installs it)"
    return None


def skip_or_fail() -> None:
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("ETCD_REQUIRE") == "1":
            pytest.fail(f"ETCD_REQUIRE=1 but {reason}")
        pytest.skip(reason)


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_certs(d: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=etcdfix test CA")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        run("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{who}.crt", "-days", "1", "-extfile", f"{who}.ext")
    return {name: d / name for name in ("ca.crt", "server.crt", "server.key", "client.crt",
                                        "client.key")}


class Member:
    """One etcd process: name, client/peer ports, data dir, its Popen while it runs."""

    def __init__(self, name: str, client_port: int, peer_port: int, data_dir: Path) -> None:
        self.name, self.client_port, self.peer_port = name, client_port, peer_port
        self.data_dir, self.log = data_dir, data_dir.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """n etcd members on loopback; see the module docstring."""

    def __init__(self, n: int = 3, *, tls: bool = False, heartbeat_ms: int = 50,
                 election_ms: int = 250, start_timeout: float = 20.0) -> None:
        self.n, self.tls, self.start_timeout = n, tls, start_timeout
        self.timing = ["--heartbeat-interval", str(heartbeat_ms),
                       "--election-timeout", str(election_ms)]
        self.dir = Path(tempfile.mkdtemp(prefix="etcdfix-"))
        self.members: list[Member] = []
        self.scheme = "https" if tls else "http"
        self.cacert = self.cert = self.key = None
        self._certs: dict[str, Path] = {}
        self._token = "etcdfix"

    # -- life
    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self.tls:
            self._certs = make_certs(self.dir)
            self.cacert, self.cert, self.key = (str(self._certs[k]) for k in
                                                ("ca.crt", "client.crt", "client.key"))
        for attempt in range(3):  # a port taken between free_ports() and etcd's bind: retry
            ports = free_ports(2 * self.n)
            token = self._token = f"etcdfix-{secrets.token_hex(4)}"
            self.members = [Member(f"m{i}", ports[2 * i], ports[2 * i + 1],
                                   self.dir / f"try{attempt}-m{i}") for i in range(self.n)]
            for i in range(self.n):
                self._spawn(i, token)
            try:
                self.wait_healthy(range(self.n), self.start_timeout)
                return
            except EtcdFixError:
                if attempt == 2 or "address already in use" not in self.logs():
                    raise
                self._kill_all()

    def _argv(self, m: Member, token: str) -> list[str]:
        peers = ",".join(f"{x.name}=http://127.0.0.1:{x.peer_port}" for x in self.members)
        client = f"{self.scheme}://127.0.0.1:{m.client_port}"
        argv = [ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-cluster", peers, "--initial-cluster-state", "new",
                "--initial-cluster-token", token, *self.timing, "--logger", "zap",
                "--log-level", "warn"]
        if self.tls:
            c = self._certs
            argv += ["--cert-file", str(c["server.crt"]), "--key-file", str(c["server.key"]),
                     "--trusted-ca-file", str(c["ca.crt"]), "--client-cert-auth"]
        return argv

    def _spawn(self, i: int, token: str | None = None) -> None:
        m, token = self.members[i], token or self._token
        pdeath = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(m.log, "ab") as log:
            m.proc = subprocess.Popen([*pdeath, *self._argv(m, token)], stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)

    def close(self) -> None:
        """Kill every member, wait for each, remove the directory. Idempotent."""
        self._kill_all()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_all(self) -> None:
        for i, m in enumerate(self.members):
            if m.proc is not None:
                self.kill(i)

    # -- faults
    def kill(self, i: int) -> None:
        """SIGKILL member i and reap it (its data stays, for restart)."""
        m = self.members[i]
        if m.proc is not None:
            if m.proc.poll() is None:
                m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(10)

    def restart(self, i: int, *, wait: bool = True) -> None:
        """Start killed member i again on its data (it rejoins the cluster)."""
        assert not self.members[i].alive, f"member {i} is running"
        self._spawn(i)
        if wait:
            self.wait_healthy([i], self.start_timeout)

    def stop_quorum(self) -> list[int]:
        """SIGKILL two members, so no write can commit; their indices (restart_all heals)."""
        victims = [i for i, m in enumerate(self.members) if m.alive][:2]
        for i in victims:
            self.kill(i)
        return victims

    def restart_all(self) -> None:
        """Start every dead member and wait until the whole cluster is healthy."""
        dead = [i for i, m in enumerate(self.members) if not m.alive]
        for i in dead:
            self._spawn(i)
        self.wait_healthy(range(self.n), self.start_timeout)

    # -- queries
    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{m.client_port}" for m in self.members]

    def _get(self, i: int, method: str, path: str, body: bytes | None = None,
             timeout: float = 1.0) -> dict:
        m = self.members[i]
        if self.tls:
            ctx = ssl.create_default_context(cafile=self.cacert)
            ctx.load_cert_chain(self.cert, self.key)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", m.client_port, timeout=timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", m.client_port, timeout=timeout)
        try:
            conn.request(method, path, body)
            return json.loads(conn.getresponse().read(1 << 20))
        finally:
            conn.close()

    def healthy(self, i: int) -> bool:
        """Member i is up and sees a leader."""
        try:
            return self._get(i, "GET", "/health").get("health") == "true"
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def wait_healthy(self, indices, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        todo = list(indices)
        while todo:
            for i in list(todo):
                if not self.members[i].alive:
                    raise EtcdFixError(f"etcd member {i} exited with {self.members[i].proc.returncode}"
                                       f"\n{self.logs()}")
                if self.healthy(i):
                    todo.remove(i)
            if todo and time.monotonic() > deadline:
                raise EtcdFixError(f"etcd members {todo} not healthy after {timeout}s\n{self.logs()}")
            if todo:
                time.sleep(0.05)

    def leader(self) -> int:
        """Index of the member that is raft leader now (asked of every live member)."""
        ids, lead = {}, None
        for i, m in enumerate(self.members):
            if m.alive:
                try:
                    st = self._get(i, "POST", "/v3/maintenance/status", b"{}")
                except (OSError, ValueError, http.client.HTTPException):
                    continue
                ids[st["header"]["member_id"]] = i
                lead = st.get("leader")
        if lead not in ids:
            raise EtcdFixError(f"no live member knows a leader\n{self.logs()}")
        return ids[lead]

    def logs(self, tail: int = 3000) -> str:
        out = []
        for m in self.members:
            text = m.log.read_text(errors="replace") if m.log.exists() else ""
            out.append(f"--- {m.name} ({m.log}):\n{text[-tail:]}")
        return "\n".join(out)


@pytest.fixture(scope="module")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A 3-member cluster shared by a module's tests; do not kill its members."""
    skip_or_fail()
    with EtcdCluster(3) as cluster:
        yield cluster


@pytest.fixture
def own_etcd_cluster() -> Iterator[EtcdCluster]:
    """A 3-member cluster for one test, which may kill and restart its members."""
    skip_or_fail()
    with EtcdCluster(3) as cluster:
        yield cluster
