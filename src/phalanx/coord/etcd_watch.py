"""Streaming etcd watches over the JSON gateway, run in a daemon thread, resumed across failover.

etcd's gateway answers POST /v3/watch with a never-ending chunked HTTP body: one JSON message per
line (created, events, progress, canceled). http.client cannot wait on such a body and also
notice a stop request (a socket timeout leaves its reader unusable), so this module speaks the
little HTTP it needs on a plain socket: it polls the socket with a short tick, so `stop` ends the
thread within a tick, and a stream silent for `idle` seconds is reconnected.

When the stream breaks (the member was killed, lost its leader, or went silent) the watch reconnects
to the next endpoint and resumes from the revision after the last event it delivered, so no event
is lost or repeated. A start revision etcd has already compacted away cannot be resumed: that ends
the watch with an EtcdError (re-read the keys, then watch from the revision the read saw).
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .etcd import UNAVAILABLE, EtcdClient, EtcdError, b64, range_end, unb64

TICK = 0.1
"""Seconds between checks of the stop event while the stream is quiet."""

MAX_HEADER = 64 << 10


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change: type "put" or "delete"; `key` relative to the client's prefix. A delete has
    an empty value and create_revision 0."""
    type: str
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


class _Broken(Exception):
    """The stream ended or failed in a way another connection may fix."""


class _Stopped(Exception):
    """The stop event was set."""


def resume_revision(last_delivered: int, start_revision: int) -> int:
    """Where a reconnected watch starts: after the last event delivered, else where it began."""
    return last_delivered + 1 if last_delivered else start_revision


class _Stream:
    """Buffered reads from a socket that give up on `stop`, on EOF, and after `idle` silence."""

    def __init__(self, sock: socket.socket, stop: threading.Event, idle: float, limit: int):
        self.sock, self.stop, self.idle, self.limit = sock, stop, idle, limit
        self.buf = bytearray()

    def _fill(self) -> None:
        quiet_until = time.monotonic() + self.idle
        while True:
            if self.stop.is_set():
                raise _Stopped
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            if pending or select.select([self.sock], [], [], TICK)[0]:
                break
            if time.monotonic() >= quiet_until:
                raise _Broken(f"no data for {self.idle:g}s")
        try:
            data = self.sock.recv(1 << 16)
        except (OSError, ssl.SSLError) as e:
            raise _Broken(f"{type(e).__name__}: {e}") from None
        if not data:
            raise _Broken("the member closed the stream")
        self.buf += data

    def readline(self, limit: int | None = None) -> bytes:
        """One line, CRLF or LF kept; _Broken past `limit` bytes."""
        limit = self.limit if limit is None else limit
        while (end := self.buf.find(b"\n")) < 0:
            if len(self.buf) > limit:
                raise EtcdError(f"an etcd watch line is over {limit} bytes; refusing it")
            self._fill()
        line = bytes(self.buf[:end + 1])
        del self.buf[:end + 1]
        return line

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data


def _chunks(stream: _Stream, limit: int) -> Iterator[bytes]:
    """The data of an HTTP/1.1 chunked body, chunk by chunk."""
    while True:
        size = int(stream.readline(1024).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        if size > limit:
            raise EtcdError(f"an etcd watch chunk of {size} bytes is over {limit}; refusing it")
        yield stream.read(size)
        stream.readline(1024)  # the CRLF after the chunk


def _lines(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    """Newline-separated messages across chunk boundaries."""
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end]).strip()
            del pending[:end + 1]
            if line:
                yield line
        if len(pending) > limit:
            raise EtcdError(f"an etcd watch message is over {limit} bytes; refusing it")


