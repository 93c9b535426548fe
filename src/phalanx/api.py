"""The public collective API on torch tensors, numpy arrays and Python scalars.

Each function returns the caller's type: a numpy array in, a numpy array out. In-place forms
(trailing underscore) write into the given tensor or array and return it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from . import runtime
from .comm import collectives as C
from .comm.work import Handle
from .errors import ConfigError

ArrayLike = TypeVar("ArrayLike", torch.Tensor, np.ndarray, float, int, bool, complex)


def rank() -> int:
    """This worker's rank in the current generation."""
    return runtime.current().group.place.rank


def size() -> int:
    """Number of workers in the current generation."""
    return runtime.current().group.place.size


def local_rank() -> int:
    """This worker's rank among the workers of its host."""
    return runtime.current().group.place.local_rank


def local_size() -> int:
    """Number of workers on this host."""
    return runtime.current().group.place.local_size


def generation() -> int:
    """Membership generation; changes whenever the set of workers changes."""
    return runtime.current().group.place.generation


def _to_tensor(x: Any, arg: str, op: str) -> tuple[torch.Tensor, str]:
    if isinstance(x, torch.Tensor):
        return (x if x.is_contiguous() else x.contiguous()), "torch"
    if isinstance(x, np.ndarray):
        try:
            arr = np.ascontiguousarray(x)
            return torch.from_numpy(arr if arr.flags.writeable else arr.copy()), "numpy"
        except TypeError:
            raise ConfigError(f"{op}: {arg} has numpy dtype {x.dtype}, which torch cannot hold; "
                              "cast it to a numeric dtype first") from None
    if isinstance(x, (bool, int, float, complex)):
        return torch.tensor(x), type(x).__name__
    raise ConfigError(f"{op}: {arg} must be a torch.Tensor, numpy.ndarray or number, "
                      f"got {type(x).__name__}")


def _back(t: torch.Tensor, kind: str) -> Any:
    if kind == "torch":
        return t
    if kind == "numpy":
        return t.numpy()
    return {"bool": bool, "int": int, "float": float, "complex": complex}[kind](t.item())


def _write_back(x: Any, t: torch.Tensor) -> Any:
    """Copy a result into the caller's object when the op worked on a contiguous copy."""
    if isinstance(x, torch.Tensor) and t is not x:
        x.copy_(t)
    elif isinstance(x, np.ndarray) and not np.shares_memory(x, t.numpy()):
        x[...] = t.numpy()
    return x


def allreduce(x: ArrayLike, op: str = "sum", *, name: str | None = None) -> ArrayLike:
    """Reduce `x` across ranks (op: sum, avg, min, max, prod); `x` is left unchanged."""
    t, kind = _to_tensor(x, "x", "allreduce")
    t = t.clone()
    g = runtime.current().group
    return _back(g.run("allreduce", lambda: C.allreduce_(g, t, op, name)), kind)


def allreduce_(x: ArrayLike, op: str = "sum", *, name: str | None = None) -> ArrayLike:
    """Reduce a tensor or array in place across ranks and return it."""
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise ConfigError(f"allreduce_: x must be a tensor or array to reduce in place, "
                          f"got {type(x).__name__}; use allreduce() for scalars")
    t, kind = _to_tensor(x, "x", "allreduce_")
    g = runtime.current().group
    g.run("allreduce", lambda: C.allreduce_(g, t, op, name))
    return _write_back(x, t)


class _Converted(Handle[Any]):
    """A handle that converts its result back to the caller's type on wait()."""

    def __init__(self, inner: Handle[Any], convert: Any) -> None:
        super().__init__()
        self._inner, self._convert = inner, convert

    def done(self) -> bool:
        return self._inner.done()

    def wait(self, timeout: float | None = None) -> Any:
        return self._convert(self._inner.wait(timeout))


