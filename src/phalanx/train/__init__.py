"""Data-parallel training: DistributedOptimizer (fusion, overlap, compression) and helpers."""

from __future__ import annotations

from .compression import COMPRESSIONS
from .helpers import broadcast_optimizer_state, broadcast_parameters, metric_average, shard_indices
from .optimizer import DistributedOptimizer
from .options import OPS

__all__ = ["COMPRESSIONS", "OPS", "DistributedOptimizer", "broadcast_optimizer_state",
           "broadcast_parameters", "metric_average", "shard_indices"]
