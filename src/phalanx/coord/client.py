"""Client side of the coordinator protocol: store ops, join/rendezvous, and a heartbeat thread."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from ..errors import AuthenticationError, JobFinished, RendezvousError
from .protocol import NONCE_BYTES, Channel, connection_key, recv_exact

log = logging.getLogger("phalanx.coord")


def parse_address(addr: str) -> tuple[str, int]:
    """'host:port' -> (host, port), with an error that shows the bad value."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RendezvousError(f"coordinator address {addr!r} is not 'host:port'")
    return host.strip("[]"), int(port)


def _open(addr: str, secret: str, connect_timeout: float) -> Channel:
    host, port = parse_address(addr)
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=min(5.0, connect_timeout))
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RendezvousError(
                    f"cannot reach the phalanx coordinator at {addr}: {e}. Is the job's launcher "
                    "(`phalanx run`) still running, and is PHALANX_COORD_ADDR right?") from None
            time.sleep(0.1)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        nonce = recv_exact(sock, NONCE_BYTES)
    except (ConnectionError, OSError) as e:
        sock.close()
        raise RendezvousError(f"coordinator at {addr} closed the connection: {e}") from None
    return Channel(sock, connection_key(secret, nonce), is_server=False)


class CoordClient:
    """One worker's link to the coordinator. Thread-safe; store calls block the calling thread."""

    def __init__(self, addr: str, secret: str, worker: str, *, connect_timeout: float = 10.0) -> None:
        self.addr = addr
        self.worker = worker
        self._secret = secret
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._chan = _open(addr, secret, connect_timeout)
        self._hello(self._chan, heartbeat=False)
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self._hb_chan: Channel | None = None
        self.status: dict[str, Any] = {}
        self.generation = 0
        self.step = -1

    def _hello(self, chan: Channel, *, heartbeat: bool) -> None:
        try:
            chan.send({"op": "hello", "worker": self.worker, "heartbeat": heartbeat})
            reply, _ = chan.recv()
        except (ConnectionError, OSError, AuthenticationError) as e:
            raise RendezvousError(
                f"the coordinator at {self.addr} rejected this worker ({e}); the job secret "
                "(PHALANX_SECRET) is missing or wrong") from None
        if not reply.get("ok"):
            raise RendezvousError(f"coordinator refused hello: {reply.get('error')}")

    def request(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        with self._lock:
            try:
                self._chan.send(header, payload)
                reply, data = self._chan.recv()
            except (ConnectionError, OSError) as e:
                raise RendezvousError(f"lost the coordinator at {self.addr} during "
                                      f"{header.get('op')!r}: {e}") from None
        return reply, data

    def _checked(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        reply, data = self.request(header, payload)
        if not reply.get("ok"):
            raise RendezvousError(f"coordinator {header.get('op')} failed: {reply.get('error')}")
        return reply, data

    # -------------------------------------------------------------- key-value store
    def set(self, key: str, value: bytes) -> None:
        self._checked({"op": "set", "key": key}, value)

    def get(self, key: str, timeout: float = 30.0) -> bytes:
        return self._checked({"op": "get", "key": key, "timeout": timeout})[1]

    def add(self, key: str, amount: int) -> int:
        return int(self._checked({"op": "add", "key": key, "amount": amount})[0]["value"])

    def check(self, keys: list[str]) -> bool:
        return bool(self._checked({"op": "check", "keys": keys})[0]["value"])

    def wait(self, keys: list[str], timeout: float = 30.0) -> None:
        self._checked({"op": "wait", "keys": keys, "timeout": timeout})

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        return self._checked({"op": "compare_set", "key": key, "expected": expected.hex()}, desired)[1]

    def delete(self, key: str) -> bool:
        return bool(self._checked({"op": "delete", "key": key})[0]["value"])

    def num_keys(self) -> int:
        return int(self._checked({"op": "num_keys"})[0]["value"])

    # -------------------------------------------------------------- membership
    def join(self, *, host: str, rank_hint: int, pid: int) -> None:
        self._checked({"op": "join", "worker": self.worker, "host": host,
                       "rank_hint": rank_hint, "pid": pid})

    def rendezvous(self, *, after: int, step: int = -1, timeout: float = 60.0) -> dict[str, Any]:
        """Block until a generation newer than `after` that includes us forms; return our place."""
        reply, _ = self.request({"op": "rendezvous", "worker": self.worker, "after": after,
                                 "step": step, "timeout": timeout})
        if not reply.get("ok"):
            if reply.get("finished"):
                raise JobFinished(str(reply.get("error")))
            raise RendezvousError(f"rendezvous at {self.addr} failed: {reply.get('error')}")
        self.generation = int(reply["generation"])
        return reply

    def leave(self) -> None:
        try:
            self.request({"op": "leave", "worker": self.worker})
        except RendezvousError:
            pass

    # -------------------------------------------------------------- heartbeats
    def start_heartbeat(self, interval: float) -> None:
        """Beat on a dedicated connection so a blocking store call never delays a beat."""
        if self._hb_thread is not None:
            return
        self._hb_chan = _open(self.addr, self._secret, self._connect_timeout)
        self._hello(self._hb_chan, heartbeat=True)
        self._hb_thread = threading.Thread(target=self._beat, args=(interval,), daemon=True,
                                           name="phalanx-heartbeat")
        self._hb_thread.start()

    def _beat(self, interval: float) -> None:
        chan = self._hb_chan
        assert chan is not None  # set by start_heartbeat before the thread starts
        while not self._hb_stop.is_set():
            try:
                chan.send({"op": "heartbeat", "worker": self.worker,
                           "generation": self.generation, "step": self.step})
                reply, _ = chan.recv()
            except (ConnectionError, OSError, AuthenticationError):
                if not self._hb_stop.is_set():
                    self.status = {"ok": False, "error": "lost the coordinator"}
                return
            self.status = reply
            self._hb_stop.wait(interval)

    def abort_reason(self) -> str | None:
        """Why collectives of our generation cannot complete, or None while it is healthy."""
        s = self.status
        if not s:
            return None
        if not s.get("ok"):
            return f"this worker was fenced or cut off from the coordinator: {s.get('error')}"
        if s.get("generation") == self.generation and s.get("lost_ranks"):
            return f"rank(s) {s['lost_ranks']} of generation {self.generation} were declared lost"
        return None

    def sever(self) -> None:
        """Drop every connection to the coordinator without a goodbye (chaos: a network cut)."""
        self._hb_stop.set()
        for chan in (self._hb_chan, self._chan):
            if chan is not None:
                try:
                    chan.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self, *, leave: bool = True) -> None:
        if leave:
            self.leave()
        self._hb_stop.set()
        for chan in (self._hb_chan, self._chan):
            if chan is None:
                continue
            try:
                chan.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            chan.sock.close()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=2)
