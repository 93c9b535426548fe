"""`phalanx bench ... --plot FILE.png`: the pictures are written and are valid PNGs showing
something (not a blank canvas); the recovery plot's data is the step log as recorded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("matplotlib")
from matplotlib import image as mpimg  # noqa: E402

from phalanx.bench import plots  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.std() > 0.05, "the picture is blank"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_allreduce_plot(tmp_path) -> None:
    png = tmp_path / "busbw.png"
    out = subprocess.run([sys.executable, "-m", "phalanx.launch.cli", "bench", "allreduce",
                          "-np", "2", "--sizes", "4K,64K", "--min-time", "0.05", "--plot",
                          str(png)], env=ENV, capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"wrote {png}" in out.stdout
    _check_png(png)


def test_train_iterative_and_recovery_plots(tmp_path) -> None:
    rows = [{"model": m, "np": 2, "single_samples_per_s": 100.0, "ddp_samples_per_s": 150.0,
             "phalanx_samples_per_s": 170.0, "ddp_scaling_efficiency": 0.75,
             "phalanx_scaling_efficiency": 0.85} for m in ("mlp", "many")]
    _check_png(plots.train(rows, tmp_path / "train.png"))
    ph = {"step": 40.0, "forward_backward": 25.0, "sync": 8.0, "optimizer": 5.0, "boundary": 0.1}
    for r in rows:   # with the copy path and the step phases: a second panel
        r.update(phalanx_copy_samples_per_s=160.0, phalanx_copy_scaling_efficiency=0.8,
                 phases_ms={"phalanx": ph, "phalanx-copy": {**ph, "sync": 12.0}})
    _check_png(plots.train(rows, tmp_path / "train2.png"))
    report = {"config": {"rows": 100000, "features": 20, "np": 2},
              "results": {"phalanx_cached": {"s_per_iter": 0.01},
                          "phalanx_reread": {"s_per_iter": 0.05},
                          "sklearn": {"s_per_iter": 0.02}}}
    _check_png(plots.iterative(report, tmp_path / "iter.png"))
    records = {"w0": [{"t": 100.0 + i * 0.1, "s": i} for i in range(50)],
               "w1": [{"t": 100.05 + i * 0.1, "s": i} for i in range(20)]}
    tl = plots.step_timeline(records, [{"t": 102.0, "kind": "SIGKILL"}])
    assert tl["t"][0] == 0.0 and tl["t"] == sorted(tl["t"]) and len(tl["t"]) == 70
    assert tl["step"][:3] == [0, 0, 1] and tl["faults"] == [{"t": 2.0, "kind": "SIGKILL"}]
    _check_png(plots.recovery({"phalanx": {"timeline": tl}}, tmp_path / "rec.png"))


def test_bad_plot_path_is_refused_before_the_benchmark_runs(tmp_path) -> None:
    for path, needle in ((tmp_path / "x.jpg", "give a .png"),
                         (tmp_path / "no" / "x.png", "does not exist")):
        out = subprocess.run([sys.executable, "-m", "phalanx.launch.cli", "bench", "allreduce",
                              "--plot", str(path)], env=ENV, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and needle in out.stderr, out.stderr
