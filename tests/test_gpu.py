"""CUDA tensors through phalanx: NCCL where every rank has its own GPU, host staging where ranks
share one, DistributedOptimizer training on the GPU, and recovery from a killed GPU worker.

Marked `gpu`; skipped without a CUDA device (CI has none). Each job is a real `phalanx run`.
The results are compared with numpy and with a single-process run of the same training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA device")]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}

COLLECTIVES = """
import json, os, sys
import numpy as np, torch, phalanx as px
from phalanx import runtime
px.init()
r, n = px.rank(), px.size()
dev = torch.device("cuda", px.local_rank() % torch.cuda.device_count())
x = (torch.arange(1000, dtype=torch.float32, device=dev) + 1) * (r + 1)
out = {"path": "nccl" if runtime.current().group.nccl_ok else "staged",
       "sum": px.allreduce(x, op="sum").cpu().tolist(),
       "avg": px.allreduce(x, op="avg").cpu().tolist(),
       "max": px.allreduce(x, op="max").cpu().tolist(),
       "gather": px.allgather(torch.full((r + 1,), float(r), device=dev)).cpu().tolist(),
       "bcast": px.broadcast(x, root=n - 1).cpu().tolist(),
       "a2a": px.alltoall(torch.arange(2 * n, device=dev) + 100 * r).cpu().tolist()}
y = x.clone()
px.allreduce_(y, op="sum")
out["inplace_on_cuda"] = bool(y.is_cuda and torch.equal(y, px.allreduce(x, op="sum")))
with open(os.path.join(sys.argv[1], f"c{r}.json"), "w") as f:
    json.dump(out, f)
"""

TRAIN = """
import json, os, sys
import torch, phalanx as px
from sklearn.datasets import load_digits
out, steps = sys.argv[1], int(sys.argv[2])
px.init()
dev = torch.device("cuda", px.local_rank() % torch.cuda.device_count())
torch.backends.cudnn.deterministic = True
d = load_digits()
X = torch.tensor(d.data[:1024] / 16.0, dtype=torch.float32, device=dev)
Y = torch.tensor(d.target[:1024], device=dev)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                            torch.nn.Linear(128, 10)).to(dev)
opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
                              model=model)
state = px.elastic.State(model=model, optimizer=opt)

@px.elastic.run
def train(state):
    while state.step < steps:
        # every rank takes its share of the same global batch of 64; averaging the shard means
        # over 2 ranks gives the batch mean
        b = state.step % 16
        idx = torch.arange(b * 64, (b + 1) * 64, device=dev).tensor_split(px.size())[px.rank()]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()  # mean over the shard
        opt.step()

train(state)
torch.save({"params": [p.detach().cpu() for p in model.parameters()], "size": px.size()},
           os.path.join(out, f"r{px.rank()}.pt"))
"""


def _run(tmp: Path, np_: int, script: str, *args: str, launcher: tuple[str, ...] = ()) -> str:
    (tmp / "job.py").write_text(script)
    res = subprocess.run([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", str(np_),
                          *launcher, str(tmp / "job.py"), str(tmp), *args], env=ENV, cwd=tmp,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stderr


def _reference(steps: int) -> list[torch.Tensor]:
    """The same training in this process, one rank, the whole batch of 64."""
    from sklearn.datasets import load_digits
    dev = torch.device("cuda", 0)
    d = load_digits()
    X = torch.tensor(d.data[:1024] / 16.0, dtype=torch.float32, device=dev)
    Y = torch.tensor(d.target[:1024], device=dev)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for step in range(steps):
        b = step % 16
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[b * 64:(b + 1) * 64]),
                                          Y[b * 64:(b + 1) * 64]).backward()
        opt.step()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("np_", [1, 2])
def test_cuda_collectives_equal_numpy(tmp_path: Path, np_: int) -> None:
    """One rank: NCCL. Two ranks: NCCL with two GPUs, else staged through host memory (NCCL
    refuses two ranks on one device); the answers are the same either way."""
    _run(tmp_path, np_, COLLECTIVES)
    base = [float(i + 1) for i in range(1000)]
    for r in range(np_):
        o = json.loads((tmp_path / f"c{r}.json").read_text())
        want_path = "nccl" if torch.cuda.device_count() >= np_ else "staged"
        assert o["path"] == want_path
        total = sum(k + 1 for k in range(np_))
        assert o["sum"] == [v * total for v in base]
        assert o["avg"] == pytest.approx([v * total / np_ for v in base])
        assert o["max"] == [v * np_ for v in base] and o["bcast"] == [v * np_ for v in base]
        assert o["gather"] == [float(k) for k in range(np_) for _ in range(k + 1)]
        assert o["a2a"] == [2 * r + j + 100 * k for k in range(np_) for j in range(2)]
        assert o["inplace_on_cuda"]


@pytest.mark.timeout(300)
def test_distributed_optimizer_on_cuda_matches_one_process(tmp_path: Path) -> None:
    _run(tmp_path, 2, TRAIN, "40")
    want = _reference(40)
    finals = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    for f in finals:
        assert f["size"] == 2
        for got, ref in zip(f["params"], want):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(finals[0]["params"], finals[1]["params"]):
        assert torch.equal(a, b), "ranks ended with different parameters"


@pytest.mark.timeout(300)
def test_killed_gpu_worker_survivors_continue(tmp_path: Path) -> None:
    """A SIGKILLed CUDA worker: the other two re-form without rollback and finish, equal."""
    err = _run(tmp_path, 3, TRAIN, "60", launcher=("--min-np", "2", "--chaos",
                                                     "kill:rank=1,step=20"))
    finals = [torch.load(p) for p in sorted(tmp_path.glob("r*.pt"))]
    assert len(finals) == 2 and all(f["size"] == 2 for f in finals), err[-2000:]
    for a, b in zip(finals[0]["params"], finals[1]["params"]):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in finals[0]["params"])
