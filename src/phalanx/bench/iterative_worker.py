"""The processes of `phalanx bench iterative`; the driver (phalanx.bench.iterative) starts them.

    phalanx run -np 2 iterative_worker.py --mode phalanx --data DIR --format parquet --iters 20 \
        --out RESULT.json                        # (a) cached shards, then (b) re-read shards
    python iterative_worker.py --mode sklearn --data DIR ... --out RESULT.json     # (c)
    python iterative_worker.py --mode spark --np 2 --data DIR ... --out RESULT.json  # Spark

Every mode trains L2-regularised logistic regression (scikit-learn's objective: mean log-loss +
||w||^2 / (2 C n), intercept unpenalised) for a fixed number of iterations over the benchmark's
shards and writes one JSON result. The phalanx modes take full-batch gradient-descent steps, one
`map_reduce` over the rank's splits per iteration; scikit-learn and Spark run their L-BFGS.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from phalanx.data.dataset import Split, SplitDataset


class XYShards(SplitDataset):
    """The benchmark's files as (X float32 [rows, features], y float32 [rows]) splits.

    Parquet shards hold one float32 column per feature plus `label`, so reading one decodes the
    columns and assembles them into a matrix (what a MapReduce job re-does every pass); npz
    shards hold X and y ready-made. `read_s` adds up the seconds spent reading.
    """

    def __init__(self, directory: str | os.PathLike[str], fmt: str) -> None:
        from phalanx.data import FileDataset
        self.files = FileDataset(directory, format=fmt)
        self.read_s = 0.0

    def split_sizes(self) -> list[int]:
        return self.files.split_sizes()

    def describe_split(self, i: int) -> str:
        return self.files.describe_split(i)

    def _read_split(self, i: int) -> Split:
        t0 = time.perf_counter()
        fields = self.files.load_split(i)
        if len(fields) == 2 and fields[0].ndim == 2:  # npz: (X, y)
            X, y = fields
        else:  # parquet: f0 .. f{d-1}, label
            X = np.column_stack(fields[:-1])
            y = fields[-1]
        split = (np.ascontiguousarray(X, dtype=np.float32), np.asarray(y, dtype=np.float32))
        self.read_s += time.perf_counter() - t0
        return split


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


BLOCK_ROWS = 16384
"""Rows per block of the gradient kernel: X @ w and X^T r read a block while it is in cache
(one pass over memory instead of two: ~20% faster alone, ~5% with two ranks sharing memory)."""


def _gradient(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """One split's sum of log-loss gradients: (X^T r, sum r) with r = sigmoid(Xw + b) - y."""
    coef, bias = w[:-1].astype(np.float32), np.float32(w[-1])
    g, s = np.zeros(X.shape[1]), 0.0
    for lo in range(0, len(X), BLOCK_ROWS):
        Xb = X[lo:lo + BLOCK_ROWS]
        r = _sigmoid(Xb @ coef + bias) - y[lo:lo + BLOCK_ROWS]
        g += Xb.T @ r
        s += float(r.sum(dtype=np.float64))
    return g, s


