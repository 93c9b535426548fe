"""Client side of the coordinator protocol: store ops, join/rendezvous, and a heartbeat thread."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..config import TIMEOUT
from ..errors import AuthenticationError, JobFinished, RendezvousError
from .mux import Mux
from .protocol import MAX_HOLD, NONCE_BYTES, Channel, connection_key, recv_exact

log = logging.getLogger("phalanx.coord")


def parse_address(addr: str) -> tuple[str, int]:
    """'host:port' -> (host, port), with an error that shows the bad value."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RendezvousError(f"coordinator address {addr!r} is not 'host:port'")
    return host.strip("[]"), int(port)


def _open(addr: str, secret: str, connect_timeout: float) -> Channel:
    """Connect and read the server's nonce, retrying until `connect_timeout` has passed.

    A coordinator over its connection caps closes new connections at once; that is retried
    like a refused connect. One that accepts but never greets us times out.
    """
    host, port = parse_address(addr)
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=min(5.0, connect_timeout))
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RendezvousError(
                    f"cannot reach the phalanx coordinator at {addr}: {e}. Is the job's launcher "
                    "(`phalanx run`) still running, and is PHALANX_COORD_ADDR right?") from None
            time.sleep(0.1)
            continue
        greet = max(1.0, deadline - time.monotonic())
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nonce = recv_exact(sock, NONCE_BYTES, time.monotonic() + greet)
        except TimeoutError:
            sock.close()
            raise RendezvousError(
                f"the coordinator at {addr} accepted the connection but sent no greeting within "
                f"{greet:.1f}s: is the launcher stopped or overloaded, or is something other than "
                "a phalanx coordinator listening there (check PHALANX_COORD_ADDR)?") from None
        except (ConnectionError, OSError) as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise RendezvousError(
                    f"the coordinator at {addr} closed the connection before greeting ({e}); it "
                    "refuses connections beyond its caps, see the launcher's log") from None
            time.sleep(0.1)
            continue
        return Channel(sock, connection_key(secret, nonce), is_server=False)


def expand_roster(reply: dict[str, Any], roster: dict[str, Any]) -> dict[str, Any]:
    """The compact roster of an assignment as per-rank lists: `hosts` (one per rank), `pids`
    (this host's ranks; -1 elsewhere) and `kept` (ranks of the previous generation still in
    this one)."""
    hosts = [str(h) for h, n in roster.get("host_runs", []) for _ in range(int(n))]
    first = int(reply["rank"]) - int(reply["local_rank"])
    pids = [-1] * len(hosts)
    for i, pid in enumerate(reply.get("local_pids", [])):
        pids[first + i] = int(pid)
    kept = [r for a, b in roster.get("kept", []) for r in range(int(a), int(b) + 1)]
    return {"hosts": hosts, "pids": pids, "kept": kept}


