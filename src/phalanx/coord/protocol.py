"""Wire format of the coordinator: authenticated, length-prefixed JSON frames.

A connection opens with the server sending a 16-byte random nonce. Both sides then derive a
connection key ``HMAC(secret, "phalanx-v1" + nonce)`` and every frame carries
``HMAC(conn_key, direction | seq | header | payload)``. The sequence number and the per-connection
nonce stop replays; the secret never crosses the wire. Headers are JSON (never pickle), payloads
are raw bytes (store values).

Frame: ``!II`` header length, payload length | header | payload | 32-byte tag.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import struct
from typing import Any

from ..errors import AuthenticationError

NONCE_BYTES = 16
TAG_BYTES = 32
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 256 << 20
_PREFIX = struct.Struct("!II")
_SEQ = struct.Struct("!cQ")
TO_SERVER = b"S"
TO_CLIENT = b"C"


def new_secret() -> str:
    """A fresh per-job secret (hex), handed to workers by the launcher."""
    return secrets.token_hex(32)


def connection_key(secret: str, nonce: bytes) -> bytes:
    """The per-connection MAC key both ends derive from the job secret and the server's nonce."""
    if not secret:
        raise AuthenticationError("no job secret: set PHALANX_SECRET (the launcher does this)")
    return hmac.new(secret.encode(), b"phalanx-v1" + nonce, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes or raise ConnectionError on EOF."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by peer")
        got += k
    return bytes(buf)


class Channel:
    """One authenticated connection end: sends and receives MAC'd frames in order."""

    def __init__(self, sock: socket.socket, key: bytes, *, is_server: bool) -> None:
        self.sock = sock
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

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        head = json.dumps(header, separators=(",", ":")).encode()
        tag = self._tag(self._send_dir, self._send_seq, head, payload)
        self._send_seq += 1
        self.sock.sendall(_PREFIX.pack(len(head), len(payload)) + head + payload + tag)

    def recv(self) -> tuple[dict[str, Any], bytes]:
        hlen, plen = _PREFIX.unpack(recv_exact(self.sock, _PREFIX.size))
        if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
            raise AuthenticationError(f"oversized frame (header {hlen} B, payload {plen} B)")
        head = recv_exact(self.sock, hlen)
        payload = recv_exact(self.sock, plen) if plen else b""
        tag = recv_exact(self.sock, TAG_BYTES)
        want = self._tag(self._recv_dir, self._recv_seq, head, payload)
        if not hmac.compare_digest(tag, want):
            raise AuthenticationError("bad HMAC: the peer does not hold this job's secret")
        self._recv_seq += 1
        header = json.loads(head)
        if not isinstance(header, dict):
            raise AuthenticationError("malformed frame header")
        return header, payload
