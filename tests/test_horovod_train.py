"""Horovod-style training under `phalanx run`: the digits example (tests/horovod_digits.py)
on 2 workers, and an elastic job (hvd.elastic.TorchState + ElasticSampler + @hvd.elastic.run)
that loses a worker to SIGKILL and finishes on the survivors."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

ELASTIC = r'''
import hashlib, json, os, sys
import torch, torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
import phalanx.horovod.torch as hvd

hvd.init()
torch.manual_seed(0)
torch.set_num_threads(1)
digits = load_digits()
X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
Y = torch.tensor(digits.target)
dataset = TensorDataset(X, Y)
sampler = hvd.elastic.ElasticSampler(dataset, shuffle=True, seed=0)
loader = DataLoader(dataset, batch_size=32, sampler=sampler)
model = torch.nn.Linear(64, 10)
LR = 0.1
optimizer = torch.optim.SGD(model.parameters(), lr=LR * hvd.size())
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
state = hvd.elastic.TorchState(model=model, optimizer=optimizer, sampler=sampler, epoch=0, batch=0)
resets = []

def on_reset():
    for group in optimizer.param_groups:
        group["lr"] = LR * hvd.size()
    resets.append(hvd.size())

state.register_reset_callbacks([on_reset])


@hvd.elastic.run
def train(state):
    for state.epoch in range(state.epoch, 3):
        for batch_idx, (x, y) in enumerate(loader):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            state.sampler.record_batch(batch_idx, 32)
            state.batch = batch_idx
            if batch_idx % 5 == 0:
                state.commit()
        state.sampler.set_epoch(state.epoch + 1)
        state.batch = 0
        state.commit()


train(state)
with torch.no_grad():
    acc = float((model(X).argmax(1) == Y).float().mean())
raw = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
digest = hashlib.sha256(raw).hexdigest()
with open(os.path.join(sys.argv[1], f"rank{hvd.rank()}.json"), "w") as f:
    json.dump({"size": hvd.size(), "resets": resets, "lr": optimizer.param_groups[0]["lr"],
               "replicas": sampler.num_replicas, "recoveries": len(state.recoveries),
               "accuracy": acc, "params": digest, "step": state.step}, f)
'''


@pytest.mark.timeout(120)
def test_horovod_style_digits_example(job, tmp_path) -> None:
    script = (REPO / "tests" / "horovod_digits.py").read_text()
    res = job(script, 2, script_args=("--out", str(tmp_path)), timeout=110)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert outs[0]["params"] == outs[1]["params"], "ranks ended with different parameters"
    assert outs[0]["size"] == 2 and outs[0]["accuracy"] > 0.9, outs[0]
    assert "test accuracy" in res.stdout


@pytest.mark.timeout(120)
def test_horovod_elastic_survives_a_killed_worker(job, tmp_path) -> None:
    res = job(ELASTIC, 3, "--min-np", "2", "--chaos", "kill:rank=2,step=10",
              script_args=(str(tmp_path),), timeout=110)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "1 fault(s) recovered" in res.stderr + res.stdout
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert not (tmp_path / "rank2.json").exists()
    assert outs[0]["params"] == outs[1]["params"], "survivors ended with different parameters"
    for out in outs:
        # The reset callback rescaled the learning rate; the sampler re-split over 2 ranks.
        assert (out["size"], out["resets"], out["lr"], out["replicas"]) == (2, [2], 0.2, 2)
        assert out["recoveries"] == 1 and out["accuracy"] > 0.85
        # 10 steps on 3 ranks (960 samples), the epoch's other 837 on 2 ranks (14 steps of 32
        # each), then 2 epochs of 1797 on 2 ranks (29 steps each): nothing replayed or skipped.
        assert out["step"] == 10 + 14 + 2 * 29
