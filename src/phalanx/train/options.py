"""Checks of `DistributedOptimizer`'s arguments, each error naming the argument, its value and
a fix (kept apart so the optimizer's module holds only its mechanics)."""

from __future__ import annotations

from typing import Any

import torch

from ..comm.ops import REDUCE_OPS
from ..errors import ConfigError
from .compression import COMPRESSIONS

OPS = REDUCE_OPS
"""Valid values of `DistributedOptimizer(op=...)`."""


def check_options(optimizer: Any, *, op: str, compression: str, topk_ratio: float,
                  bucket_cap_mb: float, backward_passes_per_step: int,
                  comm_thread: bool | None, model: Any, named_parameters: Any) -> None:
    """Raise ConfigError for the first argument of DistributedOptimizer that is wrong."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer={type(optimizer).__name__} is not a "
                          "torch.optim.Optimizer; pass e.g. "
                          "torch.optim.SGD(model.parameters(), lr=0.1)")
    if op not in OPS:
        raise ConfigError(f"op={op!r} is not one of {OPS}; use 'avg' to average gradients")
    if compression not in COMPRESSIONS:
        raise ConfigError(f"compression={compression!r} is not one of {COMPRESSIONS}; "
                          "use 'none' for exact averaging or 'fp16' to halve traffic")
    if compression in ("1bit", "topk") and op not in ("avg", "sum"):
        raise ConfigError(f"compression={compression!r} supports op 'avg' or 'sum', got "
                          f"op={op!r}; use compression='none' with op={op!r}")
    if not 0 < topk_ratio <= 1:
        raise ConfigError(f"topk_ratio={topk_ratio!r} must be in (0, 1]; e.g. 0.01 keeps 1%")
    if not bucket_cap_mb > 0:
        raise ConfigError(f"bucket_cap_mb={bucket_cap_mb!r} must be > 0; the default is 25")
    if not (isinstance(backward_passes_per_step, int) and backward_passes_per_step >= 1):
        raise ConfigError(f"backward_passes_per_step={backward_passes_per_step!r} must be an "
                          "int >= 1; use 1 to reduce after every backward")
    if comm_thread not in (None, True, False):
        raise ConfigError(f"comm_thread={comm_thread!r} must be True, False or None (pick "
                          "by the cores this worker has)")
    if model is not None and named_parameters is not None:
        raise ConfigError("pass model= or named_parameters=, not both")
