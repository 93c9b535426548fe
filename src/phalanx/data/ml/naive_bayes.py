"""GaussianNB from allreduced per-class counts, sums and centred sums of squares (two passes, so
variances are as accurate as sklearn's); classes are the union of every rank's labels."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ConfigError
from ._common import allreduce_sum, check_fitted, global_classes, global_moments, local_Xy, local_xy


class GaussianNB:
    """Gaussian naive Bayes; `var_smoothing` adds that fraction of the largest feature variance
    to every variance, as sklearn does."""

    def __init__(self, *, priors: np.ndarray | None = None, var_smoothing: float = 1e-9) -> None:
        if not var_smoothing >= 0:
            raise ConfigError(f"var_smoothing={var_smoothing!r} must be >= 0")
        self.priors = priors
        self.var_smoothing = var_smoothing

    def fit(self, X: Any, y: Any = None) -> GaussianNB:
        X, y = local_Xy(X, y)
        self.classes_ = classes = global_classes(y)
        codes = np.searchsorted(classes, y)
        k, d = len(classes), X.shape[1]
        _, _, feature_var = global_moments(X)
        self.epsilon_ = float(self.var_smoothing * feature_var.max())
        sums = np.zeros((k, d))
        np.add.at(sums, codes, X)
        counts, sums = allreduce_sum(np.bincount(codes, minlength=k), sums)
        theta = sums / counts[:, None]
        sq = np.zeros((k, d))
        np.add.at(sq, codes, (X - theta[codes]) ** 2)
        (sq,) = allreduce_sum(sq)
        self.theta_ = theta
        self.var_ = sq / counts[:, None] + self.epsilon_
        self.class_count_ = counts
        if self.priors is not None:
            priors = np.asarray(self.priors, dtype=np.float64)
            if priors.shape != (k,) or (priors < 0).any() or not np.isclose(priors.sum(), 1.0):
                raise ConfigError(f"priors={self.priors!r} must be {k} non-negative numbers "
                                  f"summing to 1, one per class {classes.tolist()}")
            self.class_prior_ = priors
        else:
            self.class_prior_ = counts / counts.sum()
        self.n_features_in_ = d
        return self

    def _joint_log_likelihood(self, X: np.ndarray) -> np.ndarray:
        log_prior = np.log(self.class_prior_)
        norm = -0.5 * np.log(2.0 * np.pi * self.var_).sum(axis=1)
        quad = -0.5 * (((X[:, None, :] - self.theta_[None]) ** 2) / self.var_[None]).sum(axis=2)
        return log_prior + norm + quad

    def predict_log_proba(self, X: Any) -> np.ndarray:
        check_fitted(self, "theta_")
        X, _ = local_xy(X, need_y=False)
        jll = self._joint_log_likelihood(X)
        top = jll.max(axis=1, keepdims=True)
        return jll - (top + np.log(np.exp(jll - top).sum(axis=1, keepdims=True)))

    def predict_proba(self, X: Any) -> np.ndarray:
        return np.exp(self.predict_log_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        check_fitted(self, "theta_")
        X, _ = local_xy(X, need_y=False)
        return self.classes_[self._joint_log_likelihood(X).argmax(axis=1)]

    def score(self, X: Any, y: Any = None) -> float:
        """Accuracy over every rank's shard."""
        X, y = local_Xy(X, y)
        hits, n = allreduce_sum(float((self.predict(X) == y).sum()), len(X))
        return float(hits / n)
