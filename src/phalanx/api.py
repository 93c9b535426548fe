"""The public collective API on torch tensors, numpy arrays and Python scalars.

Each function returns the caller's type: a numpy array in, a numpy array out. Every
collective takes `group=` (a `px.new_group` subgroup; None: the whole job). In-place forms
(trailing underscore) write into the given tensor or array and return it. Python ints are
reduced exactly: a sum or product past int64 raises instead of wrapping as tensors do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from . import runtime
from .comm import collectives as C
from .comm.group import Group
from .comm.work import Handle
from .errors import ConfigError
from .subgroups import Subgroup, resolve, root_in

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


def cross_rank() -> int:
    """This worker's host among the hosts with a worker of its local rank (as in Horovod)."""
    return runtime.current().group.place.cross_rank


def cross_size() -> int:
    """Number of hosts with a worker of this worker's local rank (as in Horovod)."""
    return runtime.current().group.place.cross_size


def generation() -> int:
    """Membership generation; changes whenever the set of workers changes."""
    return runtime.current().group.place.generation


_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def _scalar_kind(x: Any) -> str | None:
    for kind in (bool, int, float, complex):        # bool first: it is an int too
        if isinstance(x, kind):
            return kind.__name__
    return None


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
    kind = _scalar_kind(x)
    if kind is None:
        raise ConfigError(f"{op}: {arg} must be a torch.Tensor, numpy.ndarray or number, "
                          f"got {type(x).__name__}")
    if kind == "int" and not _I64_MIN <= x <= _I64_MAX:
        raise ConfigError(f"{op}: {arg}={x} does not fit in int64 (-2**63 .. 2**63-1), the "
                          "widest integer collectives carry; pass float(x) or smaller numbers")
    # Python floats and complexes are double precision: reduce them as numpy would.
    return torch.tensor(x, dtype=_SCALAR_DTYPES.get(kind)), kind


_SCALAR_DTYPES = {"float": torch.float64, "complex": torch.complex128, "int": torch.int64}


def _allreduce_int(g: Group, x: int, op: str, name: str | None) -> int:
    """Reduce a Python int exactly: a sum or product outside int64 raises, never wraps."""
    if op == "sum":
        # Ranks sum the high and low 32-bit halves apart: neither sum can wrap (below 2**31
        # ranks), so the total is exact and can be checked.
        parts = torch.tensor([x >> 32, x & 0xFFFF_FFFF], dtype=torch.int64)
        C.allreduce_(g, parts, "sum", name)
        hi, lo = parts.tolist()
        total = (hi << 32) + lo
        shown = str(total)
    elif op == "prod":
        # The int64 product is exact modulo 2**64; the float64 product is within a tiny
        # relative error, which picks the one candidate it can be (or proves overflow).
        wrapped = torch.tensor([x], dtype=torch.int64)
        approx = torch.tensor([float(x)], dtype=torch.float64)
        C.allreduce_(g, wrapped, "prod", name)
        C.allreduce_(g, approx, "prod", name)
        w, est = int(wrapped.item()), float(approx.item())
        shown = f"about {est:.4g}"
        if math.isnan(est):                 # 0 * inf: one factor is 0, and so is the product
            total = w
        elif math.isinf(est) or abs(est) >= 2.0 ** 64:
            total = _I64_MAX + 1
        else:
            total = w + round((est - w) / 2.0 ** 64) * (1 << 64)
    else:
        t = torch.tensor(x)
        C.allreduce_(g, t, op, name)
        return int(t.item())
    if not _I64_MIN <= total <= _I64_MAX:
        raise ConfigError(f"allreduce(op={op!r}) of Python ints: the result ({shown}) does not "
                          "fit in int64; pass floats to reduce in float64, or reduce an int64 "
                          "tensor or array to wrap around instead")
    return total


def _info(g: Group, t: torch.Tensor, name: str | None) -> dict[str, Any] | None:
    """Name, bytes and dtype of a collective, when the timeline is on."""
    rec = g.recorder
    if rec is None or not rec.tracing:
        return None
    return {"name": name, "bytes": t.numel() * t.element_size(), "dtype": str(t.dtype)[6:]}


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


def allreduce(x: ArrayLike, op: str = "sum", *, name: str | None = None,
              group: Subgroup | None = None) -> ArrayLike:
    """Reduce `x` across ranks (op: sum, avg, min, max, prod); `x` is left unchanged.

    A Python int is reduced exactly: a sum or product outside int64 raises ConfigError
    (tensors and arrays wrap around, as torch and numpy do).
    """
    t, kind = _to_tensor(x, "x", "allreduce")
    g = resolve(group, "allreduce")
    if kind == "int":
        exact = g.run("allreduce", lambda: _allreduce_int(g, int(x), op, name))  # type: ignore[call-overload]
        return exact  # type: ignore[return-value]
    t = t.clone()
    done = g.run("allreduce", lambda: C.allreduce_(g, t, op, name), _info(g, t, name))
    return _back(done, kind)


def allreduce_(x: ArrayLike, op: str = "sum", *, name: str | None = None,
               group: Subgroup | None = None) -> ArrayLike:
    """Reduce a tensor or array in place across ranks and return it."""
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise ConfigError(f"allreduce_: x must be a tensor or array to reduce in place, "
                          f"got {type(x).__name__}; use allreduce() for scalars")
    t, kind = _to_tensor(x, "x", "allreduce_")
    g = resolve(group, "allreduce_")
    g.run("allreduce", lambda: C.allreduce_(g, t, op, name), _info(g, t, name))
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