def _evaluate(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """One split's (sum of log-losses, correct predictions), in float64."""
    z = X.astype(np.float64) @ w[:-1] + w[-1]
    loss = float((np.logaddexp(0.0, z) - y * z).sum())
    return loss, float(((z > 0) == (y > 0.5)).sum())


def _drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def _run_phalanx(args: argparse.Namespace) -> dict[str, Any]:
    """(a) cached then (b) re-read, in one job; rank 0's timings (the allreduce syncs ranks)."""
    import phalanx as px
    from phalanx.data import PartitionedDataset, map_reduce

    px.init()
    rank, world = px.rank(), px.size()
    source = XYShards(args.data, args.format)
    n = len(source)
    strength = 1.0 / (args.C * n)

    def train(cache: bool) -> dict[str, Any]:
        part = PartitionedDataset(source, cache=cache)
        px.barrier()
        load_s = None
        if cache:
            t0 = time.perf_counter()
            for _ in part.local_splits():  # read every owned split into the cache
                pass
            px.barrier()
            load_s = time.perf_counter() - t0
        source.read_s = 0.0
        w = np.zeros(args.features + 1)
        times, drop_s = [], 0.0
        for _ in range(args.iters):
            if args.drop_caches and not cache:
                t0 = time.perf_counter()
                if rank == 0:
                    _drop_page_cache()
                px.barrier()
                drop_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            g, gb = map_reduce(part, partial(_gradient, w))
            grad = np.append(g / n + strength * w[:-1], gb / n)
            w = w - args.lr * grad
            times.append(time.perf_counter() - t0)
        loss, correct = map_reduce(part, partial(_evaluate, w))
        reads = px.allgather_object(source.read_s)
        return {"s_per_iter": float(np.mean(times)), "median_s_per_iter": float(np.median(times)),
                "iter_s": times, "load_s": load_s,
                "read_s_per_iter_max_rank": max(reads) / args.iters,
                "loss": loss / n + 0.5 * strength * float(w[:-1] @ w[:-1]),
                "accuracy": correct / n, "cached_bytes_per_rank": part.cached_bytes,
                "splits_per_rank": len(part.splits), "w": w.tolist(),
                "drop_caches_s": drop_s if args.drop_caches and not cache else None}

    cached = train(cache=True)
    reread = train(cache=False)
    return {"np": world, "rank": rank, "rows": n, "cached": cached, "reread": reread,
            "same_model": cached["w"] == reread["w"]}


def _load_all(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, float]:
    source = XYShards(args.data, args.format)
    t0 = time.perf_counter()
    parts = [source.load_split(i) for i in range(source.num_splits)]
    X = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return X, y, time.perf_counter() - t0


def _run_sklearn(args: argparse.Namespace) -> dict[str, Any]:
    """(c) scikit-learn's lbfgs on all the data in this one process; s/iter = fit / n_iter_."""
    from sklearn.exceptions import ConvergenceWarning  # type: ignore[import-untyped]
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    X, y, load_s = _load_all(args)
    clf = LogisticRegression(C=args.C, max_iter=args.iters, tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        clf.fit(X, y)
        fit_s = time.perf_counter() - t0
    n_iter = int(clf.n_iter_[0])
    w = np.append(clf.coef_[0], clf.intercept_[0])
    loss, correct = _evaluate(w, X, y)
    n = len(X)
    return {"load_s": load_s, "fit_s": fit_s, "n_iter": n_iter, "s_per_iter": fit_s / n_iter,
            "loss": loss / n + float(clf.coef_[0] @ clf.coef_[0]) / (2 * args.C * n),
            "accuracy": correct / n, "x_dtype": str(X.dtype)}


def spark_session(cores: int, memory: str, app: str = "phalanx-bench-iterative") -> Any:
    """The local[cores] SparkSession of the Spark rows (MLlib here, phalanx.spark in
    `phalanx.bench.iterative_spark`)."""
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"local[{cores}]").appName(app)
             .config("spark.driver.memory", memory)
             .config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", str(cores))
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def training_frame(spark: Any, directory: str) -> Any:
    """The DataFrame MLlib trains on: the parquet shards with the features assembled into one
    vector column, plus `label`; marked cache() (the first action fills the cache)."""
    from pyspark.ml.feature import VectorAssembler

    df = spark.read.parquet(os.path.join(directory, "*.parquet"))
    features = [c for c in df.columns if c != "label"]
    return (VectorAssembler(inputCols=features, outputCol="features").transform(df)
            .select("features", "label").cache())


def _run_spark(args: argparse.Namespace) -> dict[str, Any]:
    """MLlib's LogisticRegression on a local[np] SparkSession reading the same parquet shards,
    cached; s/iter = fit time / totalIterations of a fit timed after a 1-iteration warm-up fit,
    and marginal s/iter = (that fit - a timed 1-iteration fit) / the iterations between them."""
    from pyspark.ml.classification import LogisticRegression

    t0 = time.perf_counter()
    spark = spark_session(args.np, args.spark_memory)
    start_s = time.perf_counter() - t0
    try:
        data = training_frame(spark, args.data)
        t0 = time.perf_counter()
        n = data.count()  # reads, assembles and caches every partition
        load_s = time.perf_counter() - t0
        lr = LogisticRegression(maxIter=args.iters, regParam=1.0 / (args.C * n),
                                elasticNetParam=0.0, standardization=False, tol=1e-10,
                                family="binomial")
        one = lr.copy({lr.maxIter: 1})
        t0 = time.perf_counter()
        one.fit(data)  # warm-up: JIT-compiles the training code path
        warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_iter_one = int(one.fit(data).summary.totalIterations)
        fit_one_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = lr.fit(data)
        fit_s = time.perf_counter() - t0
        summary = model.summary
        n_iter = int(summary.totalIterations)
        # Each fit first summarises and blocks the data (a fixed cost); the difference of two
        # fits is the cost of the extra iterations alone.
        marginal = ((fit_s - fit_one_s) / (n_iter - n_iter_one) if n_iter > n_iter_one
                    else None)
        return {"start_s": start_s, "load_s": load_s, "warmup_s": warmup_s, "fit_s": fit_s,
                "n_iter": n_iter, "fit_1_iter_s": fit_one_s, "marginal_s_per_iter": marginal,
                "s_per_iter": fit_s / max(n_iter, 1),
                "loss": float(summary.objectiveHistory[-1]), "accuracy": float(summary.accuracy),
                "partitions": data.rdd.getNumPartitions(), "spark": spark.version}
    finally:
        spark.stop()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iterative_worker.py", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("phalanx", "sklearn", "spark"), required=True)
    p.add_argument("--data", required=True, help="directory of the shards")
    p.add_argument("--format", choices=("parquet", "npz"), default="parquet")
    p.add_argument("--features", type=int, required=True)
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--np", type=int, default=1, help="Spark's local[N] cores")
    p.add_argument("--spark-memory", default="6g")
    p.add_argument("--drop-caches", action="store_true")
    p.add_argument("--out", required=True, help="JSON result file (written by rank 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run = {"phalanx": _run_phalanx, "sklearn": _run_sklearn, "spark": _run_spark}[args.mode]
    result = run(args)
    if result.get("rank", 0) == 0:
        Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
