"""Training job used by the chaos tests (run under `phalanx run`; not collected by pytest).

Softmax regression on scikit-learn's digits with an exactly-once ShardedLoader, elastic State
and @run. After each step it commits, each rank logs the step number and the whole step's
sample plan (every rank's indices): a rank that gave up on a reduction its peers completed heals
from them without committing that step itself, so logging only one's own batch would miss
samples that were trained. At the end each rank writes its parameters, final full-data loss
and recoveries to OUT/rank<r>.<worker>.pt.

    phalanx run -np 3 --min-np 2 tests/elastic_job.py OUT [EPOCHS] [SECONDS_PER_STEP]
"""

import json
import os
import sys
import time

import torch
from sklearn.datasets import load_digits

import phalanx as px
from phalanx.data import ArrayDataset, ShardedLoader

out_dir = sys.argv[1]
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
compute = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0  # seconds of pretend work per step
torch.set_num_threads(1)
px.init()
digits = load_digits()
X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
Y = torch.tensor(digits.target)
IDX = torch.arange(len(X))
loader = ShardedLoader(ArrayDataset(X, Y, IDX), batch_size=32, seed=0)
torch.manual_seed(0)
model = torch.nn.Linear(64, 10)
opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
                              model=model)
state = px.elastic.State(model=model, optimizer=opt, loaders=[loader], epoch=0)
me = os.environ.get("PHALANX_WORKER_ID", "solo")
log = open(os.path.join(out_dir, f"samples.{me}.jsonl"), "a", buffering=1)


@px.elastic.run
def train(state):
    for state.epoch in range(state.epoch, epochs):
        for x, y, idx in loader:
            plan = [p.tolist() for p in loader.pending_step]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum") / 32
            loss.backward()
            time.sleep(compute)
            opt.synchronize()
            with opt.skip_synchronize():
                opt.step()
            log.write(json.dumps({"epoch": state.epoch, "step": state.step, "plan": plan}) + "\n")


train(state)
with torch.no_grad():
    final = torch.nn.functional.cross_entropy(model(X), Y).item()
# after every re-formation the buckets move into the new group's shared memory
from phalanx.train import _comm  # noqa: E402
home = _comm.shared_buffers()
shared = all(b.home is home and home.locate(b.buffer) >= 0 for b in opt.buckets)
torch.save({"params": [p.detach().clone() for p in model.parameters()], "loss": final,
            "step": state.step, "size": px.size(), "recoveries": state.recoveries,
            "buckets_shared": shared},
           os.path.join(out_dir, f"rank{px.rank()}.{me}.pt"))
px.barrier()
