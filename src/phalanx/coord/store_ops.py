"""The coordinator's key-value store ops (the process-group bootstrap store) and the
validation of request fields shared by every op.

Every field an op reads goes through a validator, so an authenticated but malformed request
gets an error reply instead of raising in a connection thread, and every wait is bounded.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from .waits import Answer, Reply, Wait, kv_topic

MAX_WAIT = 3600.0
"""Longest wait (seconds) any request may ask for."""


class BadRequest(ValueError):
    """An authenticated request whose header is malformed; answered with an error reply."""


def _str(h: dict[str, Any], key: str, limit: int = 4096) -> str:
    v = h.get(key)
    if not isinstance(v, str) or len(v) > limit:
        raise BadRequest(f"field {key!r} must be a string of at most {limit} characters")
    return v


def _int(h: dict[str, Any], key: str, default: int | None = None) -> int:
    v = h.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not -(1 << 62) < v < (1 << 62):
        raise BadRequest(f"field {key!r} must be an integer, got {v!r}")
    return v


def _seconds(h: dict[str, Any], key: str, default: float) -> float:
    v = h.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise BadRequest(f"field {key!r} must be a finite number of seconds >= 0, got {v!r}")
    return min(float(v), MAX_WAIT)


def _keys(h: dict[str, Any]) -> list[str]:
    v = h.get("keys")
    if not isinstance(v, list) or len(v) > 4096 or not all(isinstance(k, str) for k in v):
        raise BadRequest("field 'keys' must be a list of at most 4096 strings")
    return v


class StoreOps:
    """The store half of the coordinator: keys live in `kv`, guarded by `cv`."""

    cv: threading.Condition
    kv: dict[str, bytes]
    _stop: threading.Event
    wake: Callable[[tuple[str, ...]], None]

    def _put(self, key: str, value: bytes) -> None:
        """Store a value and wake only the requests waiting for this key (lock held)."""
        self.kv[key] = value
        self.wake((kv_topic(key),))

    def _op_set(self, h: dict[str, Any], payload: bytes) -> Reply:
        key = _str(h, "key")
        with self.cv:
            self._put(key, payload)
        return {"ok": True}, b""

    def _op_get(self, h: dict[str, Any], _: bytes) -> Answer:
        key, deadline = _str(h, "key"), time.monotonic() + _seconds(h, "timeout", 30.0)

        def retry() -> Reply | None:
            with self.cv:
                value = self.kv.get(key)
            return ({"ok": True}, value) if value is not None else None

        return retry() or Wait(retry, lambda: ({"ok": False, "error": "timed out waiting for "
                                                f"key {key!r}"}, b""),
                               deadline, (kv_topic(key),))

    def _op_add(self, h: dict[str, Any], _: bytes) -> Reply:
        key, amount = _str(h, "key"), _int(h, "amount")
        with self.cv:
            value = int(self.kv.get(key, b"0")) + amount
            self._put(key, str(value).encode())
        return {"ok": True, "value": value}, b""

    def _op_check(self, h: dict[str, Any], _: bytes) -> Reply:
        keys = _keys(h)
        with self.cv:
            return {"ok": True, "value": all(k in self.kv for k in keys)}, b""

    def _op_wait(self, h: dict[str, Any], _: bytes) -> Answer:
        keys, deadline = _keys(h), time.monotonic() + _seconds(h, "timeout", 30.0)

        def missing() -> list[str]:
            with self.cv:
                return [k for k in keys if k not in self.kv]

        def retry() -> Reply | None:
            return None if missing() else ({"ok": True}, b"")

        def expire() -> Reply:
            return {"ok": False, "error": f"timed out waiting for keys {missing()}"}, b""

        return retry() or Wait(retry, expire, deadline, tuple(kv_topic(k) for k in keys))

    def _op_compare_set(self, h: dict[str, Any], payload: bytes) -> Reply:
        key, expected = _str(h, "key"), bytes.fromhex(_str(h, "expected", 1 << 20))
        with self.cv:
            cur = self.kv.get(key)
            if (cur is None and not expected) or cur == expected:
                self._put(key, payload)
                return {"ok": True}, payload
            return {"ok": True}, cur if cur is not None else expected

    def _op_delete(self, h: dict[str, Any], _: bytes) -> Reply:
        key = _str(h, "key")
        with self.cv:
            return {"ok": True, "value": self.kv.pop(key, None) is not None}, b""

    def _op_num_keys(self, h: dict[str, Any], _: bytes) -> Reply:
        with self.cv:
            return {"ok": True, "value": len(self.kv)}, b""

