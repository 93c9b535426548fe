"""phalanx.spark on a real Spark cluster: `local-cluster[2,1,1024]` runs two executor JVMs with
one core each, so the two phalanx workers of each job are Spark tasks in separate executors,
each in its own PySpark Python worker process.

Covers: collectives inside fn against numpy; an elastic training job that loses a worker's
Python process to SIGKILL (survivors continue, Spark's retry joins as a replacement, parameters
bitwise equal to a single-process reference); an exception in fn failing the call without a
Spark retry; LogisticRegression fitted through `from_dataframe` against scikit-learn (and the
lineage of a lost split file); and that nothing of a call is left behind.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyspark")

import phalanx.spark as pxs
from phalanx.errors import ConfigError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def spark():
    """Two executors of one core each; their Python workers import phalanx and this module
    (fn is pickled by reference) from the repository."""
    from pyspark.sql import SparkSession
    session = (SparkSession.builder.master("local-cluster[2,1,1024]")
               .appName("phalanx-test-spark")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.shuffle.partitions", "4")
               .config("spark.driver.memory", "512m")
               .config("spark.executor.memory", "768m")
               .config("spark.task.maxFailures", "4")
               .config("spark.executorEnv.PYTHONPATH",
                       os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]))
               .config("spark.executorEnv.OMP_NUM_THREADS", "1")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def assert_nothing_left(spark) -> None:
    """No job or task of ours running, no coordinator or job thread (shared-memory segments
    and child processes: conftest's no_leaks)."""
    tracker = spark.sparkContext.statusTracker()
    assert tracker.getActiveJobsIds() == [] and tracker.getActiveStageIds() == []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        coord = [t.name for t in threading.enumerate()
                 if t.name.startswith(("phalanx-coord", "phalanx-spark")) and t.is_alive()]
        if not coord:
            break
        time.sleep(0.05)
    assert not coord, f"threads left behind: {coord}"


# ---------------------------------------------------------------------------------- collectives
def collectives(scale: float) -> dict:
    import phalanx as px
    px.init()
    r = px.rank()
    return {"rank": r, "size": px.size(), "worker": os.environ["PHALANX_WORKER_ID"],
            "sum": px.allreduce(np.arange(6, dtype=np.float64) * (r + 1) * scale, op="sum"),
            "max": px.allreduce(np.array([r * 10.0, -r]), op="max"),
            "gathered": px.allgather(np.full((2, 3), r, dtype=np.int64))}


@pytest.mark.timeout(120)
def test_collectives_match_numpy_in_rank_order(spark, caplog) -> None:
    caplog.set_level(logging.INFO, logger="phalanx.spark")
    out = pxs.run(collectives, num_workers=2, args=(0.5,))
    assert [o["rank"] for o in out] == [0, 1]
    assert {o["size"] for o in out} == {2}
    assert sorted(o["worker"] for o in out) == ["w0", "w1"]
    for o in out:
        np.testing.assert_array_equal(o["sum"], np.arange(6) * 0.5 * (1 + 2))
        np.testing.assert_array_equal(o["max"], [10.0, 0.0])
        np.testing.assert_array_equal(o["gathered"], np.repeat([[0] * 3, [1] * 3], 2, axis=0))
    lines = [r.getMessage() for r in caplog.records if r.name == "phalanx.spark"]
    assert sum(m.startswith("generation ") for m in lines) == 1, lines
    assert_nothing_left(spark)


@pytest.mark.timeout(60)
def test_bad_arguments_are_named(spark) -> None:
    with pytest.raises(ConfigError, match=r"num_workers=0 "):
        pxs.run(collectives, num_workers=0)
    with pytest.raises(ConfigError, match=r"num_workers=True "):
        pxs.run(collectives, num_workers=True)
    with pytest.raises(ConfigError, match=r"min_workers=3 .*1\.\.num_workers=2"):
        pxs.run(collectives, num_workers=2, min_workers=3)
    with pytest.raises(ConfigError, match=r"fn=42 is not callable"):
        pxs.run(42, num_workers=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"kwargs=\[1\]"):
        pxs.run(collectives, num_workers=1, kwargs=[1])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"num_workers=3 needs 3 Spark task slots .* has 2"):
        pxs.run(collectives, num_workers=3, args=(1.0,))
    with pytest.raises(ConfigError, match=r"cannot be pickled"):
        pxs.run(collectives, num_workers=1, args=(threading.Lock(),))
    assert_nothing_left(spark)


