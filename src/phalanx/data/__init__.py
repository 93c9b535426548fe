"""phalanx.data: partitioned datasets, exactly-once elastic sampling, map_reduce, estimators.

Layering: `sharding` is pure math (rank and world size are arguments); everything that needs the
runtime's collectives goes through `_collective`, which imports phalanx only when called.
"""

from __future__ import annotations

from .dataset import ArrayDataset, FileDataset, SplitDataset
from .loader import ShardedLoader
from .mapreduce import aggregate, map_reduce
from .ml import PCA, GaussianNB, KMeans, LinearRegression, LogisticRegression
from .partition import CacheBudgetExceeded, PartitionedDataset
from .sharding import EpochCursor, assign_splits, assignment_table, epoch_order, reassign_lost

__all__ = [
    "PCA", "ArrayDataset", "CacheBudgetExceeded", "EpochCursor", "FileDataset", "GaussianNB",
    "KMeans", "LinearRegression", "LogisticRegression", "PartitionedDataset", "ShardedLoader",
    "SplitDataset", "aggregate", "assign_splits", "assignment_table", "epoch_order",
    "map_reduce", "reassign_lost",
]
