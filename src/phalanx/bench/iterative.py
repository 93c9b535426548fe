"""`phalanx bench iterative`: iterative ML over sharded files, cached in memory (Spark's way) vs
re-read every iteration (MapReduce's way) vs one scikit-learn process (vs Spark MLlib).

    phalanx bench iterative --np 2 --iters 20 --json iterative.json
    phalanx bench iterative --spark --dir /tmp/iterative-data     # keep the data, add Spark

A synthetic binary classification set (--rows x --features float32, labels drawn from a logistic
model) is written as --shards parquet files (one float32 column per feature plus `label`; or npz
with --format npz). One `phalanx run -np N` job then trains logistic regression for --iters
full-batch gradient-descent iterations, each a map_reduce of the local gradient over the rank's
splits and one allreduce: (a) with the splits cached by PartitionedDataset(cache=True), after a
timed initial load, and (b) with cache=False, so every iteration re-reads and re-decodes its
splits. (c) scikit-learn's LogisticRegression (lbfgs, max_iter=--iters) fits all the data in one
process; its seconds per iteration are fit time / n_iter_. With --spark, MLlib's
LogisticRegression (maxIter=--iters) runs on a local[N] SparkSession over the same parquet files
(cached), per iteration = fit time / totalIterations; it needs `pip install 'phalanx[spark]'`
and Java 17+. --spark also runs (d): phalanx workers as Spark tasks (phalanx.spark.run) training
as (a) does on that same DataFrame through from_dataframe (see phalanx.bench.iterative_spark),
reported with its ratio to MLlib's s/iter. The re-reads hit the OS page cache unless
--drop-caches (root) drops it before each re-read iteration (outside the timed region).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import iterative_spark, plots

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "iterative_worker.py")
FORMATS = ("parquet", "npz")
MANIFEST = "_phalanx-iterative.json"  # leading _: Spark skips it
SEED = 0


class _Parser(argparse.ArgumentParser):
    """argparse whose errors exit 2 with a pointer to --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _parser() -> _Parser:
    p = _Parser(prog="phalanx bench iterative", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-np", "--np", type=int, default=2, help="phalanx workers and Spark cores "
                   "(default 2); scikit-learn gets as many BLAS threads")
    p.add_argument("--rows", type=int, default=4_000_000, help="records (default 4000000)")
    p.add_argument("--features", type=int, default=32, help="float32 features (default 32)")
    p.add_argument("--shards", type=int, default=64, help="files written (default 64)")
    p.add_argument("--iters", type=int, default=20, help="iterations of each method (default 20)")
    p.add_argument("--format", choices=FORMATS, default="parquet",
                   help="shard format: parquet (decoded on every read; default) or npz")
    p.add_argument("--lr", type=float, default=1.0, help="gradient-descent step (default 1.0)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength, as in "
                   "scikit-learn (default 1.0)")
    p.add_argument("--dir", default=None, help="write (or reuse) the shards here and keep them; "
                   "default: a temporary directory removed at the end")
    p.add_argument("--spark", action="store_true", help="also run Spark MLlib and (d) phalanx "
                   "on the same Spark DataFrame (needs pyspark and Java 17+)")
    p.add_argument("--spark-memory", default="6g", help="Spark driver memory (default 6g)")
    p.add_argument("--drop-caches", action="store_true", help="drop the OS page cache before "
                   "every re-read iteration (needs root; affects the whole machine)")
    p.add_argument("--skip-sklearn", action="store_true", help="leave out scikit-learn")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--plot", metavar="FILE.png", help="draw seconds per iteration per system "
                   "(needs matplotlib)")
    return p


def _check(p: _Parser, a: argparse.Namespace) -> None:
    for name in ("np", "rows", "features", "shards", "iters"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(a, name)}")
    if a.shards > a.rows:
        p.error(f"--shards ({a.shards}) must not exceed --rows ({a.rows}); every shard needs a row")
    if not a.lr > 0 or not a.C > 0:
        p.error(f"--lr and --C must be > 0, got lr={a.lr}, C={a.C}")
    if a.spark:
        if a.format != "parquet":
            p.error(f"--spark reads parquet shards; drop --format {a.format} or --spark")
        if importlib.util.find_spec("pyspark") is None:
            p.error("--spark needs pyspark, which is not installed; install it with "
                    "`pip install 'phalanx[spark]'` (or `pip install pyspark`), or drop --spark")
        if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
            p.error("--spark needs a Java runtime (17+) and none is on PATH or in JAVA_HOME; "
                    "install one (e.g. `apt-get install default-jre-headless`) or drop --spark")
    if a.drop_caches:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
        except OSError as e:
            p.error(f"--drop-caches cannot write /proc/sys/vm/drop_caches ({e}); run as root "
                    "on Linux, or drop --drop-caches (re-reads then hit the page cache)")