# ---------------------------------------------------------------------------------- bugs
def buggy(marker_dir: str) -> None:
    import phalanx as px
    px.init()
    with open(os.path.join(marker_dir, f"calls.{os.environ['PHALANX_WORKER_ID']}"), "a") as f:
        f.write(f"{os.getpid()}\n")
    px.barrier()
    if px.rank() == 1:
        raise ValueError("boom at rank 1")
    px.allreduce(np.ones(3))  # rank 0 waits for rank 1, which never comes


@pytest.mark.timeout(120)
def test_exception_fails_the_call_without_spark_retrying(spark, tmp_path) -> None:
    with pytest.raises(pxs.WorkerError) as info:
        pxs.run(buggy, num_workers=2, args=(str(tmp_path),))
    err = info.value
    assert isinstance(err, pxs.JobFailed) and err.rank == 1 and err.worker == "w1"
    assert (err.exc_type, err.exc_message) == ("ValueError", "boom at rank 1")
    assert "rank 1" in str(err) and "ValueError: boom at rank 1" in str(err), str(err)
    assert err.where.startswith(__file__) and __file__ in err.remote_traceback
    assert isinstance(err.__cause__, ValueError)
    # Spark.task.maxFailures=4 allows retries, yet the failing task ran once: no w1.1 exists.
    calls = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("calls."))
    assert calls == ["calls.w0", "calls.w1"]
    assert len((tmp_path / "calls.w1").read_text().split()) == 1
    assert_nothing_left(spark)


# ---------------------------------------------------------------------------------- faults
STEPS, KILL_AT, ALONE = 30, 6, 4


