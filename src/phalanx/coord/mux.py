"""One connection to the coordinator shared by a worker's threads.

Requests carry an `id` and the coordinator echoes it, so replies may come back in any order:
a reader thread hands each to the thread that asked. A worker's heartbeats (held until there
is news) and its blocking requests (rendezvous, store waits) travel on one connection, so the
coordinator holds one socket per worker, and the connection closing is how it learns that a
process died.
"""

from __future__ import annotations

import itertools
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import AuthenticationError, RendezvousError
from .protocol import Channel

Reply = tuple[dict[str, Any], bytes]


@dataclass(slots=True)
class _Slot:
    done: threading.Event = field(default_factory=threading.Event)
    reply: Reply | None = None
    error: str | None = None


class Mux:
    """Numbered requests over one authenticated channel (its socket stays in blocking mode:
    sends and the reader's receives never change its timeout under each other)."""

    def __init__(self, chan: Channel, addr: str) -> None:
        self._chan = chan
        self._addr = addr
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._ids = itertools.count(1)
        self.error: str | None = None
        """Why the connection is gone (None while it is up)."""
        chan.sock.settimeout(None)
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name="phalanx-coord-reader")
        self._reader.start()

    def call(self, header: dict[str, Any], payload: bytes = b"", *, limit: float) -> Reply:
        """Send a request and wait up to `limit` seconds for its reply."""
        op = header.get("op")
        slot = _Slot()
        with self._lock:
            if self.error is not None:
                raise RendezvousError(f"lost the coordinator at {self._addr} during {op!r}: "
                                      f"{self.error}")
            rid = next(self._ids)
            self._slots[rid] = slot
        try:
            with self._send_lock:  # sealed in send order: the tag covers a sequence number
                self._chan.sock.sendall(self._chan.codec.seal({**header, "id": rid}, payload))
        except OSError as e:
            self._fail(str(e) or type(e).__name__)
        if not slot.done.wait(limit):
            with self._lock:
                self._slots.pop(rid, None)
            raise RendezvousError(f"lost the coordinator at {self._addr} during {op!r}: no "
                                  f"reply within {limit:.1f}s")
        if slot.reply is None:
            raise RendezvousError(f"lost the coordinator at {self._addr} during {op!r}: "
                                  f"{slot.error}")
        return slot.reply

    def _read(self) -> None:
        try:
            while True:
                header, payload = self._chan.recv()
                rid = header.pop("id", None)
                with self._lock:
                    slot = self._slots.pop(rid, None) if isinstance(rid, int) else None
                if slot is not None:  # None: a reply its caller stopped waiting for
                    slot.reply = (header, payload)
                    slot.done.set()
        except (ConnectionError, OSError, AuthenticationError) as e:
            self._fail(str(e) or type(e).__name__)

    def _fail(self, why: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = why
            slots, self._slots = self._slots, {}
        for slot in slots.values():
            slot.error = why
            slot.done.set()

    def shutdown(self) -> None:
        """Cut the connection now (pending calls fail); the peer sees it close."""
        try:
            self._chan.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        self._chan.sock.close()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=2)
