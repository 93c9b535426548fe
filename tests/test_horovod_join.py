"""`hvd.join()` with uneven batches, across real worker processes, as in Horovod: a rank out
of data joins and stands in with zeros for the allreduces of the ranks still working (Average
divides by the full size, Max/Min see the zeros, as real Horovod 0.28.1 does here), including
`hvd.DistributedOptimizer`'s fused gradient reductions; other kinds fail with JoinedError on
the ranks that submit them; join() returns the same last rank everywhere. Results are checked
against numpy and against a one-process replay of the same uneven training."""

from __future__ import annotations

import json

import pytest
from conftest import CHECKS

HEAD = r'''
import json, sys, time
import numpy as np, torch
import phalanx.horovod.torch as hvd
from phalanx.horovod.torch.negotiate import JoinedError
''' + CHECKS + r'''
hvd.init()
n, r = hvd.size(), hvd.rank()

def done():
    with open(f"{sys.argv[1]}/rank{r}.json", "w") as f:
        json.dump({"failures": fails, "checks": checks[0]}, f)
'''

COLLECTIVES = r'''
def val(k, rank):
    return np.random.default_rng(100 * rank + k).integers(-9, 10, size=(2, 3)).astype(np.float32)

steps = [2 * (q + 1) for q in range(n)]        # rank q works for 2(q+1) steps, then joins
for k in range(steps[r]):
    working = [q for q in range(n) if steps[q] > k]
    mine = torch.from_numpy(val(k, r))
    got = hvd.allreduce(mine, name=f"avg{k}")                      # Average over all n ranks
    want = sum(val(k, q) for q in working) / n
    check(f"step {k} average", np.allclose(got.numpy(), want), f"{got.tolist()} vs {want.tolist()}")
    got = hvd.allreduce(mine, op=hvd.Max, name=f"max{k}")
    want = np.max([val(k, q) for q in working] + ([np.zeros((2, 3))] if len(working) < n else []), axis=0)
    check(f"step {k} max sees the zeros", np.array_equal(got.numpy(), want), f"{got.tolist()}")
    h = hvd.grouped_allreduce_async([mine, mine[0].double()], op=hvd.Sum, prescale_factor=2.0,
                                    postscale_factor=0.5)              # unnamed: matched by order
    a, b = hvd.synchronize(h)
    want = sum(val(k, q) for q in working)
    check(f"step {k} grouped", np.allclose(a.numpy(), want) and np.allclose(b.numpy(), want[0]),
          f"{a.tolist()}")
    if len(working) < n:
        ranks = [q for q in range(n) if q not in working]
        msg = raises(f"step {k} allgather refused", JoinedError,
                     lambda: hvd.allgather(mine, name=f"g{k}"))
        check("the message names the joined ranks", str(ranks[-1]) in (msg or ""), msg)
if r == n - 1:
    time.sleep(0.3)                             # so that the last rank is clearly the last
last = hvd.join()
check("join returns the last rank", last == n - 1, f"{last}")
# after everyone joined, collectives work normally again
got = hvd.allreduce(torch.ones(2), op=hvd.Sum, name="after")
check("allreduce after join", got.tolist() == [float(n)] * 2, f"{got.tolist()}")
'''

TRAIN = r'''
from sklearn.datasets import load_digits
d = load_digits()
X = torch.tensor(d.data[:600] / 16.0, dtype=torch.float32)
Y = torch.tensor(d.target[:600])
counts = [3 + 2 * q for q in range(n)]          # uneven: rank q has 3 + 2q batches of 16

def batch(q, k):
    start = (q * 97 + k * 16) % 560
    return X[start:start + 16], Y[start:start + 16]

def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

def replay(steps):
    """One process: at step k the gradient is the sum over ranks still working / n."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for k in range(steps):
        grads = None
        for q in range(n):
            if counts[q] <= k:
                continue
            model.zero_grad()
            xb, yb = batch(q, k)
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            g = [p.grad.clone() for p in model.parameters()]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        for p, g in zip(model.parameters(), grads):
            p.grad = g / n
        opt.step()
    return [p.detach().clone() for p in model.parameters()]

for compression in ("none", "fp16"):
    model = net()
    comp = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=model.named_parameters(), compression=comp)
    for k in range(counts[r]):
        opt.zero_grad()
        xb, yb = batch(r, k)
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    hvd.join()
    mine = [p.detach().clone() for p in model.parameters()]
    want = replay(counts[r])                    # where this rank stopped updating
    tol = 1e-5 if compression == "none" else 2e-3
    err = max(float((a - b).abs().max()) for a, b in zip(mine, want))
    check(f"{compression}: rank {r} after {counts[r]} steps matches the replay", err < tol, f"{err:.3g}")
    hvd.broadcast_parameters(model.state_dict(), root_rank=n - 1)   # the usual after join()
    top = replay(counts[-1])
    err = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), top))
    check(f"{compression}: synchronized to the longest rank", err < tol, f"{err:.3g}")
    opt.remove_hooks()

# a compression a joined rank cannot mirror is refused on the working ranks, not hung
model = net()
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               named_parameters=model.named_parameters(), compression="1bit")
if r == 0:
    hvd.join()
else:
    xb, yb = batch(r, 0)
    msg = raises("1-bit step while rank 0 joined", JoinedError,
                 lambda: torch.nn.functional.cross_entropy(model(xb), yb).backward())
    check("the refusal names the optimizer step", "optimizer 'step'" in (msg or ""), msg)
    hvd.join()
'''


def _results(tmp_path, n: int, least: int) -> None:
    for r in range(n):
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["failures"] == [], f"rank {r}: " + "\n".join(out["failures"])
        assert out["checks"] >= least, out


@pytest.mark.timeout(100)
def test_join_collectives_3_ranks(job, tmp_path) -> None:
    """Ranks that run out of data at steps 2 and 4 stand in for the third's allreduces."""
    res = job(HEAD + COLLECTIVES + "done()\n", 3, script_args=(str(tmp_path),), timeout=90)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _results(tmp_path, 3, 8)


@pytest.mark.timeout(120)
def test_join_distributed_optimizer_uneven_batches(job, tmp_path) -> None:
    """3 ranks with 3, 5 and 7 batches train through DistributedOptimizer and join(); each
    rank's parameters equal a one-process replay where missing ranks add zeros."""
    res = job(HEAD + TRAIN + "done()\n", 3, script_args=(str(tmp_path),), timeout=110)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _results(tmp_path, 3, 4)
