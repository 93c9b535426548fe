"""Before the first step every rank takes rank 0's state, as Horovod's broadcast_parameters
and DDP's constructor do: a job whose ranks build their models without a common seed still
trains one model. Checked with real processes against each rank's own pre-sync weights and
against a single-process run from rank 0's initial weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO

JOB = """
import sys, torch, phalanx as px
torch.set_num_threads(1)
px.init()
torch.manual_seed(1000 + px.rank())      # a different initial model on every rank
model = torch.nn.Linear(6, 3)
opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                              model=model)
state = px.elastic.State(model=model, optimizer=opt)
flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()])
print("init", px.rank(), flat().tolist(), flush=True)
x = torch.linspace(-1, 1, 48).reshape(8, 6)

@px.elastic.run
def train(state):
    while state.step < 20:
        opt.zero_grad()
        ((model(x) - 1.0) ** 2).mean().backward()
        opt.step()

train(state)
print("final", px.rank(), flat().tolist(), flush=True)
"""


def _reference(init: list[float], steps: int = 20) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(init[:18]).reshape(3, 6))
        model.bias.copy_(torch.tensor(init[18:]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.linspace(-1, 1, 48).reshape(8, 6)
    for _ in range(steps):   # every rank has the same batch: the average gradient is this one
        opt.zero_grad()
        ((model(x) - 1.0) ** 2).mean().backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags", [(), ("--min-np", "1")], ids=["static", "elastic"])
def test_unseeded_ranks_start_from_rank_zeros_model(tmp_path, flags) -> None:
    (tmp_path / "job.py").write_text(JOB)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "3", *flags,
                          str(tmp_path / "job.py")], env=env, capture_output=True, text=True,
                         timeout=100, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    found = re.findall(r"(init|final) (\d) (\[.*\])", res.stdout)
    got = {(kind, int(r)): json.loads(vals) for kind, r, vals in found}
    assert len(got) == 6, res.stdout
    assert got[("init", 0)] != got[("init", 1)], "the job was meant to start unseeded"
    finals = [torch.tensor(got[("final", r)]) for r in range(3)]
    assert all(torch.equal(finals[0], f) for f in finals[1:]), "ranks ended different"
    ref = _reference(got[("init", 0)])
    assert torch.allclose(finals[0], ref, atol=1e-5), (finals[0] - ref).abs().max()
