"""PCA from the allreduced scatter matrix: one pass for the mean, one for sum (x-mean)(x-mean)^T,
then every rank eigendecomposes the same d x d matrix. Signs follow sklearn's svd_flip
(u_based_decision=False): the largest-magnitude entry of each component is positive."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ConfigError
from ._common import allreduce_sum, check_fitted, local_xy


class PCA:
    """Principal components of every rank's shard; `n_components` as in sklearn (int, a float
    in (0, 1) for the variance to keep, or None for all)."""

    def __init__(self, n_components: float | None = None, *, whiten: bool = False) -> None:
        self.n_components = n_components
        self.whiten = whiten

    def fit(self, X: Any, y: Any = None) -> PCA:
        X, _ = local_xy(X, need_y=False)
        count, s = allreduce_sum(len(X), X.sum(axis=0))
        n = float(count)
        if n < 2:
            raise ConfigError(f"PCA needs at least 2 samples over all ranks; got {int(n)}")
        mean = s / n
        Xc = X - mean
        (scatter,) = allreduce_sum(Xc.T @ Xc)
        evals, evecs = np.linalg.eigh(scatter)
        evals, evecs = np.maximum(evals[::-1], 0.0), evecs[:, ::-1]
        d = X.shape[1]
        rank_max = int(min(n, d))
        k = self._choose_k(evals, rank_max)
        components = evecs[:, :k].T
        signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
        components *= np.where(signs == 0, 1.0, signs)[:, None]
        var = evals / (n - 1)
        total = var.sum()
        self.mean_ = mean
        self.components_ = components
        self.explained_variance_ = var[:k]
        self.explained_variance_ratio_ = var[:k] / total if total > 0 else np.zeros(k)
        self.singular_values_ = np.sqrt(evals[:k])
        self.noise_variance_ = float(var[k:rank_max].mean()) if k < rank_max else 0.0
        self.n_components_ = k
        self.n_samples_ = int(n)
        self.n_features_in_ = d
        return self

    def _choose_k(self, evals: np.ndarray, rank_max: int) -> int:
        nc = self.n_components
        if nc is None:
            return rank_max
        if isinstance(nc, float) and 0 < nc < 1:
            ratio = np.cumsum(evals) / max(evals.sum(), np.finfo(float).tiny)
            return int(np.searchsorted(ratio, nc, side="right") + 1)
        if isinstance(nc, (int, np.integer)) and not isinstance(nc, bool) and 0 <= nc <= rank_max:
            return int(nc)
        raise ConfigError(f"n_components={nc!r} must be None, an int in 0..{rank_max} "
                          "(min(samples, features)) or a float in (0, 1)")

    def transform(self, X: Any) -> np.ndarray:
        check_fitted(self, "components_")
        X, _ = local_xy(X, need_y=False)
        Z = (X - self.mean_) @ self.components_.T
        return Z / np.sqrt(self.explained_variance_) if self.whiten else Z

    def fit_transform(self, X: Any, y: Any = None) -> np.ndarray:
        return self.fit(X).transform(X)

    def inverse_transform(self, Z: np.ndarray) -> np.ndarray:
        check_fitted(self, "components_")
        Z = np.asarray(Z, dtype=np.float64)
        if self.whiten:
            Z = Z * np.sqrt(self.explained_variance_)
        return Z @ self.components_ + self.mean_
