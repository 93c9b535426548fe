"""How Horovod's reductions map onto phalanx: op resolution, pre/postscaling and Adasum.

Scaling follows Horovod's CPU (Gloo) path: `prescale_factor` multiplies each rank's tensor
before the reduction and `postscale_factor` the result after it, in the tensor's own dtype
(float32 arithmetic for float32, float16 and bfloat16; float64 for float64). Integer tensors
are multiplied in float64 and truncated toward zero. `Average` is a sum whose postscale factor
is divided by the number of ranks, so averaging an int tensor truncates (7 summed over 2 ranks
averages to 3), as in Horovod.

Adasum (power-of-two rank counts, floating dtypes) combines the ranks' tensors pairwise in
Horovod's recursive-doubling order, (0,1), (2,3), then the pairs' results, with dot products
and norms in float64. phalanx gathers every rank's tensor to do so: n times the memory of the
tensor, fine for what Adasum is used for, not for huge buffers.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import torch

from .basics import OP_NAMES, Adasum, Average, Max, Min, Product, Sum
from .handles import Chain, Done, Waitable

_PX_OP = {Average: "sum", Sum: "sum", Min: "min", Max: "max", Product: "prod"}
_SQRT_DBL_MIN = math.sqrt(sys.float_info.min)
_OPS_TEXT = "hvd.Average, hvd.Sum, hvd.Adasum, hvd.Min, hvd.Max or hvd.Product"


def check_op(op: Any, what: str) -> int:
    """`op` as one of Horovod's op values, or ValueError naming it."""
    if isinstance(op, bool) or not isinstance(op, int) or op not in OP_NAMES:
        raise ValueError(f"{what}: op={op!r} is not a reduction op; use {_OPS_TEXT}")
    return int(op)


def resolve_op(op: Any, average: bool | None, what: str) -> int:
    """Horovod's rule: `op` wins, `average` is its deprecated spelling, both is an error."""
    if op is not None:
        if average is not None:
            raise ValueError(f"{what}: pass op= or the deprecated average=, not both (got "
                             f"op={op!r}, average={average!r}); use op=hvd.Average or hvd.Sum")
        return check_op(op, what)
    if average is not None:
        warnings.warn(f"{what}: average= is deprecated; use op=hvd.Average or op=hvd.Sum",
                      DeprecationWarning, stacklevel=3)
        return Average if average else Sum
    return Average


def check_factor(value: Any, arg: str, what: str) -> float:
    """A pre/postscale factor as a float, or ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}: {arg}={value!r} must be a number, e.g. 1.0")
    return float(value)


def scale_(t: torch.Tensor, factor: float) -> None:
    """Multiply `t` (plain data, no autograd) by `factor` in place, as Horovod's CPU path does."""
    if factor == 1.0:
        return
    dt = t.dtype
    if dt in (torch.float64, torch.complex128):
        t.mul_(factor)
    elif dt in (torch.float32, torch.complex64):
        t.mul_(torch.tensor(factor, dtype=torch.float32))
    elif dt in (torch.float16, torch.bfloat16):
        t.copy_(t.float().mul_(torch.tensor(factor, dtype=torch.float32)))
    elif dt == torch.bool:
        raise ValueError(f"cannot scale a bool tensor by {factor}; pass prescale_factor=1.0 "
                         "and postscale_factor=1.0 (and op=hvd.Sum) for bool tensors")
    else:
        t.copy_(t.double().mul_(factor).trunc_())


def post_factor(op: int, postscale: float, size: int) -> float:
    """The factor applied after the reduction (Average folds 1/size into it)."""
    return postscale / size if op == Average else postscale


def start_allreduce_(buf: torch.Tensor, op: int, pre: float, post: float,
                     name: str | None, comm: Any = None) -> Waitable:
    """Start reducing contiguous `buf` in place over `comm` (a `process_sets.check` result;
    None: the whole job); waiting returns `buf`."""
    px = comm if comm is not None else _job()
    data = buf.detach()
    if op == Adasum:
        adasum_(data, pre, post, name, px)
        return Done(buf)
    scale_(data, pre)
    factor = post_factor(op, post, px.size())
    inner = px.allreduce_async_(data, op=_PX_OP[op], name=name)

    def finish(_: list[Any]) -> torch.Tensor:
        scale_(data, factor)
        return buf

    return Chain([inner], finish)