def write_shards(directory: Path, rows: int, features: int, shards: int, fmt: str) -> int:
    """Write the data set (or reuse an identical one already there); returns its bytes on disk.

    Features are standard normal float32; label ~ Bernoulli(sigmoid(x . w_true)) with
    w_true ~ N(0, 4/features), so the Bayes accuracy is about 80%.
    """
    import numpy as np

    spec = {"rows": rows, "features": features, "shards": shards, "format": fmt, "seed": SEED}
    manifest = directory / MANIFEST
    suffix = f".{fmt}"
    if manifest.is_file() and json.loads(manifest.read_text()) == spec:
        return sum(f.stat().st_size for f in directory.glob(f"*{suffix}"))
    directory.mkdir(parents=True, exist_ok=True)
    stale = [f for f in directory.iterdir() if f.suffix in (".parquet", ".npz", ".npy", ".csv")]
    if stale and not manifest.is_file():
        raise FileExistsError(f"--dir {str(directory)!r} holds data files that this benchmark did "
                              "not write; pass an empty or new directory")
    for f in stale:
        f.unlink()
    manifest.unlink(missing_ok=True)
    rng = np.random.default_rng(SEED)
    w_true = rng.standard_normal(features) * (2.0 / np.sqrt(features))
    bounds = np.linspace(0, rows, shards + 1).astype(np.int64)
    total = 0
    for i in range(shards):
        n = int(bounds[i + 1] - bounds[i])
        X = rng.standard_normal((n, features), dtype=np.float32)
        p = 1.0 / (1.0 + np.exp(-(X.astype(np.float64) @ w_true)))
        y = (rng.random(n) < p).astype(np.float32)
        path = directory / f"part-{i:05d}{suffix}"
        if fmt == "parquet":
            import pyarrow as pa  # type: ignore[import-untyped]
            import pyarrow.parquet as pq  # type: ignore[import-untyped]
            columns = {f"f{j}": X[:, j] for j in range(features)}
            columns["label"] = y
            pq.write_table(pa.table(columns), path)
        else:
            np.savez(path, X=X, y=y)
        total += path.stat().st_size
    manifest.write_text(json.dumps(spec))
    return total


def _env(threads: int) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, **{k: str(threads) for k in (
        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd: list[str], out: Path, threads: int, what: str, timeout: float) -> dict[str, Any]:
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(threads),
                       timeout=timeout)
    if p.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{what} failed (exit {p.returncode}):\n{p.stdout[-4000:]}\n"
                           f"{p.stderr[-4000:]}")
    return dict(json.loads(out.read_text()))


def _worker_args(a: argparse.Namespace, data: Path, out: Path, mode: str) -> list[str]:
    args = [WORKER, "--mode", mode, "--data", str(data), "--format", a.format,
            "--features", str(a.features), "--iters", str(a.iters), "--lr", str(a.lr),
            "--C", str(a.C), "--np", str(a.np), "--spark-memory", a.spark_memory,
            "--out", str(out)]
    return args + (["--drop-caches"] if a.drop_caches else [])


