"""Wire format of the coordinator: authenticated, length-prefixed JSON frames.

A connection opens with the server sending a 16-byte random nonce. Both sides then derive a
connection key ``HMAC(secret, "phalanx-v1" + nonce)`` and every frame carries
``HMAC(conn_key, direction | seq | header | payload)``. The sequence number and the per-connection
nonce stop replays; the secret never crosses the wire. Headers are JSON (never pickle), payloads
are raw bytes (store values).

Frame: ``!II`` header length, payload length | header | payload | 32-byte tag.

The lengths arrive before the tag that vouches for them, so a reader never trusts them: it checks
them against a cap the caller chooses (small until the peer has proved it holds the secret), reads
in chunks so memory follows the bytes that actually arrived, and gives each frame a deadline.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import struct
import time
from typing import Any

from ..errors import AuthenticationError

NONCE_BYTES = 16
TAG_BYTES = 32
MAX_HEADER = 1 << 20
"""Largest JSON header of any frame (a compare_set carries its expected value, hex, here)."""
MAX_PAYLOAD = 256 << 20
"""Largest payload (one store value) of an authenticated frame."""
MAX_FIRST_FRAME = 64 << 10
"""Largest frame (header + payload) a peer may send before it has proved it holds the secret."""
FRAME_TIMEOUT = 10.0
"""Seconds a frame may take from its first byte to its last, plus `size / MIN_RATE`."""
MIN_RATE = 1 << 20
"""Slowest transfer (bytes/s) a large frame may use before it times out."""
MAX_HOLD = 5.0
"""Longest the coordinator holds a heartbeat's reply (seconds), in a job of 20,000 workers or
more; a client that has not heard the job's hold yet waits that long plus its timeout."""
CHUNK = 1 << 20
"""Most bytes read per recv() call: a frame's buffer grows only as its bytes arrive."""
_PREFIX = struct.Struct("!II")
_SEQ = struct.Struct("!cQ")
PREFIX_BYTES = _PREFIX.size
"""Bytes of a frame's length prefix (header length, payload length)."""
TO_SERVER = b"S"
TO_CLIENT = b"C"


class FrameError(ConnectionError):
    """A frame that is oversized or whose header is not a JSON object: drop the connection."""


def new_secret() -> str:
    """A fresh per-job secret (hex), handed to workers by the launcher."""
    return secrets.token_hex(32)


def connection_key(secret: str, nonce: bytes) -> bytes:
    """The per-connection MAC key both ends derive from the job secret and the server's nonce."""
    if not secret:
        raise AuthenticationError("no job secret: set PHALANX_SECRET (the launcher does this)")
    return hmac.new(secret.encode(), b"phalanx-v1" + nonce, hashlib.sha256).digest()


def frame_seconds(nbytes: int) -> float:
    """How long a frame of `nbytes` may take to arrive (or to send) once it has started."""
    return FRAME_TIMEOUT + nbytes / MIN_RATE


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """Read exactly n bytes or raise ConnectionError on EOF, TimeoutError past `deadline`.

    `deadline` is a `time.monotonic()` instant; None waits as long as it takes. The buffer grows
    by what each recv() returns, never to the announced `n` up front.
    """
    buf = bytearray()
    while len(buf) < n:
        if deadline is None:
            sock.settimeout(None)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out with {len(buf)} of {n} bytes received")
            sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), CHUNK))
        if not chunk:
            raise ConnectionError("connection closed by peer")
        buf += chunk
    return bytes(buf)


