"""Row (d) of `phalanx bench iterative --spark`: phalanx training on the Spark DataFrame itself,
through `phalanx.spark`, next to Spark MLlib on that same DataFrame.

    python -m phalanx.bench.iterative_spark --data DIR --features 32 --iters 20 --np 2 \
        --out RESULT.json                 # the driver (phalanx.bench.iterative) starts this

A local[np] SparkSession builds the DataFrame MLlib trains on (`iterative_worker.training_frame`:
the parquet shards, the features assembled into one vector column, cached) and fills its cache
with a count, as the MLlib row does. `from_dataframe` then converts each partition once through
Arrow into a split file (features as float64, the label as stored); that one-time conversion
is reported as convert_s and is not in s/iter. `phalanx.spark.run` starts np phalanx workers
as Spark tasks; each caches the splits it owns (load_s, timed as row (a)'s initial load) and
takes the same full-batch gradient-descent steps as row (a), with the same gradient kernel,
step size and L2 strength: s/iter is rank 0's mean, over the iterations, of the time from the
start of an iteration's map_reduce to the updated weights (the allreduce included). X stays
float64 as `from_dataframe` gives it (row (a) holds float32: twice the bytes per iteration).

The weights must match row (a)'s within RTOL/ATOL (same data and steps; only the float
precision and the summation order differ): `same_model_as_cached` in the result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

KEY = "phalanx_spark_df"
"""This row's key in the report's results."""
LABEL = "(d) phalanx.spark on the DataFrame"
"""This row's name in the printed table."""
RTOL, ATOL = 1e-4, 1e-6
"""How close this row's weights must be to row (a)'s to count as the same model."""
COLLECTIVE_TIMEOUT = 600.0
"""Seconds a collective may wait (a rank still loading its splits at the first barrier)."""


def _fit(ds: Any, iters: int, lr: float, C: float) -> dict[str, Any]:
    """One phalanx worker inside a Spark task: the loop of iterative_worker's train(cache=True)
    over the DataFrame's splits."""
    import phalanx as px
    from phalanx.bench.iterative_worker import _evaluate, _gradient
    from phalanx.data import PartitionedDataset, map_reduce

    px.init()
    n = len(ds)
    strength = 1.0 / (C * n)
    part = PartitionedDataset(ds, cache=True)
    px.barrier()
    t0 = time.perf_counter()
    for _ in part.local_splits():  # read every owned split file into the cache
        pass
    px.barrier()
    load_s = time.perf_counter() - t0
    reads_after_load = ds.reads
    w = np.zeros(ds.width + 1)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        g, gb = map_reduce(part, partial(_gradient, w))
        grad = np.append(g / n + strength * w[:-1], gb / n)
        w = w - lr * grad
        times.append(time.perf_counter() - t0)
    loss, correct = map_reduce(part, partial(_evaluate, w))
    rows = px.allgather_object(sum(len(s[0]) for _, s in part.local_splits()))
    rereads = px.allgather_object(ds.reads - reads_after_load)
    x_dtype = str(next(part.local_splits())[1][0].dtype) if part.splits else "none"
    return {"rank": px.rank(), "np": px.size(), "rows": n,
            "s_per_iter": float(np.mean(times)), "median_s_per_iter": float(np.median(times)),
            "iter_s": times, "load_s": load_s,
            "loss": loss / n + 0.5 * strength * float(w[:-1] @ w[:-1]),
            "accuracy": correct / n, "cached_bytes_per_rank": part.cached_bytes,
            "splits_per_rank": len(part.splits), "rows_per_rank": rows,
            "split_reads_during_iterations": sum(rereads), "x_dtype": x_dtype,
            "w": w.tolist()}


