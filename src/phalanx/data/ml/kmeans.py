"""KMeans: k-means++ (or random) seeding computed identically on every rank, then Lloyd's
iterations with allreduced per-cluster sums and counts.

Seeding draws from one RNG seeded alike on every rank; a draw picks a global sample through the
allgathered per-rank weight totals, and the rank that holds it contributes the point to an
allreduce (zeros elsewhere), so every rank sees the same centres. Lloyd follows sklearn's
`_kmeans_single_lloyd` (strict or centre-shift convergence, final E-step) so that, from the same
centres, the result matches sklearn's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ConfigError
from .. import _collective
from ._common import allreduce_sum, check_fitted, global_moments, local_xy


def _sq_dist(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    d = (X * X).sum(axis=1)[:, None] - 2.0 * X @ centers.T + (centers * centers).sum(axis=1)
    return np.maximum(d, 0.0)


def _fetch_points(X: np.ndarray, owners: list[tuple[int, int]], dim: int) -> np.ndarray:
    """Rows named by (rank, local index) from whichever rank holds them, on every rank."""
    me = _collective.rank()
    out = np.zeros((len(owners), dim))
    for j, (r, i) in enumerate(owners):
        if r == me:
            out[j] = X[i]
    return allreduce_sum(out)[0]


def _locate(weights: np.ndarray, totals: list[float], u: float) -> tuple[int, int]:
    """The (rank, local index) where the cumulative weight of the rank-ordered concatenation of
    every rank's weights passes `u`; only the owning rank learns the index (-1 elsewhere)."""
    holders = [r for r, t in enumerate(totals) if t > 0]
    before = 0.0
    for r in holders:
        if u < before + totals[r] or r == holders[-1]:
            if r != _collective.rank():
                return r, -1
            i = np.searchsorted(np.cumsum(weights), u - before, side="right")
            return r, min(int(i), len(weights) - 1)
        before += totals[r]
    raise ConfigError("no rank holds a sample to pick a centre from")


def _pick(X: np.ndarray, weights: np.ndarray, us: np.ndarray) -> np.ndarray:
    """Draw len(us) samples with probability proportional to `weights`, over all ranks."""
    totals = [float(t) for t in _collective.allgather_object(float(weights.sum()))]
    if sum(totals) == 0:  # every sample sits on a centre already: any sample will do
        weights = np.ones(len(X))
        totals = [float(t) for t in _collective.allgather_object(float(len(X)))]
    owners = [_locate(weights, totals, float(u) * sum(totals)) for u in us]
    return _fetch_points(X, owners, X.shape[1])


