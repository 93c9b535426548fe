"""The worker's side of the coordinator protocol over asyncio, for `phalanx bench
control-plane`'s simulated workers: thousands of connections in one process.

The frames are byte-for-byte those of `coord/protocol.py`'s `Channel` (nonce, per-connection
key, `!II` lengths, JSON header, payload, HMAC tag over direction, sequence number, lengths,
header and payload); connecting retries refused connections as `coord/client.py` does.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import struct
import time
from collections.abc import Callable
from typing import Any

from ..coord.protocol import (
    MAX_HEADER,
    MAX_PAYLOAD,
    NONCE_BYTES,
    TAG_BYTES,
    TO_CLIENT,
    TO_SERVER,
    connection_key,
)
from ..errors import AuthenticationError

_PREFIX = struct.Struct("!II")
_SEQ = struct.Struct("!cQ")
BEAT_ID = 0
"""The `id` of every heartbeat (requests count up from 1)."""
RETRY = 0.1
"""Seconds between connection attempts, as the real client waits."""


class Link(asyncio.Protocol):
    """One authenticated client connection; frames identical to `protocol.Channel`'s.

    As the real client (`coord/mux.py`), one connection carries a worker's requests and its
    heartbeats: requests are numbered and replies matched by `id`; heartbeats use id 0 and go
    to `on_frame`, which answers from the event loop without a task switch (one id for all
    beats keeps identical status replies byte-identical, so they are parsed once)."""

    def __init__(self, secret: str, parse: Callable[[bytes], dict[str, Any]]) -> None:
        self.secret, self.parse = secret, parse
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.replies: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}
        self._ids = itertools.count(1)
        self.on_frame: Callable[[dict[str, Any], bytes], None] | None = None
        self.on_close: Callable[[Exception], None] | None = None
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._mac: Any = None  # HMAC keyed for this connection, copied for each frame
        self._sent = self._received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        err = exc or ConnectionError("connection closed by the coordinator")
        for fut in [self.ready, *self.replies.values()]:
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # whoever still awaits it gets it; nobody may (a shutdown)
        self.replies.clear()
        if self.on_close is not None:
            self.on_close(err)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            if self._mac is None:
                if len(self._buf) < NONCE_BYTES:
                    return
                key = connection_key(self.secret, bytes(self._buf[:NONCE_BYTES]))
                del self._buf[:NONCE_BYTES]
                self._mac = hmac.new(key, digestmod=hashlib.sha256)
                self.ready.set_result(None)
            while (frame := self._next()) is not None:
                rid = frame[0].get("id")
                if rid == BEAT_ID and self.on_frame is not None:
                    self.on_frame(*frame)
                elif (fut := self.replies.pop(rid, None)) is not None and not fut.done():
                    fut.set_result(frame)
        except (AuthenticationError, ConnectionError, ValueError) as e:
            self.abort()
            self.connection_lost(e)

    def _tag(self, direction: bytes, seq: int, prefix: bytes, head: bytes,
             payload: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(_SEQ.pack(direction, seq) + prefix)
        mac.update(head)
        mac.update(payload)
        return mac.digest()

    def _next(self) -> tuple[dict[str, Any], bytes] | None:
        buf = self._buf
        if len(buf) < _PREFIX.size:
            return None
        hlen, plen = _PREFIX.unpack_from(buf)
        if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
            raise ConnectionError(f"oversized reply ({hlen} B header, {plen} B payload)")
        end = _PREFIX.size + hlen + plen + TAG_BYTES
        if len(buf) < end:
            return None
        body = _PREFIX.size + hlen
        prefix, head = bytes(buf[:_PREFIX.size]), bytes(buf[_PREFIX.size:body])
        payload, tag = bytes(buf[body:end - TAG_BYTES]), bytes(buf[end - TAG_BYTES:end])
        del buf[:end]
        if not hmac.compare_digest(tag, self._tag(TO_CLIENT, self._received, prefix, head,
                                                  payload)):
            raise AuthenticationError("bad HMAC on a coordinator reply")
        self._received += 1
        return self.parse(head), payload

    def send_head(self, head: bytes) -> None:
        """Send one frame (no payload) whose JSON header is already encoded."""
        prefix = _PREFIX.pack(len(head), 0)
        tag = self._tag(TO_SERVER, self._sent, prefix, head, b"")
        self._sent += 1
        self.transport.write(prefix + head + tag)  # type: ignore[union-attr]

    async def ask(self, header: dict[str, Any], timeout: float) -> tuple[dict[str, Any], bytes]:
        """Send a request; its reply (header, payload) within `timeout` seconds."""
        fut: asyncio.Future[tuple[dict[str, Any], bytes]] = \
            asyncio.get_running_loop().create_future()
        rid = next(self._ids)
        self.replies[rid] = fut
        self.send_head(json.dumps({**header, "id": rid}, separators=(",", ":")).encode())
        try:
            return await asyncio.wait_for(fut, max(timeout, 0.001))
        finally:
            self.replies.pop(rid, None)

    def abort(self) -> None:
        """Close at once, as the kernel does for a SIGKILLed process."""
        if self.transport is not None:
            self.transport.abort()


async def open_link(host: str, port: int, src: str | None, secret: str, deadline: float,
                    parse: Callable[[bytes], dict[str, Any]]) -> Link:
    """Connect and read the nonce, retrying refused or dropped connections until `deadline`
    (the coordinator closes connections over its caps at once), as `client._open` does."""
    loop = asyncio.get_running_loop()
    while True:
        link: Link | None = None
        try:
            _, link = await asyncio.wait_for(loop.create_connection(
                lambda: Link(secret, parse), host, port, local_addr=(src, 0) if src else None),
                max(deadline - time.monotonic(), 0.001))
            await asyncio.wait_for(link.ready, max(1.0, deadline - time.monotonic()))
            return link
        except (OSError, asyncio.TimeoutError):
            if link is not None:
                link.abort()
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(RETRY)