def format_table(report: dict[str, Any]) -> str:
    """The human table: one row per method, seconds per iteration and ratios to cached."""
    c, r = report["config"], report["results"]
    cached = r["phalanx_cached"]["s_per_iter"]
    title = (f"logistic regression, {c['rows']:,} x {c['features']} float32, {c['shards']} "
             f"{c['format']} shards ({c['bytes_on_disk'] / 2**20:.0f} MiB on disk), "
             f"{c['iters']} iterations, {c['np']} workers")
    head = (f"{'method':34} {'s/iter':>9} {'vs cached':>9} {'load s':>7} {'iters':>5} "
            f"{'loss':>7} {'acc':>6}")
    lines = [title, head]
    names = {"phalanx_cached": "(a) phalanx, cached shards",
             "phalanx_reread": "(b) phalanx, re-read every iter",
             "sklearn": "(c) scikit-learn lbfgs, 1 process", "spark": "Spark MLlib lbfgs, local",
             iterative_spark.KEY: iterative_spark.LABEL}
    for key, label in names.items():
        if key not in r:
            continue
        m = r[key]
        load = "" if m.get("load_s") is None else f"{m['load_s']:.2f}"
        lines.append(f"{label:34} {m['s_per_iter']:>9.4f} {m['s_per_iter'] / cached:>8.1f}x "
                     f"{load:>7} {m.get('n_iter', c['iters']):>5} {m['loss']:>7.4f} "
                     f"{m['accuracy']:>6.3f}")
    if r.get("spark", {}).get("marginal_s_per_iter") is not None:
        sp = r["spark"]
        lines.append(f"Spark: {sp['fit_s']:.1f} s fit of which a fixed ~{sp['fit_1_iter_s']:.1f} s "
                     f"(a 1-iteration fit); {sp['marginal_s_per_iter']:.4f} s per extra iteration "
                     f"({sp['marginal_s_per_iter'] / cached:.1f}x cached)")
    rr = r["phalanx_reread"]
    lines.append(f"median s/iter: cached {r['phalanx_cached']['median_s_per_iter']:.4f}, re-read "
                 f"{rr['median_s_per_iter']:.4f} "
                 f"({report['ratios']['phalanx_reread_over_cached_median']:.1f}x)")
    lines.append(f"re-read: {rr['read_s_per_iter_max_rank']:.3f} s/iter reading+decoding (slowest "
                 f"rank); " + ("page cache dropped before every re-read iteration"
                               if c["drop_caches"] else
                               "re-reads hit the OS page cache (the data fits in RAM; "
                               "--drop-caches makes them cold)"))
    lines.extend(iterative_spark.table_lines(report))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    p = _parser()
    a = p.parse_args(argv)
    _check(p, a)
    plots.check_plot_arg(p, a.plot)
    keep = a.dir is not None
    data = Path(a.dir) if keep else Path(tempfile.mkdtemp(prefix="phalanx-iterative-"))
    scratch = Path(tempfile.mkdtemp(prefix="phalanx-iterative-out-"))
    try:
        t0 = time.perf_counter()
        try:
            disk = write_shards(data, a.rows, a.features, a.shards, a.format)
        except FileExistsError as e:
            p.error(str(e))
        print(f"data: {a.rows:,} x {a.features} in {a.shards} {a.format} shards at {data} "
              f"({disk / 2**20:.0f} MiB; {time.perf_counter() - t0:.1f} s)", flush=True)
        results: dict[str, Any] = {}
        out = scratch / "phalanx.json"
        job = [sys.executable, "-m", "phalanx.launch.cli", "run", "-np", str(a.np),
               *_worker_args(a, data, out, "phalanx")]
        res = _run(job, out, 1, "the phalanx job", timeout=3600)
        results["phalanx_cached"] = {k: v for k, v in res["cached"].items() if k != "w"}
        results["phalanx_reread"] = {k: v for k, v in res["reread"].items() if k != "w"}
        print(f"phalanx: cached {res['cached']['s_per_iter']:.4f} s/iter, re-read "
              f"{res['reread']['s_per_iter']:.4f} s/iter", flush=True)
        if not a.skip_sklearn:
            out = scratch / "sklearn.json"
            results["sklearn"] = _run([sys.executable, *_worker_args(a, data, out, "sklearn")],
                                      out, a.np, "scikit-learn", timeout=3600)
            print(f"scikit-learn: {results['sklearn']['s_per_iter']:.4f} s/iter", flush=True)
        if a.spark:
            out = scratch / "spark.json"
            results["spark"] = _run([sys.executable, *_worker_args(a, data, out, "spark")],
                                    out, 1, "Spark", timeout=3600)
            print(f"Spark: {results['spark']['s_per_iter']:.4f} s/iter", flush=True)
            results[iterative_spark.KEY] = iterative_spark.run(a, data, scratch,
                                                               res["cached"]["w"])
            print(f"phalanx on the Spark DataFrame: "
                  f"{results[iterative_spark.KEY]['s_per_iter']:.4f} s/iter", flush=True)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        sys.stderr.write(f"phalanx bench iterative: error: {e}\n")
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not keep:
            shutil.rmtree(data, ignore_errors=True)
    cached = results["phalanx_cached"]["s_per_iter"]
    ratios = {f"{k}_over_cached": v["s_per_iter"] / cached
              for k, v in results.items() if k != "phalanx_cached"}
    ratios["phalanx_reread_over_cached_median"] = (
        results["phalanx_reread"]["median_s_per_iter"]
        / results["phalanx_cached"]["median_s_per_iter"])
    if iterative_spark.KEY in results:
        ratios.update(iterative_spark.ratios(results))
    report = {
        "bench": "iterative",
        "config": {"rows": a.rows, "features": a.features, "shards": a.shards,
                   "format": a.format, "iters": a.iters, "np": a.np, "lr": a.lr, "C": a.C,
                   "bytes_on_disk": disk, "bytes_in_memory": a.rows * (a.features + 1) * 4,
                   "drop_caches": a.drop_caches, "sklearn_threads": a.np,
                   "same_model_cached_and_reread": res["same_model"]},
        "results": results,
        "ratios": ratios,
    }
    print(format_table(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    if a.plot:
        print(f"wrote {plots.iterative(report, a.plot)}")
    return 0
