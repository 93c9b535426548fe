"""How a DistributedOptimizer step tells a rank that called `hvd.join()` what to stand in for,
without stopping backward.

Every negotiation round starts with one allreduce (max) of a fixed-size int64 payload: words
0-3 hash the rank's queue (`negotiate.all_same`), word 4 is 0. Before its first reduction of a
step, the facade's optimizer queues the same allreduce asynchronously with word 4 set to 1 and
its bucket layout in the following words, and goes on with backward: with every rank working,
that costs one small collective on the comm thread. A joined rank negotiating at that moment
reads the layout from the result (the working ranks agree on it; a joined rank contributes
zeros) and reduces zero buckets of that layout (`joining.optimizer_step`). Layouts that do not
fit the payload, and compressions a joined rank cannot mirror, take a normal, synchronous
negotiation round instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

MAX_BUCKETS = 32
"""Largest bucket count the payload carries."""
LENGTH = 9 + 3 * MAX_BUCKETS
"""int64 words of every round's first allreduce."""
_OPS = ("avg", "sum", "min", "max", "prod")
_COMPRESSIONS = ("none", "fp16", "bf16")
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
           "uint8", "complex64", "complex128")
_DEVICES = ("cpu", "cuda")


def round_payload(a: int, b: int) -> torch.Tensor:
    """A normal round's payload: the queue digest (a, b), no announcement."""
    out = torch.zeros(LENGTH, dtype=torch.int64)
    out[:4] = torch.tensor([a, b, -a, -b])
    return out


def fits(buckets: Sequence[tuple[int, str, str]], op: str, compression: str) -> bool:
    """Whether a step with this layout can be announced asynchronously."""
    return (len(buckets) <= MAX_BUCKETS and op in _OPS and compression in _COMPRESSIONS
            and all(d in _DTYPES and dev in _DEVICES for _, d, dev in buckets))


def encode(buckets: Sequence[tuple[int, str, str]], op: str, compression: str,
           layout_check: bool) -> torch.Tensor:
    """The announcement of one optimizer step (check `fits` first). Words 0-3 stay neutral
    (0 and the smallest int64) so the announcement never changes another rank's digest test."""
    words = [0, 0, -(1 << 63), -(1 << 63), 1, len(buckets), _OPS.index(op),
             _COMPRESSIONS.index(compression), int(layout_check)]
    for numel, dtype, device in buckets:
        words += [numel, _DTYPES.index(dtype), _DEVICES.index(device)]
    out = torch.zeros(LENGTH, dtype=torch.int64)
    out[:len(words)] = torch.tensor(words, dtype=torch.int64)
    return out


def decode(top: list[int]) -> dict[str, Any] | None:
    """The announced step (the fields `joining.optimizer_step` takes), or None for a normal
    round."""
    if top[4] != 1:
        return None
    n = top[5]
    buckets = tuple((top[9 + 3 * i], _DTYPES[top[10 + 3 * i]], _DEVICES[top[11 + 3 * i]])
                    for i in range(n))
    return {"buckets": buckets, "op": _OPS[top[6]], "compression": _COMPRESSIONS[top[7]],
            "layout check": bool(top[8])}
