"""A `torch.distributed.Store` over the authenticated coordinator, keys namespaced by generation.

Process groups bootstrap through this store, so a job opens no unauthenticated store port.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from ..coord.client import CoordClient


class CoordStore(dist.Store):
    """Store whose keys live in the coordinator under ``g<generation>/<scope>/``."""

    def __init__(self, client: CoordClient, prefix: str, timeout: float = 60.0) -> None:
        super().__init__()
        self._client = client
        self._prefix = prefix
        self._timeout_s = timeout

    def _k(self, key: str) -> str:
        return f"{self._prefix}/{key}"

    def set(self, key: str, value: bytes | str | list[int]) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        self._client.set(self._k(key), data)

    def get(self, key: str) -> bytes:
        return self._client.get(self._k(key), timeout=self._timeout_s)

    def add(self, key: str, amount: int) -> int:
        return self._client.add(self._k(key), amount)

    def check(self, keys: list[str]) -> bool:
        return self._client.check([self._k(k) for k in keys])

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        seconds = timeout.total_seconds() if timeout is not None else self._timeout_s
        self._client.wait([self._k(k) for k in keys], timeout=seconds)

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        enc = (lambda v: v.encode() if isinstance(v, str) else bytes(v))
        return self._client.compare_set(self._k(key), enc(expected), enc(desired))

    def delete_key(self, key: str) -> bool:
        return self._client.delete(self._k(key))

    def num_keys(self) -> int:
        return self._client.num_keys()
