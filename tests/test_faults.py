"""A dead or stopped peer surfaces as WorkerLost on every survivor, within the timeout."""

from __future__ import annotations

import json

import pytest

SCRIPT = """
import json, os, signal, sys, time
import torch, phalanx as px
px.init()
r = px.rank()
victim, sig = int(sys.argv[2]), getattr(signal, sys.argv[3])
x = torch.ones(1 << 16)
for step in range(20):
    px.allreduce_(x, op="avg")
px.barrier()
if r == victim:
    os.kill(os.getpid(), sig)
    time.sleep(60)
t0 = time.monotonic()
try:
    for _ in range(1000):
        px.allreduce_(x, op="avg")
        time.sleep(0.001)
    result = {"lost": False}
except px.WorkerLost as e:
    result = {"lost": True, "after": time.monotonic() - t0, "msg": str(e),
              "lost_ranks": e.lost_ranks}
with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as f:
    json.dump(result, f)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("algo", ["auto", "gloo"])
@pytest.mark.parametrize("victim,sig", [(1, "SIGKILL"), (0, "SIGKILL"), (2, "SIGSTOP")])
def test_peer_loss_surfaces_as_worker_lost(job, tmp_path, algo, victim, sig) -> None:
    # --min-np 1 keeps the launcher from ending the job when a worker dies, so survivors report.
    # Default heartbeat timeout (3 s): a stopped process is still caught fast, because the
    # launcher sees its state T and the coordinator fences it after 0.5 s of silence.
    res = job(SCRIPT, 3, "--min-np", "1", "--timeout", "20",
              script_args=(str(tmp_path), str(victim), sig), env={"PHALANX_ALLREDUCE": algo})
    assert res.returncode == 0, res.stderr
    limit = 1.0 if sig == "SIGKILL" else 2.0  # SIGSTOP: probe + fence, then the error
    for r in range(3):
        if r == victim:
            assert not (tmp_path / f"rank{r}.json").exists()
            continue
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["lost"], f"rank {r} never noticed the loss"
        assert out["after"] < limit, f"rank {r} took {out['after']:.2f}s"
    if sig == "SIGSTOP":
        assert "fenc" in res.stderr
