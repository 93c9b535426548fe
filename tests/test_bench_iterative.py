"""Smoke test of `phalanx bench iterative` at tiny sizes: it runs end to end (data generation, a
real 2-worker phalanx job, scikit-learn; with --spark, Spark MLlib and phalanx workers as Spark
tasks on the same DataFrame), writes JSON of the documented shape, cached iterations beat
re-reading ones, and bad arguments fail with a message naming the flag."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from phalanx.bench import iterative

pytestmark = pytest.mark.slow


@pytest.mark.timeout(90)
def test_tiny_run_writes_json_and_the_cache_is_not_reread(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "iterative.json"
    data = tmp_path / "data"
    # Big enough that reading 16 parquet files per rank per iteration clearly costs more than
    # the collectives both modes pay (a few ms under load), small enough to take seconds.
    argv = ["--np", "2", "--rows", "200000", "--features", "8", "--shards", "32", "--iters", "5",
            "--dir", str(data), "--json", str(out)]
    assert iterative.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["bench"] == "iterative"
    config = report["config"]
    assert {k: config[k] for k in ("rows", "features", "shards", "iters", "np", "format")} == {
        "rows": 200000, "features": 8, "shards": 32, "iters": 5, "np": 2, "format": "parquet"}
    assert config["same_model_cached_and_reread"] is True
    results = report["results"]
    assert set(results) == {"phalanx_cached", "phalanx_reread", "sklearn"}
    cached, reread, sk = results["phalanx_cached"], results["phalanx_reread"], results["sklearn"]
    for r in (cached, reread):
        assert len(r["iter_s"]) == 5 and r["splits_per_rank"] == 16
        assert min(r["iter_s"]) <= r["median_s_per_iter"] <= max(r["iter_s"])
        assert 0.5 < r["accuracy"] <= 1.0
    assert cached["load_s"] > 0 and cached["cached_bytes_per_rank"] == 100000 * 9 * 4
    assert reread["cached_bytes_per_rank"] == 0 and reread["read_s_per_iter_max_rank"] > 0
    assert cached["loss"] == reread["loss"]  # same data, same steps: the same model
    assert 1 <= sk["n_iter"] <= 5 and sk["s_per_iter"] == pytest.approx(sk["fit_s"] / sk["n_iter"])
    # The speed claim lives in BENCHMARKS.md; here: after loading, the cached run reads nothing.
    assert cached["read_s_per_iter_max_rank"] == 0
    assert report["ratios"]["phalanx_reread_over_cached"] == pytest.approx(
        reread["s_per_iter"] / cached["s_per_iter"])
    table = capsys.readouterr().out
    assert "(a) phalanx, cached shards" in table and "page cache" in table
    # A second run reuses the shards in --dir instead of writing them again.
    stamp = {f.name: f.stat().st_mtime_ns for f in data.glob("*.parquet")}
    assert len(stamp) == 32
    assert iterative.write_shards(data, 200000, 8, 32, "parquet") > 0
    assert stamp == {f.name: f.stat().st_mtime_ns for f in data.glob("*.parquet")}


@pytest.mark.parametrize("argv,message", [
    (["--rows", "0"], "--rows must be at least 1, got 0"),
    (["--rows", "10", "--shards", "20"], "--shards (20) must not exceed --rows (10)"),
    (["--lr", "-1"], "--lr and --C must be > 0"),
    (["--spark", "--format", "npz"], "--spark reads parquet shards"),
])
def test_bad_arguments_name_the_flag(argv: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        iterative.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_dir_with_foreign_data_is_refused(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine.parquet").write_bytes(b"not ours")
    with pytest.raises(SystemExit):
        iterative.main(["--rows", "100", "--shards", "2", "--dir", str(tmp_path)])
    assert "did not write" in capsys.readouterr().err
    assert (tmp_path / "mine.parquet").read_bytes() == b"not ours"


@pytest.mark.timeout(150)
def test_spark_adds_phalanx_on_the_same_dataframe(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """--spark at the smallest size: MLlib's row and row (d), phalanx workers as Spark tasks
    training on MLlib's DataFrame (from_dataframe), with its ratio to MLlib and the same model
    as the cached row."""
    from phalanx.bench import iterative_spark

    pytest.importorskip("pyspark")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("no Java runtime for Spark")
    out = tmp_path / "iterative.json"
    argv = ["--np", "2", "--rows", "20000", "--features", "4", "--shards", "4", "--iters", "3",
            "--skip-sklearn", "--spark", "--spark-memory", "1g", "--dir", str(tmp_path / "data"),
            "--json", str(out)]
    assert iterative.main(argv) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"phalanx_cached", "phalanx_reread", "spark", iterative_spark.KEY}
    row, mllib, cached = results[iterative_spark.KEY], results["spark"], results["phalanx_cached"]
    assert row["np"] == 2 and row["rows"] == 20000 and sum(row["rows_per_rank"]) == 20000
    # The DataFrame MLlib trained on: one split per partition, split between the two workers.
    assert row["partitions"] == mllib["partitions"] == row["splits"]
    assert row["x_dtype"] == "float64" and row["cached_bytes_per_rank"] > 0
    assert len(row["iter_s"]) == 3 and row["n_iter"] == 3
    assert min(row["iter_s"]) <= row["median_s_per_iter"] <= max(row["iter_s"])
    assert row["s_per_iter"] == pytest.approx(sum(row["iter_s"]) / 3)
    assert row["convert_s"] > 0 and row["load_s"] > 0 and row["arrow_bytes"] > 0
    assert row["split_reads_during_iterations"] == 0  # cached: no split file read again
    assert "w" not in row and row["same_model_as_cached"] is True
    assert row["loss"] == pytest.approx(cached["loss"], rel=1e-5)
    assert row["accuracy"] == pytest.approx(cached["accuracy"], abs=1e-3)
    ratios = report["ratios"]
    assert ratios[f"{iterative_spark.KEY}_over_spark"] == pytest.approx(
        row["s_per_iter"] / mllib["s_per_iter"])
    assert ratios[f"{iterative_spark.KEY}_over_cached"] == pytest.approx(
        row["s_per_iter"] / cached["s_per_iter"])
    table = capsys.readouterr().out
    assert iterative_spark.LABEL in table and "Spark MLlib lbfgs" in table
    assert "vs Spark MLlib on the same DataFrame" in table
    assert "same model as (a): yes" in table