def _main(args: argparse.Namespace) -> dict[str, Any]:
    import phalanx.spark as pxs
    from phalanx.bench.iterative_spark import _fit  # by its module name: pickled by reference
    from phalanx.bench.iterative_worker import spark_session, training_frame

    t0 = time.perf_counter()
    spark = spark_session(args.np, args.spark_memory, app="phalanx-bench-iterative-dataframe")
    start_s = time.perf_counter() - t0
    try:
        data = training_frame(spark, args.data)
        t0 = time.perf_counter()
        n = data.count()  # reads, assembles and caches every partition (as the MLlib row)
        spark_cache_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = pxs.from_dataframe(data, columns=["features"], label="label")
        convert_s = time.perf_counter() - t0
        try:
            arrow_bytes = sum(Path(ds.path(p)).stat().st_size for p, _ in ds.parts)
            t0 = time.perf_counter()
            out = pxs.run(_fit, num_workers=args.np, args=(ds, args.iters, args.lr, args.C),
                          spark=spark, timeout=COLLECTIVE_TIMEOUT)
            job_s = time.perf_counter() - t0
        finally:
            ds.close()
        result = dict(out[0])
        if result["rows"] != n:
            raise RuntimeError(f"the workers saw {result['rows']} records, the DataFrame {n}")
        result.update(start_s=start_s, spark_cache_s=spark_cache_s, convert_s=convert_s,
                      job_s=job_s, arrow_bytes=arrow_bytes, n_iter=args.iters,
                      partitions=data.rdd.getNumPartitions(), splits=ds.num_splits,
                      spark=spark.version)
        return result
    finally:
        spark.stop()


# ------------------------------------------------------------------ driver side
def run(a: argparse.Namespace, data: Path, scratch: Path,
        cached_w: list[float]) -> dict[str, Any]:
    """Run this row in its own process for `phalanx bench iterative`; compare its weights with
    row (a)'s `cached_w` and drop them from the result."""
    from .iterative import _run

    out = scratch / f"{KEY}.json"
    cmd = [sys.executable, "-m", __name__, "--data", str(data), "--iters", str(a.iters),
           "--lr", str(a.lr), "--C", str(a.C), "--np", str(a.np),
           "--spark-memory", a.spark_memory, "--out", str(out)]
    res = _run(cmd, out, 1, "phalanx on the Spark DataFrame", timeout=3600)
    w, ref = np.asarray(res.pop("w")), np.asarray(cached_w)
    res["max_abs_w_diff_vs_cached"] = float(np.max(np.abs(w - ref)))
    res["same_model_as_cached"] = bool(w.shape == ref.shape
                                       and np.allclose(w, ref, rtol=RTOL, atol=ATOL))
    return res


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """This row against MLlib on the same DataFrame (s/iter over s/iter, and over MLlib's
    marginal s/iter when it came out positive: fit-time noise can exceed a few iterations)."""
    row, mllib = results[KEY], results["spark"]
    out = {f"{KEY}_over_spark": row["s_per_iter"] / mllib["s_per_iter"]}
    if (mllib.get("marginal_s_per_iter") or 0.0) > 0:
        out[f"{KEY}_over_spark_marginal"] = row["s_per_iter"] / mllib["marginal_s_per_iter"]
    return out


def table_lines(report: dict[str, Any]) -> list[str]:
    """The lines under the table that explain row (d) and give its ratio to MLlib."""
    r = report["results"].get(KEY)
    if r is None:
        return []
    ratio = report["ratios"][f"{KEY}_over_spark"]
    marginal = report["ratios"].get(f"{KEY}_over_spark_marginal")
    vs = (f"(d) vs Spark MLlib on the same DataFrame: {ratio:.3f}x MLlib's s/iter (MLlib/(d) "
          f"= {1 / ratio:.1f}x)")
    if marginal:
        vs += f"; {marginal:.3f}x MLlib's marginal s/iter"
    timed = (f"(d) s/iter: the gradient iterations alone, timed as (a), over the DataFrame's "
             f"{r['splits']} partitions as splits ({r['x_dtype']} X)")
    once = (f"(d) once, not in s/iter: Spark reading and caching the DataFrame "
            f"{r['spark_cache_s']:.2f} s, from_dataframe's Arrow conversion {r['convert_s']:.2f} "
            f"s, the workers loading their splits {r['load_s']:.2f} s (load s); the whole "
            f"phalanx.spark.run call {r['job_s']:.2f} s")
    same = (f"(d) same model as (a): {'yes' if r['same_model_as_cached'] else 'NO'} "
            f"(max |w - w_a| = {r['max_abs_w_diff_vs_cached']:.1e}; rtol {RTOL:g}, atol {ATOL:g})")
    return [vs, timed, once, same]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m phalanx.bench.iterative_spark",
                                description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="directory of the parquet shards")
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--np", type=int, default=2, help="phalanx workers = Spark's local[N] cores")
    p.add_argument("--spark-memory", default="6g")
    p.add_argument("--out", required=True, help="JSON result file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    Path(args.out).write_text(json.dumps(_main(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
