"""Summation-form estimators in real multi-process jobs (`phalanx run`, real Gloo collectives).

Part 1: one job per world size (1, 2, 3) fits every estimator on contiguous row shards of
scikit-learn's bundled datasets (rank r takes np.array_split(rows, world)[r]); each rank pickles
its fitted attributes, predictions on its own shard and its (allreduced) scores, and this process
compares them with scikit-learn fitted on the whole data, with the tolerances of
tests/test_data_estimators.py. Running every estimator in one job per world keeps the cost to one
job start-up each.

Part 2: rank 2 of 3 SIGKILLs itself in the middle of a fit (inside L-BFGS for LogisticRegression,
inside Lloyd's iterations for KMeans). The survivors catch WorkerLost, re-form the group, reassign
the lost rank's splits among themselves (re-read from the files, their own stay cached) and fit
again; the result must match scikit-learn on the whole data.

Exactly-once sampling with a worker killed mid-epoch (ShardedLoader + elastic State/@run) is
covered by tests/test_elastic.py, which counts every sample of every epoch across all workers.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from test_data_estimators import load
from sklearn import cluster, decomposition, linear_model, naive_bayes

pytestmark = pytest.mark.slow

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Up to three workers share two cores: BLAS pools spinning in each would thrash."""

FIT_ALL = """
import pickle, sys, warnings
import numpy as np
from sklearn import datasets
from sklearn.preprocessing import StandardScaler
import phalanx as px
from phalanx.data import ml

px.init()
rank, world = px.rank(), px.size()


def load(name, standardise=False):
    X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    if standardise:
        X = StandardScaler().fit_transform(X)
    return X.astype(np.float64), y


def shard(*arrays):
    rows = np.array_split(np.arange(len(arrays[0])), world)[rank]
    return tuple(a[rows] for a in arrays)


def attrs(model, *names):
    return {n: np.asarray(getattr(model, n)) for n in names}


out = {}
X, y = shard(*load("diabetes"))
for alpha in (0.0, 0.5):
    m = ml.LinearRegression(alpha=alpha).fit(X, y)
    out[f"linear/{alpha}"] = {**attrs(m, "coef_", "intercept_"), "predict": m.predict(X),
                              "score": m.score(X, y)}

for name in ("breast_cancer", "wine", "iris"):
    X, y = shard(*load(name, standardise=True))
    m = ml.LogisticRegression(C=1.0, max_iter=2000, tol=1e-8).fit(X, y)
    out[f"logistic/{name}"] = {**attrs(m, "coef_", "intercept_", "classes_"),
                               "predict": m.predict(X), "proba": m.predict_proba(X),
                               "score": m.score(X, y)}
X, y = shard(*load("digits", standardise=True))
m = ml.LogisticRegression(C=0.1, max_iter=1000, tol=1e-6).fit(X, y)
out["logistic/digits"] = {**attrs(m, "coef_", "intercept_"), "predict": m.predict(X)}

Xd, _ = load("digits")
(X,) = shard(Xd)
m = ml.KMeans(10, init=Xd[::180][:10]).fit(X)
out["kmeans/same-init"] = {**attrs(m, "cluster_centers_", "inertia_", "n_iter_", "labels_")}
m = ml.KMeans(10, random_state=0, n_init=3).fit(X)
out["kmeans/plusplus"] = {**attrs(m, "cluster_centers_", "inertia_"), "score": m.score(X)}

for name in ("iris", "wine", "digits"):
    X, _ = load(name)
    (X,) = shard(X)
    m = ml.PCA(n_components=min(5, X.shape[1])).fit(X)
    out[f"pca/{name}"] = {**attrs(m, "components_", "mean_", "explained_variance_",
                                  "explained_variance_ratio_", "singular_values_",
                                  "noise_variance_"), "transform": m.transform(X)}

for name in ("iris", "wine", "digits", "breast_cancer"):
    X, y = shard(*load(name))
    m = ml.GaussianNB().fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proba = m.predict_proba(X)
    out[f"nb/{name}"] = {**attrs(m, "theta_", "var_", "class_prior_", "class_count_",
                                 "epsilon_"), "predict": m.predict(X), "proba": proba,
                         "score": m.score(X, y)}

with open(f"{sys.argv[1]}/rank{rank}.pkl", "wb") as f:
    pickle.dump({"world": world, "results": out}, f)
"""




