"""Summation-form estimators against scikit-learn, with the data split over 1, 2 and 3 fake ranks
(threads over an in-process collective) so the allreduced math is checked for each world size."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pytest
from sklearn import cluster, datasets, decomposition, linear_model, naive_bayes
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from phalanx.data import ArrayDataset, ml
from phalanx.data._testing import ThreadWorld
from phalanx.errors import ConfigError

WORLDS = [1, 2, 3]


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread() -> Any:
    """Fake ranks are threads on a 2-core machine: BLAS pools spinning in each would thrash."""
    with threadpool_limits(limits=1):
        yield


@cache
def load(name: str, standardise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    if standardise:
        X = StandardScaler().fit_transform(X)
    return X.astype(np.float64), y


def fit_sharded(make: Callable[[], Any], X: np.ndarray, y: np.ndarray | None,
                world: int) -> list[Any]:
    """Fit one estimator per fake rank on that rank's contiguous (uneven) shard."""
    shards = np.array_split(np.arange(len(X)), world)
    return ThreadWorld(world).run(
        lambda r: make().fit(X[shards[r]], None if y is None else y[shards[r]]))


def same_on_every_rank(models: list[Any], *attrs: str) -> None:
    for attr in attrs:
        for m in models[1:]:
            np.testing.assert_array_equal(getattr(m, attr), getattr(models[0], attr))


# LinearRegression: coef_ rtol 1e-6, intercept_ rtol 1e-6 (normal equations after centring).
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_linear_regression_matches_sklearn(world: int, alpha: float) -> None:
    X, y = load("diabetes")
    ref = (linear_model.Ridge(alpha=alpha) if alpha else linear_model.LinearRegression()).fit(X, y)
    models = fit_sharded(lambda: ml.LinearRegression(alpha=alpha), X, y, world)
    same_on_every_rank(models, "coef_", "intercept_")
    np.testing.assert_allclose(models[0].coef_, ref.coef_, rtol=1e-6)
    np.testing.assert_allclose(models[0].intercept_, ref.intercept_, rtol=1e-6)
    np.testing.assert_allclose(models[0].predict(X), ref.predict(X), rtol=1e-6)
    shards = np.array_split(np.arange(len(X)), world)
    scores = ThreadWorld(world).run(lambda r: models[r].score(X[shards[r]], y[shards[r]]))
    assert scores[0] == pytest.approx(ref.score(X, y), rel=1e-9)


def test_linear_regression_multi_output_and_dataset_input() -> None:
    X, y = load("diabetes")
    Y = np.column_stack([y, 2 * y + 1])
    ref = linear_model.LinearRegression().fit(X, Y)
    ds = ArrayDataset(X, Y, num_splits=7)
    models = ThreadWorld(2).run(lambda r: ml.LinearRegression().fit(ds))
    np.testing.assert_allclose(models[1].coef_, ref.coef_, rtol=1e-6)
    np.testing.assert_allclose(models[1].intercept_, ref.intercept_, rtol=1e-6)


# LogisticRegression (standardised features, tight tol on both sides): coef_ and intercept_
# within 1e-3 relative (Frobenius) of sklearn's lbfgs solution; predictions agree on >= 99%.
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["breast_cancer", "wine", "iris"])
def test_logistic_regression_matches_sklearn(world: int, name: str) -> None:
    X, y = load(name, standardise=True)
    ref = linear_model.LogisticRegression(C=1.0, max_iter=2000, tol=1e-8).fit(X, y)
    models = fit_sharded(lambda: ml.LogisticRegression(C=1.0, max_iter=2000, tol=1e-8),
                         X, y, world)
    same_on_every_rank(models, "coef_", "intercept_", "classes_")
    m = models[0]
    assert m.coef_.shape == ref.coef_.shape and m.intercept_.shape == ref.intercept_.shape
    for got, want in [(m.coef_, ref.coef_), (m.intercept_, ref.intercept_)]:
        assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want) + 1e-9
    np.testing.assert_array_equal(m.classes_, ref.classes_)
    assert np.mean(m.predict(X) == ref.predict(X)) >= 0.99
    np.testing.assert_allclose(m.predict_proba(X), ref.predict_proba(X), atol=1e-4)


@cache
def digits_reference() -> linear_model.LogisticRegression:
    X, y = load("digits", standardise=True)
    return linear_model.LogisticRegression(C=0.1, max_iter=1000, tol=1e-6).fit(X, y)


@pytest.mark.parametrize("world", [1, 3])
def test_logistic_regression_digits_predictions(world: int) -> None:
    X, y = load("digits", standardise=True)
    ref = digits_reference()
    models = fit_sharded(lambda: ml.LogisticRegression(C=0.1, max_iter=1000, tol=1e-6),
                         X, y, world)
    assert np.mean(models[0].predict(X) == ref.predict(X)) >= 0.99
    assert np.linalg.norm(models[0].coef_ - ref.coef_) <= 1e-3 * np.linalg.norm(ref.coef_)


