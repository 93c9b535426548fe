"""`phalanx bench goodput`: the simulator against closed forms (no failures: ETTR = 1 minus the
overheads, exactly; checkpoint-restart under Poisson failures: Daly's exact expectation within
1%), seeded repeatability, the extrapolation rule, orderings that must hold, the JSON shape,
and the calibration on two recorded soak runs (tests/data/goodput_soak_*.json, written by
`phalanx bench goodput --save-soak` from real `phalanx bench soak` runs on this machine)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import run_bench

from phalanx.bench import goodput, goodput_calib
from phalanx.bench.goodput_models import STRATEGIES, Inputs, ettr, model
from phalanx.bench.goodput_params import (
    DAY,
    LLAMA3_RATE,
    Curve,
    FailureClass,
    FailureModel,
    PhalanxParams,
)
from phalanx.bench.goodput_sim import (
    ContinueModel,
    Fault,
    RestartModel,
    daly_ettr,
    daly_interval,
    make_trace,
    run_continue,
    run_restart,
)

pytestmark = pytest.mark.timeout(60)
DATA = Path(__file__).resolve().parent / "data"
NO_FAULTS = FailureModel(rate_per_gpu_day=0.0)


# ---------------------------------------------------------------------- closed forms
def test_no_failures_ettr_is_one_minus_the_overheads_exactly() -> None:
    inp = Inputs(failures=NO_FAULTS)
    for name in ("phalanx", "phalanx-target", "torchft"):
        assert ettr(name, 4000, inp, days=30, seeds=2) == pytest.approx(
            1 - inp.job.steady_overhead, abs=1e-12)
    for name in ("inprocess", "ckpt-restart"):   # no faults: never worth a checkpoint
        assert ettr(name, 4000, inp, days=30, seeds=2) == pytest.approx(1.0, abs=1e-12)
    # a fixed checkpoint schedule: tau of work, then delta blocked, with a final tail
    m = RestartModel(restart=lambda _k: 0.0, interval_s=900.0, checkpoint_s=100.0)
    assert run_restart(m, [], horizon_s=10_000.0) == pytest.approx(0.9, abs=1e-12)
    assert run_restart(m, [], horizon_s=10_500.0) == pytest.approx(9_500 / 10_500, abs=1e-12)
    slow = ContinueModel(n=8, pause=lambda _k, _a: 0.0, overhead=0.25)
    assert run_continue(slow, [], horizon_s=1e6)[0] == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize(("mtbf", "restart", "delta"), [(3600.0, 600.0, 60.0),
                                                         (900.0, 300.0, 10.0)])
def test_checkpoint_restart_matches_daly_within_one_percent(mtbf: float, restart: float,
                                                            delta: float) -> None:
    n = 1000
    fm = FailureModel(rate_per_gpu_day=DAY / mtbf / n,
                      mix=(FailureClass(kind="crash", scope="gpu", count=1, causes="-"),))
    tau = daly_interval(delta, mtbf)
    m = RestartModel(restart=lambda _k: restart, interval_s=tau, checkpoint_s=delta)
    horizon = 20000 * mtbf   # per-seed spread ~0.3%: the 1% bound has a wide margin
    sim = sum(run_restart(m, make_trace(fm, n, horizon, s), horizon_s=horizon)
              for s in range(3)) / 3
    exact = daly_ettr(interval_s=tau, checkpoint_s=delta, restart_s=restart, mtbf_s=mtbf)
    assert sim == pytest.approx(exact, rel=0.01)
    # and Daly's interval is (near) the optimum of the exact expectation
    best = max(daly_ettr(interval_s=tau * f / 100, checkpoint_s=delta, restart_s=restart,
                         mtbf_s=mtbf) for f in range(20, 400))
    assert exact >= best * 0.999


def test_continue_engine_pauses_and_degraded_throughput_add_up() -> None:
    # 10 workers, one fault at t=100: a 5 s pause, then 9 workers until t=100+50, then a 2 s
    # join pause: over 1000 s the work is 1000 - 5 - 2 - 45 * (1/10).
    m = ContinueModel(n=10, pause=lambda _k, _a: 5.0, replace_s=50.0, join=lambda _a: 2.0)
    got, wall = run_continue(m, [Fault(t=100.0, kind="crash")], horizon_s=1000.0)
    assert wall == 1000.0
    assert got == pytest.approx((1000 - 5 - 2 - 45 * 0.1) / 1000, abs=1e-12)
    # step-scheduled faults: two at the same step fire together; below min_workers it waits
    m2 = replace(m, n=3, min_workers=2, step_time=lambda _n: 0.5)
    f = [Fault(kind="crash", step=10), Fault(kind="crash", step=10)]
    got, wall = run_continue(m2, f, target_progress=100.0)
    # 10 steps (5 s), pauses 5+5, a lone survivor waits for the first replacement (t=55),
    # a 2 s join pause, the second one joins at t=55 too (same time: its pause adds 2 s)
    assert wall == pytest.approx(5 + 50 + 2 + 2 + (100 - 5) * 1.0, rel=1e-9)
    assert got == pytest.approx(100 / wall)


def test_extrapolation_rule_passes_through_the_measured_points() -> None:
    c = Curve(points=((4, 0.033), (64, 0.47), (256, 1.525)))
    for n, v in c.points:
        assert c(n) == pytest.approx(v)
    slope = math.log(1.525 / 0.47) / math.log(4)
    assert c(1024) == pytest.approx(1.525 * 4 ** slope)
    assert Curve(points=((4, 0.033), (10000, 2.0)), beyond="log")(100000) == pytest.approx(
        2.0 * math.log(100000) / math.log(10000))
    p = PhalanxParams()
    assert p.pause_s("crash", 4) == pytest.approx(0.143)         # the measured MTTR at N=4
    assert p.join_pause_s(4, 0.0, 1.0) == pytest.approx(p.join_s)
    assert p.recover_s(256) == pytest.approx(1.525 + 120.0)      # re-form + Gloo bootstrap
    with pytest.raises(ValueError, match="N increasing"):
        Curve(points=((64, 1.0), (4, 0.1)))


# ---------------------------------------------------------------------- traces and orderings
def test_traces_are_seeded_poisson_with_the_published_mix() -> None:
    fm = FailureModel()
    a, b = make_trace(fm, 100_000, 30 * DAY, 7), make_trace(fm, 100_000, 30 * DAY, 7)
    assert a == b and a != make_trace(fm, 100_000, 30 * DAY, 8)
    expect = LLAMA3_RATE * 100_000 * 30
    assert abs(len(a) - expect) < 4 * math.sqrt(expect)
    hosts = sum(f.workers == 8 for f in a) / len(a)
    assert hosts == pytest.approx((46 + 35) / 419, abs=0.03)
    inp = Inputs()
    assert ettr("phalanx-target", 16000, inp, days=10, seeds=2, seed=3) == \
        ettr("phalanx-target", 16000, inp, days=10, seeds=2, seed=3)


def test_orderings_that_must_hold() -> None:
    inp = Inputs()
    n = 64000
    e = {s: ettr(s, n, inp, days=30, seeds=2) for s in STRATEGIES}
    # in-process restart: shorter restart and cheaper checkpoints than checkpoint-restart
    assert e["inprocess"] > e["ckpt-restart"]
    # the same phalanx with a faster control plane is never worse
    assert e["phalanx-target"] >= e["phalanx"]
    # with a control plane no slower than torchft's quorum, phalanx (faster detection, half
    # a step redone, one worker out instead of a replica group) is at least torchft
    quick = replace(inp.target, reform=Curve(points=((4, 0.05), (8, 0.1)), beyond="log"))
    assert ettr("phalanx-target", n, replace(inp, target=quick), days=30, seeds=2) >= \
        e["torchft"]
    # ETTR falls with N for checkpoint-restart
    ck = [ettr("ckpt-restart", k, inp, days=30, seeds=2) for k in (1000, 16000, 100000)]
    assert ck == sorted(ck, reverse=True)
    with pytest.raises(ValueError, match="not one of"):
        model("horovod", 8, inp)


# ---------------------------------------------------------------------- calibration
@pytest.mark.parametrize("name", ["goodput_soak_a.json", "goodput_soak_b.json",
                                  "goodput_soak_bench.json"])
def test_calibration_on_recorded_soak_runs(name: str) -> None:
    # a: 4 step faults 500-700 steps apart, no throttling (a lone survivor waits once);
    # b: 4 faults 700-900 apart; bench: the defaults, the run behind BENCHMARKS.md
    tr = goodput_calib.SoakTrace.from_json((DATA / name).read_text())
    assert goodput_calib.SoakTrace.from_json(tr.to_json()).steps == pytest.approx(tr.steps)
    c = goodput_calib.calibration(tr)
    assert 0.5 < c["measured"] < 1.0
    assert abs(c["error_points"]) <= goodput.CALIBRATION_POINTS
    assert c["faults"]["kill-in-recovery"] == 1 and sum(c["faults"].values()) >= 4


def test_measured_goodput_of_a_made_up_run() -> None:
    # 4 workers, 10 ms steps; the fault after step 100 costs a 0.5 s pause, 100 steps run at 3
    # workers (10 ms each), a 0.2 s join pause, then 99 more steps at 4 workers.
    steps, t = [], 0.0
    for s in range(1, 301):
        n, g = (4, 1) if s <= 100 else (3, 2) if s <= 200 else (4, 3)
        t += 0.5 if s == 101 else 0.2 if s == 201 else 0.01
        steps.append((s, t, n, g))
    tr = goodput_calib.SoakTrace(np=4, min_np=2, steps=steps, faults=[{"kind": "kill",
                                                                      "step": 100}])
    m = goodput_calib.measure(tr)
    assert m.step_s == pytest.approx({4: 0.01, 3: 0.01})
    assert m.wall_s == pytest.approx(steps[-1][1] - steps[0][1])
    work = (99 + 100 * 0.75 + 100) * 0.01
    assert m.goodput == pytest.approx(work / m.wall_s)
    assert m.paused_s == pytest.approx(0.49 + 0.19)


# ---------------------------------------------------------------------- the command
def test_json_shape_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "g.json", tmp_path / "g.png"
    rc = goodput.main(["--sizes", "1000,4000", "--days", "2", "--seeds", "1", "--json",
                       str(out), "--soak-json", str(DATA / "goodput_soak_b.json"),
                       "--plot", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["ettr"]) == set(STRATEGIES)
    for row in res["ettr"].values():
        assert set(row) == {"1000", "4000"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert set(res["ettr_by_rate"]) == {"llama3", "ant"}
    assert {"predicted", "measured"} <= set(res["calibration"])
    assert res["sensitivity"][-1]["input"].startswith("failure rate")
    assert res["what_if"][0]["case"] == "as simulated" and len(res["what_if"]) == 4
    text = capsys.readouterr().out
    assert "calibration on a real soak run" in text and "target calibration within 3" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_cli_registered_and_refuses_bad_input(tmp_path: Path) -> None:
    text = run_bench(["goodput", "--no-soak", "--sizes", "1000", "--days", "1", "--seeds", "1"],
                     tmp_path, timeout=50)
    assert "ETTR, llama3 failure rate" in text and "ckpt-restart" in text
    with pytest.raises(SystemExit):
        goodput.main(["--rates", "bogus", "--no-soak"])
    with pytest.raises(SystemExit):
        goodput.main(["--no-soak", "--soak-json", "x.json"])
