"""`phalanx run` starts what Horovod and torchrun users type: a script, `python script.py`,
`python -m module`, or any command (pytest, a shell script), with the rank variables Horovod
scripts read (HOROVOD_RANK, ...) set, and the facade's init() rewriting them from the job."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}
PRINT_RANK = ("import os, phalanx as px\npx.init()\n"
              "print('rank', px.rank(), px.size(), os.environ['HOROVOD_RANK'], "
              "os.environ['HOROVOD_SIZE'], os.environ['HOROVOD_LOCAL_RANK'], flush=True)\n")


def _run(tmp_path, *program: str, np: int = 2) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", str(np),
                           *program], env=ENV, cwd=tmp_path, capture_output=True, text=True,
                          timeout=90)


def _ranks(out: str) -> list[tuple[str, ...]]:
    return sorted(re.findall(r"rank (\d) (\d) (\d) (\d) (\d)", out))


@pytest.mark.timeout(120)
def test_python_script_and_module_forms(tmp_path) -> None:
    (tmp_path / "job.py").write_text(PRINT_RANK)
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(PRINT_RANK + "import sys\nprint('argv', sys.argv[1:])\n")
    want = [("0", "2", "0", "2", "0"), ("1", "2", "1", "2", "1")]
    for program in (["job.py"], ["python", "job.py"], [sys.executable, "job.py"],
                    ["python3", "-m", "mypkg.train", "--lr", "0.1"]):
        res = _run(tmp_path, *program)
        assert res.returncode == 0, (program, res.stderr[-2000:])
        assert _ranks(res.stdout) == want, (program, res.stdout)
    assert "argv ['--lr', '0.1']" in res.stdout


@pytest.mark.timeout(120)
def test_any_command_runs_and_its_exit_status_counts(tmp_path) -> None:
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho \"shell $HOROVOD_RANK of $HOROVOD_SIZE\"\n"
                      f"exec {sys.executable} job.py\n")
    script.chmod(0o755)
    (tmp_path / "job.py").write_text(PRINT_RANK)
    res = _run(tmp_path, "./run.sh")
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(re.findall(r"shell (\d) of (\d)", res.stdout)) == [("0", "2"), ("1", "2")]
    assert len(_ranks(res.stdout)) == 2
    bad = _run(tmp_path, "sh", "-c", "exit 3")
    assert bad.returncode == 3
    assert re.search(r"job failed: rank \d .* exited with code 3", bad.stderr), bad.stderr
    (tmp_path / "test_dist.py").write_text(
        "import torch, phalanx as px\n\ndef test_sum():\n    px.init()\n"
        "    assert px.allreduce(torch.ones(2)).tolist() == [px.size()] * 2\n")
    res = _run(tmp_path, "pytest", "-q", "-p", "no:cacheprovider", "test_dist.py")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.count("1 passed") == 2


def test_unknown_program_is_refused(tmp_path) -> None:
    res = _run(tmp_path, "no-such-command-xyz")
    assert res.returncode == 2
    assert "neither a Python script nor a command on PATH" in res.stderr
    res = _run(tmp_path, "python", "missing.py")
    assert res.returncode == 2 and "'missing.py' not found" in res.stderr
