"""`phalanx run`: argument errors, output prefixes, failure reasons, signals, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phalanx.launch.cli", *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,needle", [
    (["run", "-np", "0", "x.py"], "-np must be at least 1, got 0"),
    (["run", "-np", "2", "missing_script.py"], "script 'missing_script.py' not found"),
    (["run", "--frobnicate", "x.py"], "unrecognized arguments: --frobnicate"),
    (["run", "-np", "2", "--min-np", "3", "x.py"], "--min-np must be between 1 and -np (2)"),
    (["run", "-np", "2", "--chaos", "explode:rank=1", "x.py"], "kind 'explode'"),
    (["bench", "nonsense"], "unknown benchmark 'nonsense'"),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, needle) -> None:
    (tmp_path / "x.py").write_text("print('hi')\n")
    args = [str(tmp_path / "x.py") if a == "x.py" else a for a in args]
    res = cli(*args)
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr


@pytest.mark.timeout(30)
def test_help_is_complete() -> None:
    res = cli("run", "--help")
    assert res.returncode == 0
    for flag in ("-np", "--min-np", "--max-np", "--max-restarts", "--timeout",
                 "--heartbeat-timeout", "--chaos", "--bind", "script", "args"):
        assert flag in res.stdout, flag


@pytest.mark.timeout(60)
def test_output_is_rank_prefixed_and_args_reach_the_script(job) -> None:
    res = job("""
        import sys, phalanx as px
        px.init()
        print("hello from", px.rank(), "of", px.size(), sys.argv[1:])
    """, 3, script_args=("--lr", "0.1"))
    assert res.returncode == 0, res.stderr
    for r in range(3):
        assert f"[rank{r}]: hello from {r} of 3 ['--lr', '0.1']" in res.stdout


@pytest.mark.timeout(60)
def test_failing_worker_fails_the_job_with_a_reason(job) -> None:
    res = job("""
        import sys, time, phalanx as px
        px.init()
        if px.rank() == 1:
            sys.exit(7)
        time.sleep(30)
    """, 3)
    assert res.returncode == 7
    assert "job failed: rank 1" in res.stderr and "exited with code 7" in res.stderr


@pytest.mark.timeout(60)
def test_killed_worker_reason_names_the_signal(job) -> None:
    res = job("""
        import os, signal, time, phalanx as px
        px.init()
        if px.rank() == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(30)
    """, 3)
    assert res.returncode == 128 + signal.SIGKILL
    assert "rank 2" in res.stderr and "killed by SIGKILL" in res.stderr


@pytest.mark.timeout(60)
def test_sigterm_is_forwarded_and_leaves_no_orphans(tmp_path) -> None:
    script = tmp_path / "sleepy.py"
    pids = tmp_path / "pids"
    pids.mkdir()
    script.write_text(
        "import os, time, phalanx as px\npx.init()\n"
        f"open(os.path.join({str(pids)!r}, str(os.getpid())), 'w').close()\n"
        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "2",
                             str(script)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while len(os.listdir(pids)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(os.listdir(pids)) == 2
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "received SIGTERM" in err
    for pid in os.listdir(pids):
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived the launcher"


@pytest.mark.timeout(60)
def test_plain_python_is_a_one_worker_job(tmp_path) -> None:
    script = tmp_path / "solo.py"
    script.write_text("import numpy as np, phalanx as px\npx.init()\n"
                      "print(px.rank(), px.size(), px.allreduce(np.arange(3.0), op='avg'))\n")
    res = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0 1 [0. 1. 2.]"