@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda w: f"np{w}")
def fitted(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One job per world size fits every estimator; the per-rank results, in rank order."""
    from conftest import run_job

    world = request.param
    tmp = tmp_path_factory.mktemp(f"fit{world}")
    res = run_job(tmp, FIT_ALL, world, script_args=(str(tmp),), env=ONE_THREAD, timeout=100)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [pickle.loads((tmp / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    assert [r["world"] for r in ranks] == [world] * world
    return [r["results"] for r in ranks]


def model_attrs(ranks: list[dict[str, Any]], key: str, *names: str) -> dict[str, np.ndarray]:
    """Attributes every rank must hold bit for bit; returns rank 0's."""
    for name in names:
        for r in ranks[1:]:
            np.testing.assert_array_equal(r[key][name], ranks[0][key][name],
                                          err_msg=f"{key}.{name} differs between ranks")
    return {n: ranks[0][key][n] for n in names}


def gathered(ranks: list[dict[str, Any]], key: str, field: str) -> np.ndarray:
    """A per-shard output (predictions, labels, ...) concatenated in rank order = row order."""
    return np.concatenate([r[key][field] for r in ranks])


# LinearRegression: coef_ and intercept_ rtol 1e-6; R^2 of the allreduced score to 1e-9.
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_linear_regression(fitted: list[dict[str, Any]], alpha: float) -> None:
    X, y = load("diabetes")
    ref = (linear_model.Ridge(alpha=alpha) if alpha else linear_model.LinearRegression()).fit(X, y)
    key = f"linear/{alpha}"
    m = model_attrs(fitted, key, "coef_", "intercept_", "score")
    np.testing.assert_allclose(m["coef_"], ref.coef_, rtol=1e-6)
    np.testing.assert_allclose(m["intercept_"], ref.intercept_, rtol=1e-6)
    np.testing.assert_allclose(gathered(fitted, key, "predict"), ref.predict(X), rtol=1e-6)
    assert float(m["score"]) == pytest.approx(ref.score(X, y), rel=1e-9)


# LogisticRegression: coef_/intercept_ within 1e-3 relative (Frobenius), >= 99% same predictions.
@pytest.mark.parametrize("name", ["breast_cancer", "wine", "iris"])
def test_logistic_regression(fitted: list[dict[str, Any]], name: str) -> None:
    X, y = load(name, standardise=True)
    ref = linear_model.LogisticRegression(C=1.0, max_iter=2000, tol=1e-8).fit(X, y)
    key = f"logistic/{name}"
    m = model_attrs(fitted, key, "coef_", "intercept_", "classes_", "score")
    for got, want in [(m["coef_"], ref.coef_), (m["intercept_"], ref.intercept_)]:
        assert got.shape == want.shape
        assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want) + 1e-9
    np.testing.assert_array_equal(m["classes_"], ref.classes_)
    pred = gathered(fitted, key, "predict")
    assert np.mean(pred == ref.predict(X)) >= 0.99
    np.testing.assert_allclose(gathered(fitted, key, "proba"), ref.predict_proba(X), atol=1e-4)
    assert float(m["score"]) == pytest.approx(np.mean(pred == y), rel=1e-12)


def test_logistic_regression_digits(fitted: list[dict[str, Any]]) -> None:
    X, y = load("digits", standardise=True)
    ref = linear_model.LogisticRegression(C=0.1, max_iter=1000, tol=1e-6).fit(X, y)
    m = model_attrs(fitted, "logistic/digits", "coef_", "intercept_")
    assert np.mean(gathered(fitted, "logistic/digits", "predict") == ref.predict(X)) >= 0.99
    assert np.linalg.norm(m["coef_"] - ref.coef_) <= 1e-3 * np.linalg.norm(ref.coef_)


