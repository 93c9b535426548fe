"""Gradient compression for fusion buckets: fp16/bf16 casts, 1-bit sign and top-k sparsification.

A compressor starts the reduction of one bucket and, on `wait()`, leaves the reduced gradients and
presence flags in the bucket's buffer. The lossy ones (1-bit, top-k) keep an error-feedback
residual per bucket on this rank, so what is dropped in one step is added back in the next
(Seide et al., "1-bit SGD", CNTK; Lin et al., "Deep Gradient Compression"). Their payloads are
allgathered and decoded identically on every rank, so every rank applies the same update.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from . import _comm
from .buckets import Bucket

COMPRESSIONS = ("none", "fp16", "bf16", "1bit", "topk")
"""Valid values of `DistributedOptimizer(compression=...)`."""

_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


class Pending(Protocol):
    """A bucket reduction in flight; `wait()` leaves the result in the bucket's buffer."""

    def wait(self) -> None: ...


class Compressor(Protocol):
    """Starts the (possibly compressed) reduction of one packed bucket."""

    group: Any
    """The subgroup to reduce among (None: the whole job)."""

    def start(self, bucket: Bucket, op: str) -> Pending: ...


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a flat bool tensor into uint8, most significant bit first (zero padded)."""
    n = bits.numel()
    b = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8, device=bits.device)
    b[:n] = bits
    return (b.view(-1, 8) << _SHIFTS.to(bits.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_bits` over the last dim: (..., ceil(n/8)) uint8 -> (..., n) bool."""
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.flatten(-2)[..., :n].bool()


class _Done:
    def __init__(self, handle: _comm.Handle, finish: object = None) -> None:
        self._handle, self._finish = handle, finish

    def wait(self) -> None:
        out = self._handle.wait()
        if self._finish is not None:
            self._finish(out)  # type: ignore[operator]


class _OnGroup:
    group: Any = None
    """The `px.new_group` subgroup to reduce among (None: the whole job), set by
    DistributedOptimizer."""

    inline: bool = False
    """Reduce on the calling thread instead of the comm thread (set by DistributedOptimizer,
    see its `comm_thread`)."""

    def _allreduce(self, t: torch.Tensor, op: str, name: str) -> _comm.Handle:
        if self.inline:
            return _comm.allreduce_now_(t, op=op, name=name, group=self.group)
        return _comm.allreduce_async_(t, op=op, name=name, group=self.group)


class NoCompression(_OnGroup):
    """Allreduce the bucket's flat buffer (gradients and presence flags) as it is."""

    def start(self, bucket: Bucket, op: str) -> Pending:
        assert bucket.buffer is not None
        name = f"grad.bucket{bucket.index}"
        return _Done(self._allreduce(bucket.buffer, op, name))


