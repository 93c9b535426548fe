"""`phalanx bench recovery -H`: losing a whole host. The analysis and the fault commands (pure or
with `true`/`false`), argument errors, and one quick run of each fault on simulated hosts
(real jobs, a real crash and cut: this checks the plumbing and that nothing is lost, not the
numbers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bench_host_loss import run as run_on_simhosts
from simhosts import simhosts  # noqa: F401 - the fixture

from phalanx.bench import recovery
from phalanx.bench.recovery import BenchError
from phalanx.bench.recovery_hosts import CommandFaults, max_stall, summarize


def test_max_stall_is_the_longest_pause_of_a_survivor_after_the_fault() -> None:
    records = {"w0": [{"t": t} for t in (9.0, 10.5, 10.6, 14.6, 14.7)],
               "w1": [{"t": t} for t in (9.0, 10.5, 10.6, 14.6, 14.7)],
               "w2": [{"t": 9.0}]}
    assert max_stall(records, ["w0", "w1"], 10.0) == pytest.approx((4.0, 0.6))
    assert max_stall(records, ["w0"], 14.65) == pytest.approx((0.05, 0.0))
    assert max_stall({}, ["w0"], 1.0) == (0.0, 0.0)


def _row(mttr: float, stall: float, lost: int = 0) -> dict[str, Any]:
    return {"recovered": True, "mttr_s": mttr, "max_stall_s": stall, "steps_lost": lost,
            "samples_lost": 32 * lost,
            "exactly_once": {"samples_missing": 0, "samples_duplicated": 0}}


def test_summarize_takes_medians_and_totals() -> None:
    s = summarize([_row(0.1, 0.2), _row(0.3, 30.0, lost=1), _row(0.2, 0.4)])
    assert s["n"] == 3 and s["recovered"] == 3
    assert s["mttr_median_s"] == 0.2 and s["mttr_max_s"] == 0.3
    assert s["max_stall_median_s"] == 0.4 and s["max_stall_max_s"] == 30.0
    assert s["steps_lost_total"] == 1 and s["samples_lost_total"] == 32


def test_fault_commands_name_the_host_and_report_failures(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    f = CommandFaults({"crash": f"echo crash {{host}} >> {mark}", "cut": "exit 3"},
                      restore=f"echo back {{host}} >> {mark}")
    f.inject("crash", "node 2")
    f.restore("crash", "node 2")
    assert mark.read_text().splitlines() == ["crash node 2", "back node 2"]
    with pytest.raises(BenchError, match="host cut command 'exit 3' failed with exit code 3"):
        f.inject("cut", "b")
    CommandFaults({}, restore=None).restore("cut", "b")  # no restore command: nothing to do


@pytest.mark.parametrize("argv,needle", [
    (["-H", "a:2"], "needs at least 2"),
    (["-H", "a:2,b:2", "--faults", "crash", ], "give --host-crash-cmd"),
    (["-H", "a:2,b:2", "--faults", "flood", "--host-crash-cmd", "x"], "choose from crash, cut"),
    (["-H", "a:2,b:2", "--faults", "cut", "--host-cut-cmd", "x", "--repeat", "0"], "--repeat"),
])
def test_bad_arguments_are_rejected(argv: list[str], needle: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        recovery.main(argv)   # -H sends `phalanx bench recovery` to the host-loss benchmark
    assert needle in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_quick_host_loss_run_loses_nothing(simhosts, tmp_path: Path) -> None:  # noqa: F811
    """One crash and one cut of the second of 2 hosts x 2 workers: the survivors recover, never
    stall for anything like the collective timeout, and no committed step or sample is lost."""
    pytest.importorskip("sklearn")
    hosts = simhosts(2)
    out = tmp_path / "hosts.json"
    code = run_on_simhosts(["--repeat", "1", "--observe-s", "8", "--gap-steps", "5",
                            "--timeout", "10", "--workdir", str(tmp_path), "--json", str(out),
                            # 1 s (the bench's default) fenced a loaded survivor whose heartbeat
                            # thread went 1 s without the GIL just after a recovery, once in CI
                            "--heartbeat-timeout", "2.5"],
                           hosts)
    assert code == 0
    res = json.loads(out.read_text())
    for kind in ("crash", "cut"):
        s = res[kind]
        assert s["n"] == 1 and s["recovered"] == 1, s
        assert 0 < s["mttr_median_s"] < 10, s
        assert s["steps_lost_total"] == 0 and s["samples_lost_total"] == 0, s
        assert s["samples_missing"] == 0 and s["samples_duplicated"] == 0, s
        assert s["runs"][0]["exactly_once"]["epochs_checked"] > 0, s
        # Regression: after a cut, dropping the old group's in-flight Gloo operation froze the
        # survivors for the rest of --timeout (comm/graveyard.py); a stall that long is a hang.
        assert s["max_stall_max_s"] < 5, s
