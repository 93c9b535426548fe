"""The seam between the data layer and the runtime's collectives.

Every function imports `phalanx.api` (never the root package) when called, never at import
time, so the data layer loads without the runtime and tests can route the calls to an in-process
fake with `use_backend`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Collectives(Protocol):
    """The five calls the data layer needs from a runtime."""

    def rank(self) -> int: ...
    def size(self) -> int: ...
    def allreduce(self, x: Any, op: str = "sum") -> Any: ...
    def allgather_object(self, obj: Any) -> list[Any]: ...
    def broadcast_object(self, obj: Any, root: int = 0) -> Any: ...


_backend: Collectives | None = None


@contextmanager
def use_backend(backend: Collectives | None) -> Iterator[None]:
    """Route the data layer's collectives to `backend` inside the block (tests, simulations)."""
    global _backend
    previous, _backend = _backend, backend
    try:
        yield
    finally:
        _backend = previous


def _runtime() -> Any:
    if _backend is not None:
        return _backend
    from .. import api
    return api


def rank() -> int:
    return int(_runtime().rank())


def size() -> int:
    return int(_runtime().size())


def allreduce(x: Any, op: str = "sum") -> Any:
    return _runtime().allreduce(x, op=op)


def allgather_object(obj: Any) -> list[Any]:
    return list(_runtime().allgather_object(obj))


def broadcast_object(obj: Any, root: int = 0) -> Any:
    return _runtime().broadcast_object(obj, root=root)
