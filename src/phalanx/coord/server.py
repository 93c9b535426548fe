"""The coordinator's network side: an authenticated TCP service in front of `Membership`.

Hosted by the launcher (so a worker's death never takes it down). One thread runs every
connection (`eventloop.py`: a selector, no thread per connection), authenticates every frame
(HMAC over the per-job secret, see `protocol.py`), and hands each request to `Membership`,
which holds the members, generations and the bootstrap store; a request that must wait is
parked, not blocked. A second thread runs the membership's timers, a third reports closed
heartbeat connections (fencing may take a moment).

The port is reachable by anyone on the network, so nothing an unauthenticated peer sends may
cost the launcher much: a new connection may send one small frame and must prove it holds the
secret within `auth_timeout`; connections are capped in total and per address (the caps are
tighter for connections not yet authenticated); every frame has a deadline once it starts.
Whatever is refused or dropped is logged, at most one line per second per reason.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import HEARTBEAT_TIMEOUT
from ..errors import ConfigError
from .eventloop import Conn, EventLoop
from .membership import FenceFn, Membership, World
from .waits import Answer

log = logging.getLogger("phalanx.coord")

__all__ = ["ConnectionLimits", "CoordServer", "World", "raise_fd_limit"]

FD_WANTED = 1 << 16
"""Open files the coordinator asks for: two sockets per worker for 30,000 workers, and spare."""
LOG_INTERVAL = 1.0
"""At most one log line per this many seconds per reason a connection was refused or dropped."""


@dataclass(kw_only=True, slots=True)
class ConnectionLimits:
    """Caps that keep a flood of connections from exhausting the launcher's threads and memory."""

    max_connections: int = 65536
    """Open connections in all; each holds a file descriptor and its buffers (each worker
    holds two: requests and heartbeats). The process's open-files limit bounds it too."""

    max_per_address: int = 65536
    """Open connections from one IP address (a host running many workers, or a NAT)."""

    max_pending: int = 256
    """Connections that have not yet sent an authenticated frame, in all."""

    max_pending_per_address: int = 64
    """Connections that have not yet sent an authenticated frame, from one IP address."""

    auth_timeout: float = 5.0
    """Seconds a new connection has to send its first authenticated frame before it is dropped."""

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_per_address", "max_pending",
                     "max_pending_per_address"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ConnectionLimits.{name}={value!r} must be an integer >= 1")
        t = self.auth_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"ConnectionLimits.auth_timeout={t!r} must be a positive number of "
                              "seconds (a few seconds suits workers on a busy network)")


class _DropLog:
    """Counts refused and dropped connections by reason and logs each reason at most once per
    `interval`, so a flood costs a log line per second instead of a line per connection."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, tuple[int, str]] = {}  # reason -> (count, latest detail)
        self._totals: Counter[str] = Counter()

    def note(self, reason: str, detail: str) -> None:
        with self._lock:
            self._totals[reason] += 1
            n, _ = self._unlogged.get(reason, (0, ""))
            self._unlogged[reason] = (n + 1, detail)
        self.flush()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._totals)

    def flush(self, *, force: bool = False) -> None:
        """Log every reason with unlogged drops whose last line is older than `interval`."""
        now = time.monotonic()
        lines: list[tuple[str, int, float, str]] = []
        with self._lock:
            for reason, (n, detail) in list(self._unlogged.items()):
                last = self._last.get(reason, now - self._interval)
                if force or now - last >= self._interval:
                    self._last[reason] = now
                    del self._unlogged[reason]
                    lines.append((reason, n, now - last, detail))
        for reason, n, span, detail in lines:
            if n == 1:
                log.warning("%s: %s", reason, detail)
            else:
                log.warning("%s: %d times in the last %.1fs; latest: %s", reason, n, span, detail)


_SPEAKS_FOR = frozenset({"join", "leave", "failed", "event", "rendezvous"})
"""Ops whose 'worker' field must match the connection's hello."""