# KMeans: same initial centres -> inertia rel 1e-6, centres atol 1e-8, same n_iter_ and labels;
# k-means++ (another random stream) -> inertia within 3% of sklearn's best of three seeds.
def test_kmeans(fitted: list[dict[str, Any]]) -> None:
    X, _ = load("digits")
    ref = cluster.KMeans(10, init=X[::180][:10], n_init=1).fit(X)
    m = model_attrs(fitted, "kmeans/same-init", "cluster_centers_", "inertia_", "n_iter_")
    assert float(m["inertia_"]) == pytest.approx(ref.inertia_, rel=1e-6)
    np.testing.assert_allclose(m["cluster_centers_"], ref.cluster_centers_, atol=1e-8)
    assert int(m["n_iter_"]) == ref.n_iter_
    np.testing.assert_array_equal(gathered(fitted, "kmeans/same-init", "labels_"), ref.labels_)
    best = min(cluster.KMeans(10, random_state=s).fit(X).inertia_ for s in range(3))
    pp = model_attrs(fitted, "kmeans/plusplus", "cluster_centers_", "inertia_", "score")
    assert float(pp["inertia_"]) <= 1.03 * best
    assert float(pp["score"]) == pytest.approx(-float(pp["inertia_"]), rel=1e-9)


# PCA: components_ atol 1e-8 (same svd_flip signs), variances rtol 1e-8, transform atol 1e-6.
@pytest.mark.parametrize("name", ["iris", "wine", "digits"])
def test_pca(fitted: list[dict[str, Any]], name: str) -> None:
    X, _ = load(name)
    ref = decomposition.PCA(n_components=min(5, X.shape[1]), svd_solver="full").fit(X)
    key = f"pca/{name}"
    m = model_attrs(fitted, key, "components_", "mean_", "explained_variance_",
                    "explained_variance_ratio_", "singular_values_", "noise_variance_")
    np.testing.assert_allclose(m["components_"], ref.components_, atol=1e-8)
    np.testing.assert_allclose(m["mean_"], ref.mean_, rtol=1e-10)
    for attr in ("explained_variance_", "explained_variance_ratio_", "singular_values_"):
        np.testing.assert_allclose(m[attr], getattr(ref, attr), rtol=1e-8)
    np.testing.assert_allclose(m["noise_variance_"], ref.noise_variance_, rtol=1e-6)
    np.testing.assert_allclose(gathered(fitted, key, "transform"), ref.transform(X), atol=1e-6)


# GaussianNB: theta_, var_, class_prior_, class_count_ rtol 1e-9; identical predictions.
@pytest.mark.parametrize("name", ["iris", "wine", "digits", "breast_cancer"])
def test_gaussian_nb(fitted: list[dict[str, Any]], name: str) -> None:
    X, y = load(name)
    ref = naive_bayes.GaussianNB().fit(X, y)
    key = f"nb/{name}"
    m = model_attrs(fitted, key, "theta_", "var_", "class_prior_", "class_count_", "epsilon_",
                    "score")
    for attr in ("theta_", "var_", "class_prior_", "class_count_"):
        np.testing.assert_allclose(m[attr], getattr(ref, attr), rtol=1e-9, atol=1e-12)
    assert float(m["epsilon_"]) == pytest.approx(ref.epsilon_, rel=1e-9)
    np.testing.assert_array_equal(gathered(fitted, key, "predict"), ref.predict(X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(gathered(fitted, key, "proba"), ref.predict_proba(X),
                                   atol=1e-6)
    assert float(m["score"]) == pytest.approx(ref.score(X, y), rel=1e-12)


# A fit that loses a worker midway: the retry loop a user writes today with public APIs.
FIT_THROUGH_KILL = """
import json, os, signal, sys
import numpy as np
import phalanx as px
from phalanx.data import FileDataset, PartitionedDataset, ml
from phalanx.data import _collective

out_dir, estimator, victim, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
px.init()
start_rank, start_world = px.rank(), px.size()

# Fault injection: the victim SIGKILLs itself on its kill_at-th allreduce inside fit (not between
# fits), so the survivors are left blocked in the middle of the optimizer's iterations.
calls = 0
allreduce = _collective.allreduce


def allreduce_or_die(x, op="sum"):
    global calls
    calls += 1
    if px.rank() == victim and px.generation() == 1 and calls == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return allreduce(x, op=op)


_collective.allreduce = allreduce_or_die

source = FileDataset(os.path.join(out_dir, "data"))
part = PartitionedDataset(source, cache=True)


def make():
    if estimator == "logistic":
        return ml.LogisticRegression(C=1.0, max_iter=2000, tol=1e-8)
    return ml.KMeans(10, init=np.load(os.path.join(out_dir, "init.npy")))


from phalanx.data.ml import fit_elastic
recoveries = []
reads_at_loss = [0]
orig_reassign = part.reassign
def reassign(*a, **k):  # note how much the source was read when the loss happened
    reads_at_loss[0] = source.reads
    return orig_reassign(*a, **k)
part.reassign = reassign
def note(info):
    recoveries.append({**info, "reads_before": reads_at_loss[0], "calls_at_loss": calls})
model = fit_elastic(make(), part, on_recovery=note)

fields = ("coef_", "intercept_") if estimator == "logistic" else ("cluster_centers_", "inertia_")
result = {f: np.asarray(getattr(model, f)).tolist() for f in fields}
result.update(start_rank=start_rank, rank=px.rank(), world=px.size(), owned=part.splits,
              reads=source.reads, recoveries=recoveries, n_iter=np.asarray(model.n_iter_).tolist())
with open(os.path.join(out_dir, f"survivor{start_rank}.json"), "w") as f:
    json.dump(result, f)
"""

N_FILES = 9


def write_npz_shards(directory: Path, X: np.ndarray, y: np.ndarray) -> None:
    directory.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(len(X)), N_FILES)):
        np.savez(directory / f"part-{i:02d}.npz", X=X[rows], y=y[rows])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("estimator,kill_at", [("logistic", 8), ("kmeans", 6)])