def regression_problem():
    import torch
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=g)
    Y = X @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(64, 1, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return X, Y, model


def reference_parameters() -> list:
    """One process, plain SGD, the same full batch every step."""
    import torch
    X, Y, model = regression_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def elastic_train(marker: str) -> dict:
    """Every rank trains on the same full batch (so the averaged gradient is the
    single-process one); rank 1's first attempt SIGKILLs its own process at step KILL_AT."""
    import torch
    from pyspark import TaskContext

    import phalanx as px
    torch.set_num_threads(1)
    px.init()
    X, Y, model = regression_problem()
    opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  model=model)
    state = px.elastic.State(model=model, optimizer=opt)
    entered: list[int] = []

    @px.elastic.run
    def train(state):
        entered.append(state.step)
        while state.step < STEPS:
            if px.rank() == 1 and state.step == KILL_AT and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            if px.size() < 2 and state.step >= KILL_AT + ALONE:
                # Trained alone for a while; now wait at step boundaries (commit() admits
                # newcomers: MembershipChanged) for the replacement, so it surely joins.
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    state.commit()
                    time.sleep(0.05)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(X), Y).backward()
            opt.step()
            time.sleep(0.01)

    train(state)
    return {"worker": os.environ["PHALANX_WORKER_ID"], "pid": os.getpid(),
            "attempt": TaskContext.get().attemptNumber(), "step": state.step,
            "entered": entered, "recoveries": state.recoveries,
            "params": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.timeout(180)
def test_killed_worker_is_replaced_and_survivor_continues(spark, tmp_path, caplog) -> None:
    import torch
    caplog.set_level(logging.INFO, logger="phalanx.spark")
    marker = str(tmp_path / "killed")
    out = pxs.run(elastic_train, num_workers=2, min_workers=1, args=(marker,))
    killed = int(Path(marker).read_text())
    assert not os.path.exists(f"/proc/{killed}"), "the killed Python worker is gone"
    assert [o["worker"] for o in out] == ["w0", "w1.1"], out  # survivor keeps rank 0
    survivor, replacement = out
    # The survivor was never restarted: one process, first attempt, entered at step 0 and
    # re-entered (after recovering) where it was, never lower.
    assert survivor["attempt"] == 0 and survivor["entered"][0] == 0
    assert survivor["entered"] == sorted(survivor["entered"])
    alone = survivor["recoveries"][0]  # it went on alone, then the replacement joined
    assert (alone["cause"], alone["old_size"], alone["new_size"]) == ("WorkerLost", 2, 1), alone
    assert any(r["cause"] == "MembershipChanged" and r["new_size"] == 2
               for r in survivor["recoveries"][1:]), survivor["recoveries"]
    assert survivor["pid"] != killed
    # The replacement is Spark's retry of rank 1's task; it healed from its peer, not step 0.
    assert replacement["attempt"] == 1 and replacement["entered"][0] >= KILL_AT
    assert survivor["step"] == replacement["step"] == STEPS
    for a, b, ref in zip(survivor["params"], replacement["params"], reference_parameters(),
                          strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, ref), (a - ref).abs().max()
    gens = [r.getMessage() for r in caplog.records
            if r.name == "phalanx.spark" and r.getMessage().startswith("generation ")]
    assert len(gens) >= 2 and gens[-1].startswith("generation ") and "w1.1" in gens[-1], gens
    assert_nothing_left(spark)


def doomed_peer(marker_dir: str, attempts: int) -> dict:
    """Every attempt of slot 1's task dies right after joining; slot 0 carries on alone until
    Spark has given up on slot 1 (all `attempts` are dead)."""
    import phalanx as px
    px.init()
    me = os.environ["PHALANX_WORKER_ID"]
    if me != "w0":
        Path(marker_dir, me).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    state = px.elastic.State(total=0.0)

    @px.elastic.run
    def loop(state):
        while len(os.listdir(marker_dir)) < attempts or px.size() > 1:
            state.total += float(px.allreduce(np.ones(1))[0])
            state.end_step()
            time.sleep(0.05)

    loop(state)
    return {"worker": me, "steps": state.step, "recoveries": len(state.recoveries)}


@pytest.mark.timeout(180)
def test_a_task_out_of_retries_fails_only_its_own_job(spark, tmp_path, caplog) -> None:
    """One Spark job per worker: slot 1 exhausting spark.task.maxFailures=4 fails its job
    alone; with min_workers=1 the survivor's task is never killed and the call succeeds."""
    caplog.set_level(logging.INFO, logger="phalanx.spark")
    out = pxs.run(doomed_peer, num_workers=2, min_workers=1, args=(str(tmp_path), 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w1", "w1.1", "w1.2", "w1.3"]
    assert [o["worker"] for o in out] == ["w0"] and out[0]["recoveries"] >= 4
    gave_up = [r.getMessage() for r in caplog.records if "failed for good" in r.getMessage()]
    assert len(gave_up) == 1 and "worker slot 1" in gave_up[0], gave_up
    assert "failed 4 times" in gave_up[0] and "Python worker exited" in gave_up[0]
    assert_nothing_left(spark)


# ---------------------------------------------------------------------------------- data
def breast_cancer_frame(spark, partitions: int):
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    names = [f"f{i}" for i in range(X.shape[1])]
    rows = [(*map(float, x), int(t)) for x, t in zip(X, y, strict=True)]
    schema = ", ".join(f"{n} double" for n in names) + ", label int"
    return X, y, names, spark.createDataFrame(rows, schema).repartition(partitions)


def fit_logistic(ds) -> dict:
    import phalanx as px
    from phalanx.data import PartitionedDataset
    from phalanx.data.ml import LogisticRegression, fit_elastic
    px.init()
    data = PartitionedDataset(ds)
    m = fit_elastic(LogisticRegression(C=1.0, max_iter=2000, tol=1e-8), data)
    return {"coef": m.coef_, "intercept": m.intercept_, "classes": m.classes_,
            "splits": data.cached_splits, "reads": ds.reads}


# LogisticRegression on standardised breast_cancer (tight tol on both sides): coef_ and
# intercept_ within 1e-3 relative (Frobenius) of scikit-learn's lbfgs solution, as in
# test_data_estimators; identical on every rank; each owned split read from its file once
# (then cached). Spark MLlib (regParam = 1 / (C n), standardization=False: the same objective)
# lands within 1e-6 of scikit-learn on this data, but its fit costs ~10-30 s of Spark jobs on a
# 2-core machine, so it is not part of this test.
@pytest.mark.timeout(180)
def test_logistic_regression_on_a_dataframe_matches_sklearn(spark) -> None:
    from sklearn.linear_model import LogisticRegression
    X, y, names, df = breast_cancer_frame(spark, partitions=5)
    with pxs.from_dataframe(df, columns=names, label="label") as ds:
        assert ds.num_splits == 5 and len(ds) == len(X) and ds.width == X.shape[1]
        lost = ds.parts[2][0]
        os.unlink(ds.path(lost))  # lineage: run() rewrites it from the DataFrame partition
        out = pxs.run(fit_logistic, num_workers=2, args=(ds,))
        assert ds.recomputed == [lost] and os.path.exists(ds.path(lost))
        directory = ds.directory
    assert not os.path.exists(directory)
    ref = LogisticRegression(C=1.0, max_iter=2000, tol=1e-8).fit(X, y)
    for o in out:
        np.testing.assert_array_equal(o["coef"], out[0]["coef"])
        np.testing.assert_array_equal(o["classes"], ref.classes_)
    for got, want in [(out[0]["coef"], ref.coef_), (out[0]["intercept"], ref.intercept_)]:
        assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want) + 1e-9
    assert sorted(out[0]["splits"] + out[1]["splits"]) == list(range(5))
    assert [o["reads"] for o in out] == [len(o["splits"]) for o in out]  # cached in memory
    assert_nothing_left(spark)


@pytest.mark.timeout(120)
def test_from_dataframe_splits_hold_the_partitions(spark) -> None:
    import pickle

    from pyspark.ml.linalg import Vectors
    rows = [(i, float(i) / 2, [float(i), -float(i)], Vectors.dense([i % 3, 1.0]), f"c{i % 2}")
            for i in range(23)]
    df = spark.createDataFrame(rows, ["id", "a", "arr", "vec", "label"]).repartition(3, "id")
    with pytest.raises(ConfigError, match=r"label='nope' is not a column"):
        pxs.from_dataframe(df, columns=["a"], label="nope")
    with pytest.raises(ConfigError, match=r"feature column 'label' has type string"):
        pxs.from_dataframe(df, columns=["a", "label"])
    ds = pxs.from_dataframe(df, columns=["id", "a", "arr", "vec"], label="label")
    assert ds.width == 6 and len(ds) == 23
    X = np.concatenate([ds.load_split(i)[0] for i in range(ds.num_splits)])
    y = np.concatenate([ds.load_split(i)[1] for i in range(ds.num_splits)])
    order = np.argsort(X[:, 0])
    ids = np.arange(23.0)
    want = np.column_stack([ids, ids / 2, ids, -ids, ids % 3, np.ones(23)])
    np.testing.assert_array_equal(X[order], want)
    assert [str(v) for v in y[order]] == [f"c{i % 2}" for i in range(23)]
    # A copy (what workers get) cannot recompute; the driver's object can.
    copy = pickle.loads(pickle.dumps(ds))
    part = ds.parts[0][0]
    os.unlink(ds.path(part))
    with pytest.raises(pxs.SplitMissing, match=f"partition.*{part}"):
        copy.load_split(0)
    np.testing.assert_array_equal(ds.load_split(0)[0], copy.load_split(0)[0])
    assert ds.recomputed == [part]
    copy.close()  # a copy never removes the directory
    assert os.path.isdir(ds.directory)
    ds.close()
    assert not os.path.exists(ds.directory)


# ---------------------------------------------------------------------------------- pure parts
@pytest.mark.timeout(30)
def test_root_cause_is_the_first_bug_and_results_follow_the_final_rank_order() -> None:
    import pickle

    from phalanx.spark.outcome import WorkerResult, failure, in_rank_order, root_cause

    def err(worker: str, kind: str, t: float, cascade: bool = False, rank: int = 0):
        return WorkerResult(slot=0, attempt=0, worker=worker, host="h", pid=1, rank=rank,
                            error={"type": kind, "message": f"{kind} here", "where": "f.py:1",
                                   "time": t, "cascade": cascade, "traceback": "Traceback..."},
                            exception=pickle.dumps(KeyError("k")) if kind == "KeyError" else None)
    lost = err("w0", "WorkerLost", 1.0, cascade=True)
    bug = err("w1.2", "KeyError", 2.0, rank=1)
    assert root_cause([lost, bug]) is bug and root_cause([lost]) is lost and root_cause([]) is None
    e = failure(bug, [], "a worker raised an exception")
    assert isinstance(e, pxs.WorkerError) and (e.rank, e.worker, e.exc_type) == (1, "w1.2",
                                                                                "KeyError")
    assert str(e).startswith("phalanx job on Spark failed: rank 1 (worker w1.2 on h, pid 1) "
                             "raised KeyError: KeyError here (at f.py:1)")
    assert isinstance(e.__cause__, KeyError) and e.remote_traceback == "Traceback..."
    e = failure(lost, ["rank 1 (worker w1) was lost: killed"], "x")
    assert type(e) is pxs.JobFailed and e.cause == "rank 1 (worker w1) was lost: killed"
    assert "rank 1 (worker w1) was lost: killed; then rank 0" in str(e)
    assert "@phalanx.elastic.run" in str(e)
    assert str(failure(None, ["slot 1 failed"], "every worker was lost")).endswith(
        "every worker was lost (slot 1 failed)")

    def done(worker: str, rank: int, returned: bool = True):
        return WorkerResult(slot=0, attempt=0, worker=worker, host="h", pid=1, rank=rank,
                            returned=returned)
    results = [done("w1.1", 0), done("w0", 1), done("w2", 0, returned=False), done("w3", 2)]
    order = [r.worker for r in in_rank_order(results, ["w0", "w1.1"])]
    assert order == ["w0", "w1.1", "w3"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("master", "conf", "attempts"), [
    ("local", {}, 1), ("local[4]", {"spark.task.maxFailures": "8"}, 1), ("local[*, 3]", {}, 3),
    ("local-cluster[2,1,1024]", {}, 4), ("spark://h:7077", {"spark.task.maxFailures": "2"}, 2),
    ("yarn", {}, 4)])
def test_task_attempts_follow_the_master(master: str, conf: dict, attempts: int) -> None:
    from phalanx.spark.cluster import is_local, max_task_attempts

    class Conf:
        def get(self, key: str, default: str | None = None) -> str | None:
            return conf.get(key, default)

    class Context:
        def __init__(self) -> None:
            self.master = master

        def getConf(self) -> Conf:  # noqa: N802 (pyspark's name)
            return Conf()
    assert max_task_attempts(Context()) == attempts  # type: ignore[arg-type]
    assert is_local(Context()) == master.startswith("local")  # type: ignore[arg-type]