def allreduce_async(x: ArrayLike, op: str = "sum", *, name: str | None = None,
                    group: Subgroup | None = None) -> Handle[Any]:
    """Start an allreduce of a copy of `x`; `handle.wait()` returns the result."""
    t, kind = _to_tensor(x, "x", "allreduce_async")
    g = resolve(group, "allreduce_async")
    if kind == "int":
        value = int(x)  # type: ignore[call-overload]
        return g.submit("allreduce", lambda: _allreduce_int(g, value, op, name))
    t = t.clone()
    inner = g.submit("allreduce", lambda: C.allreduce_(g, t, op, name), _info(g, t, name))
    return _Converted(inner, lambda r: _back(r, kind))


def allreduce_async_(t: torch.Tensor, op: str = "sum", *, name: str | None = None,
                     group: Subgroup | None = None) -> Handle[torch.Tensor]:
    """Start an in-place allreduce of a contiguous tensor; `handle.wait()` returns it."""
    if not isinstance(t, torch.Tensor) or not t.is_contiguous():
        raise ConfigError("allreduce_async_: t must be a contiguous torch.Tensor; "
                          "call .contiguous() first or use allreduce_async()")
    g = resolve(group, "allreduce_async_")
    return g.submit("allreduce", lambda: C.allreduce_(g, t, op, name), _info(g, t, name))


def allgather(x: ArrayLike, *, name: str | None = None,
              group: Subgroup | None = None) -> ArrayLike:
    """Concatenate every rank's `x` along dim 0 (first dims may differ between ranks)."""
    t, kind = _to_tensor(x, "x", "allgather")
    g = resolve(group, "allgather")
    out = g.run("allgather", lambda: C.allgather(g, t, name), _info(g, t, name))
    return _back(out, "torch" if kind not in ("torch", "numpy") else kind)


def allgather_async(x: torch.Tensor, *, name: str | None = None,
                    group: Subgroup | None = None) -> Handle[torch.Tensor]:
    """Start an allgather; `handle.wait()` returns the concatenated tensor."""
    t, _ = _to_tensor(x, "x", "allgather_async")
    g = resolve(group, "allgather_async")
    return g.submit("allgather", lambda: C.allgather(g, t, name), _info(g, t, name))


def broadcast(x: ArrayLike, root: int = 0, *, name: str | None = None,
              group: Subgroup | None = None) -> ArrayLike:
    """Root's `x` on every rank, as a new tensor or array."""
    t, kind = _to_tensor(x, "x", "broadcast")
    t = t.clone()
    g = resolve(group, "broadcast")
    at = root_in(group, root, "broadcast")
    out = g.run("broadcast", lambda: C.broadcast_(g, t, at, name), _info(g, t, name))
    return _back(out, kind)


def broadcast_(x: ArrayLike, root: int = 0, *, name: str | None = None,
               group: Subgroup | None = None) -> ArrayLike:
    """Overwrite `x` with root's values on every rank and return it."""
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise ConfigError(f"broadcast_: x must be a tensor or array, got {type(x).__name__}")
    t, _ = _to_tensor(x, "x", "broadcast_")
    g = resolve(group, "broadcast_")
    at = root_in(group, root, "broadcast_")
    g.run("broadcast", lambda: C.broadcast_(g, t, at, name), _info(g, t, name))
    return _write_back(x, t)


def reducescatter(x: ArrayLike, op: str = "sum", *, name: str | None = None,
                  group: Subgroup | None = None) -> ArrayLike:
    """Reduce across ranks and return this rank's slice of dim 0 (torch.tensor_split order)."""
    t, kind = _to_tensor(x, "x", "reducescatter")
    g = resolve(group, "reducescatter")
    out = g.run("reducescatter", lambda: C.reducescatter(g, t, op, name), _info(g, t, name))
    return _back(out, kind)


def alltoall(x: ArrayLike, splits: Sequence[int] | None = None, *, name: str | None = None,
             return_splits: bool = False, group: Subgroup | None = None) -> Any:
    """Send `splits[j]` rows of `x` to rank j (equal parts by default); return what arrived,
    ordered by source rank, and with `return_splits=True` also how many rows came from each."""
    t, kind = _to_tensor(x, "x", "alltoall")
    g = resolve(group, "alltoall")
    out, recv = g.run("alltoall", lambda: C.alltoall(g, t, splits, name), _info(g, t, name))
    result = _back(out, kind)
    return (result, recv) if return_splits else result


def barrier(*, group: Subgroup | None = None) -> None:
    """Block until every rank reaches the barrier."""
    g = resolve(group, "barrier")
    g.run("barrier", lambda: C.barrier(g))


def broadcast_object(obj: Any, root: int = 0, *, group: Subgroup | None = None) -> Any:
    """Root's picklable object on every rank."""
    rt = runtime.current()
    g = resolve(group, "broadcast_object")
    at = root_in(group, root, "broadcast_object")
    return g.run("broadcast_object", lambda: C.broadcast_object(g, obj, at, rt.object_key))


def allgather_object(obj: Any, *, group: Subgroup | None = None) -> list[Any]:
    """Every rank's picklable object, as a list in rank order."""
    rt = runtime.current()
    g = resolve(group, "allgather_object")
    return g.run("allgather_object", lambda: C.allgather_object(g, obj, rt.object_key))


def metrics() -> dict[str, Any]:
    """This worker's step metrics: `steps` recorded, the `last` step's phases and their `mean`
    (`step_s` = `forward_backward_s` + `sync_s` + `optimizer_s` + `boundary_s`; `reduce_s` is
    collective time, overlapping compute), `steps_per_s`, `recoveries` and `comm_busy_s`.
    Steps are recorded by DistributedOptimizer."""
    return runtime.current().recorder.summary()
