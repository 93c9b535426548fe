"""The coordinator: HMAC authentication, the store, rendezvous, heartbeats and fencing."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from phalanx.coord import CoordClient, CoordServer, new_secret
from phalanx.coord.protocol import NONCE_BYTES, Channel, connection_key, recv_exact
from phalanx.errors import JobFinished, RendezvousError


@pytest.fixture
def server():
    fenced: list[tuple[str, int]] = []
    srv = CoordServer(new_secret(), target_np=2, heartbeat_timeout=0.6,
                      fence=lambda w, pid, urgent: fenced.append((w, pid)))
    srv.fenced = fenced  # type: ignore[attr-defined]
    with srv:
        yield srv


def client(srv: CoordServer, worker: str, secret: str | None = None) -> CoordClient:
    return CoordClient(srv.address, secret or srv._secret, worker, connect_timeout=2)


@pytest.mark.timeout(20)
def test_wrong_or_missing_secret_is_rejected_and_logged(server, caplog) -> None:
    with pytest.raises(RendezvousError, match="secret"):
        client(server, "w0", secret=new_secret())
    # No secret at all: a raw frame without a valid tag.
    raw = socket.create_connection((server.host, server.port))
    recv_exact(raw, NONCE_BYTES)
    head = json.dumps({"op": "get", "key": "x"}).encode()
    raw.sendall(struct.pack("!II", len(head), 0) + head + b"\0" * 32)
    raw.settimeout(3)
    assert raw.recv(1) == b""  # the server hung up
    raw.close()
    deadline = time.monotonic() + 3
    while server.rejected < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.rejected == 2
    assert "bad HMAC" in caplog.text


@pytest.mark.timeout(20)
def test_replayed_frame_is_rejected(server) -> None:
    sock = socket.create_connection((server.host, server.port))
    nonce = recv_exact(sock, NONCE_BYTES)
    chan = Channel(sock, connection_key(server._secret, nonce), is_server=False)
    sent: list[bytes] = []
    real_sendall = sock.sendall

    class Tap:  # the real socket, recording what is sent
        def __getattr__(self, name: str):
            return getattr(sock, name)

        def sendall(self, b: bytes) -> None:
            sent.append(b)
            real_sendall(b)

    chan.sock = Tap()  # type: ignore[assignment]
    chan.send({"op": "hello", "worker": "w0"})
    assert chan.recv()[0]["ok"]
    real_sendall(sent[0])  # the same bytes again: sequence number is stale
    sock.settimeout(3)
    assert sock.recv(1) == b""
    sock.close()


@pytest.mark.timeout(20)
def test_store_operations(server) -> None:
    a, b = client(server, "a"), client(server, "b")
    try:
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(b.get("k", timeout=5)))
        t.start()
        time.sleep(0.05)
        a.set("k", b"\x00\x01binary")
        t.join(5)
        assert got == [b"\x00\x01binary"]
        assert a.add("n", 2) == 2 and b.add("n", 3) == 5
        assert a.check(["k", "n"]) and not a.check(["k", "zz"])
        assert a.compare_set("c", b"", b"v1") == b"v1"
        assert a.compare_set("c", b"nope", b"v2") == b"v1"
        assert a.delete("c") and not a.delete("c")
        with pytest.raises(RendezvousError, match="timed out"):
            a.get("never", timeout=0.2)
    finally:
        a.close(), b.close()


@pytest.mark.timeout(20)
def test_rendezvous_heartbeat_loss_and_fencing(server) -> None:
    a, b = client(server, "w0"), client(server, "w1")
    try:
        for i, c in enumerate((a, b)):
            c.join(host="h", rank_hint=i, pid=1000 + i)
            c.start_heartbeat(0.1)
        out: dict[str, dict] = {}
        ts = [threading.Thread(target=lambda c=c: out.__setitem__(c.worker, c.rendezvous(after=0)))
              for c in (a, b)]
        [t.start() for t in ts]
        [t.join(10) for t in ts]
        assert out["w0"]["rank"] == 0 and out["w1"]["rank"] == 1 and out["w0"]["size"] == 2
        assert out["w0"]["generation"] == 1 == server.generation
        # Silence w1's heartbeats (as a SIGSTOPped process would be): declared lost and fenced.
        b._hb_stop.set()
        deadline = time.monotonic() + 5
        while not server.fenced and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.fenced == [("w1", 1001)]
        time.sleep(0.3)
        assert a.abort_reason() is not None and "[1]" in a.abort_reason()
    finally:
        a.close(), b.close()


@pytest.mark.timeout(20)
def test_closed_heartbeat_connection_means_lost(server) -> None:
    a = client(server, "w0")
    a.join(host="h", rank_hint=0, pid=1)
    a.start_heartbeat(0.1)
    a._mux.shutdown()  # what the kernel does when the process dies
    deadline = time.monotonic() + 2
    while not any(e["event"] == "lost" for e in server.events) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(e["event"] == "lost" and e["worker"] == "w0" for e in server.events)
    a.close(leave=False)


@pytest.mark.timeout(20)
def test_unreachable_coordinator_names_the_address() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(RendezvousError, match=f"127.0.0.1:{port}"):
        CoordClient(f"127.0.0.1:{port}", new_secret(), "w0", connect_timeout=0.3)
    with pytest.raises(RendezvousError, match="host:port"):
        CoordClient("nonsense", new_secret(), "w0", connect_timeout=0.3)


@pytest.mark.timeout(20)
def test_heartbeat_cannot_be_impersonated(server) -> None:
    w0 = client(server, "w0")
    w0.join(host="h", rank_hint=0, pid=1)
    w0.start_heartbeat(0.1)
    intruder = client(server, "evil")
    intruder.join(host="h", rank_hint=1, pid=2)
    try:
        # Holding the secret, and even a token of its own, is not enough to beat for w0.
        for token in ("", "0" * 32, intruder._token, "\u00e9" * 32, None, 7):
            c = client(server, "evil-hb")
            reply, _ = c.request({"op": "hello", "worker": "w0", "heartbeat": True, "token": token})
            assert not reply["ok"] and "refused" in reply["error"]
            reply, _ = c.request({"op": "heartbeat", "worker": "w0", "generation": 0, "step": 9})
            assert not reply["ok"] and "heartbeat connection" in reply["error"]
            c.close(leave=False)  # a refused heartbeat connection closing means nothing
        intruder.worker = "w0"
        with pytest.raises(RendezvousError, match="refused"):
            intruder.start_heartbeat(0.1)
        time.sleep(1.0)  # > heartbeat_timeout: w0 beats on, and nobody could stop it
        assert not server.membership.is_lost("w0")
        assert all(w != "w0" for w, _ in server.fenced)
    finally:
        intruder.close(leave=False)
        w0.close()


@pytest.mark.timeout(20)
def test_a_newcomer_after_the_job_finished_hears_so_at_once(server) -> None:
    """Every member left before the newcomer's rendezvous: it is told the job is over at
    once (a replacement that started too late), not after its rendezvous timeout."""
    a, b = client(server, "w0"), client(server, "w1")
    for i, c in enumerate((a, b)):
        c.join(host="h", rank_hint=i, pid=1)
    with ThreadPoolExecutor(2) as ex:
        assert [f.result()["size"] for f in [ex.submit(c.rendezvous, after=0, timeout=5)
                                             for c in (a, b)]] == [2, 2]
    a.close(), b.close()  # both leave cleanly: the job is over
    late = client(server, "w0.1")
    late.join(host="h", rank_hint=0, pid=1)
    t0 = time.monotonic()
    with pytest.raises(JobFinished):
        late.rendezvous(after=0, timeout=10)
    assert time.monotonic() - t0 < 2
    late.close(leave=False)