def test_logistic_regression_classes_seen_by_one_rank_only() -> None:
    X, y = load("iris", standardise=True)
    order = np.argsort(y, kind="stable")  # rank 0 sees classes 0-1 only, rank 1 sees 1-2
    X, y = X[order], y[order]
    models = fit_sharded(lambda: ml.LogisticRegression(max_iter=500), X, y, 2)
    np.testing.assert_array_equal(models[0].classes_, [0, 1, 2])
    assert models[0].coef_.shape == (3, 4)


# KMeans: from the same initial centres, inertia_ within 1e-6 relative of sklearn's and the same
# centres; with k-means++ (different random streams) inertia within 3% of sklearn's.
@pytest.mark.parametrize("world", WORLDS)
def test_kmeans_same_init_matches_sklearn(world: int) -> None:
    X, _ = load("digits")
    init = X[::180][:10]
    ref = cluster.KMeans(10, init=init, n_init=1).fit(X)
    models = fit_sharded(lambda: ml.KMeans(10, init=init), X, None, world)
    same_on_every_rank(models, "cluster_centers_", "inertia_", "n_iter_")
    assert models[0].inertia_ == pytest.approx(ref.inertia_, rel=1e-6)
    np.testing.assert_allclose(models[0].cluster_centers_, ref.cluster_centers_, atol=1e-8)
    assert models[0].n_iter_ == ref.n_iter_
    labels = np.concatenate([m.labels_ for m in models])
    np.testing.assert_array_equal(labels, ref.labels_)


@pytest.mark.parametrize("world", WORLDS)
def test_kmeans_plusplus_close_to_sklearn(world: int) -> None:
    X, _ = load("digits")
    ref = min(cluster.KMeans(10, random_state=s).fit(X).inertia_ for s in range(3))
    models = fit_sharded(lambda: ml.KMeans(10, random_state=0, n_init=3), X, None, world)
    same_on_every_rank(models, "cluster_centers_", "inertia_")
    assert models[0].inertia_ <= 1.03 * ref
    shards = np.array_split(np.arange(len(X)), world)
    scores = ThreadWorld(world).run(lambda r: models[r].score(X[shards[r]]))
    assert scores[0] == pytest.approx(-models[0].inertia_, rel=1e-9)


def test_kmeans_random_init_and_bad_arguments() -> None:
    X, _ = load("iris")
    models = fit_sharded(lambda: ml.KMeans(3, init="random", random_state=1), X, None, 2)
    same_on_every_rank(models, "cluster_centers_")
    assert models[0].inertia_ < 100
    with pytest.raises(ConfigError, match="init has shape"):
        fit_sharded(lambda: ml.KMeans(3, init=np.zeros((2, 4))), X, None, 1)
    with pytest.raises(ConfigError, match="n_clusters=0"):
        ml.KMeans(0)


# PCA: components_ equal to sklearn's (same svd_flip sign) to 1e-8 for components with a clear
# eigengap; explained_variance_(_ratio_) and singular_values_ rtol 1e-8.
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["iris", "wine", "digits"])
def test_pca_matches_sklearn(world: int, name: str) -> None:
    X, _ = load(name)
    k = min(5, X.shape[1])
    ref = decomposition.PCA(n_components=k, svd_solver="full").fit(X)
    models = fit_sharded(lambda: ml.PCA(n_components=k), X, None, world)
    same_on_every_rank(models, "components_", "mean_")
    m = models[0]
    np.testing.assert_allclose(m.components_, ref.components_, atol=1e-8)
    np.testing.assert_allclose(m.mean_, ref.mean_, rtol=1e-10)
    for attr in ("explained_variance_", "explained_variance_ratio_", "singular_values_"):
        np.testing.assert_allclose(getattr(m, attr), getattr(ref, attr), rtol=1e-8)
    np.testing.assert_allclose(m.transform(X), ref.transform(X), atol=1e-6)
    np.testing.assert_allclose(m.noise_variance_, ref.noise_variance_, rtol=1e-6)


def test_pca_fractional_components() -> None:
    X, _ = load("digits")
    ref = decomposition.PCA(n_components=0.9, svd_solver="full").fit(X)
    m = fit_sharded(lambda: ml.PCA(n_components=0.9), X, None, 2)[0]
    assert m.n_components_ == ref.n_components_


# GaussianNB: theta_, var_, class_prior_ to 1e-9 relative; identical predictions.
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["iris", "wine", "digits", "breast_cancer"])
def test_gaussian_nb_matches_sklearn(world: int, name: str) -> None:
    X, y = load(name)
    ref = naive_bayes.GaussianNB().fit(X, y)
    models = fit_sharded(ml.GaussianNB, X, y, world)
    same_on_every_rank(models, "theta_", "var_")
    m = models[0]
    for attr in ("theta_", "var_", "class_prior_", "class_count_"):
        np.testing.assert_allclose(getattr(m, attr), getattr(ref, attr), rtol=1e-9, atol=1e-12)
    assert m.epsilon_ == pytest.approx(ref.epsilon_, rel=1e-9)
    np.testing.assert_array_equal(m.predict(X), ref.predict(X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(m.predict_proba(X), ref.predict_proba(X), atol=1e-6)


def test_unfitted_estimator_says_so() -> None:
    with pytest.raises(ml.NotFittedError, match="call fit"):
        ml.PCA().transform(np.zeros((2, 2)))
