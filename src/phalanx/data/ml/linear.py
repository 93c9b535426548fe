"""LinearRegression (optionally ridge) from allreduced normal equations: each rank sums X^T X and
X^T y over its shard, one allreduce adds them up, and every rank solves the same small system."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ConfigError
from ._common import allreduce_sum, check_fitted, local_Xy, local_xy


class LinearRegression:
    """Least squares with an optional L2 penalty `alpha` (sklearn's Ridge objective; the intercept
    is not penalised). fit, predict and score take this rank's shard."""

    def __init__(self, *, fit_intercept: bool = True, alpha: float = 0.0) -> None:
        if not alpha >= 0:
            raise ConfigError(f"alpha={alpha!r} must be >= 0 (0 is ordinary least squares)")
        self.fit_intercept = fit_intercept
        self.alpha = float(alpha)

    def fit(self, X: Any, y: Any = None) -> LinearRegression:
        X, y = local_Xy(X, y)
        y = np.asarray(y, dtype=np.float64)
        Y = y.reshape(len(y), -1)
        d = X.shape[1]
        n, sx, sy = allreduce_sum(len(X), X.sum(axis=0), Y.sum(axis=0))
        if float(n) == 0:
            raise ConfigError("every rank's X is empty; there is nothing to fit")
        x_mean = sx / n if self.fit_intercept else np.zeros(d)
        y_mean = sy / n if self.fit_intercept else np.zeros(Y.shape[1])
        Xc, Yc = X - x_mean, Y - y_mean  # centring first keeps the Gram matrix well conditioned
        gram, xty = allreduce_sum(Xc.T @ Xc, Xc.T @ Yc)
        if self.alpha > 0:
            import scipy.linalg
            coef = scipy.linalg.solve(gram + self.alpha * np.eye(d), xty, assume_a="pos")
        else:
            coef = np.linalg.lstsq(gram, xty, rcond=None)[0]  # min-norm if rank deficient
        coef = coef.T
        intercept = y_mean - coef @ x_mean
        self.n_features_in_ = d
        self.n_samples_seen_ = int(n)
        self.coef_ = coef if y.ndim > 1 else coef[0]
        self.intercept_ = intercept if y.ndim > 1 else float(intercept[0])
        if not self.fit_intercept:
            self.intercept_ = np.zeros(Y.shape[1]) if y.ndim > 1 else 0.0
        return self

    def predict(self, X: Any) -> np.ndarray:
        check_fitted(self, "coef_")
        X, _ = local_xy(X, need_y=False)
        return X @ np.asarray(self.coef_).T + self.intercept_

    def score(self, X: Any, y: Any = None) -> float:
        """R^2 over every rank's shard (uniform average over outputs, like sklearn)."""
        X, y = local_Xy(X, y)
        Y = np.asarray(y, dtype=np.float64).reshape(len(X), -1)
        P = self.predict(X).reshape(len(X), -1)
        n, sy = allreduce_sum(len(Y), Y.sum(axis=0))
        ss_res, ss_tot = allreduce_sum(((Y - P) ** 2).sum(axis=0),
                                       ((Y - sy / n) ** 2).sum(axis=0))
        ok = ss_tot > 0
        r2 = np.where(ok, 1 - ss_res / np.where(ok, ss_tot, 1), np.where(ss_res == 0, 1.0, 0.0))
        return float(r2.mean())
