"""Horovod's gradient compression objects: `Compression.none` and `Compression.fp16`.

`hvd.allreduce(..., compression=...)` calls `compress()` before the reduction and
`decompress()` after, so a user-defined `Compressor` subclass works there too.
`hvd.DistributedOptimizer` maps `none` and `fp16` onto phalanx's fused compressors (and
accepts phalanx's names "bf16", "1bit", "topk"); other compressors are refused there.
"""

from __future__ import annotations

from typing import Any

import torch


class Compressor:
    """Interface: `compress(t) -> (t', ctx)`; `decompress(t', ctx) -> t`."""

    phalanx_name: str | None = None
    """phalanx's name for this compression (what DistributedOptimizer uses), if it has one."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The tensor to send and what `decompress` needs to undo the change."""
        raise NotImplementedError

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Undo `compress` on the reduced tensor."""
        raise NotImplementedError


class NoneCompressor(Compressor):
    """Send tensors as they are (the default)."""

    phalanx_name = "none"

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor


class FP16Compressor(Compressor):
    """Send floating-point tensors as float16 and cast the result back; others unchanged."""

    phalanx_name = "fp16"

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if tensor.dtype.is_floating_point:
            return tensor.to(torch.float16), tensor.dtype
        return tensor, tensor.dtype

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        if isinstance(ctx, torch.dtype) and ctx.is_floating_point:
            return tensor.to(ctx)
        return tensor


class Compression:
    """The built-in compressors, as Horovod names them."""

    none = NoneCompressor
    """No compression (the default)."""

    fp16 = FP16Compressor
    """Floating-point tensors travel as float16 (half the bytes)."""
