"""Frames from a non-blocking socket: the coordinator's event loop appends whatever bytes
arrive and takes out each complete, authenticated frame (see `protocol.py` for the format).

Lengths are checked against the connection's cap before their bytes are awaited, the buffer
holds only bytes that arrived, and `started` says when the pending frame's first byte came, so
the loop can drop a peer whose frame does not complete within `frame_seconds`.
"""

from __future__ import annotations

import time
from typing import Any

from .protocol import PREFIX_BYTES, TAG_BYTES, Codec, check_lengths, read_lengths


class FrameBuffer:
    """Reassembles one connection's incoming frames."""

    def __init__(self, codec: Codec, limit: int) -> None:
        self.codec = codec
        self.limit = limit
        """Largest frame accepted now (small until the peer proved it holds the secret)."""
        self.started: float | None = None
        """monotonic() when the pending frame's first byte arrived (None: no partial frame)."""
        self.size = 0
        """Total bytes of the pending frame once its prefix arrived (0 before)."""
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        if data and self.started is None:
            self.started = time.monotonic()
        self._buf += data

    def next(self) -> tuple[dict[str, Any], bytes] | None:
        """The next complete frame, or None until more bytes arrive. Raises FrameError
        (oversized, not a JSON object) or AuthenticationError (bad tag)."""
        buf = self._buf
        if len(buf) < PREFIX_BYTES:
            return None
        hlen, plen = read_lengths(bytes(buf[:PREFIX_BYTES]))
        check_lengths(hlen, plen, self.limit)
        self.size = PREFIX_BYTES + hlen + plen + TAG_BYTES
        if len(buf) < self.size:
            return None
        head_end = PREFIX_BYTES + hlen
        head, payload = bytes(buf[PREFIX_BYTES:head_end]), bytes(buf[head_end:head_end + plen])
        tag = bytes(buf[head_end + plen:self.size])
        del buf[:self.size]
        self.size = 0
        self.started = time.monotonic() if buf else None
        return self.codec.open(head, payload, tag), payload
