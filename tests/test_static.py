"""Scripts started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT set) run as static phalanx
jobs: real torchrun, real processes, results checked against numpy and by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

JOB = """
import json, os, sys
import numpy as np, torch, phalanx as px
px.init()
r, n = px.rank(), px.size()
model = torch.nn.Linear(4, 1)
px.broadcast_parameters(model.state_dict(), root=0)
w0 = model.weight.detach().clone()
opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
for step in range(5):
    opt.zero_grad()
    model(torch.ones(2, 4) * (r + 1)).sum().backward()  # weight grad 2 * (r + 1) per entry
    opt.step()
out = {"rank": r, "size": n, "local": [px.local_rank(), px.local_size()],
       "sum": px.allreduce(np.arange(3.0) * (r + 1), op="sum").tolist(),
       "obj": px.allgather_object(r), "delta": (model.weight.detach() - w0).tolist()}
with open(os.path.join(sys.argv[1], f"r{r}.json"), "w") as f:
    json.dump(out, f)
"""


@pytest.mark.timeout(120)
def test_a_torchrun_script_runs_as_a_static_job(tmp_path) -> None:
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    (tmp_path / "job.py").write_text(JOB)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run([*torchrun.split(), "--standalone", "--nproc-per-node", "3",
                          str(tmp_path / "job.py"), str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=100)
    assert res.returncode == 0, res.stderr[-3000:]
    outs = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(3)]
    for r, o in enumerate(outs):
        assert o["size"] == 3 and o["local"] == [r, 3]
        assert o["sum"] == [0.0, 6.0, 12.0] and o["obj"] == [0, 1, 2]
        # averaged weight gradient: 2 * (1 + 2 + 3) / 3 = 4; five SGD steps at lr 0.1
        assert o["delta"][0] == pytest.approx([-2.0] * 4, abs=1e-6)
