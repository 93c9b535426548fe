"""Smoke test of `phalanx bench iterative` at tiny sizes: it runs end to end (data generation, a
real 2-worker phalanx job, scikit-learn), writes JSON of the documented shape, cached iterations
beat re-reading ones, and bad arguments fail with a message naming the flag."""

from __future__ import annotations

import json
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