class CoordClient:
    """One worker's link to the coordinator: one connection (`Mux`) for its requests and its
    heartbeats. Thread-safe; store calls block the calling thread."""

    def __init__(self, addr: str, secret: str, worker: str, *, connect_timeout: float = 10.0,
                 reply_timeout: float = TIMEOUT) -> None:
        self.addr = addr
        self.reply_timeout = reply_timeout
        self.worker = worker
        self._secret = secret
        self._connect_timeout = connect_timeout
        chan = _open(addr, secret, connect_timeout)
        self._hello(chan)
        self._mux = Mux(chan, addr)
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self.status: dict[str, Any] = {}
        self._seen: int | None = None
        """The coordinator's news version this worker has heard for its generation."""
        self._token = ""
        self.generation = 0
        self.step = -1
        self.progress: Callable[[], tuple[int, float]] | None = None
        """(collectives started in this generation, seconds blocked in the current one),
        sent with each heartbeat so the coordinator can find a hung worker."""

    def _hello(self, chan: Channel) -> None:
        hello: dict[str, Any] = {"op": "hello", "worker": self.worker, "heartbeat": False}
        try:
            chan.send(hello)
            reply, _ = chan.recv(deadline=time.monotonic() + max(1.0, self._connect_timeout))
        except TimeoutError:
            chan.sock.close()
            raise RendezvousError(
                f"the coordinator at {self.addr} did not answer hello within "
                f"{max(1.0, self._connect_timeout):.1f}s; is the launcher stopped or "
                "overloaded?") from None
        except (ConnectionError, OSError, AuthenticationError) as e:
            chan.sock.close()
            raise RendezvousError(
                f"the coordinator at {self.addr} rejected this worker ({e}); the job secret "
                "(PHALANX_SECRET) is missing or wrong") from None
        if not reply.get("ok"):
            chan.sock.close()
            raise RendezvousError(f"coordinator refused hello: {reply.get('error')}")

    def request(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """Send one request and wait for its reply: at most the request's own `timeout` (for
        blocking ops) plus `reply_timeout`, so a cut-off coordinator cannot hang the caller."""
        wait = header.get("timeout")
        limit = (float(wait) if isinstance(wait, (int, float)) else 0.0) + self.reply_timeout
        return self._mux.call(header, payload, limit=limit)

    def _checked(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        reply, data = self.request(header, payload)
        if not reply.get("ok"):
            raise RendezvousError(f"coordinator {header.get('op')} failed: {reply.get('error')}")
        return reply, data

    # -------------------------------------------------------------- key-value store
    def set(self, key: str, value: bytes) -> None:
        self._checked({"op": "set", "key": key}, value)

    def get(self, key: str, timeout: float = TIMEOUT) -> bytes:
        return self._checked({"op": "get", "key": key, "timeout": timeout})[1]

    def add(self, key: str, amount: int) -> int:
        return int(self._checked({"op": "add", "key": key, "amount": amount})[0]["value"])

    def check(self, keys: list[str]) -> bool:
        return bool(self._checked({"op": "check", "keys": keys})[0]["value"])

    def wait(self, keys: list[str], timeout: float = TIMEOUT) -> None:
        self._checked({"op": "wait", "keys": keys, "timeout": timeout})

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        return self._checked({"op": "compare_set", "key": key, "expected": expected.hex()}, desired)[1]

    def delete(self, key: str) -> bool:
        return bool(self._checked({"op": "delete", "key": key})[0]["value"])

    def num_keys(self) -> int:
        return int(self._checked({"op": "num_keys"})[0]["value"])

    # -------------------------------------------------------------- membership
    def join(self, *, host: str, rank_hint: int, pid: int, starter: str | None = None) -> None:
        """Become a member. `starter` names the agent (or `phalanx join`) that started this
        process and will fence it if the coordinator declares it lost."""
        header: dict[str, Any] = {"op": "join", "worker": self.worker, "host": host,
                                  "rank_hint": rank_hint, "pid": pid}
        if starter:
            header["starter"] = starter
        reply, _ = self._checked(header)
        self._token = str(reply.get("token", ""))

    def rendezvous(self, *, after: int, step: int = -1, timeout: float = 60.0) -> dict[str, Any]:
        """Block until a generation newer than `after` that includes us forms; return our place."""
        reply, roster = self.request({"op": "rendezvous", "worker": self.worker,
                                      "after": after, "step": step, "timeout": timeout})
        if not reply.get("ok"):
            if reply.get("finished"):
                raise JobFinished(str(reply.get("error")))
            raise RendezvousError(f"rendezvous at {self.addr} failed: {reply.get('error')}")
        if roster:  # the generation's roster: one blob shared by all ranks, O(hosts)
            reply.update(expand_roster(reply, json.loads(roster)))
        self.generation = int(reply["generation"])
        if isinstance(reply.get("version"), int):
            self._seen = reply["version"]  # news after this are news for the new generation
        return reply

    def leave(self) -> None:
        try:
            self.request({"op": "leave", "worker": self.worker, "step": self.step})
        except RendezvousError:
            pass

    # -------------------------------------------------------------- heartbeats
    def start_heartbeat(self, interval: float, timeout: float = 3.0) -> None:
        """Beat from a thread of its own, on the shared connection, which from now on speaks
        as this worker's heartbeat connection: its closing means the process died.

        Each beat's reply is held by the coordinator for up to `interval` (longer in a large
        job) and sent at once when there is news (a loss, a new generation), so a loss reaches
        every worker within milliseconds. No reply within `timeout` plus the hold means this
        worker is cut off."""
        if self._hb_thread is not None:
            return
        self._checked({"op": "hello", "worker": self.worker, "heartbeat": True,
                       "token": self._token})
        self._hb_thread = threading.Thread(target=self._beat, args=(interval, timeout),
                                           daemon=True, name="phalanx-heartbeat")
        self._hb_thread.start()

    def _beat(self, interval: float, timeout: float) -> None:
        while not self._hb_stop.is_set():
            coll, blocked = self.progress() if self.progress is not None else (0, 0.0)
            beat = {"op": "heartbeat", "worker": self.worker, "hold": interval,
                    "generation": self.generation, "step": self.step,
                    "coll": coll, "blocked": round(blocked, 3)}
            if self._seen is not None:
                beat["seen"] = self._seen  # news since is answered at once
            try:
                held = self.status.get("hold", MAX_HOLD)  # a large job's beats are held longer
                held = float(held) if isinstance(held, (int, float)) else MAX_HOLD
                reply, _ = self._mux.call(beat, limit=timeout + max(interval, held))
            except RendezvousError as e:
                if not self._hb_stop.is_set():
                    self.status = {"ok": False, "error": f"lost the coordinator ({e})"}
                return
            self.status = reply
            if not reply.get("ok"):
                return
            if reply.get("asked") == self.generation and isinstance(reply.get("version"), int):
                self._seen = reply["version"]  # a reply about an older generation is not

    def watch(self, starter: str, stopped: list[str], timeout: float = 1.0, *,
              workers: list[str] | None = None, generation: int = -1) -> dict[str, Any]:
        """For a starter (agent, `phalanx join`): report stopped workers and wait up to
        `timeout` for orders to fence some of them. With its `workers` and the `generation`
        it knows, a newer generation's ranks for them come back too (`ranks`)."""
        reply, _ = self._checked({"op": "watch", "starter": starter, "stopped": stopped,
                                  "timeout": timeout, "workers": workers or [],
                                  "generation": generation})
        return reply

    def abort_reason(self) -> str | None:
        """Why collectives of our generation cannot complete, or None while it is healthy."""
        s = self.status
        if not s:
            return None
        if not s.get("ok"):
            return f"this worker was fenced or cut off from the coordinator: {s.get('error')}"
        # lost_ranks refer to the generation the beat asked about, maybe an older one.
        if s.get("asked") == self.generation and s.get("lost_ranks"):
            return f"rank(s) {s['lost_ranks']} of generation {self.generation} were declared lost"
        return None

    def sever(self) -> None:
        """Drop the connection to the coordinator without a goodbye (chaos: a network cut)."""
        self.status = {"ok": False, "error": "cut off from the coordinator"}
        self._hb_stop.set()
        self._mux.shutdown()

    def close(self, *, leave: bool = True) -> None:
        if leave:
            self.leave()
        self._hb_stop.set()
        self._mux.close()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=2)