class CastCompression(_OnGroup):
    """Cast the bucket to a 16-bit float for the wire and back after (halves the bytes moved)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def start(self, bucket: Bucket, op: str) -> Pending:
        buf = bucket.buffer
        assert buf is not None
        if buf.dtype == self.dtype or not buf.is_floating_point():
            return _Done(self._allreduce(buf, op, f"grad.bucket{bucket.index}"))
        wire = buf.to(self.dtype)
        handle = self._allreduce(wire, op, f"grad.bucket{bucket.index}")
        return _Done(handle, lambda _: buf.copy_(wire))


class _ErrorFeedback(_OnGroup):
    """Per-bucket residuals: what compression dropped on this rank, added back next step."""

    def __init__(self) -> None:
        self.residuals: dict[int, torch.Tensor] = {}

    def corrected(self, bucket: Bucket, grads: torch.Tensor) -> torch.Tensor:
        """The gradients plus the residual carried from the last step, in float32 or wider."""
        dtype = torch.promote_types(grads.dtype, torch.float32)
        e = self.residuals.get(bucket.index)
        x = grads.to(dtype, copy=True)
        return x if e is None else x.add_(e)

    def keep(self, bucket: Bucket, residual: torch.Tensor) -> None:
        self.residuals[bucket.index] = residual


def _segments(bucket: Bucket, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([p.numel() for p in bucket.params], device=device)
    ids = torch.arange(len(bucket.params), device=device)
    return torch.repeat_interleave(ids, lengths), lengths


class OneBitCompression(_ErrorFeedback):
    """1-bit SGD: send sign bits plus one scale per parameter (mean |x|), with error feedback.

    Wire format per rank (uint8): scales as float32 bytes, presence flags, packed sign bits; an
    allgather moves it and every rank decodes all of them and averages (or sums)."""

    def start(self, bucket: Bucket, op: str) -> Pending:
        buf = bucket.buffer
        assert buf is not None
        grads, presence = buf[:bucket.numel], buf[bucket.numel:]
        m, n = len(bucket.params), bucket.numel
        x = self.corrected(bucket, grads)
        seg, lengths = _segments(bucket, x.device)
        scales = torch.zeros(m, dtype=torch.float32, device=x.device)
        scales.index_add_(0, seg, x.abs().float()).div_(lengths)
        bits = x >= 0
        sent = torch.where(bits, scales[seg].to(x.dtype), -scales[seg].to(x.dtype))
        self.keep(bucket, x.sub_(sent))
        payload = torch.cat([scales.view(torch.uint8), (presence > 0).to(torch.uint8),
                             pack_bits(bits)])
        handle = _comm.allgather_async(payload, group=self.group)

        def finish(gathered: torch.Tensor) -> None:
            rows = gathered.view(-1, payload.numel())
            world = rows.shape[0]
            all_scales = rows[:, :4 * m].reshape(-1).view(torch.float32).view(world, m)
            all_bits = unpack_bits(rows[:, 5 * m:], n)                          # (world, n)
            per_elem = all_scales[:, seg]
            total = torch.where(all_bits, per_elem, -per_elem).sum(0)
            pres = rows[:, 4 * m:5 * m].float().sum(0)
            if op == "avg":
                total.div_(world)
                pres.div_(world)
            grads.copy_(total)
            presence.copy_(pres)

        return _Done(handle, finish)


class TopKCompression(_ErrorFeedback):
    """Send the `ratio` largest-magnitude entries of each bucket (indices and values), with error
    feedback; wire format per rank (int32): indices, float32 values bit-cast, presence flags."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def start(self, bucket: Bucket, op: str) -> Pending:
        buf = bucket.buffer
        assert buf is not None
        grads, presence = buf[:bucket.numel], buf[bucket.numel:]
        n = bucket.numel
        k = max(1, min(n, math.ceil(self.ratio * n)))
        x = self.corrected(bucket, grads)
        idx = x.abs().topk(k, sorted=False).indices
        vals = x[idx].float()
        x[idx] = 0
        self.keep(bucket, x)
        payload = torch.cat([idx.to(torch.int32), vals.view(torch.int32),
                             (presence > 0).to(torch.int32)])
        handle = _comm.allgather_async(payload, group=self.group)

        def finish(gathered: torch.Tensor) -> None:
            rows = gathered.view(-1, payload.numel())
            world = rows.shape[0]
            all_idx = rows[:, :k].reshape(-1).long()
            all_vals = rows[:, k:2 * k].contiguous().view(torch.float32).reshape(-1)
            total = torch.zeros(n, dtype=torch.float32, device=grads.device)
            total.index_add_(0, all_idx, all_vals)
            pres = rows[:, 2 * k:].float().sum(0)
            if op == "avg":
                total.div_(world)
                pres.div_(world)
            grads.copy_(total)
            presence.copy_(pres)

        return _Done(handle, finish)


def make_compressor(compression: str, topk_ratio: float) -> Compressor:
    """The compressor for a `compression` name (validated by the caller)."""
    if compression == "fp16":
        return CastCompression(torch.float16)
    if compression == "bf16":
        return CastCompression(torch.bfloat16)
    if compression == "1bit":
        return OneBitCompression()
    if compression == "topk":
        return TopKCompression(topk_ratio)
    return NoCompression()
