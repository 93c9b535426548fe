"""An in-process fake of the runtime's collectives: N ranks as N threads over a barrier.

Used by the data layer's tests to check multi-rank math (1, 2, 3 ranks) without processes;
reductions run in rank order, so every rank gets bit-identical results, as with a real ring.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _collective

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "sum": lambda a, b: a + b, "avg": lambda a, b: a + b, "prod": lambda a, b: a * b,
    "min": lambda a, b: np.minimum(a, b), "max": lambda a, b: np.maximum(a, b)}


class ThreadWorld:
    """`world_size` ranks played by threads; `run(fn)` calls fn(rank) on each and returns the
    results in rank order (re-raising the first failure)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size)
        self._slots: list[Any] = [None] * world_size
        self._local = threading.local()
        self.calls = 0

    def rank(self) -> int:
        return int(getattr(self._local, "rank", 0))

    def size(self) -> int:
        return self.world_size

    def _exchange(self, obj: Any) -> list[Any]:
        r = self.rank()
        self._slots[r] = obj
        self._barrier.wait()
        gathered = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before everyone has read them all
        if r == 0:
            self.calls += 1
        return gathered

    def allreduce(self, x: Any, op: str = "sum") -> Any:
        if op not in _OPS:
            raise ValueError(f"op={op!r} is not one of {sorted(_OPS)}")
        is_torch = type(x).__module__.startswith("torch")
        local = x.detach().cpu().numpy().copy() if is_torch else np.array(x, copy=True)
        parts = self._exchange(local)
        out = parts[0].copy()
        for p in parts[1:]:
            out = _OPS[op](out, p)
        if op == "avg":
            out = out / self.world_size
        out = np.asarray(out, dtype=local.dtype) if op != "avg" else np.asarray(out)
        if is_torch:
            import torch
            return torch.as_tensor(out, dtype=x.dtype)
        return out

    def allgather_object(self, obj: Any) -> list[Any]:
        return [copy.deepcopy(o) for o in self._exchange(obj)]

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return copy.deepcopy(self._exchange(obj)[root])

    def run(self, fn: Callable[[int], Any], timeout: float = 60.0) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException] = []

        def body(r: int) -> None:
            self._local.rank = r
            try:
                results[r] = fn(r)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)
                self._barrier.abort()

        with _collective.use_backend(self):
            threads = [threading.Thread(target=body, args=(r,), daemon=True)
                       for r in range(self.world_size)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout)
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"a fake rank did not finish within {timeout}s (collective hang?)")
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        if real or errors:
            raise (real or errors)[0]
        return results
