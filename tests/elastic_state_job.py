"""Training job with every kind of State field, for the heal-in-place chaos test (run under
`phalanx run`; not collected by pytest).

A StepLR scheduler, a GradScaler-style loss-scale object (Stateful protocol) and the global
RNG streams (RNGState) ride along with model, optimizer and loader. Each step draws from torch,
numpy and Python `random`. At the end every rank writes OUT/rank<r>.<worker>.pt with its
parameters, learning rate, loss scale, step and the next draw of each stream.

    phalanx run -np 3 --min-np 2 --max-restarts 1 tests/elastic_state_job.py OUT EPOCHS PAUSE
"""

import os
import random
import sys
import time

import numpy as np
import torch

import phalanx as px
from phalanx.data import ArrayDataset, ShardedLoader

out_dir, epochs, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])


class LossScale:
    """Doubles every `interval` steps, like torch.amp.GradScaler's growth."""

    def __init__(self, interval: int = 10) -> None:
        self.scale, self.interval, self.good = 1.0, interval, 0

    def update(self) -> None:
        self.good += 1
        if self.good == self.interval:
            self.scale, self.good = self.scale * 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, sd: dict) -> None:
        self.scale, self.good = sd["scale"], sd["good"]


torch.set_num_threads(1)
px.init()
gen = torch.Generator().manual_seed(1)
X, Y = torch.randn(600, 8, generator=gen), torch.randn(600, 1, generator=gen)
torch.manual_seed(0)
np.random.seed(0)
random.seed(0)
model = torch.nn.Linear(8, 1)
opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.04), model=model)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)
scale = LossScale()
loader = ShardedLoader(ArrayDataset(X, Y), batch_size=8, seed=0)
state = px.elastic.State(model=model, optimizer=opt, loaders=[loader], sched=sched, scale=scale,
                         rng=px.elastic.RNGState(), epoch=0)


@px.elastic.run
def train(state):
    for state.epoch in range(state.epoch, epochs):
        for x, y in loader:
            opt.zero_grad()
            noise = torch.rand(1).item() + np.random.rand() + random.random()
            loss = torch.nn.functional.mse_loss(model(x), y) * (1 + 0 * noise)
            loss.backward()
            time.sleep(pause)
            opt.step()
            sched.step()
            scale.update()


train(state)
me = os.environ.get("PHALANX_WORKER_ID", "solo")
torch.save({"params": [p.detach().clone() for p in model.parameters()], "step": state.step,
            "lr": opt.param_groups[0]["lr"], "scale": scale.state_dict(),
            "draws": (torch.rand(1).item(), float(np.random.rand()), random.random()),
            "sched_epoch": sched.last_epoch, "recoveries": state.recoveries},
           os.path.join(out_dir, f"rank{px.rank()}.{me}.pt"))
px.barrier()
