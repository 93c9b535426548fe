"""Horovod's PyTorch examples in examples/horovod/, run as Horovod users run them: the digits
example (Horovod's pytorch_mnist.py on scikit-learn's digits) and the synthetic benchmark,
under `phalanx run ... python SCRIPT` on one host (2 and 4 workers) and across 2 simulated
hosts; and, where Horovod itself is installed, the digits example with its import line changed
back to `import horovod.torch as hvd` under `horovodrun`, which must train as well."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cmd
from simhosts import simhosts  # noqa: F401 - the fixture

EXAMPLES = REPO / "examples" / "horovod"
DIGITS = EXAMPLES / "pytorch_digits.py"
SYNTHETIC = EXAMPLES / "pytorch_synthetic_benchmark.py"
IMPORT_LINE = "import phalanx.horovod.torch as hvd\n"
DIGITS_ARGS = ("--epochs", "12", "--log-interval", "1000")
SYNTHETIC_ARGS = ("--batch-size", "16", "--num-warmup-batches", "2",
                  "--num-batches-per-iter", "3", "--num-iters", "3")
TEST_LINE = re.compile(r"Test set: Average loss: ([0-9.]+), Accuracy: ([0-9.]+)%")
TOTAL_LINE = re.compile(r"Total img/sec on (\d+) CPU\(s\): ([0-9.]+) \+-([0-9.]+)")
ENV = {**os.environ,
       "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def launch(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `cmd` (never hangs, see conftest.run_cmd); it must exit 0."""
    proc = run_cmd(cmd, cwd, timeout, ENV)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def phalanx_run(launcher_args: list[str], script: Path, script_args: tuple[str, ...],
                cwd: Path, timeout: float) -> str:
    """`phalanx run LAUNCHER_ARGS python SCRIPT SCRIPT_ARGS`, Horovod-style; its stdout."""
    cmd = [sys.executable, "-m", "phalanx.launch.cli", "run", *launcher_args, "python",
           str(script), *script_args]
    return launch(cmd, cwd, timeout).stdout


def final_accuracy(stdout: str) -> float:
    """The accuracy (a fraction) of the last `Test set: ...` line rank 0 printed."""
    found = TEST_LINE.findall(stdout)
    assert found, f"no 'Test set: ...' line in the output:\n{stdout[-3000:]}"
    return float(found[-1][1]) / 100


def check_ranks(out: Path, np: int, accuracy: float) -> None:
    """Every rank wrote its record, and all ranks ended with the same parameters."""
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(np)]
    assert {r["size"] for r in records} == {np}, records
    assert len({r["params"] for r in records}) == 1, f"ranks ended with different parameters: " \
                                                     f"{records}"
    assert records[0]["accuracy"] == pytest.approx(accuracy, abs=1e-4), records[0]


def check_total_line(stdout: str, np: int) -> float:
    found = TOTAL_LINE.search(stdout)
    assert found, f"no 'Total img/sec on N CPU(s)' line in the output:\n{stdout[-3000:]}"
    assert int(found.group(1)) == np, found.group(0)
    assert float(found.group(2)) > 0, found.group(0)
    return float(found.group(2))


@pytest.fixture(scope="module")
def digits_accuracy() -> dict[int, float]:
    """Final accuracies of the one-host digits runs, by worker count: the real-Horovod test
    compares with the 2-worker run instead of repeating it."""
    return {}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("np", [2, 4])
def test_digits_example(np, tmp_path, digits_accuracy) -> None:
    pytest.importorskip("sklearn")
    stdout = phalanx_run(["-np", str(np)], DIGITS, (*DIGITS_ARGS, "--out", str(tmp_path)),
                         tmp_path, timeout=140)
    accuracy = final_accuracy(stdout)
    assert accuracy > 0.9, stdout[-3000:]
    check_ranks(tmp_path, np, accuracy)
    digits_accuracy[np] = accuracy


@pytest.mark.timeout(90)
def test_synthetic_benchmark(tmp_path) -> None:
    stdout = phalanx_run(["-np", "2"], SYNTHETIC, SYNTHETIC_ARGS, tmp_path, timeout=80)
    assert len(re.findall(r"Iter #\d+: [0-9.]+ img/sec per CPU", stdout)) == 3, stdout
    assert re.search(r"Img/sec per CPU: [0-9.]+ \+-[0-9.]+", stdout), stdout
    check_total_line(stdout, 2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_examples_on_two_hosts(simhosts, tmp_path) -> None:  # noqa: F811
    pytest.importorskip("sklearn")
    hosts = simhosts(2)
    launcher = ["-H", ",".join(f"{h.addr}:2" for h in hosts), "--ssh-config",
                str(hosts.ssh_config)]
    stdout = phalanx_run(launcher, DIGITS, (*DIGITS_ARGS, "--out", str(tmp_path)), tmp_path,
                         timeout=150)
    accuracy = final_accuracy(stdout)
    assert accuracy > 0.9, stdout[-3000:]
    check_ranks(tmp_path, 4, accuracy)
    stdout = phalanx_run(launcher, SYNTHETIC, SYNTHETIC_ARGS, tmp_path, timeout=100)
    check_total_line(stdout, 4)


@pytest.mark.timeout(200)
def test_digits_example_trains_as_under_real_horovod(tmp_path, digits_accuracy) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("horovod.torch")
    horovodrun = shutil.which("horovodrun")
    if horovodrun is None:
        pytest.skip("horovod.torch is importable but horovodrun is not on PATH")
    source = DIGITS.read_text()
    assert source.count(IMPORT_LINE) == 1, f"{DIGITS} should import hvd in exactly one line"
    script = tmp_path / "pytorch_digits_horovod.py"
    script.write_text(source.replace(IMPORT_LINE, "import horovod.torch as hvd\n"))
    if 2 not in digits_accuracy:
        stdout = phalanx_run(["-np", "2"], DIGITS, DIGITS_ARGS, tmp_path, timeout=140)
        digits_accuracy[2] = final_accuracy(stdout)
    out = tmp_path / "horovod"
    out.mkdir()
    stdout = launch([horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
                     str(script), *DIGITS_ARGS, "--out", str(out)], tmp_path, timeout=150).stdout
    horovod_accuracy = final_accuracy(stdout)
    check_ranks(out, 2, horovod_accuracy)
    assert abs(horovod_accuracy - digits_accuracy[2]) < 0.03, \
        f"phalanx {digits_accuracy[2]:.4f}, Horovod {horovod_accuracy:.4f}"