def kmeans_plusplus(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ (sklearn's 2 + log k trials per centre) over all ranks' samples."""
    trials = 2 + int(np.log(k))
    # First centre: uniform over all samples (weights 1).
    centers = [_pick(X, np.ones(len(X)), rng.random(1))[0]]
    closest = _sq_dist(X, centers[0][None])[:, 0]
    for _ in range(1, k):
        cands = _pick(X, closest, rng.random(trials))
        dist = np.minimum(closest[:, None], _sq_dist(X, cands))
        (pots,) = allreduce_sum(dist.sum(axis=0))
        best = int(np.argmin(pots))
        centers.append(cands[best])
        closest = dist[:, best]
    return np.array(centers)


class KMeans:
    """Lloyd's k-means over every rank's shard; labels_ holds this rank's labels."""

    def __init__(self, n_clusters: int = 8, *, init: str | np.ndarray = "k-means++",
                 n_init: int | str = "auto", max_iter: int = 300, tol: float = 1e-4,
                 random_state: int | None = None) -> None:
        if not (isinstance(n_clusters, int) and n_clusters >= 1):
            raise ConfigError(f"n_clusters={n_clusters!r} must be a positive integer")
        if isinstance(init, str) and init not in ("k-means++", "random"):
            raise ConfigError(f"init={init!r} must be 'k-means++', 'random' or an array of "
                              "shape (n_clusters, n_features)")
        self.n_clusters, self.init, self.n_init = n_clusters, init, n_init
        self.max_iter, self.tol, self.random_state = max_iter, tol, random_state

    def fit(self, X: Any, y: Any = None) -> KMeans:
        X, _ = local_xy(X, need_y=False)
        n, _, var = global_moments(X)
        if n < self.n_clusters:
            raise ConfigError(f"n_clusters={self.n_clusters} exceeds the {int(n)} samples of "
                              "all ranks together")
        tol = float(var.mean() * self.tol)
        array_init = not isinstance(self.init, str)
        n_init = self.n_init
        if n_init == "auto":
            n_init = 10 if isinstance(self.init, str) and self.init == "random" else 1
        if not (isinstance(n_init, int) and n_init >= 1):
            raise ConfigError(f"n_init={self.n_init!r} must be a positive integer or 'auto'")
        # Every rank seeds alike: random_state=None is resolved once, on rank 0.
        seed = self.random_state
        if seed is None:
            seed = _collective.broadcast_object(int(np.random.SeedSequence().generate_state(1)[0]))
        rng = np.random.default_rng(seed)
        best: tuple[float, np.ndarray, np.ndarray, int] | None = None
        for _ in range(1 if array_init else n_init):
            centers = self._initial_centers(X, n, rng)
            labels, inertia, centers, n_iter = self._lloyd(X, centers, tol)
            if best is None or inertia < best[0]:
                best = (inertia, labels, centers, n_iter)
        if best is None:  # unreachable: n_init >= 1 was checked
            raise ConfigError(f"n_init={n_init!r} ran no initialisation")
        self.inertia_, self.labels_, self.cluster_centers_, self.n_iter_ = best
        self.n_features_in_ = X.shape[1]
        return self

    def _initial_centers(self, X: np.ndarray, n: float, rng: np.random.Generator) -> np.ndarray:
        if not isinstance(self.init, str):
            centers = np.asarray(self.init, dtype=np.float64)
            if centers.shape != (self.n_clusters, X.shape[1]):
                raise ConfigError(f"init has shape {centers.shape}; expected (n_clusters, "
                                  f"n_features) = ({self.n_clusters}, {X.shape[1]})")
            return centers.copy()
        if self.init == "k-means++":
            return kmeans_plusplus(X, self.n_clusters, rng)
        chosen = np.sort(rng.choice(int(n), self.n_clusters, replace=False))
        starts = np.cumsum([0] + _collective.allgather_object(len(X)))
        owners = [(int(np.searchsorted(starts, g, side="right") - 1), 0) for g in chosen]
        owners = [(r, int(g - starts[r])) for (r, _), g in zip(owners, chosen)]
        return _fetch_points(X, owners, X.shape[1])

    def _lloyd(self, X: np.ndarray, centers: np.ndarray,
               tol: float) -> tuple[np.ndarray, float, np.ndarray, int]:
        k = self.n_clusters
        labels_old = np.full(len(X), -1)
        strict = False
        i = 0
        for i in range(self.max_iter):
            labels = _sq_dist(X, centers).argmin(axis=1)
            sums = np.zeros((k, X.shape[1]))
            np.add.at(sums, labels, X)
            sums, counts, changed = allreduce_sum(
                sums, np.bincount(labels, minlength=k), float((labels != labels_old).sum()))
            # An empty cluster keeps its centre (sklearn would move it to a far point).
            new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers)
            shift = float(((new - centers) ** 2).sum())
            centers = new
            if changed == 0:
                strict = True
                break
            if shift <= tol:
                break
            labels_old = labels
        if not strict:
            labels = _sq_dist(X, centers).argmin(axis=1)
        inertia = self._inertia(X, centers, labels)
        return labels, inertia, centers, i + 1

    @staticmethod
    def _inertia(X: np.ndarray, centers: np.ndarray, labels: np.ndarray) -> float:
        (total,) = allreduce_sum(((X - centers[labels]) ** 2).sum())
        return float(total)

    def predict(self, X: Any) -> np.ndarray:
        check_fitted(self, "cluster_centers_")
        X, _ = local_xy(X, need_y=False)
        return _sq_dist(X, self.cluster_centers_).argmin(axis=1)

    def transform(self, X: Any) -> np.ndarray:
        check_fitted(self, "cluster_centers_")
        X, _ = local_xy(X, need_y=False)
        return np.sqrt(_sq_dist(X, self.cluster_centers_))

    def score(self, X: Any, y: Any = None) -> float:
        """Minus the inertia of every rank's shard (sklearn's convention)."""
        X, _ = local_xy(X, need_y=False)
        return -self._inertia(X, self.cluster_centers_, self.predict(X))
