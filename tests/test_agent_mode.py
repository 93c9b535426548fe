"""Agent mode: a host started by something other than the launcher (by hand, a scheduler, a
container) runs `phalanx agent` itself, with the coordinator's address and the job secret from a
0600 file, and its workers join a running job.

The launcher runs 2 local workers with `--max-np 4`, bound to the address the simulated hosts
reach; an agent started inside a simulated host (its own hostname, address and PID space) adds
2 workers, which heal from the running ones and train to the end in one job of 4.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO
from simhosts import simhosts  # noqa: F401 - the fixture

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}
JOB = """
import socket, time, torch, phalanx as px
torch.set_num_threads(1)
px.init()
torch.manual_seed(0)            # the same initial model on every rank
model = torch.nn.Linear(16, 4)
opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
state = px.elastic.State(model=model, optimizer=opt)

@px.elastic.run
def train(state):
    while state.step < 300:
        opt.zero_grad()
        model(torch.ones(8, 16)).sum().backward()
        opt.step()
        time.sleep(0.02)

train(state)
w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
print("done", px.rank(), px.size(), socket.gethostname(), round(float(w.sum()), 6), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_an_agent_started_by_hand_joins_a_running_job(simhosts, tmp_path) -> None:  # noqa: F811
    hosts = simhosts(1)
    (tmp_path / "job.py").write_text(JOB)
    join = tmp_path / "join.json"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "2", "--max-np", "4",
         "--bind", hosts.bridge_addr, "--join-file", str(join), str(tmp_path / "job.py")],
        env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    agent = None
    try:
        deadline = time.monotonic() + 60
        while not join.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        j = json.loads(join.read_text())
        secret = tmp_path / "secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, j["secret"].encode())
        os.close(fd)
        agent = hosts[0].popen(
            [sys.executable, "-m", "phalanx.launch.cli", "agent", "--coordinator", j["address"],
             "--job-id", j["job_id"], "--slots", "2", "--rank-base", "2", "--secret-file",
             str(secret), "--elastic", "--growth", str(tmp_path / "job.py")],
            env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = launcher.communicate(timeout=120)
        a_out, a_err = agent.communicate(timeout=30)   # it stops once the coordinator is gone
    finally:
        for p in (launcher, agent):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    assert launcher.returncode == 0, err[-3000:]
    assert j["secret"] not in " ".join(map(str, agent.args))
    done = re.findall(r"done (\d) (\d) (\S+) (\S+)", out + a_out)
    by_rank = {int(r): (int(n), host, w) for r, n, host, w in done}
    assert sorted(by_rank) == [0, 1, 2, 3], out + a_out + a_err[-2000:]
    assert all(n == 4 for n, _, _ in by_rank.values())
    # Two ranks on each host, contiguous (the shared-memory path needs that). Which host holds
    # ranks 0-1 depends on whose workers were ready first when the first generation formed.
    pairs = [{by_rank[0][1], by_rank[1][1]}, {by_rank[2][1], by_rank[3][1]}]
    assert all(len(p) == 1 for p in pairs), by_rank
    assert {hosts[0].name} in pairs and pairs[0] != pairs[1], by_rank
    assert re.search(r"generation \d formed with 4 workers", err), err[-2000:]
    assert len({w for _, _, w in by_rank.values()}) == 1, by_rank   # one model in the end
