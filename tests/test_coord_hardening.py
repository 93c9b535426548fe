"""The coordinator against hostile input: floods, slow peers, bad frames, forged heartbeats.

Each test starts a live `CoordServer` on 127.0.0.1 and talks to it over raw sockets (peers from
127.0.0.2 stand for a second host); the last one runs `phalanx run -np 2` on the digits example
and attacks its coordinator while it trains.
"""

from __future__ import annotations

from coordtools import *  # noqa: F403 - the shared helpers and imports of these tests


# ----------------------------------------------------------------------------- limits
@pytest.mark.timeout(5)
def test_connection_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_pending=0"):
        ConnectionLimits(max_pending=0)
    with pytest.raises(ConfigError, match="auth_timeout=nan"):
        ConnectionLimits(auth_timeout=float("nan"))


# ----------------------------------------------------------------------------- memory
@pytest.mark.timeout(30)
def test_announced_huge_frames_cost_no_memory(caplog) -> None:
    with serving() as srv:
        rss0 = proc_status(os.getpid())["VmRSS"] / 1024
        socks = [raw(srv) for _ in range(32)]
        try:
            # Before authentication: a 256 MiB announcement is refused before any byte is read.
            for s in socks:
                recv_exact(s, NONCE_BYTES)
                s.sendall(struct.pack("!II", 0, 256 << 20) + b"\0" * 4096)
            assert all(hung_up(s, 3) for s in socks)
            # After it: memory follows the bytes that arrived (4 MiB each), not those announced.
            chans = [authed(srv, f"w{i}") for i in range(8)]
            socks += [c.sock for c in chans]
            for c in chans:
                c.sock.sendall(struct.pack("!II", 0, 200 << 20) + b"\0" * (4 << 20))
            time.sleep(0.5)
            grown = proc_status(os.getpid())["VmRSS"] / 1024 - rss0
            assert grown < 120, f"RSS grew {grown:.0f} MiB for 32 + 8 announced-huge frames"
        finally:
            closing(socks)
        assert "sent a bad frame" in caplog.text and "oversized frame" in caplog.text
        assert wait_until(lambda: conn_threads() == 0, 5)
        c = authed(srv)  # still serving
        with c.sock:
            assert ask(c, {"op": "num_keys"})["ok"]


# ----------------------------------------------------------------------------- slow peers
@pytest.mark.timeout(30)
def test_slow_and_silent_connections_time_out(monkeypatch, caplog) -> None:
    monkeypatch.setattr(protocol, "FRAME_TIMEOUT", 0.5)
    with serving(auth_timeout=1.0) as srv:
        silent, slow = raw(srv), raw(srv)
        idle = authed(srv, "idle")  # an authenticated worker may idle between requests
        stalled = authed(srv, "stalled")
        try:
            recv_exact(slow, NONCE_BYTES)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4:  # slowloris: one byte every 0.2 s
                try:
                    slow.sendall(b"\0")
                except OSError:
                    break
                if hung_up(slow, 0.2):
                    break
            assert time.monotonic() - t0 < 2.5, "a byte-a-while peer held its connection"
            assert hung_up(silent, 2)
            stalled.sock.sendall(struct.pack("!II", 100, 0) + b"{}")  # starts a frame, stops
            assert hung_up(stalled.sock, 2)
            time.sleep(1.0)  # idle past auth_timeout and FRAME_TIMEOUT: still served
            assert ask(idle, {"op": "num_keys"})["ok"]
        finally:
            closing([silent, slow, idle.sock, stalled.sock])
        assert "did not authenticate in time" in caplog.text
        assert "did not complete in time" in caplog.text
        assert wait_until(lambda: conn_threads() == 0, 5)


# ----------------------------------------------------------------------------- accept() errors
class _FlakyListener:
    """The server's listening socket, whose accept() first fails like a process out of fds."""

    def __init__(self, sock: socket.socket, failures: int) -> None:
        self._sock, self.failures = sock, failures

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures > 0:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self._sock.accept()

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


@pytest.mark.timeout(20)
def test_accept_loop_survives_accept_errors(caplog) -> None:
    srv = CoordServer(new_secret())
    srv._sock = _FlakyListener(srv._sock, failures=8)  # type: ignore[assignment]
    with srv:
        c = CoordClient(srv.address, srv._secret, "w0", connect_timeout=5)
        try:
            c.set("k", b"v")
            assert c.get("k", timeout=1) == b"v"
        finally:
            c.close()
        reason = "accept() failed; retrying"
        assert srv.dropped[reason] == 8
        assert wait_until(lambda: logged(caplog, reason) == 8, 3)  # all 8, in a line or three
        assert sum(r.getMessage().startswith(reason) for r in caplog.records) <= 3


@pytest.mark.timeout(20)
def test_client_gives_up_on_a_server_that_never_greets() -> None:
    with socket.create_server((HOST, 0)) as mute:  # the kernel accepts; nobody sends a nonce
        addr = f"{HOST}:{mute.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(RendezvousError, match="sent no greeting within"):
            CoordClient(addr, new_secret(), "w0", connect_timeout=0.5)
        assert time.monotonic() - t0 < 5


# ----------------------------------------------------------------------------- caps
@pytest.mark.timeout(30)
def test_connection_caps_refuse_and_log(caplog) -> None:
    caps = dict(max_connections=12, max_per_address=8, max_pending=6, max_pending_per_address=4)
    with serving(auth_timeout=3.0, **caps) as srv:
        flood = [raw(srv) for _ in range(200)]
        try:
            greeted = 0
            for s in flood:
                try:
                    greeted += len(recv_exact(s, NONCE_BYTES, time.monotonic() + 2)) > 0
                except ConnectionError:
                    pass
            assert greeted == 4, "max_pending_per_address=4 connections may wait to authenticate"
            assert conn_threads() <= 4
            # A worker on the same address is refused while the flood holds the pending slots...
            with pytest.raises(RendezvousError, match="beyond its caps"):
                CoordClient(srv.address, srv._secret, "w0", connect_timeout=0.5)
            # ...but not one from another address, nor once the flood is gone.
            other = raw(srv, source="127.0.0.2")
            assert len(recv_exact(other, NONCE_BYTES, time.monotonic() + 2)) == NONCE_BYTES
            other.close()
        finally:
            closing(flood)
        assert wait_until(lambda: conn_threads() == 0, 5)
        clients = [CoordClient(srv.address, srv._secret, f"w{i}", connect_timeout=2)
                   for i in range(8)]
        try:
            with pytest.raises(RendezvousError):  # max_per_address=8 authenticated connections
                CoordClient(srv.address, srv._secret, "w9", connect_timeout=0.3)
            assert clients[0].num_keys() == 0
        finally:
            for c in clients:
                c.close()
        reason = "refused a connection over the connection caps"
        refused = srv.dropped[reason]
        assert refused >= 196
        assert wait_until(lambda: logged(caplog, reason) == refused, 3)
        lines = sum(r.getMessage().startswith(reason) for r in caplog.records)
        assert lines <= 6, f"{refused} refusals took {lines} log lines"
