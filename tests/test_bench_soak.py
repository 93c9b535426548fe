"""`phalanx bench soak`: the checks on made-up logs (pure), and a small real soak (a few mixed
chaos faults on 4 workers) whose report must show nothing lost: 0 committed steps lost, every
sample of every epoch exactly once, every fault survived."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import run_bench

from phalanx.bench import soak, soak_check
from phalanx.bench.soak_worker import chain
from phalanx.elastic.chaos import parse_chaos

pytestmark = pytest.mark.timeout(30)


def _history(plans: list[tuple[int, list[list[int]]]], *, worker_gen: int = 1,
             start: str = "", first_step: int = 1) -> list[dict[str, Any]]:
    """Step records (as soak_worker logs them) for consecutive steps with these plans."""
    out, h = [], start
    for i, (epoch, plan) in enumerate(plans):
        s = first_step + i
        prev, h = h, chain(h, s, epoch, plan)
        out.append({"t": float(s), "s": s, "e": epoch, "g": worker_gen, "n": len(plan),
                    "h": h, "hp": prev, "p": plan})
    return out


PLANS = [(0, [[0, 1], [2]]), (0, [[3], []]), (1, [[2, 0], [1]]), (1, [[3], []])]


def test_spec_parses_and_plans_every_kind_on_distinct_steps() -> None:
    spec, plan = soak_check.make_spec(100, seed=3, gap=(6, 12), warmup=10)
    rules = parse_chaos(spec)
    assert len(rules) == plan["rules"] >= 100
    assert all(plan["planned"][k] > 0 for k in soak_check.KINDS)
    steps = [r.step for r in rules if r.step is not None]
    assert len(steps) == len(set(steps)) and max(steps) == plan["last_step"]
    assert {r.kind for r in rules} == {"kill", "stop", "cut", "term"}
    assert all(r.rank in soak_check.RECOVERY_RANKS for r in rules if r.recovery is not None)
    assert soak_check.make_spec(100, seed=3, gap=(6, 12), warmup=10)[0] == spec  # seeded


def test_clean_history_passes_every_check() -> None:
    # w1 did not finish step 2 (its peer died mid-reduction), healed from w0, and went on.
    first = _history(PLANS[:2])
    rest = _history(PLANS[2:], worker_gen=2, start=first[1]["h"], first_step=3)
    w0, w1 = first + rest, first[:1] + rest
    res = soak_check.check_history({"w0": w0, "w1": w1}, [w0[-1]["h"]], num_samples=4)
    assert res["final_step"] == res["history_steps"] == res["distinct_committed_steps"] == 4
    assert res["committed_steps_lost"] == 0 and res["unlogged_steps"] == 0
    assert res["backwards"] == [] and res["epochs"] == [0, 1]
    assert res["samples_missing"] == 0 and res["samples_duplicated"] == 0


def test_a_step_redone_with_another_history_is_a_committed_step_lost() -> None:
    w0 = _history(PLANS[:3])                       # committed step 3, then died
    redo = _history([PLANS[3], (1, [[2, 0], [1]])], worker_gen=2, start=w0[1]["h"],
                    first_step=3)                  # survivors redid step 3 differently
    w1 = _history(PLANS[:2]) + redo
    res = soak_check.check_history({"w0": w0, "w1": w1}, [w1[-1]["h"]], num_samples=4)
    assert res["committed_steps_lost"] == 1 and res["lost_examples"][0].startswith("step 3 ")
    assert res["backwards"]                        # generation 2 logged step 3 after step 3


def test_missing_and_duplicated_samples_and_a_reset_are_found() -> None:
    bad = _history([(0, [[0, 1], [1]]), (0, [[], []])])
    res = soak_check.check_history({"w0": bad}, [bad[-1]["h"]], num_samples=4)
    assert res["samples_missing"] == 2 and res["samples_duplicated"] == 1
    reset = _history(PLANS[:2]) + _history(PLANS[:1], worker_gen=2)
    res = soak_check.check_history({"w0": reset}, [reset[-1]["h"]], num_samples=4)
    assert res["committed_steps_lost"] == 1 and len(res["backwards"]) == 2
    assert res["final_step"] == 1 != res["distinct_committed_steps"]


def test_a_step_nobody_logged_is_reported_not_guessed() -> None:
    w0 = _history(PLANS)
    del w0[1]
    res = soak_check.check_history({"w0": w0}, [w0[-1]["h"]], num_samples=4)
    assert res["unlogged_steps"] >= 1


LAUNCHER_LOG = """\
[rank2]: [chaos] sending SIGKILL to rank 2 (pid 101) at step 30
[phalanx] rank 2 (worker w2, pid 101) was killed by SIGKILL; respawning it (1/10 restarts)
[rank1]: [chaos] sending SIGSTOP to rank 1 (pid 102) at step 40
[phalanx] fencing worker w1 (pid 102): declared lost by the coordinator
[phalanx] rank 1 (worker w1, pid 102) was killed by SIGKILL (fenced by the launcher); \
respawning it (2/10 restarts)
[rank0]: [chaos] cutting rank 0 (pid 103) at step 50 off from the coordinator
[phalanx] rank 0 (worker w0, pid 103) exited with code 1; respawning it (3/10 restarts)
[rank3]: [chaos] sending SIGKILL to rank 1 (pid 104) during recovery 2
[phalanx] rank 1 (worker w3, pid 104) was killed by SIGKILL; continuing without it
[phalanx] rank 2 (worker w2.1, pid 105) was killed by SIGKILL; respawning it (4/10 restarts)
[phalanx] chaos rule 'term:random,seed=1,step=90' never fired (the job's last step was 80)
[phalanx] job finished in 9.0s: 3 worker(s) finished (started with 4), ...
"""


def test_launcher_log_is_parsed_into_faults_and_outcomes() -> None:
    got = soak_check.parse_launcher_log(LAUNCHER_LOG)
    kinds = [f["kind"] for f in got["injected"]]
    assert kinds == ["kill", "stop", "cut", "kill-in-recovery"]
    assert [f["replaced"] for f in got["injected"]] == [True, True, True, False]
    assert got["respawns"] == 4 and got["fenced"] == 1 and got["continued_without"] == 1
    assert got["unplanned"] == ["w2.1 (pid 105) was killed by SIGKILL"]
    assert got["unfired_rules"] == ["term:random,seed=1,step=90"] and got["finished"]
    table = soak_check.fault_table(got["injected"], {"kill": 1, "term": 1})
    assert table["total"] == {"planned": 2, "injected": 4, "replaced": 3}


def test_resource_and_recovery_stats() -> None:
    flat = soak_check.resource_stats([(float(t), 10.0) for t in range(60)])
    assert flat["median"] == 10.0 and flat["trend_per_min"] == pytest.approx(0.0)
    leak = soak_check.resource_stats([(float(t), 10.0 + t) for t in range(60)])
    assert leak["trend_per_min"] == pytest.approx(60.0)
    assert leak["last_fifth_median"] > leak["first_fifth_median"]
    recs = [{"generation": 2, "cause": "WorkerLost", "seconds": 0.1, "new_size": 3,
             "survivors": [0, 1, 2]},
            {"generation": 2, "cause": "WorkerLost", "seconds": 0.3, "new_size": 3,
             "survivors": [0, 1, 2]},
            {"generation": 3, "cause": "WorkerLost", "seconds": 5.0, "new_size": 2,
             "survivors": [0]},
            {"generation": 4, "cause": "MembershipChanged", "seconds": 0.2, "new_size": 4,
             "survivors": [0, 1]}]
    stats = soak_check.recovery_stats(recs)
    assert stats["lost"] == {"n": 1, "median_s": 0.3, "p90_s": 0.3, "max_s": 0.3}
    assert stats["lost+joined"]["n"] == 1 and stats["joined"]["max_s"] == 0.2


@pytest.mark.parametrize("argv", [["--faults", "0"], ["--np", "2"], ["--gap-steps", "5", "2"],
                                  ["--faults", "100", "--epochs", "2"],
                                  ["--heartbeat-timeout", "0"]])
def test_bad_arguments_are_rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        soak.main(argv)
    assert "--" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_small_soak_loses_nothing(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "soak.json"
    text = run_bench(["soak", "--faults", "6", "--epochs", "2", "--gap-steps", "3", "5",
                      "--no-baseline", "--json", str(out)], tmp_path, timeout=150)
    res = json.loads(out.read_text())
    s = res["soak"]
    assert s["exit_code"] == 0, text
    total = s["faults"]["total"]
    assert total["injected"] >= 6 and total["replaced"] == total["injected"], s["faults"]
    assert s["launcher_log"]["unplanned"] == [], s["launcher_log"]
    h = s["integrity"]
    assert h["committed_steps_lost"] == 0 and h["unlogged_steps"] == 0, h
    assert h["backwards"] == [] and h["final_hashes_agree"], h
    assert s["final_step"] == h["distinct_committed_steps"] == h["history_steps"] > 0
    assert h["epochs"] == [0, 1], h["epochs"]
    assert h["samples_missing"] == 0 and h["samples_duplicated"] == 0, h["per_epoch"]
    assert all(v.startswith("met") for v in s["verdicts"].values()), s["verdicts"]
    assert s["launcher_resources"]["open_fds"]["n"] > 0 and s["recovery"]
    assert re.search(r"^committed steps lost +0 ", text, re.MULTILINE) and "target" in text
