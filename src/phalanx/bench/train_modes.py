"""How `phalanx bench train` starts some of its modes' processes, and reads their results:
independent one-process runs started together, real Horovod under horovodrun, and the
environment every worker gets (one thread, this checkout first on the path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def meet(where: Path, rank: int, n: int, timeout: float = 120.0) -> None:
    """Wait until all `n` independent processes have started (a file each in `where`)."""
    (where / f"ready.{rank}").touch()
    deadline = time.monotonic() + timeout
    while len(list(where.glob("ready.*"))) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench train: only {len(list(where.glob('ready.*')))} of {n} "
                             f"independent processes started within {timeout:.0f} s")
        time.sleep(0.01)


def worker_env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def parse_result(outputs: list[str], what: str) -> dict[str, Any]:
    for out in outputs:
        for line in out.splitlines():
            if "BENCH " in line:
                return dict(json.loads(line.split("BENCH ", 1)[1]))
    raise RuntimeError(f"{what} produced no result; its output was:\n" + "\n".join(outputs))


def run_all(cmds: list[list[str]], timeout: float, what: str) -> list[str]:
    """Start every command at once, wait for all; their outputs (stderr merged), in order.
    Raises RuntimeError with every output if any fails; none outlives this call."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=worker_env()) for cmd in cmds]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError(f"{what} failed:\n" + "\n".join(outs))
    return outs


def run_independent(common: list[str], n: int, timeout: float) -> dict[str, Any]:
    """`n` one-process runs at once, each on its own core, sharing nothing but the machine:
    their summed samples/s is what the hardware allows `n` workers with no communication."""
    import tempfile
    common = [c if c != "independent" else "single" for c in common]
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-") as ready:
        outs = run_all([[sys.executable, *common, "--rank", str(r), "--world", str(n),
                         "--ready-dir", ready] for r in range(n)], timeout, "independent runs")
    each = [parse_result([o], "independent") for o in outs]
    return {**each[0], "samples_per_s": sum(e["samples_per_s"] for e in each),
            "step_ms": sum(e["step_ms"] for e in each) / n}


def run_horovodrun(common: list[str], n: int, timeout: float) -> dict[str, Any]:
    """Real Horovod (`import horovod.torch`), launched on this host with its own horovodrun."""
    import shutil
    launcher = shutil.which("horovodrun")
    if launcher is None:
        raise RuntimeError("--real-horovod: horovodrun is not on PATH; install Horovod "
                           "(BENCHMARKS.md says how to build 0.28.1 against this torch)")
    p = subprocess.run([launcher, "-np", str(n), "-H", f"localhost:{n}", "--gloo",
                        sys.executable, *common], check=False, capture_output=True, text=True,
                       env=worker_env(), timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"horovodrun failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return parse_result([p.stdout], "horovod-real")
