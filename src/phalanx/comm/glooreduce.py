"""Allreduce of one CPU tensor over a Gloo process group, with phalanx's semantics for every dtype.

Shared by the flat path (the generation's process group) and the hierarchical path (a cross-host
group per local rank, `comm/hier.py`). Gloo lacks kernels for some dtypes and drops NaN in
min/max; this widens, falls back to allgather + local reduce, or reduces order-preserving integer
keys, so every path gives numpy's answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from . import ops

Wait = Callable[[Any], None]
"""Waits for one process-group Work (the Group's wait: turns transport errors into its own)."""

# Float dtype -> (same-width int dtype, mask flipping all but the sign bit) for `_minmax_keys_`.
_ORDER_KEYS: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.float32: (torch.int32, 0x7FFF_FFFF), torch.float64: (torch.int64, (1 << 63) - 1),
    torch.float16: (torch.int16, 0x7FFF), torch.bfloat16: (torch.int16, 0x7FFF)}


def local_reduce(stack: torch.Tensor, op: str) -> torch.Tensor:
    """Reduce dim 0 of `stack` with `op`, in its dtype (bool: or/and)."""
    if op in ("sum", "avg"):
        out = stack.sum(0, dtype=stack.dtype) if stack.dtype != torch.bool else stack.any(0)
        return out / stack.shape[0] if op == "avg" else out
    if op == "prod":
        return stack.prod(0, dtype=stack.dtype) if stack.dtype != torch.bool else stack.all(0)
    if stack.dtype == torch.bool:
        return stack.all(0) if op == "min" else stack.any(0)
    return stack.amin(0) if op == "min" else stack.amax(0)


def _minmax_keys_(wait: Wait, pg: Any, t: torch.Tensor, op: str) -> None:
    """Min/max of floats with NaN propagating (Gloo's kernels drop NaN).

    Reduces order-preserving integer keys instead: a float's bits as a signed int, with all but
    the sign bit flipped when negative, order like the floats; NaN gets the key that wins.
    """
    itype, mask = _ORDER_KEYS[t.dtype]
    bits = t.view(itype)
    if itype == torch.int16:
        bits = bits.to(torch.int32)         # Gloo has no int16 kernel; widening keeps order
    key = torch.where(bits < 0, bits ^ mask, bits)
    info = torch.iinfo(itype)
    key.masked_fill_(torch.isnan(t), info.max if op == "max" else info.min)
    wait(pg.allreduce([key], ops.GLOO_REDUCE[op]))
    bits = torch.where(key < 0, key ^ mask, key)   # the map is its own inverse
    t.copy_((bits.to(itype) if itype == torch.int16 else bits).view(t.dtype))


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def start_allreduce_(wait: Wait, pg: Any, size: int, t: torch.Tensor, op: str,
                     divide_by: int | None = None,
                     track: Callable[[Any], None] | None = None) -> Callable[[], None]:
    """Start `gloo_allreduce_` and return the function that finishes it.

    Dtypes and ops Gloo reduces natively run in the background (Gloo's own threads) until the
    returned function waits for them, so the caller can compute meanwhile; the rest run now.
    """
    if t.numel() and t.dtype in ops.GLOO_NATIVE and not (
            op in ("min", "max") and t.dtype in _ORDER_KEYS):
        work = pg.allreduce([t], ops.GLOO_REDUCE[op])
        if track is not None:
            track(work)             # it may still run if the caller gives up before finish()

        def finish() -> None:
            wait(work)
            if op == "avg":
                t.div_(divide_by or size)
        return finish
    gloo_allreduce_(wait, pg, size, t, op, divide_by)
    return lambda: None


def gloo_allreduce_(wait: Wait, pg: Any, size: int, t: torch.Tensor, op: str,
                    divide_by: int | None = None) -> None:
    """Reduce contiguous CPU tensor `t` in place over `pg` (`size` ranks) with `op`.

    'avg' divides by `divide_by` (default `size`): the hierarchical path averages over the whole
    job, not over the cross group that finishes the reduction.
    """
    if t.numel() == 0:
        return
    dtype = t.dtype
    if op in ("min", "max") and dtype in _ORDER_KEYS:
        _minmax_keys_(wait, pg, t, op)
        return
    if dtype in ops.GLOO_NATIVE:
        wait(pg.allreduce([t], ops.GLOO_REDUCE[op]))
    elif dtype == torch.int16:
        # Widening then truncating gives the same wrapped result as int16 arithmetic.
        wide = t.to(torch.int32)
        wait(pg.allreduce([wide], ops.GLOO_REDUCE[op]))
        t.copy_(wide.to(torch.int16))
    elif dtype == torch.bool:
        as_u8 = t.to(torch.uint8)
        red = dist.ReduceOp.MAX if op in ("sum", "avg", "max") else dist.ReduceOp.MIN
        wait(pg.allreduce([as_u8], red))
        t.copy_(as_u8.bool())
    elif dtype.is_complex and op in ("sum", "avg"):
        wait(pg.allreduce([torch.view_as_real(t)], dist.ReduceOp.SUM))
    else:
        gathered = torch.empty((size,) + tuple(t.shape), dtype=dtype)
        wait(pg._allgather_base(_as_bytes(gathered), _as_bytes(t)))
        t.copy_(local_reduce(gathered, "sum" if op == "avg" else op))
    if op == "avg":
        t.div_(divide_by or size)
