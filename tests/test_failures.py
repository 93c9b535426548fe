"""Faults versus bugs, and what the launcher says: real processes, real signals.

A worker killed by a signal is a fault (recovered); an exception is a bug (the job fails,
whatever --max-restarts says, and the last line names the rank, exception and file:line).
A successful job ends with a one-line summary; Ctrl-C stops quietly; chaos rules that can
never fire are refused and rules that did not fire are reported.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}

# An elastic training loop; `fail=R:S` makes rank R raise ValueError after step S.
JOB = """
import os, sys, time
import torch, phalanx as px
px.init()
args = dict(a.split("=") for a in sys.argv[1:])
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model=model)
state = px.elastic.State(model=model, optimizer=opt)
steps, pause = int(args.get("steps", 40)), float(args.get("pause", 0.02))
fail_rank, fail_step = map(int, args.get("fail", "-1:-1").split(":"))

@px.elastic.run
def train(state):
    while state.step < steps:
        if px.rank() == fail_rank and state.step == fail_step and "w" in os.environ.get(
                "PHALANX_WORKER_ID", "") and "." not in os.environ["PHALANX_WORKER_ID"]:
            raise ValueError(f"bad batch at step {state.step}")
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        time.sleep(pause)

train(state)
time.sleep(float(args.get("linger", 0)) * px.rank())
"""
FAIL_LINE = next(i for i, line in enumerate(JOB.splitlines(), 1) if "raise ValueError" in line)


def launch(tmp_path, np: int, *flags: str, script_args: tuple[str, ...] = (),
           timeout: float = 90) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "job.py"
    path.write_text(JOB)
    return subprocess.run([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", str(np),
                           *flags, str(path), *script_args], env=ENV, capture_output=True,
                          text=True, timeout=timeout, cwd=tmp_path)


def last_line(res: subprocess.CompletedProcess[str]) -> str:
    return res.stderr.strip().splitlines()[-1]


@pytest.mark.timeout(120)
def test_exception_fails_the_job_even_with_restarts_left(tmp_path) -> None:
    res = launch(tmp_path, 2, "--min-np", "1", "--max-restarts", "3",
                 script_args=("fail=1:5",))
    assert res.returncode == 1, res.stderr[-3000:]
    line = last_line(res)
    assert line.startswith("[phalanx] job failed: rank 1"), line
    assert "raised ValueError: bad batch at step 5" in line, line
    assert f"job.py:{FAIL_LINE}" in line, line
    assert "respawning" not in res.stderr and "[rank1.1]" not in res.stderr + res.stdout
    assert res.stderr.count("Traceback (most recent call last)") == 1, res.stderr[-3000:]


@pytest.mark.timeout(120)
def test_sigkill_under_the_same_flags_is_recovered_with_a_summary(tmp_path) -> None:
    res = launch(tmp_path, 2, "--min-np", "1", "--max-restarts", "3", "--chaos",
                 "kill:rank=1,step=5", script_args=("steps=60",))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "respawning it (1/3 restarts)" in res.stderr
    line = last_line(res)
    assert line.startswith("[phalanx] job finished in "), line
    assert "1 fault(s) recovered (rank 1 (worker w1" in line and "killed by SIGKILL" in line, line
    assert "1 replacement(s) started" in line, line


@pytest.mark.timeout(120)
def test_below_min_np_names_the_exception(tmp_path) -> None:
    res = launch(tmp_path, 3, "--min-np", "2", script_args=("fail=2:3",))
    assert res.returncode == 1
    line = last_line(res)
    assert "rank 2" in line and "raised ValueError" in line, line


@pytest.mark.timeout(120)
def test_root_cause_is_the_first_failure_not_the_cascade(tmp_path) -> None:
    """Not elastic: when rank 2 raises, ranks 0 and 1 fail with WorkerLost; the last line
    still names rank 2's exception."""
    res = launch(tmp_path, 3, script_args=("fail=2:3",))
    assert res.returncode == 1
    line = last_line(res)
    assert "rank 2" in line and "raised ValueError" in line, line
    assert res.stderr.count("Traceback (most recent call last)") == 1, res.stderr[-3000:]


@pytest.mark.timeout(60)
def test_chaos_rule_for_a_missing_rank_is_refused(tmp_path) -> None:
    res = launch(tmp_path, 2, "--chaos", "kill:rank=5,step=10")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "rank=5 does not exist" in lines[0], res.stderr


@pytest.mark.timeout(120)
def test_chaos_rule_that_never_fired_is_reported(tmp_path) -> None:
    res = launch(tmp_path, 2, "--min-np", "1", "--chaos",
                 "kill:rank=1,step=10;stop:rank=0,step=100000", script_args=("steps=30",))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "chaos rule 'stop:rank=0,step=100000' never fired" in res.stderr
    assert "chaos rule 'kill:rank=1,step=10' never fired" not in res.stderr
    assert last_line(res).startswith("[phalanx] job finished in ")


@pytest.mark.timeout(120)
def test_a_rank_that_finished_is_never_called_lost(tmp_path) -> None:
    res = launch(tmp_path, 3, "--min-np", "1", script_args=("steps=20", "linger=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "lost" not in res.stderr, res.stderr[-3000:]
    assert "no faults" in last_line(res)


@pytest.mark.timeout(120)
def test_ctrl_c_stops_quietly(tmp_path) -> None:
    path = tmp_path / "job.py"
    path.write_text(JOB)
    proc = subprocess.Popen([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "3",
                             "--min-np", "1", str(path), "steps=100000"], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        time.sleep(6)  # well into training
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT
    assert "Traceback" not in err and "lost" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) <= 2, err[-3000:]
    assert lines[-1].startswith("[phalanx] received SIGINT: stopped 3 worker(s)"), lines