class Codec:
    """One connection end's frame sealing and checking: its MAC key, direction and sequence
    numbers. `Channel` uses it over a blocking socket; the coordinator's event loop over a
    buffer of whatever bytes have arrived."""

    def __init__(self, key: bytes, *, is_server: bool) -> None:
        self._key = key
        self._send_dir = TO_CLIENT if is_server else TO_SERVER
        self._recv_dir = TO_SERVER if is_server else TO_CLIENT
        self._send_seq = 0
        self._recv_seq = 0

    def _tag(self, direction: bytes, seq: int, head: bytes, payload: bytes) -> bytes:
        mac = hmac.new(self._key, _SEQ.pack(direction, seq), hashlib.sha256)
        mac.update(_PREFIX.pack(len(head), len(payload)))
        mac.update(head)
        mac.update(payload)
        return mac.digest()

    def seal(self, header: dict[str, Any], payload: bytes = b"") -> bytes:
        """The bytes of the next frame this end sends."""
        return self.seal_head(json.dumps(header, separators=(",", ":")).encode(), payload)

    def seal_head(self, head: bytes, payload: bytes = b"") -> bytes:
        """`seal` for a header already encoded as JSON (one shared by many replies)."""
        tag = self._tag(self._send_dir, self._send_seq, head, payload)
        self._send_seq += 1
        return b"".join((_PREFIX.pack(len(head), len(payload)), head, payload, tag))

    def open(self, head: bytes, payload: bytes, tag: bytes) -> dict[str, Any]:
        """Check the next received frame's tag and parse its header (AuthenticationError,
        FrameError)."""
        want = self._tag(self._recv_dir, self._recv_seq, head, payload)
        if not hmac.compare_digest(tag, want):
            raise AuthenticationError("bad HMAC: the peer does not hold this job's secret")
        self._recv_seq += 1
        try:
            header = json.loads(head)
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, huge ints, deep nesting
            raise FrameError(f"frame header is not JSON: {str(e)[:200]}") from None
        if not isinstance(header, dict):
            raise FrameError(f"frame header is a JSON {type(header).__name__}, not an object")
        return header


def read_lengths(prefix: bytes) -> tuple[int, int]:
    """A frame's announced (header, payload) lengths from its first PREFIX_BYTES bytes."""
    hlen, plen = _PREFIX.unpack(prefix)
    return hlen, plen


def check_lengths(hlen: int, plen: int, limit: int) -> None:
    """Refuse a frame whose announced lengths exceed the caps (before reading its bytes)."""
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD or hlen + plen > limit:
        raise FrameError(f"oversized frame (header {hlen} B, payload {plen} B): the limits "
                         f"are {MAX_HEADER} B of header, {MAX_PAYLOAD} B of payload and "
                         f"{limit} B per frame on this connection")


class Channel:
    """One authenticated connection end: sends and receives MAC'd frames in order."""

    def __init__(self, sock: socket.socket, key: bytes, *, is_server: bool) -> None:
        self.sock = sock
        self.codec = Codec(key, is_server=is_server)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        """Send one frame; a peer that does not read it within `frame_seconds` times it out."""
        frame = self.codec.seal(header, payload)
        self.sock.settimeout(frame_seconds(len(frame)))
        self.sock.sendall(frame)

    def recv(self, *, limit: int = MAX_HEADER + MAX_PAYLOAD,
             deadline: float | None = None) -> tuple[dict[str, Any], bytes]:
        """Receive one frame of at most `limit` bytes (header + payload).

        Waits for the frame's first byte until `deadline` (monotonic; None: forever, as an idle
        worker's connection may be); from that byte on, the frame must complete within
        `frame_seconds(size)` and by `deadline`. Raises FrameError (oversized, not a JSON object),
        AuthenticationError (bad tag), TimeoutError or ConnectionError.
        """
        first = recv_exact(self.sock, 1, deadline)
        start = time.monotonic()

        def by(nbytes: int) -> float:  # when a frame of this size must have arrived
            end = start + frame_seconds(nbytes)
            return end if deadline is None else min(end, deadline)

        hlen, plen = _PREFIX.unpack(first + recv_exact(self.sock, _PREFIX.size - 1, by(0)))
        check_lengths(hlen, plen, limit)
        end = by(hlen + plen)
        head = recv_exact(self.sock, hlen, end)
        payload = recv_exact(self.sock, plen, end) if plen else b""
        tag = recv_exact(self.sock, TAG_BYTES, end)
        return self.codec.open(head, payload, tag), payload
