"""A torchrun-style script (env:// `init_process_group`, DistributedSampler, DDP) runs unchanged
under the real `phalanx run -np 2`: the launcher sets the variables torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Checked against a
single-process run on the concatenated batches, and with `px.init()` still joining phalanx's
coordinator (not a static job) when those variables are set."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import REPO, run_cmd

pytestmark = pytest.mark.slow

N, DIM, BATCH, EPOCHS, SEED, LR = 32, 4, 4, 2, 3, 0.05

TRAIN = f"""
import json, os, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

dist.init_process_group("gloo")
seen = {{k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                   "MASTER_ADDR", "MASTER_PORT")}}
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
X = torch.randn({N}, {DIM}, generator=g)
Y = X @ torch.randn({DIM}, 1, generator=g)
data = TensorDataset(torch.arange({N}), X, Y)
sampler = DistributedSampler(data, shuffle=True, seed={SEED})
loader = DataLoader(data, batch_size={BATCH}, sampler=sampler)
model = DDP(torch.nn.Linear({DIM}, 1))
opt = torch.optim.SGD(model.parameters(), lr={LR})
batches = []
for epoch in range({EPOCHS}):
    sampler.set_epoch(epoch)
    for idx, x, y in loader:
        batches.append(idx.tolist())
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
out = {{"env": seen, "rank": dist.get_rank(), "size": dist.get_world_size(),
       "batches": batches, "params": [p.detach().tolist() for p in model.module.parameters()]}}
with open(os.path.join(sys.argv[1], f"r{{dist.get_rank()}}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""

PX_JOB = """
import os, phalanx as px
from phalanx import runtime
px.init()
print("px", px.rank(), px.size(), runtime.active().client is not None,
      os.environ["RANK"], os.environ["MASTER_ADDR"], flush=True)
"""


def _phalanx_run(tmp_path, *program: str, np: int = 2):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(name, None)  # what the workers see must come from phalanx run
    return run_cmd([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", str(np), *program],
                   tmp_path, 90, env)


def _reference(batches: list[list[list[int]]]) -> list:
    """One process, plain SGD, each step on the union of the ranks' batches: DDP's averaged
    gradient of equal-sized per-rank mean losses is the gradient of the mean over the union."""
    import torch
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, DIM, generator=g)
    Y = X @ torch.randn(DIM, 1, generator=g)
    model = torch.nn.Linear(DIM, 1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in zip(*batches, strict=True):
        idx = torch.tensor([i for b in step for i in b])
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X[idx]), Y[idx]).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def _sampler_batches(rank: int, size: int) -> list[list[int]]:
    """DistributedSampler's documented order: a seeded permutation per epoch, every size-th
    index from `rank`, cut into batches."""
    import torch
    out = []
    for epoch in range(EPOCHS):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        mine = perm[rank::size]
        out += [mine[i:i + BATCH] for i in range(0, len(mine), BATCH)]
    return out


@pytest.mark.timeout(120)
def test_torchrun_script_runs_unchanged_and_matches_one_process(tmp_path) -> None:
    import torch
    (tmp_path / "train.py").write_text(TRAIN)
    res = _phalanx_run(tmp_path, "python", "train.py", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    outs = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    ports = {o["env"]["MASTER_PORT"] for o in outs}
    assert len(ports) == 1 and 0 < int(ports.pop()) < 65536
    for r, o in enumerate(outs):
        assert (o["rank"], o["size"]) == (r, 2)
        assert {k: v for k, v in o["env"].items() if k != "MASTER_PORT"} == {
            "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1"}
        assert o["batches"] == _sampler_batches(r, 2)
    want = _reference([o["batches"] for o in outs])
    for o in outs:
        for got, ref in zip(o["params"], want, strict=True):
            torch.testing.assert_close(torch.tensor(got), ref, rtol=0, atol=1e-6)


@pytest.mark.timeout(120)
def test_px_init_still_joins_the_coordinator(tmp_path) -> None:
    (tmp_path / "job.py").write_text(PX_JOB)
    res = _phalanx_run(tmp_path, "job.py")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = sorted(ln.split(": ", 1)[1] for ln in res.stdout.splitlines() if " px " in ln)
    assert lines == ["px 0 2 True 0 127.0.0.1", "px 1 2 True 1 127.0.0.1"], res.stdout


KILLED = """
import os, signal, time, torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)
"""


@pytest.mark.timeout(120)
def test_a_lost_worker_fails_the_static_job(tmp_path) -> None:
    """As under torchrun: no elastic recovery for a script that rendezvous through env://."""
    (tmp_path / "job.py").write_text(KILLED)
    res = _phalanx_run(tmp_path, "python", "job.py")
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "job failed: rank 1" in last and "SIGKILL" in last, res.stderr[-2000:]
