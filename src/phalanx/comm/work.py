"""Ordered execution of collectives: inline when idle, on one background thread when async.

Every rank must issue collectives in the same order. Async calls go to a single FIFO thread;
a synchronous call made while async work is queued joins the same queue, so the issue order
on every rank is the program order, whichever thread the user calls from.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Handle(Generic[T]):
    """The result of an async collective; `wait()` returns it or raises its error."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def _finish(self, value: T | None, error: BaseException | None) -> None:
        self._value, self._error = value, error
        self._done.set()

    def done(self) -> bool:
        """True once the collective finished (successfully or not)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> T:
        """Block until the collective finishes; re-raise its error here."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"collective not finished after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class OrderedExecutor:
    """Runs callables in submission order; sync calls run inline when nothing is queued."""

    def __init__(self, name: str = "phalanx-comm") -> None:
        self._lock = threading.Lock()
        self._pending = 0
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], Handle[object]] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, handle = item
            try:
                value, error = fn(), None
            except BaseException as e:  # delivered to whoever waits on the handle
                value, error = None, e
            with self._lock:
                self._pending -= 1
            handle._finish(value, error)

    def submit(self, fn: Callable[[], T]) -> Handle[T]:
        handle: Handle[T] = Handle()
        with self._lock:
            self._pending += 1
            self._queue.put((fn, handle))  # type: ignore[arg-type]
        return handle

    def run(self, fn: Callable[[], T]) -> T:
        with self._lock:
            if self._pending == 0:
                # Holding the lock keeps any concurrent submit behind this call.
                return fn()
            handle: Handle[T] = Handle()
            self._pending += 1
            self._queue.put((fn, handle))  # type: ignore[arg-type]
        return handle.wait()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