def allreduce_async(x: ArrayLike, op: str = "sum", *, name: str | None = None) -> Handle[Any]:
    """Start an allreduce of a copy of `x`; `handle.wait()` returns the result."""
    t, kind = _to_tensor(x, "x", "allreduce_async")
    t = t.clone()
    g = runtime.current().group
    inner = g.submit("allreduce", lambda: C.allreduce_(g, t, op, name))
    return _Converted(inner, lambda r: _back(r, kind))


def allreduce_async_(t: torch.Tensor, op: str = "sum", *, name: str | None = None) -> Handle[torch.Tensor]:
    """Start an in-place allreduce of a contiguous tensor; `handle.wait()` returns it."""
    if not isinstance(t, torch.Tensor) or not t.is_contiguous():
        raise ConfigError("allreduce_async_: t must be a contiguous torch.Tensor; "
                          "call .contiguous() first or use allreduce_async()")
    g = runtime.current().group
    return g.submit("allreduce", lambda: C.allreduce_(g, t, op, name))


def allgather(x: ArrayLike, *, name: str | None = None) -> ArrayLike:
    """Concatenate every rank's `x` along dim 0 (first dims may differ between ranks)."""
    t, kind = _to_tensor(x, "x", "allgather")
    g = runtime.current().group
    return _back(g.run("allgather", lambda: C.allgather(g, t, name)), "torch" if kind not in (
        "torch", "numpy") else kind)


def allgather_async(x: torch.Tensor, *, name: str | None = None) -> Handle[torch.Tensor]:
    """Start an allgather; `handle.wait()` returns the concatenated tensor."""
    t, _ = _to_tensor(x, "x", "allgather_async")
    g = runtime.current().group
    return g.submit("allgather", lambda: C.allgather(g, t, name))


def broadcast(x: ArrayLike, root: int = 0, *, name: str | None = None) -> ArrayLike:
    """Root's `x` on every rank, as a new tensor or array."""
    t, kind = _to_tensor(x, "x", "broadcast")
    t = t.clone()
    g = runtime.current().group
    return _back(g.run("broadcast", lambda: C.broadcast_(g, t, root, name)), kind)


def broadcast_(x: ArrayLike, root: int = 0, *, name: str | None = None) -> ArrayLike:
    """Overwrite `x` with root's values on every rank and return it."""
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise ConfigError(f"broadcast_: x must be a tensor or array, got {type(x).__name__}")
    t, _ = _to_tensor(x, "x", "broadcast_")
    g = runtime.current().group
    g.run("broadcast", lambda: C.broadcast_(g, t, root, name))
    return _write_back(x, t)


def reducescatter(x: ArrayLike, op: str = "sum", *, name: str | None = None) -> ArrayLike:
    """Reduce across ranks and return this rank's slice of dim 0 (torch.tensor_split order)."""
    t, kind = _to_tensor(x, "x", "reducescatter")
    g = runtime.current().group
    return _back(g.run("reducescatter", lambda: C.reducescatter(g, t, op, name)), kind)


def alltoall(x: ArrayLike, splits: Sequence[int] | None = None, *, name: str | None = None,
             return_splits: bool = False) -> Any:
    """Send `splits[j]` rows of `x` to rank j (equal parts by default); return what arrived,
    ordered by source rank, and with `return_splits=True` also how many rows came from each."""
    t, kind = _to_tensor(x, "x", "alltoall")
    g = runtime.current().group
    out, recv = g.run("alltoall", lambda: C.alltoall(g, t, splits, name))
    result = _back(out, kind)
    return (result, recv) if return_splits else result


def barrier() -> None:
    """Block until every rank reaches the barrier."""
    g = runtime.current().group
    g.run("barrier", lambda: C.barrier(g))


def broadcast_object(obj: Any, root: int = 0) -> Any:
    """Root's picklable object on every rank."""
    rt = runtime.current()
    g = rt.group
    return g.run("broadcast_object", lambda: C.broadcast_object(g, obj, root, rt.object_key))


def allgather_object(obj: Any) -> list[Any]:
    """Every rank's picklable object, as a list in rank order."""
    rt = runtime.current()
    g = rt.group
    return g.run("allgather_object", lambda: C.allgather_object(g, obj, rt.object_key))
