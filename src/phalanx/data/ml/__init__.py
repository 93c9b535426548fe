"""Summation-form estimators with a scikit-learn-like API: fit(X, y) takes this rank's shard (or
a dataset) and reduces sufficient statistics across ranks, so every rank ends with one model."""

from __future__ import annotations

from ._common import NotFittedError
from .elastic import fit_elastic
from .kmeans import KMeans, kmeans_plusplus
from .linear import LinearRegression
from .logistic import LogisticRegression
from .naive_bayes import GaussianNB
from .pca import PCA

__all__ = [
           "PCA",
           "GaussianNB",
           "KMeans",
           "LinearRegression",
           "LogisticRegression",
           "NotFittedError",
           "fit_elastic",
           "kmeans_plusplus",
]