def raise_fd_limit(want: int = FD_WANTED) -> int:
    """Raise the open-files limit towards `want` (the hard limit too, where the process may):
    the coordinator holds two sockets per worker, and Gloo a socket per peer (it aborts the
    process when it runs out). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((want, max(hard, want)), (min(want, hard), hard)):
        if hard != resource.RLIM_INFINITY and limits[1] > hard and os.geteuid() != 0:
            continue  # raising the hard limit needs privilege
        try:
            if limits[0] > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class CoordServer:
    """Serves one job's coordinator on (host, port); port 0 picks a free one."""

    def __init__(self, secret: str, *, host: str = "127.0.0.1", port: int = 0,
                 target_np: int = 1, min_np: int | None = None, max_np: int | None = None,
                 heartbeat_timeout: float = HEARTBEAT_TIMEOUT, settle: float = 1.0,
                 fence: FenceFn | None = None,
                 probe_stopped: Callable[[str, int], bool] | None = None,
                 stopped_timeout: float = 0.3, limits: ConnectionLimits | None = None) -> None:
        self._secret = secret
        self.limits = limits or ConnectionLimits()
        self._stop = threading.Event()
        self.membership = Membership(
            target_np=target_np, min_np=min_np if min_np is not None else target_np,
            max_np=max_np if max_np is not None else target_np,
            heartbeat_timeout=heartbeat_timeout, settle=settle, fence=fence,
            stopped_timeout=stopped_timeout, probe_stopped=probe_stopped, stop=self._stop)
        self.rejected = 0
        self._lock = threading.Lock()
        raise_fd_limit()
        self._sock = socket.create_server((host, port), reuse_port=False, backlog=4096)
        self.host, self.port = self._sock.getsockname()[:2]
        self._open: Counter[str] = Counter()  # IP address -> open connections
        self._pending: Counter[str] = Counter()  # IP address -> connections not yet authenticated
        self._drops = _DropLog()
        self._loop: EventLoop | None = None
        self._closed_beats: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------- lifecycle
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> CoordServer:
        self._loop = EventLoop(self._sock, self, self._stop, secret=self._secret,
                               auth_timeout=self.limits.auth_timeout)
        self.membership.wake = self._loop.wake
        self._loop.start()
        for target in (self._monitor_loop, self._beats_closed_loop):
            t = threading.Thread(target=target, name=f"phalanx-coord-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._closed_beats.put(None)
        if self._loop is not None:
            self._loop.wake(("stop",))
            self._loop.join(timeout=2)
        for t in self._threads:
            t.join(timeout=2)
        if self._loop is not None:
            self._loop.close_all()
        try:
            self._sock.close()
        except OSError:
            pass
        self._drops.flush(force=True)

    def __enter__(self) -> CoordServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- public state
    @property
    def generation(self) -> int:
        with self.membership.cv:
            w = self.membership.world
            return w.generation if w else 0

    def world(self) -> World | None:
        with self.membership.cv:
            return self.membership.world

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.membership.events

    @property
    def dropped(self) -> dict[str, int]:
        """How many connections were refused or dropped, by reason (as logged)."""
        return self._drops.counts()

    @property
    def connections(self) -> int:
        """Connections open now."""
        with self._lock:
            return sum(self._open.values())

    def declare_lost(self, worker: str, reason: str, *, urgent: bool = True) -> None:
        """Mark a worker lost, break its generation, and fence it (see `Membership`)."""
        self.membership.declare_lost(worker, reason, urgent=urgent)

    # ----------------------------------------------------------------- the event loop's
    def admit(self, ip: str) -> str | None:
        """Count a new connection in, or say which cap it would break."""
        lim = self.limits
        with self._lock:
            n_open, n_pending = sum(self._open.values()), sum(self._pending.values())
            if n_open >= lim.max_connections:
                return f"{n_open} connections open (max_connections={lim.max_connections})"
            if self._open[ip] >= lim.max_per_address:
                return (f"{self._open[ip]} connections open from {ip} "
                        f"(max_per_address={lim.max_per_address})")
            if n_pending >= lim.max_pending:
                return (f"{n_pending} connections not yet authenticated "
                        f"(max_pending={lim.max_pending})")
            if self._pending[ip] >= lim.max_pending_per_address:
                return (f"{self._pending[ip]} connections not yet authenticated from {ip} "
                        f"(max_pending_per_address={lim.max_pending_per_address})")
            self._open[ip] += 1
            self._pending[ip] += 1
        return None

    def note(self, reason: str, detail: str) -> None:
        self._drops.note(reason, detail)

    def authenticated(self, conn: Conn) -> None:
        self._leave_pending(conn.ip)

    def answer(self, conn: Conn, header: dict[str, Any], payload: bytes) -> Answer:
        op = header.get("op")
        if op == "hello":
            conn.worker, conn.beating, reply = self._hello(header)
            return reply, b""
        return self._request(op, header, payload, conn.worker, conn.beating)

    def closed(self, conn: Conn, why: str | None, detail: str) -> None:
        if why is not None:
            if "authentication" in why:
                with self._lock:
                    self.rejected += 1
            self._drops.note(why, detail)
        with self._lock:
            self._open[conn.ip] -= 1
            if self._open[conn.ip] <= 0:
                del self._open[conn.ip]
        if not conn.authed:
            self._leave_pending(conn.ip)
        # A heartbeat connection closing without a goodbye means the process died.
        if conn.beating and conn.worker and not self._stop.is_set():
            self._closed_beats.put(conn.worker)

    def after_pass(self) -> None:
        self.membership.form_if_due()

    def _leave_pending(self, ip: str) -> None:
        with self._lock:
            self._pending[ip] -= 1
            if self._pending[ip] <= 0:
                del self._pending[ip]

    # ----------------------------------------------------------------- threads
    def _monitor_loop(self) -> None:
        while not self._stop.wait(0.05):
            self.membership.tick()
            self._drops.flush()

    def _beats_closed_loop(self) -> None:
        """Declares workers whose heartbeat connection closed lost, off the loop's thread
        (fencing signals a process or asks its starter, which may take a moment). Closes that
        arrive together (a host going down) become one loss."""
        while True:
            workers = [self._closed_beats.get()]
            time.sleep(0.002)  # the rest of a burst
            while not self._closed_beats.empty():
                workers.append(self._closed_beats.get())
            if None in workers or self._stop.is_set():
                return
            self.membership.heartbeats_closed([w for w in workers if w is not None])

    def _request(self, op: Any, h: dict[str, Any], payload: bytes, speaks_for: str | None,
                 beating: bool) -> Answer:
        """Answer one request; malformed ones (and our own failures) get an error reply.

        A request that names a worker (or a starter) must come from a connection whose hello
        named the same one: a holder of the secret cannot leave, fail or rendezvous for
        another worker."""
        if not isinstance(op, str):
            return {"ok": False, "error": "field 'op' must be a string naming an operation, got "
                    f"{type(op).__name__}"}, b""
        field = "starter" if op in ("watch", "exited") else "worker" if op in _SPEAKS_FOR else None
        if field is not None and h.get(field) != speaks_for:
            return {"ok": False, "error": f"{op!r} for {str(h.get(field))[:64]!r} refused: this "
                    "connection's hello named another worker"}, b""
        if op == "heartbeat" and (not beating or h.get("worker") != speaks_for):
            return {"ok": False, "error": "heartbeats are taken only on the worker's heartbeat "
                    "connection (hello with heartbeat=true and the token from its join)"}, b""
        try:
            return self.membership.handle(op, h, payload)
        except Exception as e:
            log.exception("coordinator request %r failed", op[:64])
            return {"ok": False, "error": f"internal error in {op[:64]!r}: {e!r}"[:512]}, b""

    def _hello(self, h: dict[str, Any]) -> tuple[str | None, bool, dict[str, Any]]:
        """A connection says whom it speaks for; a heartbeat connection must prove it with the
        token its worker got at join, so nobody else can beat (or stop beating) for it."""
        worker, beating = h.get("worker"), h.get("heartbeat", False)
        if not isinstance(worker, str) or not worker or len(worker) > 256:
            return None, False, {"ok": False, "error": "hello needs a worker id (a short string)"}
        if not isinstance(beating, bool):
            return None, False, {"ok": False, "error": "hello field 'heartbeat' must be true or "
                                 f"false, got {type(beating).__name__}"}
        if beating:
            token = h.get("token")
            if not (isinstance(token, str) and token.isascii() and len(token) <= 256
                    and self.membership.check_token(worker, token)):
                return None, False, {"ok": False, "error": f"heartbeat for {worker!r} refused: "
                                     "not the connection of the worker that joined"}
        return worker, beating, {"ok": True}
