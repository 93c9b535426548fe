"""`phalanx bench recovery`: the analysis of step logs (pure, on made-up logs) and a smoke run of
the whole benchmark with --quick (real jobs and real signals: this checks the plumbing and that
phalanx loses nothing, not the numbers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import run_bench

from phalanx.bench import recovery



def _rec(t: float, s: int, g: int, n: int = 3, e: int = 0, plan: list[list[int]] | None = None,
         b: int = 6) -> dict[str, Any]:
    r: dict[str, Any] = {"t": t, "s": s, "g": g, "n": n, "e": e, "b": b}
    if plan is not None:
        r["p"] = plan
    return r


def test_analyze_phalanx_measures_from_signal_to_first_step_of_new_generation() -> None:
    # w2 is killed at t=10.0 in generation 1 after step 5; w0 completes step 6 at 10.01 in the
    # old generation (its reduction had finished), so the survivors resume after step 6.
    records = {
        "w0": [_rec(9.9, 5, 1), _rec(10.01, 6, 1), _rec(10.30, 7, 2, n=2), _rec(15.0, 8, 3)],
        "w1": [_rec(9.9, 5, 1), _rec(10.31, 7, 2, n=2), _rec(15.0, 8, 3)],
        "w2": [_rec(9.9, 5, 1)],
        "w2.1": [_rec(15.01, 8, 3)],
    }
    fault = {"kind": "SIGKILL", "victim": "w2", "t": 10.0, "g": 1}
    (row,) = recovery.analyze_phalanx(records, [fault], np_full=3)
    assert row["recovered"]
    assert row["mttr_s"] == pytest.approx(0.30)
    assert row["committed_step"] == 6 and row["resumed_from_step"] == 6
    assert row["steps_lost"] == 0 and row["samples_lost"] == 0
    assert row["back_to_full_s"] == pytest.approx(5.0)
    assert row["join_pause_s"] == pytest.approx(15.0 - 10.31)


def test_analyze_phalanx_counts_a_rollback_as_lost() -> None:
    records = {"w0": [_rec(9.9, 5, 1), _rec(10.2, 5, 2, n=2)], "w1": [_rec(9.9, 5, 1)]}
    (row,) = recovery.analyze_phalanx(records, [{"victim": "w1", "t": 10.0, "g": 1}], 2)
    assert row["steps_lost"] == 1 and row["samples_lost"] == 6


def test_analyze_phalanx_reports_no_recovery() -> None:
    records = {"w0": [_rec(9.9, 5, 1)]}
    (row,) = recovery.analyze_phalanx(records, [{"victim": "w1", "t": 10.0, "g": 1}], 2)
    assert row["recovered"] is False
    assert recovery._kind_summary([row])["recovered"] == 0


def test_exactly_once_finds_missing_and_duplicated_samples() -> None:
    ok = {"w0": [_rec(1, 1, 1, plan=[[0, 1], [2]]), _rec(2, 2, 1, plan=[[3], []])]}
    assert recovery.exactly_once(ok, 4, last_epoch_complete=True)["samples_missing"] == 0
    bad = {"w0": [_rec(1, 1, 1, plan=[[0, 1], [1]]), _rec(2, 2, 1, plan=[[], []]),
                  _rec(3, 3, 1, e=1, plan=[[0], []])]}
    res = recovery.exactly_once(bad, 4, last_epoch_complete=False)
    assert res["epochs_checked"] == 1       # epoch 1 is unfinished and not judged
    assert res["samples_missing"] == 2 and res["samples_duplicated"] == 1


def test_exactly_once_prefers_the_survivors_version_of_a_redone_step() -> None:
    records = {"dead": [_rec(1.0, 1, 1, plan=[[0], [1]])],
               "live": [_rec(2.0, 1, 2, plan=[[0, 1], [2, 3]])]}
    res = recovery.exactly_once(records, 4, last_epoch_complete=True)
    assert res["steps_redone"] == 1 and res["samples_missing"] == 0


def test_analyze_torchrun_counts_steps_since_the_checkpoint() -> None:
    records = {"0.0": [_rec(9.0, s, 0) | {"a": 0} for s in range(1, 19)],
               "0.1": [_rec(17.0, 16, 0) | {"a": 1}]}
    (row,) = recovery.analyze_torchrun(records, [{"victim": 1, "t": 10.0, "a": 0}])
    assert row["mttr_s"] == pytest.approx(7.0)
    assert row["resumed_from_step"] == 15 and row["steps_lost"] == 3
    assert row["samples_lost"] == 18


@pytest.mark.parametrize("argv", [["--np", "1"], ["--faults", "0"], ["--gap-steps", "5", "2"],
                                  ["--skip", "spark"], ["--heartbeat-timeout", "0"]])
def test_bad_arguments_are_rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        recovery.main(argv)
    assert "--" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_run_writes_json_and_phalanx_loses_nothing(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "recovery.json"
    # 30 throughput steps per mode rather than --quick's 100: the plumbing, in 20 s less
    text = run_bench(["recovery", "--quick", "--throughput-steps", "30", "--json", str(out)],
                     tmp_path, timeout=200)
    res = json.loads(out.read_text())
    assert res["bench"] == "recovery" and res["config"]["quick"]
    px = res["phalanx"]
    for kind in ("SIGKILL", "SIGSTOP"):
        s = px[kind]
        assert s["n"] == 1 and s["recovered"] == 1, s
        assert s["mttr_median_s"] > 0 and s["mttr_max_s"] >= s["mttr_median_s"]
        assert s["steps_lost_total"] == 0 and s["samples_lost_total"] == 0, s
    eo = px["exactly_once"]
    assert eo["epochs_checked"] > 0
    assert eo["samples_missing"] == 0 and eo["samples_duplicated"] == 0, eo
    assert px["exit_code"] == 0
    tr = res["torchrun"]["SIGKILL"]
    assert tr["n"] == 1 and tr["recovered"] == 1 and tr["mttr_median_s"] > 0
    thr = res["throughput"]
    assert thr["on_samples_per_s"] > 0 and thr["off_samples_per_s"] > 0
    assert "overhead_pct" in thr and res["verdicts"]
    assert "MTTR" in text and "torchrun" in text
