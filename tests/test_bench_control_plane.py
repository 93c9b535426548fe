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


@pytest.mark.timeout(150)
def test_2048_workers_form_and_reform_without_false_losses(tmp_path: Path) -> None:
    """The CI-sized run: 2,048 simulated workers on 256 hosts against the real coordinator."""
    out = tmp_path / "cp.json"
    res = _bench(tmp_path, "--workers", "2048", "--per-host", "8", "--steady", "1",
                 "--procs", "1", "--deadline", "60", "--json", str(out), timeout=140)
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["formed"] is True and row["false_losses"] == 0 and row["errors"] == 0, row
    for key in ("first_generation_s", "fanout_p99_s", "reform_s"):
        assert isinstance(row[key], float), (key, row)
    # The threads are the server's own (loop, timers, losses, main), not one per connection.
    assert row["coord_threads"] <= 8, row
    assert all(_gone(pid) for pid in [row["coord_pid"], *row["generator_pids"]])


def test_in_process_costs_of_a_large_job_stay_within_the_limits() -> None:
    from phalanx.bench.control_plane_inproc import costs
    r = costs(4000, 8)
    assert r["within_limits"] is True, r
    # The roster shared by every assignment is O(hosts): 500 hosts, not 4,000 worker ids.
    assert r["roster_payload_b"] < 500 * 32, r
    assert r["assignment_header_max_b"] < 512, r  # its own numbers and its host's 8 pids
    assert r["status_reply_b"] < 512 and r["status_after_loss_b"] < 512, r


def test_assignments_expand_to_a_consistent_world_and_survivors() -> None:
    """The compact roster, expanded as a worker does, against the coordinator's own world:
    every rank once, each worker's host and local rank, its host's pids, and after a loss the
    previous generation's ranks that are kept."""
    import threading

    from phalanx.coord.client import expand_roster
    from phalanx.coord.membership import Membership
    from phalanx.coord.waits import Wait
    m = Membership(target_np=24, min_np=20, max_np=24, heartbeat_timeout=3.0, settle=1.0,
                   fence=None, stopped_timeout=0.3, probe_stopped=None, stop=threading.Event())
    m.quiet()
    ids = [f"w{i}" for i in range(24)]
    for i, w in enumerate(ids):
        m.handle("join", {"worker": w, "host": f"h{i % 3}", "rank_hint": i, "pid": 100 + i}, b"")

    def place_all(workers: list[str], after: int) -> dict[str, dict]:
        for w in workers:
            assert isinstance(m.handle("rendezvous", {"worker": w, "after": after}, b""), Wait)
        m.form_if_due()
        out = {}
        for w in workers:
            header, payload = m._placed(m.members[w], after)
            out[w] = {**header, **expand_roster(header, json.loads(payload))}
        return out

    first = place_all(ids, 0)
    assert sorted(a["rank"] for a in first.values()) == list(range(24))
    for i, w in enumerate(ids):
        a = first[w]
        assert a["hosts"][a["rank"]] == f"h{i % 3}" and a["size"] == 24
        here = [r for r, h in enumerate(a["hosts"]) if h == f"h{i % 3}"]
        assert a["local_size"] == 8 and here[a["local_rank"]] == a["rank"]
        assert a["pids"][a["rank"]] == 100 + i
        assert all(a["pids"][r] > 0 for r in here)
    m.declare_lost("w4", "test")
    second = place_all([w for w in ids if w != "w4"], 1)
    old_rank = first["w4"]["rank"]
    for a in second.values():
        assert a["size"] == 23 and a["kept"] == [r for r in range(24) if r != old_rank]
