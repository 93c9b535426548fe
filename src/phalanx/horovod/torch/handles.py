"""Horovod's integer handles for asynchronous collectives: `poll(handle)`, `synchronize(handle)`.

An in-flight operation is keyed by its kind and name, as Horovod keys its tensor queue: a
second named operation of the same kind and name submitted while the first is still running
raises ValueError, as Horovod's duplicate-name check does. Results come back from
`synchronize()` in whatever order it is called; phalanx runs the operations themselves in
submission order, which must be the same on every rank.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class Waitable(Protocol):
    """What the table holds: a phalanx Handle or one of the wrappers below."""

    def done(self) -> bool: ...
    def wait(self) -> Any: ...


class Done:
    """An operation that already finished (the async forms phalanx runs eagerly)."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def done(self) -> bool:
        return True

    def wait(self) -> Any:
        return self._value


class Chain:
    """Several phalanx handles and what to make of their results, computed once."""

    def __init__(self, inner: Sequence[Waitable], finish: Callable[[list[Any]], Any]) -> None:
        self._inner, self._finish = inner, finish
        self._result: tuple[Any] | None = None

    def done(self) -> bool:
        return all(h.done() for h in self._inner)

    def wait(self) -> Any:
        if self._result is None:
            self._result = (self._finish([h.wait() for h in self._inner]),)
        return self._result[0]


@dataclass(slots=True)
class _Entry:
    op: Waitable
    key: tuple[str, str] | None


_table: dict[int, _Entry] = {}
_ids = itertools.count(1)
_lock = threading.Lock()


def start(kind: str, name: str | None, make: Callable[[], Waitable]) -> int:
    """Check that no `kind` operation named `name` is in flight, start one with `make()`
    and return its handle."""
    key = (kind, name) if name else None
    with _lock:
        if key is not None and any(e.key == key and not e.op.done() for e in _table.values()):
            raise ValueError(
                f"{kind}(name={name!r}): an operation with this name is still in flight; "
                "synchronize() it first or use a different name (as in Horovod, names of "
                "in-flight operations must be unique)")
    op = make()
    with _lock:
        handle = next(_ids)
        _table[handle] = _Entry(op, key)
    return handle


def poll(handle: int) -> bool:
    """True once the operation finished; `synchronize(handle)` then returns without waiting."""
    with _lock:
        entry = _table.get(handle)
    if entry is None:
        raise ValueError(f"poll({handle!r}): unknown handle (already synchronized, or from "
                         "before the last hvd.init()); poll a handle an *_async call returned")
    return bool(entry.op.done())


def synchronize(handle: int) -> Any:
    """Wait for the operation and return its output (None for an unknown handle, as Horovod)."""
    with _lock:
        entry = _table.get(handle)
    if entry is None:
        return None
    try:
        return entry.op.wait()
    finally:
        with _lock:
            _table.pop(handle, None)


def run(kind: str, name: str | None, make: Callable[[], Waitable]) -> Any:
    """Start an operation and wait for it (the synchronous forms)."""
    return synchronize(start(kind, name, make))


def reset() -> None:
    """Forget every handle (init and shutdown); operations in flight still finish."""
    with _lock:
        _table.clear()
