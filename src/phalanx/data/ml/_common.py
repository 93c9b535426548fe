"""Shared plumbing of the summation-form estimators: local data, fused allreduce, classes."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ConfigError, PhalanxError
from .. import _collective
from ..dataset import SplitDataset, is_torch
from ..mapreduce import as_partitioned
from ..partition import PartitionedDataset


class NotFittedError(PhalanxError, AttributeError):
    """An estimator was used before `fit`."""


def _numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if is_torch(a) else np.asarray(a)


def local_xy(X: Any, y: Any = None, *, need_y: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """This rank's (X, y): numpy arrays as given, or fields 0 and 1 of a dataset's local splits."""
    if isinstance(X, (SplitDataset, PartitionedDataset)):
        fields = as_partitioned(X).local_arrays()
        if y is None and len(fields) > 1:
            y = fields[1]
        X = fields[0]
    X = _numpy(X).astype(np.float64, copy=False)
    if X.ndim == 1:
        X = X.reshape(-1, 1)
    if X.ndim != 2:
        raise ConfigError(f"X has shape {X.shape}; pass a 2-d array (samples, features)")
    if y is None:
        if need_y:
            raise ConfigError("y is None; pass this rank's targets, or a dataset whose second "
                              "field holds them")
        return X, None
    y = _numpy(y)
    if len(y) != len(X):
        raise ConfigError(f"X has {len(X)} rows but y has {len(y)}; they must match")
    return X, y


def local_Xy(X: Any, y: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """`local_xy` for estimators that need targets."""
    X, y = local_xy(X, y)
    if y is None:  # local_xy raised already; this narrows the type
        raise ConfigError("y is None; pass this rank's targets")
    return X, y


def allreduce_sum(*arrays: Any) -> list[np.ndarray]:
    """Sum float64 arrays over ranks in one collective (fusion), each keeping its shape."""
    parts = [np.asarray(a, dtype=np.float64) for a in arrays]
    flat = np.concatenate([p.ravel() for p in parts]) if parts else np.empty(0)
    flat = np.asarray(_collective.allreduce(flat, op="sum"), dtype=np.float64)
    out, offset = [], 0
    for p in parts:
        out.append(flat[offset:offset + p.size].reshape(p.shape))
        offset += p.size
    return out


def global_classes(y: np.ndarray) -> np.ndarray:
    """The sorted union of every rank's labels."""
    gathered = _collective.allgather_object(np.unique(y).tolist())
    merged = [label for labels in gathered for label in labels]
    if not merged:
        raise ConfigError("no rank holds any labels; every shard of y is empty")
    return np.unique(np.asarray(merged))


def global_moments(X: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(n, mean, variance per feature) over all ranks, with a second centred pass for accuracy."""
    count, s = allreduce_sum(len(X), X.sum(axis=0))
    n = float(count)
    if n == 0:
        raise ConfigError("every rank's X is empty; there is nothing to fit")
    mean = s / n
    (ss,) = allreduce_sum(((X - mean) ** 2).sum(axis=0))
    return n, mean, ss / n


def check_fitted(est: Any, attr: str) -> None:
    if not hasattr(est, attr):
        raise NotFittedError(f"this {type(est).__name__} is not fitted yet; call fit(X, y) first")
