"""Smoke tests of the training demo (`examples/train_digits.py` under `phalanx run`) and of
`phalanx bench train` (tiny step counts: this checks the plumbing, not the numbers)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep +
            os.environ.get("PYTHONPATH", "")}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_digits_example_on_four_workers() -> None:
    pytest.importorskip("sklearn")
    cmd = [sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "4",
           str(REPO / "examples" / "train_digits.py"), "--epochs", "4"]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(),
                       timeout=80)
    assert p.returncode == 0, p.stdout + p.stderr
    epochs = re.findall(r"epoch\s+\d+\s+step\s+\d+\s+workers 4\s+loss", p.stdout)
    assert len(epochs) == 4, p.stdout                     # rank 0 only prints progress
    match = re.search(r"final test accuracy ([0-9.]+)", p.stdout)
    assert match, p.stdout
    acc = float(match.group(1))
    assert acc > 0.9, p.stdout


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_readme_demo_kills_a_worker_and_training_carries_on() -> None:
    """The README's main command, shortened: rank 2 is SIGKILLed at step 40."""
    pytest.importorskip("sklearn")
    cmd = [sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "4", "--min-np", "2",
           "--chaos", "kill:rank=2,step=40", str(REPO / "examples" / "train_digits.py"),
           "--epochs", "5"]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(), timeout=80)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"killed by SIGKILL( \(fenced by the launcher\))?; continuing without it",
                     p.stderr), p.stderr
    assert re.search(r"recovered in [0-9.]+s: generation 2 with 3 workers", p.stdout + p.stderr)
    assert re.search(r"epoch\s+5\s+step\s+\d+\s+workers 3", p.stdout), p.stdout
    acc = float(re.search(r"final test accuracy ([0-9.]+)", p.stdout).group(1))
    assert acc > 0.9, p.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_train_runs_and_writes_json(tmp_path: Path) -> None:
    from phalanx.bench import train
    out = tmp_path / "train.json"
    assert train.main(["--np", "2", "--steps", "2", "--warmup", "1", "--batch-size", "4",
                       "--models", "many", "--horovod", "--compare-copy", "--compare-independent",
                       "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "many" and row["tensors"] > 100
    for key in ("single_samples_per_s", "ddp_samples_per_s", "phalanx_samples_per_s",
                "phalanx_over_ddp", "phalanx_scaling_efficiency", "horovod_samples_per_s",
                "horovod_over_phalanx", "phalanx_copy_samples_per_s",
                "independent_samples_per_s"):
        assert row[key] > 0
    for mode in ("phalanx", "phalanx-copy", "horovod"):   # step phases, about the step time
        ph = row["phases_ms"][mode]   # (2 timed steps here: a loose check of the plumbing)
        parts = ph["forward_backward"] + ph["sync"] + ph["optimizer"] + ph["boundary"]
        assert 0.5 * ph["step"] < parts < 1.5 * ph["step"], (mode, ph)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_step_parts_times_every_mode() -> None:
    """`phalanx.bench.step_parts`: every mode timed on both ranks, and the summary line."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "2",
                          sys.executable, "-m", "phalanx.bench.step_parts", "many", "1"],
                         env=env, capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    for mode in ("free", "lockstep", "reduce-only", "thread", "inline"):
        assert re.search(rf"{mode} +rank 0: step +[0-9.]+ .*\| rank 1: step", out), (mode, out)
    assert "inline / thread step time:" in out, out


def test_bench_train_rejects_bad_models() -> None:
    from phalanx.bench import train
    with pytest.raises(SystemExit):
        train.main(["--models", "resnet"])
