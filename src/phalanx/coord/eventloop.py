"""The coordinator's connections on one thread: non-blocking sockets under a selector.

Every connection is a small record (buffers, deadlines, the request it has parked), not a
thread, so 20,000 connections cost memory, not 20,000 stacks. A request the membership cannot
answer yet returns a `Wait`; the connection is parked under the wait's topics and retried when
one of them changes (`wake`, callable from any thread), or answered at its deadline. Requests
without an `id` are answered in order (while one is parked, later frames stay buffered);
numbered ones (`id` in the header, echoed in the reply) are independent, so one connection
carries a worker's heartbeats and its blocking requests at once.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import AuthenticationError
from .frames import FrameBuffer
from .protocol import (
    CHUNK,
    MAX_FIRST_FRAME,
    MAX_HEADER,
    MAX_PAYLOAD,
    NONCE_BYTES,
    Codec,
    FrameError,
    connection_key,
    frame_seconds,
)
from .waits import Answer, Wait

SWEEP_INTERVAL = 0.25
"""Seconds between passes that drop connections past their authentication or frame deadline."""
ACCEPT_BACKOFF = 0.1
"""Seconds the loop stops accepting after accept() fails (e.g. EMFILE: out of descriptors)."""
ACCEPTS_PER_PASS = 256
MAX_PARKED_PER_CONN = 64
"""Numbered requests one connection may have waiting at once; more are refused."""
"""Connections accepted per loop pass at most, so a flood cannot starve the members."""


@dataclass(eq=False, slots=True)
class Conn:
    """One client connection's state."""

    sock: socket.socket
    ip: str
    who: str
    accepted: float
    frames: FrameBuffer
    out: bytearray = field(default_factory=bytearray)
    out_since: float | None = None
    authed: bool = False
    worker: str | None = None
    beating: bool = False
    parked: set[Parked] = field(default_factory=set)
    blocked: bool = False
    """An unnumbered request is parked: its later frames wait."""
    closed: bool = False


@dataclass(eq=False, slots=True)
class Parked:
    """One request waiting for an answer."""

    conn: Conn
    rid: int | None
    """The request's `id` (None: unnumbered)."""
    wait: Wait
    done: bool = False


class Handler(Protocol):
    """What the loop needs from the server (see `CoordServer`)."""

    def admit(self, ip: str) -> str | None:
        """Count a new connection in, or say which cap it would break."""

    def note(self, reason: str, detail: str) -> None:
        """A refused or dropped connection, for the rate-limited log."""

    def authenticated(self, conn: Conn) -> None:
        """The connection's first frame carried a good tag."""

    def answer(self, conn: Conn, header: dict[str, Any], payload: bytes) -> Answer:
        """A reply to one request, or a `Wait`."""

    def closed(self, conn: Conn, why: str | None, detail: str) -> None:
        """The connection is gone (`why`: the reason it was dropped, None if the peer left)."""

    def after_pass(self) -> None:
        """Once per loop pass, after the pass's requests were answered."""


