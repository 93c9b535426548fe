"""A `torch.distributed.Store` over the authenticated coordinator, keys namespaced by generation.

Process groups bootstrap through this store, so a job opens no unauthenticated store port.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from ..coord.client import CoordClient
from ..errors import RendezvousError


class CoordStore(dist.Store):
    """Store whose keys live in the coordinator under ``g<generation>/<scope>/``."""

    def __init__(self, client: CoordClient, prefix: str, timeout: float = 60.0,
                 abort_check: Callable[[], str | None] | None = None) -> None:
        super().__init__()
        self._client = client
        self._prefix = prefix
        self._timeout_s = timeout
        self._abort_check = abort_check

    def _k(self, key: str) -> str:
        return f"{self._prefix}/{key}"

    def set(self, key: str, value: bytes | str | list[int]) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._client.set(self._k(key), data)

    def get(self, key: str) -> bytes:
        self._await([key], self._timeout_s)
        return self._client.get(self._k(key), timeout=self._timeout_s)

    def _await(self, keys: list[str], seconds: float) -> None:
        """Wait for keys in short slices, giving up early if a peer of this generation is lost
        (its bootstrap key would never come)."""
        deadline = time.monotonic() + seconds
        full = [self._k(k) for k in keys]
        while True:
            left = deadline - time.monotonic()
            try:
                self._client.wait(full, timeout=max(0.01, min(0.25, left)))
                return
            except RendezvousError:
                reason = self._abort_check() if self._abort_check else None
                if reason:
                    raise RuntimeError(f"process-group bootstrap aborted: {reason}") from None
                if left <= 0.25:
                    raise RuntimeError(f"timed out after {seconds:.0f}s waiting for process-group "
                                       f"bootstrap keys {keys}") from None

    def add(self, key: str, amount: int) -> int:
        return self._client.add(self._k(key), amount)

    def check(self, keys: list[str]) -> bool:
        return self._client.check([self._k(k) for k in keys])

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        seconds = timeout.total_seconds() if timeout is not None else self._timeout_s
        self._await(keys, seconds)

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        enc = (lambda v: v.encode() if isinstance(v, str) else bytes(v))
        return self._client.compare_set(self._k(key), enc(expected), enc(desired))

    def delete_key(self, key: str) -> bool:
        return self._client.delete(self._k(key))

    def num_keys(self) -> int:
        return self._client.num_keys()