def start_grouped_(bufs: list[torch.Tensor], op: int, pre: float, post: float,
                   name: str | None, comm: Any = None) -> Waitable:
    """Start reducing contiguous `bufs` in place over `comm`, fused into one buffer per dtype
    and device; waiting returns `bufs`."""
    px = comm if comm is not None else _job()
    if op == Adasum:
        adasum_many_([b.detach() for b in bufs], pre, post, name, px)
        return Done(bufs)
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for b in bufs:
        groups.setdefault((b.dtype, b.device), []).append(b.detach())
    factor = post_factor(op, post, px.size())
    flats, inner = [], []
    for k, members in enumerate(groups.values()):
        flat = torch.cat([m.reshape(-1) for m in members])
        scale_(flat, pre)
        flats.append((flat, members))
        inner.append(px.allreduce_async_(flat, op=_PX_OP[op], name=f"{name}.{k}" if name else None))

    def finish(_: list[Any]) -> list[torch.Tensor]:
        for flat, members in flats:
            scale_(flat, factor)
            off = 0
            for m in members:
                m.copy_(flat[off:off + m.numel()].view_as(m))
                off += m.numel()
        return bufs

    return Chain(inner, finish)


def _job() -> Any:
    import phalanx as px
    return px


def check_adasum(n: int, dtypes: list[torch.dtype], what: str) -> None:
    """Horovod's Adasum preconditions: a power-of-two number of ranks, floating tensors."""
    if n & (n - 1):
        raise NotImplementedError(f"{what}(op=hvd.Adasum) needs a power-of-two number of ranks "
                                  f"(as in Horovod), got {n}; use op=hvd.Average")
    for dt in dtypes:
        if dt not in (torch.float16, torch.float32, torch.float64):
            raise ValueError(f"{what}(op=hvd.Adasum) needs float16/32/64 tensors, got {dt}; "
                             "cast it or use op=hvd.Sum")


def adasum_(data: torch.Tensor, pre: float, post: float, name: str | None, px: Any) -> None:
    """Adasum-reduce `data` in place over `px` (see the module docstring)."""
    adasum_many_([data], pre, post, name, px)


def adasum_many_(tensors: list[torch.Tensor], pre: float, post: float, name: str | None,
                 px: Any) -> None:
    """Adasum-reduce each of `tensors` in place over `px`, with one allgather per dtype: each
    tensor is combined on its own (its own dot products and norms), as Horovod does for the
    tensors of a fused buffer."""
    check_adasum(px.size(), [t.dtype for t in tensors], "allreduce")
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for k, members in enumerate(groups.values()):
        flat = torch.cat([m.detach().reshape(-1) for m in members])
        scale_(flat, pre)
        rows = px.allgather(flat.reshape(1, -1), name=f"{name}.{k}" if name else None)
        off = 0
        for m in members:
            seg = [rows[i, off:off + m.numel()] for i in range(rows.shape[0])]
            out = adasum_combine(seg)
            scale_(out, post)
            m.detach().copy_(out.view_as(m))
            off += m.numel()


def adasum_combine(vecs: list[torch.Tensor]) -> torch.Tensor:
    """Horovod's recursive pairwise Adasum of one tensor from each rank (rank order):
    (0,1), (2,3), ..., then the pairs' results, and so on."""
    while len(vecs) > 1:
        vecs = [_adasum_pair(vecs[i], vecs[i + 1]) for i in range(0, len(vecs), 2)]
    return vecs[0].clone()


def _adasum_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ad, bd = a.double(), b.double()
    dot = float((ad * bd).sum())
    anorm, bnorm = float((ad * ad).sum()), float((bd * bd).sum())
    acoeff = 1.0 - dot / anorm * 0.5 if anorm >= _SQRT_DBL_MIN else 1.0
    bcoeff = 1.0 - dot / bnorm * 0.5 if bnorm >= _SQRT_DBL_MIN else 1.0
    return (acoeff * ad + bcoeff * bd).to(a.dtype)
