"""Horovod's `SyncBatchNorm`: batch normalisation whose batch statistics are those of every
rank's batch together.

In training (and whenever `track_running_stats` is False) the forward pass combines each
rank's per-channel count, mean and sum of squared deviations (one allgather, combined in
float64 with Chan's parallel formula), normalises with the global mean and biased variance,
and updates the running statistics with the global mean and unbiased variance, so the result,
the running statistics and the input gradients are those of one BatchNorm over the
concatenated batch. Backward sums the per-channel sums of the output gradient and of the
gradient times the centred input over the ranks (one allreduce). The weight and bias gradients
stay local, as in Horovod: DistributedOptimizer averages them. In eval mode with running
statistics nothing is exchanged.

Differences from Horovod: CPU tensors work (Horovod's needs CUDA, whose fused kernels it
calls); the exchanges are phalanx collectives matched by order (every rank runs the same
layers in the same order, as a forward and backward pass does), not Horovod operations
negotiated by name, so they cost no negotiation round.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .basics import require_init


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the batch of every rank (for inputs of shape (N, C, ...))."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected at least 2D input (N, C, ...), got "
                             f"{input.dim()}D input of shape {tuple(input.shape)}")

    def _run_bn(self, input: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training or not self.track_running_stats, self.momentum,
                            self.eps)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.training and self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
        if not self.training and self.track_running_stats:
            return self._run_bn(input)
        require_init("SyncBatchNorm")
        import phalanx as px
        if px.size() == 1:
            return self._run_bn(input)
        return _SyncBatchNorm.apply(input, self.weight, self.bias, self.running_mean,
                                    self.running_var, self.eps, self._factor(), px)

    def _factor(self) -> float:
        """The running statistics' update factor (a cumulative average when momentum is None,
        as torch's BatchNorm)."""
        if self.momentum is not None:
            return float(self.momentum)
        tracked = int(self.num_batches_tracked) if self.num_batches_tracked is not None else 1
        return 1.0 / max(1, tracked)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *) as (C, N * prod(*)), in float64."""
    return x.transpose(0, 1).reshape(x.shape[1], -1).double()


def _shape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against (N, C, *)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, eps: float, factor: float,
                px: Any) -> torch.Tensor:
        flat = _channels_last(input.detach())
        n = flat.shape[1]
        mean = flat.mean(1) if n else torch.zeros(flat.shape[0], dtype=torch.float64)
        m2 = ((flat - mean[:, None]) ** 2).sum(1)
        row = torch.cat([torch.tensor([float(n)], dtype=torch.float64), mean, m2])
        rows = px.allgather(row.reshape(1, -1).to(input.device), name="sync_batch_norm.stats")
        rows = rows.double().cpu()
        c = flat.shape[0]
        counts, means, m2s = rows[:, 0], rows[:, 1:1 + c], rows[:, 1 + c:]
        total = float(counts.sum())
        if total <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel across all "
                             f"ranks when training, got {int(total)}")
        g_mean = (counts[:, None] * means).sum(0) / total
        g_m2 = (m2s + counts[:, None] * (means - g_mean) ** 2).sum(0)
        var = g_m2 / total
        invstd = 1.0 / torch.sqrt(var + eps)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - factor).add_(factor * g_mean.to(running_mean))
                running_var.mul_(1 - factor).add_(factor * (g_m2 / (total - 1)).to(running_var))
        dev, dt = input.device, input.dtype
        mean_t, invstd_t = g_mean.to(dev), invstd.to(dev)
        ctx.save_for_backward(input, weight, mean_t, invstd_t)
        ctx.total, ctx.px = total, px
        out = (input.double() - _shape(mean_t, input)) * _shape(invstd_t, input)
        if weight is not None:
            out = out * _shape(weight.double(), input)
        if bias is not None:
            out = out + _shape(bias.double(), input)
        return out.to(dt)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        input, weight, mean, invstd = ctx.saved_tensors
        dy = _channels_last(grad_output)
        xmu = _channels_last(input) - mean[:, None]
        sum_dy, sum_dy_xmu = dy.sum(1), (dy * xmu).sum(1)
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None else None
        grad_bias = sum_dy.to(weight.dtype) if weight is not None else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            both = ctx.px.allreduce(torch.cat([sum_dy, sum_dy_xmu]), op="sum",
                                    name="sync_batch_norm.grads")
            g_dy, g_dy_xmu = both.double().chunk(2)
            w = weight.double() if weight is not None else torch.ones_like(invstd)
            scale = _shape(w * invstd, input)
            grad_input = scale * (grad_output.double() - _shape(g_dy / ctx.total, input)
                                  - (input.double() - _shape(mean, input))
                                  * _shape(invstd * invstd * g_dy_xmu / ctx.total, input))
            grad_input = grad_input.to(input.dtype)
        if not ctx.needs_input_grad[1]:
            grad_weight = None
        if not ctx.needs_input_grad[2]:
            grad_bias = None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None