def test_fit_continues_after_a_worker_is_killed(job, tmp_path: Path, estimator: str,
                                                kill_at: int) -> None:
    if estimator == "logistic":
        X, y = load("breast_cancer", standardise=True)
        ref: Any = linear_model.LogisticRegression(C=1.0, max_iter=2000, tol=1e-8).fit(X, y)
    else:
        X, y = load("digits")
        init = X[::180][:10]
        np.save(tmp_path / "init.npy", init)
        ref = cluster.KMeans(10, init=init, n_init=1).fit(X)
    write_npz_shards(tmp_path / "data", X, y)
    res = job(FIT_THROUGH_KILL, 3, "--min-np", "2", "--heartbeat-timeout", "1", "--timeout", "20",
              script_args=(str(tmp_path), estimator, "2", str(kill_at)), env=ONE_THREAD,
              timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "continuing without it" in res.stderr
    survivors = [json.loads((tmp_path / f"survivor{r}.json").read_text())
                 for r in range(3) if (tmp_path / f"survivor{r}.json").exists()]
    assert [s["start_rank"] for s in survivors] == [0, 1], "rank 2 should be the one that died"
    for s in survivors:
        assert s["world"] == 2 and s["rank"] == s["start_rank"]
        [rec] = s["recoveries"]
        assert rec["lost"] == [2]
        assert rec["calls_at_loss"] == kill_at, "the kill should land inside fit, mid-iterations"
    # Survivors kept their own cached splits and rebuilt only the lost rank's from the files.
    initial = [[0, 1, 2], [3, 4, 5]]  # 9 splits over 3 ranks, contiguous
    owned = sorted(i for s in survivors for i in s["owned"])
    assert owned == list(range(N_FILES))
    for s, mine in zip(survivors, initial):
        assert set(mine) <= set(s["owned"])
        assert s["reads"] == len(s["owned"]), "a split was read twice: the cache was not reused"
        assert s["recoveries"][0]["adopted"] == sorted(set(s["owned"]) - set(mine))
    if estimator == "logistic":
        for s in survivors:
            np.testing.assert_array_equal(s["coef_"], survivors[0]["coef_"])
        coef, intercept = np.asarray(survivors[0]["coef_"]), np.asarray(survivors[0]["intercept_"])
        for got, want in [(coef, ref.coef_), (intercept, ref.intercept_)]:
            assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want) + 1e-9
    else:
        for s in survivors:
            np.testing.assert_array_equal(s["cluster_centers_"], survivors[0]["cluster_centers_"])
        assert survivors[0]["inertia_"] == pytest.approx(ref.inertia_, rel=1e-6)
        np.testing.assert_allclose(survivors[0]["cluster_centers_"], ref.cluster_centers_,
                                   atol=1e-8)
        assert survivors[0]["n_iter"] == ref.n_iter_
