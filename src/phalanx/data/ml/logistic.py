"""LogisticRegression by L-BFGS on allreduced loss and gradient.

Every rank runs the same scipy optimizer on identical allreduced values, so all ranks take the
same steps and evaluate the objective the same number of times (their collectives stay matched).
The objective is sklearn's: mean log-loss + ||w||^2 / (2 C n), intercept unpenalised; two classes
use the binomial loss, more use the full multinomial one (sklearn's lbfgs default).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ConfigError
from ._common import allreduce_sum, check_fitted, global_classes, local_Xy, local_xy


class LogisticRegression:
    """L2-regularised logistic regression; fit, predict and score take this rank's shard."""

    def __init__(self, *, C: float = 1.0, fit_intercept: bool = True, max_iter: int = 100,
                 tol: float = 1e-4) -> None:
        if not C > 0:
            raise ConfigError(f"C={C!r} must be > 0 (the inverse of the L2 strength)")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ConfigError(f"max_iter={max_iter!r} must be a positive integer")
        self.C, self.fit_intercept, self.max_iter, self.tol = float(C), fit_intercept, max_iter, tol

    def fit(self, X: Any, y: Any = None) -> LogisticRegression:
        import scipy.optimize

        X, y = local_Xy(X, y)
        self.classes_ = classes = global_classes(y)
        k = len(classes)
        if k < 2:
            raise ConfigError(f"y holds one class {classes.tolist()} over all ranks; "
                              "LogisticRegression needs at least two")
        codes = np.searchsorted(classes, y)
        d = X.shape[1]
        (count,) = allreduce_sum(len(X))
        n = float(count)
        rows = 1 if k == 2 else k
        Xb = np.hstack([X, np.ones((len(X), 1))]) if self.fit_intercept else X
        width = Xb.shape[1]
        penal = np.ones((rows, width))
        if self.fit_intercept:
            penal[:, -1] = 0.0
        strength = 1.0 / (self.C * n)
        onehot = np.eye(k)[codes] if k > 2 else None

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            W = w.reshape(rows, width)
            Z = Xb @ W.T
            if k == 2:
                z, t = Z[:, 0], (codes == 1).astype(np.float64)
                loss = np.logaddexp(0.0, z) - t * z
                resid = (0.5 * (1.0 + np.tanh(0.5 * z)) - t)[:, None]  # stable sigmoid
            else:
                zmax = Z.max(axis=1, keepdims=True)
                lse = zmax[:, 0] + np.log(np.exp(Z - zmax).sum(axis=1))
                loss = lse - Z[np.arange(len(Z)), codes]
                resid = np.exp(Z - lse[:, None]) - onehot
            total, grad = allreduce_sum(loss.sum(), resid.T @ Xb)
            Wp = W * penal
            value = float(total) / n + 0.5 * strength * float((Wp * W).sum())
            return value, (grad / n + strength * Wp).ravel()

        result = scipy.optimize.minimize(
            objective, np.zeros(rows * width), method="L-BFGS-B", jac=True,
            options={"maxiter": self.max_iter, "maxls": 50, "gtol": self.tol,
                     "ftol": 64 * np.finfo(float).eps})
        W = result.x.reshape(rows, width)
        self.coef_ = W[:, :d].copy()
        self.intercept_ = W[:, d].copy() if self.fit_intercept else np.zeros(rows)
        self.n_iter_ = np.array([result.nit])
        self.n_features_in_ = d
        self.converged_ = bool(result.success)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        check_fitted(self, "coef_")
        X, _ = local_xy(X, need_y=False)
        Z = X @ self.coef_.T + self.intercept_
        return Z[:, 0] if Z.shape[1] == 1 else Z

    def predict_proba(self, X: Any) -> np.ndarray:
        Z = self.decision_function(X)
        if Z.ndim == 1:
            p = 0.5 * (1.0 + np.tanh(0.5 * Z))
            return np.column_stack([1 - p, p])
        Z = Z - Z.max(axis=1, keepdims=True)
        E = np.exp(Z)
        return E / E.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        Z = self.decision_function(X)
        idx = (Z > 0).astype(int) if Z.ndim == 1 else Z.argmax(axis=1)
        return self.classes_[idx]

    def score(self, X: Any, y: Any = None) -> float:
        """Accuracy over every rank's shard."""
        X, y = local_Xy(X, y)
        hits, n = allreduce_sum(float((self.predict(X) == y).sum()), len(X))
        return float(hits / n)
