"""`phalanx bench recovery --engines`: option checks and the table rows (pure), and a smoke run of
the smallest phalanx-on-Ray part (a real local Ray, a real SIGKILL of an actor's process from
outside): it checks the plumbing and that phalanx on Ray loses nothing, not the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_bench

from phalanx.bench import recovery, recovery_engines



@pytest.mark.parametrize("argv", [
    ["--engines", "dask"], ["--engines", "ray", "--engine-faults", "0"],
    ["--engines", "raytrain", "--checkpoint-every", "0"]])
def test_bad_engine_arguments_are_rejected(argv: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        recovery.main(argv)
    assert "--" in capsys.readouterr().err


def test_engine_defaults_follow_np_and_faults() -> None:
    p = recovery._parser()
    a = p.parse_args(["--np", "3", "--engines", "spark,ray,spark", "--quick"])
    recovery._validate(p, a)
    assert a.engines == ["spark", "ray"] and a.engine_faults == 1
    assert a.spark_master == "local[3,3]"
    a = p.parse_args(["--np", "3"])
    recovery._validate(p, a)
    assert a.engines == [] and a.engine_faults == 2


def test_engine_rows_have_the_table_columns() -> None:
    summary = {"n": 2, "recovered": 2, "mttr_median_s": 0.5, "mttr_max_s": 0.7,
               "steps_lost_total": 0, "samples_lost_total": 0, "back_to_full_median_s": 4.0,
               "join_pause_median_s": 0.2}
    eo = {"epochs_checked": 3, "samples_missing": 0, "samples_duplicated": 0, "steps_redone": 0}
    res = {"engines": {
        "ray": {"job": "phalanx/ray", "SIGKILL": summary, "exactly_once": eo,
                "unplanned_losses": []},
        "spark": {"job": "phalanx/spark", "error": "spark: exited\nlog tail"},
        "raytrain": {"job": "raytrain", "skipped": "`import ray.train.torch` failed: X"}}}
    lines = recovery_engines.report_lines(res, recovery._row)
    assert lines[0].split() == ["phalanx/ray", "SIGKILL", "2", "0.500s", "0.700s", "0", "0",
                                "4.000s", "0.200s"]
    assert lines[1].startswith("phalanx/spark") and "ERROR: spark: exited" in lines[1]
    assert "log tail" not in lines[1]
    assert lines[2].startswith("raytrain") and "skipped" in lines[2]
    assert "phalanx/ray exactly-once: 3 epochs checked, 0 samples missing" in lines[3]
    assert recovery_engines.failed(res) and not recovery_engines.failed({"engines": {}})


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_ray_part_recovers_from_a_killed_actor_and_loses_nothing(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    pytest.importorskip("sklearn")
    out = tmp_path / "recovery.json"
    text = run_bench(["recovery", "--np", "2", "--skip", "phalanx,torchrun,throughput",
                      "--engines", "ray", "--engine-faults", "1", "--gap-steps", "3", "6",
                      "--hidden", "64", "--json", str(out)], tmp_path, timeout=120)
    res = json.loads(out.read_text())
    assert set(res) >= {"engines"} and not {"phalanx", "torchrun", "throughput"} & set(res)
    ray_part = res["engines"]["ray"]
    assert ray_part["job"] == "phalanx/ray" and ray_part["exit_code"] == 0, ray_part
    s = ray_part["SIGKILL"]
    assert s["n"] == 1 and s["recovered"] == 1, s
    assert s["mttr_median_s"] > 0 and s["steps_lost_total"] == 0, s
    assert s["samples_lost_total"] == 0, s
    assert s["back_to_full_median_s"] is not None   # the replacement actor joined
    eo = ray_part["exactly_once"]
    assert eo["epochs_checked"] > 0, eo
    assert eo["samples_missing"] == 0 and eo["samples_duplicated"] == 0, eo
    assert "phalanx/ray" in text and "MTTR" in text
