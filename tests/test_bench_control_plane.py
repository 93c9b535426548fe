"""`phalanx bench control-plane` against the real coordinator: a small run forms, re-forms
after a crash and a host loss with no false loss and leaves no process behind; a coordinator
whose caps refuse the workers reads "never" rather than hanging; bad flags exit 2 naming them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cmd

from phalanx.bench import control_plane

pytestmark = pytest.mark.timeout(90)

KEYS = {"workers", "first_generation_s", "fanout_p99_s", "reform_s", "false_losses",
        "coord_threads", "coord_rss_mb", "coord_cpu_pct", "generator_cpu_s"}


def _bench(tmp_path: Path, *args: str, timeout: float = 75):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep +
           os.environ.get("PYTHONPATH", "")}
    return run_cmd([sys.executable, "-m", "phalanx.bench.control_plane", *args], tmp_path,
                   timeout, env)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited too
    except FileNotFoundError:
        return True


def test_small_run_forms_and_reforms_without_false_losses(tmp_path: Path) -> None:
    out = tmp_path / "cp.json"
    res = _bench(tmp_path, "--workers", "16,64", "--per-host", "8", "--steady", "1",
                 "--host-loss", "--deadline", "20", "--json", str(out))
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["workers"] for r in rows] == [16, 64]
    for r in rows:
        assert KEYS <= set(r), set(r) ^ KEYS
        assert r["formed"] is True and "error" not in r, r
        for key in ("first_generation_s", "fanout_p99_s", "reform_s",
                    "host_loss_fanout_p99_s", "host_loss_reform_s"):
            assert isinstance(r[key], float) and 0 <= r[key] < 20, (key, r)
        # Everyone hears of the loss before the last survivor has its new place.
        assert r["fanout_p99_s"] <= r["reform_s"], r
        assert r["false_losses"] == 0 and r["errors"] == 0, r
        assert isinstance(r["coord_threads"], int) and r["coord_threads"] > 0
        assert r["coord_rss_mb"] > 0 and r["generator_cpu_s"] > 0
        assert all(_gone(pid) for pid in [r["coord_pid"], *r["generator_pids"]]), r
    lines = res.stdout.splitlines()
    assert lines[0].startswith("| workers | first generation (s)")
    assert lines[2].startswith("| 16 |") and lines[3].startswith("| 64 |")
    assert "never" not in res.stdout


def test_a_phase_that_never_completes_reads_never(tmp_path: Path) -> None:
    # Caps that admit 8 connections: 16 workers (32 connections) can never all join.
    out = tmp_path / "cp.json"
    res = _bench(tmp_path, "--workers", "16", "--steady", "1", "--deadline", "3",
                 "--limits", "max_connections=8", "--json", str(out), timeout=40)
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["formed"] is False
    assert row["first_generation_s"] is None and row["reform_s"] is None
    assert "| 16 | never | never | never |" in res.stdout
    assert all(_gone(pid) for pid in [row["coord_pid"], *row["generator_pids"]])


@pytest.mark.parametrize("args,flag", [(["--workers", "1"], "--workers"),
                                       (["--workers", "64,x"], "--workers"),
                                       (["--per-host", "0"], "--per-host"),
                                       (["--limits", "max_bogus=3"], "--limits")])
def test_bad_flags_exit_2_naming_the_flag(tmp_path: Path, args: list[str], flag: str) -> None:
    res = _bench(tmp_path, *args, timeout=30)
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert flag in line and "error" in line


def test_p99_counts_what_never_arrived_and_the_table_says_never() -> None:
    assert control_plane.p99([0.1] * 99 + [0.5], 100) == 0.1
    assert control_plane.p99([0.1] * 98, 100) is None  # 2% never heard: no p99
    assert control_plane.p99([0.1] * 199, 200) == 0.1
    row = {"workers": 512, "first_generation_s": 0.25, "fanout_p99_s": None, "reform_s": None,
           "false_losses": 0, "coord_threads": 4, "coord_rss_mb": 30.2, "coord_cpu_pct": 12.0,
           "generator_cpu_s": 1.5}
    assert control_plane.table([row])[2] == ("| 512 | 0.250 | never | never | 0 | 4 | 30 | 12 "
                                             "| 1.5 |")
