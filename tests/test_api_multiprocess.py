"""The public API across real worker processes: caller's types in and out, 1-4 ranks, both paths."""

from __future__ import annotations

import json

import pytest

SCRIPT = """
import json, sys
import numpy as np, torch
import phalanx as px
px.init()
r, n = px.rank(), px.size()
out = {}
a = np.arange(6, dtype=np.float32).reshape(2, 3) * (r + 1)
y = px.allreduce(a, op="sum")
out["np_type"] = type(y).__name__
out["np_ok"] = bool(np.allclose(y, np.arange(6).reshape(2, 3) * sum(range(1, n + 1))))
t = torch.full((1000,), float(r))
px.allreduce_(t, op="max")
out["inplace_ok"] = bool((t == n - 1).all())
h = px.allreduce_async(torch.ones(3, dtype=torch.float64), op="avg")
out["async_ok"] = h.wait().tolist() == [1.0, 1.0, 1.0]
out["scalar"] = px.allreduce(r + 1)
base = torch.zeros(4, 3)
px.allreduce_(base[:, 1].fill_(r + 1.0), op="sum")          # non-contiguous: written back
a2 = np.ones((3, 4))[:, ::2]
px.allreduce_(a2, op="sum")
out["noncontig_ok"] = bool((base[:, 1] == n * (n + 1) / 2).all() and (base[:, 0] == 0).all()
                           and (a2 == n).all())
g = px.allgather(np.full((r + 1, 2), r, dtype=np.int16))
out["allgather_ok"] = type(g).__name__ == "ndarray" and g.shape == (n * (n + 1) // 2, 2)
out["bcast"] = px.broadcast(np.array([r, r]), root=n - 1).tolist()
out["objs"] = px.allgather_object({"r": r})
px.barrier()
with open(sys.argv[1] + f"/rank{r}.json", "w") as f:
    json.dump(out, f)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algo", ["auto", "gloo"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_public_api_on_real_processes(job, tmp_path, n, algo) -> None:
    res = job(SCRIPT, n, script_args=(str(tmp_path),), env={"PHALANX_ALLREDUCE": algo})
    assert res.returncode == 0, res.stderr
    for r in range(n):
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["np_type"] == "ndarray" and out["np_ok"] and out["inplace_ok"]
        assert out["async_ok"] and out["allgather_ok"] and out["noncontig_ok"]
        assert out["scalar"] == n * (n + 1) // 2
        assert out["bcast"] == [n - 1, n - 1]
        assert out["objs"] == [{"r": k} for k in range(n)]