class Watch:
    """Every change to the keys under `key_prefix` (or to that one key with prefix=False) from
    `start_revision` (0: from now), passed to `on_event` in order, from a daemon thread, until
    `stop` is set. A fatal error (compaction, refusal) is passed to `on_error` and ends it."""

    def __init__(self, client: EtcdClient, key_prefix: bytes | str,
                 start_revision: int, on_event: Callable[[WatchEvent], None],
                 stop: threading.Event | None = None, *, prefix: bool = True,
                 on_error: Callable[[Exception], None] | None = None, idle: float = 30.0) -> None:
        self.client, self.on_event, self.on_error = client, on_event, on_error
        self.stop = stop if stop is not None else threading.Event()
        full = client.full_key(key_prefix)
        self._request = {"key": b64(full), "progress_notify": True}
        if prefix:
            self._request["range_end"] = b64(range_end(full))
        self.start_revision, self.idle = start_revision, idle
        self.revision = 0  # mod revision of the last event delivered
        self.reconnects = 0
        self._floor = 0
        self._was_created = False
        self.created = threading.Event()  # set once the first stream is established
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"etcd-watch {full.decode(errors='replace')}")

    def start(self) -> Watch:
        self._thread.start()
        return self

    def cancel(self, timeout: float = 2.0) -> None:
        """Stop the watch and wait (up to `timeout`) for its thread to end."""
        self.stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        pause, n = 0.02, len(self.client.endpoints)
        attempt = 0
        while not self.stop.is_set():
            idx = (self.client._current + attempt) % n
            try:
                self._stream(idx)
            except _Stopped:
                return
            except _Broken:
                attempt += 1
                self.reconnects += 1
                if self._was_created:  # a stream that worked broke: retry elsewhere at once
                    pause, self._was_created = 0.02, False
                elif attempt % n == 0:  # a whole round failed: back off
                    pause = min(pause * 2, 0.5)
                if self.stop.wait(pause):
                    return
                continue
            except Exception as e:  # noqa: BLE001 - compaction, refusal, on_event: to on_error
                self.error = e
                if self.on_error is not None:
                    self.on_error(e)
                return

    def _connect(self, idx: int) -> socket.socket:
        scheme, host, port = self.client._parsed[idx]
        try:
            sock = socket.create_connection((host, port), timeout=self.client.timeout)
            if scheme == "https":
                assert self.client._ssl is not None
                sock = self.client._ssl.wrap_socket(sock, server_hostname=host)
        except (OSError, ssl.SSLError) as e:
            raise _Broken(f"{self.client.endpoints[idx]}: {e}") from None
        return sock

    def _stream(self, idx: int) -> None:
        try:
            self.client.ensure_token(idx)
        except EtcdError as e:  # that member is unreachable: the next one may authenticate us
            raise _Broken(str(e)) from None
        sock = self._connect(idx)
        try:
            start = self._floor = resume_revision(self.revision, self.start_revision)
            body = json.dumps({"create_request": {**self._request, "start_revision": str(start)}})
            _, host, port = self.client._parsed[idx]
            head = ["POST /v3/watch HTTP/1.1", f"Host: {host}:{port}",
                    f"Content-Length: {len(body)}"]
            head += [f"{k}: {v}" for k, v in self.client.headers().items()]
            sock.sendall(("\r\n".join(head) + "\r\n\r\n" + body).encode())
            stream = _Stream(sock, self.stop, self.client.timeout, self.client.max_response)
            status = self._status(stream)  # a member that accepts but never answers: next one
            stream.idle = self.idle
            if status != 200:
                raise EtcdError(f"etcd {self.client.endpoints[idx]} refused a watch: HTTP {status}")
            for line in _lines(_chunks(stream, self.client.max_response),
                               self.client.max_response):
                self._message(json.loads(line))
            raise _Broken("the member ended the stream")
        except (OSError, ValueError) as e:
            raise _Broken(f"{type(e).__name__}: {e}") from None
        finally:
            sock.close()

    @staticmethod
    def _status(stream: _Stream) -> int:
        """Read the status line and headers; the status code. Only chunked bodies are valid."""
        status = int(stream.readline(1024).split()[1])
        chunked, size = False, 0
        while (line := stream.readline(MAX_HEADER).strip()):
            size += len(line)
            if size > MAX_HEADER:
                raise EtcdError("an etcd watch answer has over 64 KiB of headers; refusing it")
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "transfer-encoding":
                chunked = "chunked" in value.lower()
        if status == 200 and not chunked:
            raise _Broken("a watch answer that is not a chunked stream")
        if status in (502, 503, 504):
            raise _Broken(f"HTTP {status}")
        return status

    def _message(self, msg: dict[str, Any]) -> None:
        if "error" in msg:
            err = msg["error"]
            code = int(err.get("grpc_code", err.get("code", 0))) if isinstance(err, dict) else 0
            text = err.get("message", err) if isinstance(err, dict) else err
            if code == UNAVAILABLE:
                raise _Broken(str(text))
            raise EtcdError(f"etcd ended a watch: {text}", code=code)
        result = msg.get("result") or {}
        if result.get("created"):
            self.created.set()
            self._was_created = True
            if not self.start_revision and not self.revision:  # "from now": pin where now was
                self.start_revision = int(result["header"]["revision"]) + 1
        if result.get("canceled"):
            compact = int(result.get("compact_revision", 0))
            reason = (f"revision {resume_revision(self.revision, self.start_revision)} was "
                      f"compacted (up to {compact}): re-read the keys and watch from the "
                      "revision that read saw" if compact else result.get("cancel_reason", ""))
            raise EtcdError(f"etcd canceled a watch: {reason}")
        for ev in result.get("events") or []:
            self._deliver(ev)

    def _deliver(self, ev: dict[str, Any]) -> None:
        kv = ev.get("kv") or {}
        event = WatchEvent("delete" if ev.get("type") == "DELETE" else "put",
                           self.client.relative(unb64(kv.get("key"))), unb64(kv.get("value")),
                           int(kv.get("mod_revision", 0)), int(kv.get("create_revision", 0)),
                           int(kv.get("lease", 0)))
        if event.mod_revision < self._floor:
            return  # before where this stream was asked to start: never deliver twice
        self.on_event(event)
        self.revision = event.mod_revision
