"""Timeline and step metrics of a real job: `phalanx run --timeline FILE --metrics FILE` on 3
workers with one SIGKILLed mid-run. The trace must be valid Chrome-trace JSON (what Perfetto
and chrome://tracing open), hold every worker's collectives (with name, bytes, dtype), fused
gradient buckets, step phases and the survivors' recovery in order; the metric lines' phases
must add up to each step's time, and agree with px.metrics() inside the job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

JOB = """
import json, time, torch, phalanx as px
torch.set_num_threads(1)
px.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model=model,
                              bucket_cap_mb=0.005)      # several buckets
state = px.elastic.State(model=model, optimizer=opt)
x = torch.randn(16, 32)

@px.elastic.run
def train(state):
    while state.step < 40:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        time.sleep(0.01)

train(state)
px.allreduce(torch.ones(3), name="final.check")
print("metrics", px.rank(), json.dumps(px.metrics()), flush=True)
"""

PHASES = ("forward_backward_s", "sync_s", "optimizer_s", "boundary_s")


def _check_schema(events: list[dict]) -> None:
    for e in events:
        assert isinstance(e["name"], str) and isinstance(e["pid"], int), e
        assert isinstance(e["tid"], int), e
        assert e["ph"] in ("X", "i", "M"), e
        if e["ph"] != "M":
            assert isinstance(e["ts"], (int, float)) and e["ts"] > 1.6e15, e   # wall-clock us
            assert isinstance(e.get("args", {}), dict)
        if e["ph"] == "X":
            assert e["dur"] >= 0, e
    timed = [e["ts"] for e in events if e["ph"] != "M"]
    assert timed == sorted(timed), "events are not in time order"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_timeline_and_metrics_of_a_job_with_a_fault(tmp_path) -> None:
    (tmp_path / "job.py").write_text(JOB)
    trace, metrics = tmp_path / "trace.json", tmp_path / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run(
        [sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "3", "--min-np", "2",
         "--chaos", "kill:rank=2,step=15", "--timeline", str(trace), "--metrics", str(metrics),
         "--progress", "0.2", str(tmp_path / "job.py")],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"timeline: {trace}" in res.stderr
    assert re.search(r"progress: step \d+ \([\d.]+ steps/s\), \d worker\(s\)", res.stderr)
    assert not (tmp_path / "trace.json.parts").exists(), "part files were not merged away"

    events = json.loads(trace.read_text())["traceEvents"]
    _check_schema(events)
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert len(names) == 3, names
    by_pid: dict[int, list[dict]] = {}
    for e in events:
        if e["ph"] != "M":
            by_pid.setdefault(e["pid"], []).append(e)
    assert len(by_pid) == 3
    survivors = [evs for evs in by_pid.values() if any(e["name"] == "fault detected" for e in evs)]
    assert len(survivors) == 2, "both survivors record the recovery"
    for evs in survivors:
        first = {}
        for e in evs:
            first.setdefault(e["name"], e)
        order = [first["fault detected"]["ts"], first["re-form"]["ts"], first["heal"]["ts"]]
        assert order == sorted(order), order
        rec = first["recovery"]
        assert rec["args"]["old_size"] == 3 and rec["args"]["new_size"] == 2
        for phase in ("forward+backward", "wait for reductions", "optimizer step"):
            assert phase in first, phase
        buckets = {e["args"]["name"] for e in evs
                   if e["cat"] == "collective" and e["name"] == "allreduce"
                   and str(e["args"].get("name")).startswith("grad.bucket")}
        assert len(buckets) >= 2, buckets
        check = [e for e in evs if e["name"] == "allreduce" and e["args"].get("name") == "final.check"]
        assert check and check[0]["args"]["bytes"] == 12 and check[0]["args"]["dtype"] == "float32"
        assert any(e["name"] == "negotiate" for e in evs)

    lines = [json.loads(s) for s in metrics.read_text().splitlines()]
    assert {r["rank"] for r in lines} >= {0, 1}
    for r in lines:
        assert abs(sum(r[p] for p in PHASES) - r["step_s"]) <= 0.05 * r["step_s"] + 1e-5, r
        assert r["reduce_s"] >= 0 and r["step"] >= 1
    assert any(r["recovery_s"] > 0 for r in lines), "the recovery's time is in a step record"
    reported = {int(m.group(1)): json.loads(m.group(2))
                for m in re.finditer(r"metrics (\d) (\{.*\})", res.stdout)}
    assert len(reported) == 2, res.stdout[-2000:]
    for rank, m in reported.items():
        assert m["recoveries"] == 1 and m["steps"] >= 20
        mean = m["mean"]
        assert abs(sum(mean[p] for p in PHASES) - mean["step_s"]) <= 0.05 * mean["step_s"]
        mine = [r for r in lines if r["rank"] == rank and r["generation"] == m["last"]["generation"]]
        assert mine[-1]["step"] == m["last"]["step"]
        assert mine[-1]["step_s"] == pytest.approx(m["last"]["step_s"], abs=2e-6)


def test_a_one_worker_job_writes_its_own_timeline(tmp_path) -> None:
    trace = tmp_path / "solo.json"
    code = ("import torch, phalanx as px\npx.init()\n"
            "m = torch.nn.Linear(4, 2)\n"
            "opt = px.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), model=m)\n"
            "for _ in range(3):\n"
            "    opt.zero_grad(); m(torch.ones(2, 4)).sum().backward(); opt.step()\n"
            "print(px.metrics()['steps'])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PHALANX_TIMELINE": str(trace)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-1] == "3"
    events = json.loads(trace.read_text())["traceEvents"]
    _check_schema(events)
    assert sum(e["name"] == "optimizer step" for e in events) == 3


def test_bad_timeline_and_progress_arguments_are_refused(tmp_path) -> None:
    script = tmp_path / "s.py"
    script.write_text("")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for flags, needle in ((["--timeline", str(tmp_path / "nope" / "t.json")], "does not exist"),
                          (["--progress", "0"], "--progress must be > 0")):
        res = subprocess.run([sys.executable, "-m", "phalanx.launch.cli", "run", *flags,
                              str(script)], env=env, capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and needle in res.stderr, res.stderr


@pytest.mark.timeout(90)
def test_horovod_timeline_variable_under_the_facade(tmp_path) -> None:
    """HOROVOD_TIMELINE=FILE, as Horovod users set it, gives the same merged trace."""
    script = tmp_path / "hvd.py"
    script.write_text("import torch, phalanx.horovod.torch as hvd\nhvd.init()\n"
                      "hvd.allreduce(torch.ones(5), name='loss')\nhvd.shutdown()\n")
    trace = tmp_path / "hvd.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HOROVOD_TIMELINE": str(trace)}
    res = subprocess.run([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "2",
                          str(script)], env=env, capture_output=True, text=True, timeout=80)
    assert res.returncode == 0, res.stderr[-2000:]
    events = json.loads(trace.read_text())["traceEvents"]
    _check_schema(events)
    named = [e for e in events if e["ph"] == "X" and e["args"].get("bytes") == 20]
    assert len({e["pid"] for e in named}) == 2, named