class EventLoop:
    """Accepts, reads, answers and parks requests for one listening socket."""

    def __init__(self, listener: socket.socket, handler: Handler, stop: threading.Event, *,
                 secret: str, auth_timeout: float) -> None:
        self._listener = listener
        self._secret = secret
        self._auth_timeout = auth_timeout
        self._handler = handler
        self._stop = stop
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (listener, self._wake_r, self._wake_w):
            s.setblocking(False)
        self._sel.register(listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.conns: set[Conn] = set()
        self._parked: dict[str, set[Parked]] = {}
        self._deadlines: list[tuple[float, int, Parked]] = []
        self._seq = itertools.count()
        self._encoded: dict[int, tuple[dict[str, Any], bytes]] = {}
        self._woken: set[str] = set()
        self._woken_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_sweep = time.monotonic()
        self._accept_paused_until: float | None = None

    # ----------------------------------------------------------------- from any thread
    def wake(self, topics: tuple[str, ...]) -> None:
        """Retry the requests parked on these topics (soon, on the loop's thread)."""
        with self._woken_lock:
            kick = not self._woken
            self._woken.update(topics)
        if kick and threading.get_ident() != (self._thread.ident if self._thread else None):
            try:
                self._wake_w.send(b"x")
            except (BlockingIOError, OSError):
                pass  # a wake-up is already pending, or we are stopping

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="phalanx-coord-loop",
                                        daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def close_all(self) -> None:
        """After the loop ended: close every connection and the selector."""
        for conn in list(self.conns):
            self._close(conn, None, "")
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # ----------------------------------------------------------------- the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            for key, mask in self._sel.select(self._timeout()):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    self._drain_wake()
                else:
                    self._ready(key.data, mask)
            self._handler.after_pass()
            self._retry_woken()
            now = time.monotonic()
            self._expire(now)
            self._sweep()
            if self._accept_paused_until is not None and now >= self._accept_paused_until:
                self._accept_paused_until = None
                self._sel.register(self._listener, selectors.EVENT_READ, "accept")

    def _timeout(self) -> float:
        with self._woken_lock:
            if self._woken:
                return 0.0
        soonest = self._deadlines[0][0] if self._deadlines else time.monotonic() + 0.1
        return max(0.0, min(soonest - time.monotonic(), 0.1))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_PASS):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: the open connections still need us
                self._handler.note("accept() failed; retrying", str(e))
                self._sel.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + ACCEPT_BACKOFF
                return
            self._open(sock, addr)

    def _open(self, sock: socket.socket, addr: Any) -> None:
        ip, who = str(addr[0]), f"{addr[0]}:{addr[1]}"
        why = self._handler.admit(ip)
        if why is not None:
            sock.close()
            self._handler.note("refused a connection over the connection caps", f"{who}: {why}")
            return
        nonce = os.urandom(NONCE_BYTES)
        codec = Codec(connection_key(self._secret, nonce), is_server=True)
        conn = Conn(sock=sock, ip=ip, who=who, accepted=time.monotonic(),
                    frames=FrameBuffer(codec, MAX_FIRST_FRAME))
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.conns.add(conn)
        self._sel.register(sock, selectors.EVENT_READ, conn)
        self._send(conn, nonce)

    def _ready(self, conn: Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and not conn.closed:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            try:
                data = conn.sock.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close(conn, None, "")
                return
            conn.frames.feed(data)
            self._process(conn)

    def _process(self, conn: Conn) -> None:
        """Answer the connection's complete frames in order until an unnumbered one waits."""
        while not conn.closed and not conn.blocked:
            try:
                frame = conn.frames.next()
            except AuthenticationError as e:
                self._close(conn, "dropped a connection that failed authentication", f"{e}")
                return
            except FrameError as e:
                self._close(conn, "dropped a connection that sent a bad frame", f"{e}")
                return
            if frame is None:
                return
            if not conn.authed:
                conn.authed = True
                conn.frames.limit = MAX_HEADER + MAX_PAYLOAD
                self._handler.authenticated(conn)
            rid = frame[0].get("id")
            if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int)):
                self._reply(conn, ({"ok": False, "error": "field 'id' must be an integer"},
                                   b""), None)
                continue
            if rid is not None and len(conn.parked) >= MAX_PARKED_PER_CONN:
                self._reply(conn, ({"ok": False, "error": f"more than {MAX_PARKED_PER_CONN} "
                                    "requests waiting on this connection"}, b""), rid)
                continue
            answer = self._handler.answer(conn, *frame)
            if isinstance(answer, Wait):
                self._park(Parked(conn, rid, answer))
            else:
                self._reply(conn, answer, rid)

    # ----------------------------------------------------------------- parked requests
    def _park(self, p: Parked) -> None:
        p.conn.parked.add(p)
        p.conn.blocked = p.rid is None
        for topic in p.wait.topics:
            self._parked.setdefault(topic, set()).add(p)
        heapq.heappush(self._deadlines, (p.wait.deadline, next(self._seq), p))

    def _unpark(self, p: Parked) -> None:
        p.done = True
        p.conn.parked.discard(p)
        for topic in p.wait.topics:
            waiters = self._parked.get(topic)
            if waiters is not None:
                waiters.discard(p)
                if not waiters:
                    del self._parked[topic]

    def _finish(self, p: Parked, reply: tuple[dict[str, Any], bytes]) -> None:
        self._unpark(p)
        self._reply(p.conn, reply, p.rid)
        if p.rid is None:
            p.conn.blocked = False
            self._process(p.conn)  # frames that arrived while it waited

    def _retry_woken(self) -> None:
        with self._woken_lock:
            topics, self._woken = self._woken, set()
        for topic in topics:
            for p in list(self._parked.get(topic, ())):
                if not p.done and not p.conn.closed:
                    reply = p.wait.retry()
                    if reply is not None:
                        self._finish(p, reply)

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, p = heapq.heappop(self._deadlines)
            if not p.done and not p.conn.closed:
                self._finish(p, p.wait.expire())

    # ----------------------------------------------------------------- writing
    def _reply(self, conn: Conn, reply: tuple[dict[str, Any], bytes], rid: int | None) -> None:
        if not conn.closed:
            self._send(conn, conn.frames.codec.seal_head(self._encode(reply[0], rid), reply[1]))

    def _encode(self, header: dict[str, Any], rid: int | None) -> bytes:
        """The header as JSON with the request's id. A header object answered to many (one
        heartbeat status per piece of news) is encoded once and the id spliced in."""
        cached = self._encoded.get(id(header))
        if cached is None or cached[0] is not header:
            if len(self._encoded) >= 256:
                self._encoded.clear()
            cached = (header, json.dumps(header, separators=(",", ":")).encode())
            self._encoded[id(header)] = cached  # holds the header: its id is not reused
        head = cached[1]
        if rid is None:
            return head
        return head[:-1] + (b',"id":%d}' % rid if len(head) > 2 else b'"id":%d}' % rid)

    def _send(self, conn: Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn, None, "")
            return
        if sent < len(data):
            conn.out += data[sent:]
            conn.out_since = time.monotonic()
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _flush(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn, None, "")
            return
        del conn.out[:sent]
        if not conn.out:
            conn.out_since = None
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)

    # ----------------------------------------------------------------- deadlines, closing
    def _sweep(self) -> None:
        """Drop connections that did not authenticate in time, or whose frame (in either
        direction) did not complete in time: a slow peer costs a buffer, never the loop."""
        now = time.monotonic()
        if now - self._last_sweep < SWEEP_INTERVAL:
            return
        self._last_sweep = now
        auth = self._auth_timeout
        for conn in list(self.conns):
            if not conn.authed and now - conn.accepted > auth:
                self._close(conn, "dropped a connection that did not authenticate in time",
                            f"{conn.who}: no authenticated frame within {auth:g}s")
            elif conn.frames.started is not None and conn.authed and \
                    now - conn.frames.started > frame_seconds(conn.frames.size):
                self._close(conn, "dropped a connection whose frame did not complete in time",
                            f"{conn.who}: {conn.frames.size or 'unknown'} bytes announced")
            elif conn.out_since is not None and now - conn.out_since > frame_seconds(len(conn.out)):
                self._close(conn, "dropped a connection that did not read its reply in time",
                            f"{conn.who}: {len(conn.out)} bytes unsent")

    def _close(self, conn: Conn, why: str | None, detail: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        for p in list(conn.parked):
            self._unpark(p)
        self.conns.discard(conn)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        conn.sock.close()
        self._handler.closed(conn, why, detail)

