"""Reduction ops, dtype tables and collective signatures (for CollectiveMismatch checks).

These tables are the one vocabulary of `phalanx.comm`: the Gloo path, the shared-memory engine
and the mismatch messages all name ops, dtypes and collectives by their index here.

A signature is a fixed-length tuple of ints every rank computes for the collective it is about
to run; ranks exchange signatures and any difference becomes a CollectiveMismatch that names
the op, the ranks and what differed.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..errors import ConfigError

from .names import COLLECTIVES as COLLECTIVES
from .names import REDUCE_OPS as REDUCE_OPS

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)

# Gloo reduces these natively; others are widened or fall back to allgather + local reduce.
GLOO_NATIVE = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16,
                         torch.int8, torch.uint8, torch.int32, torch.int64})

GLOO_REDUCE = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
               "max": dist.ReduceOp.MAX, "prod": dist.ReduceOp.PRODUCT}

# Collectives whose tensors may differ in dim 0 between ranks: their signatures carry dim 0 in
# the last slot, which no comparison looks at (it is 0 for every other collective).
DIM0_FREE = frozenset({"allgather", "alltoall"})

# Index of each name in the tables above (dict lookups keep the per-op cost down).
OP_INDEX = {op: i for i, op in enumerate(REDUCE_OPS)}
DTYPE_INDEX = {dt: i for i, dt in enumerate(DTYPES)}
COLLECTIVE_INDEX = {kind: i for i, kind in enumerate(COLLECTIVES)}

_VALID = frozenset((op, dt) for op in REDUCE_OPS for dt in DTYPES
                   if not (op == "avg" and not (dt.is_floating_point or dt.is_complex))
                   and not (op in ("min", "max") and dt.is_complex))

_MAX_DIMS = 5


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a dtype, e.g. ``float32``."""
    return str(dtype).replace("torch.", "")


def check_op(op: str, dtype: torch.dtype) -> None:
    """Reject an op the dtype cannot do, naming both and suggesting a fix (ConfigError)."""
    if (op, dtype) in _VALID:
        return
    if op not in REDUCE_OPS:
        raise ConfigError(f"op={op!r} is not a reduction; choose one of {REDUCE_OPS}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype} is not supported by phalanx collectives; "
                          f"cast to one of {[str(d) for d in DTYPES]}")
    if op == "avg" and not (dtype.is_floating_point or dtype.is_complex):
        raise ConfigError(f"op='avg' needs a floating or complex tensor, got {dtype}; "
                          "use op='sum' and divide, or cast to float")
    if op in ("min", "max") and dtype.is_complex:
        raise ConfigError(f"op={op!r} is undefined for complex dtype {dtype}; "
                          "reduce the real and imaginary parts separately")


def _hash(text: str) -> int:
    return zlib.crc32(text.encode())


def signature(kind: str, *, op: str = "", dtype: torch.dtype | None = None,
              shape: Sequence[int] = (), root: int = -1,
              name: str | None = None) -> tuple[int, ...]:
    """Fixed-length int tuple describing a collective call (dims past 5 are hashed)."""
    skip_dim0 = kind in DIM0_FREE
    dims = list(shape)
    shown = dims[1:] if skip_dim0 else dims
    head = [COLLECTIVE_INDEX[kind], OP_INDEX[op] if op else -1,
            DTYPE_INDEX[dtype] if dtype is not None else -1, root, len(dims),
            _hash(name or "")]
    body = (shown + [-1] * _MAX_DIMS)[:_MAX_DIMS]
    rest = _hash(repr(shown[_MAX_DIMS:])) if len(shown) > _MAX_DIMS else 0
    # The last slot carries dim 0 when ranks may differ there (it is not compared then).
    aux = dims[0] if skip_dim0 and dims else 0
    return tuple(head + body + [rest, aux])


def describe(sig: Sequence[int]) -> str:
    """Human form of a signature, e.g. ``allreduce(op='sum', dtype=float32, shape=(4, 3))``."""
    kind = COLLECTIVES[sig[0]] if 0 <= sig[0] < len(COLLECTIVES) else f"op#{sig[0]}"
    skip_dim0 = kind in DIM0_FREE
    parts = []
    if sig[1] >= 0:
        parts.append(f"op={REDUCE_OPS[sig[1]]!r}")
    if sig[2] >= 0:
        parts.append(f"dtype={dtype_name(DTYPES[sig[2]])}")
    ndim = sig[4]
    if ndim > 0 or sig[2] >= 0:
        dims = [d for d in sig[6:6 + _MAX_DIMS] if d >= 0]
        shape = ("(*, " + ", ".join(map(str, dims)) + ")") if skip_dim0 else repr(tuple(dims))
        if ndim > _MAX_DIMS + (1 if skip_dim0 else 0):
            shape = shape[:-1] + ", ...)"
        parts.append(f"shape={shape}")
    if sig[3] >= 0:
        parts.append(f"root={sig[3]}")
    if sig[5]:
        parts.append(f"name#{sig[5]:08x}")
    return f"{kind}({', '.join(parts)})"


def mismatch_message(sigs: Sequence[Sequence[int]],
                     ranks: Sequence[int] | None = None) -> str | None:
    """None if all ranks agree, else a message naming each group of ranks and what differed.

    `sigs[i]` is the signature of rank `ranks[i]` (of rank i when `ranks` is None). The same
    signatures give the same text on every rank and every path (Gloo or shared memory).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, s in zip(range(len(sigs)) if ranks is None else ranks, sigs):
        groups.setdefault(tuple(s[:-1]), []).append(r)      # the last slot: see DIM0_FREE
    if len(groups) == 1:
        return None
    fields = ("collective", "reduce op", "dtype", "root", "rank of the shape", "name")
    first = list(groups)[0]
    differ = sorted({fields[i] if i < len(fields) else "shape"
                     for s in groups for i, (a, b) in enumerate(zip(s, first)) if a != b})
    calls = "; ".join(f"rank(s) {rs} called {describe(s)}" for s, rs in groups.items())
    kind = describe(first).split("(")[0]
    return (f"collective mismatch in {kind}: {calls}. Differs in: {', '.join(differ)}. Every "
            "rank must issue the same collectives in the same order with the same shapes, "
            "dtypes and names")
