"""phalanx.horovod.torch across real worker processes (2 and 4 ranks): every collective
against numpy, Horovod's pre/postscaling per dtype, autograd rules, async handles, errors,
process sets, init/shutdown cycles, and DistributedOptimizer training against one process
on the full batch. The script checks everything itself and each rank writes its failures."""

from __future__ import annotations

import json

import pytest
from conftest import CHECKS

SCRIPT = r'''
import json, sys, time
import numpy as np, torch
import phalanx as px
import phalanx.horovod.torch as hvd
''' + CHECKS + r'''

hvd.init()
n, r = hvd.size(), hvd.rank()
check("basics", (hvd.local_size(), hvd.local_rank(), hvd.cross_size(), hvd.cross_rank())
      == (n, r, 1, 0))
check("caps", hvd.gloo_built() and not hvd.mpi_built() and hvd.gloo_enabled()
      and isinstance(hvd.nccl_built(), int) and not hvd.mpi_threads_supported())

def data(k, shape=(3, 4), lo=-5, hi=6):
    return np.random.default_rng(100 + k).integers(lo, hi, size=shape)

NP = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
      torch.int32: np.int32, torch.int64: np.int64}

def emul_scale(x, f, dt):
    """Horovod's CPU scaling, in numpy."""
    if f == 1.0:
        return x
    if dt == torch.float64:
        return x * f
    if dt in (torch.float32, torch.float16):
        return (x.astype(np.float32) * np.float32(f)).astype(NP[dt])
    return np.trunc(x.astype(np.float64) * f).astype(NP[dt])

def expect(op, dt, pre=1.0, post=1.0, shape=(3, 4), lo=-5, hi=6):
    xs = [emul_scale(data(k, shape, lo, hi).astype(NP[dt]), pre, dt) for k in range(n)]
    red = {hvd.Sum: np.sum, hvd.Average: np.sum, hvd.Min: np.min, hvd.Max: np.max,
           hvd.Product: np.prod}[op](np.stack(xs), axis=0).astype(NP[dt])
    return emul_scale(red, post / n if op == hvd.Average else post, dt)

for dt in NP:
    for op in (hvd.Sum, hvd.Average, hvd.Min, hvd.Max, hvd.Product):
        lo, hi = (-2, 3) if op == hvd.Product else (-5, 6)
        x = torch.from_numpy(data(r, lo=lo, hi=hi).astype(NP[dt]))
        y = hvd.allreduce(x, op=op)
        e = expect(op, dt, lo=lo, hi=hi)
        check(f"allreduce {dt} op={op}", y.dtype == dt and np.array_equal(y.numpy(), e),
              f"{y.numpy().tolist()} != {e.tolist()}")
    for op in (hvd.Sum, hvd.Average):
        x = torch.from_numpy(data(r, (16, 16)).astype(NP[dt]))
        y = hvd.allreduce(x, op=op, prescale_factor=1.25, postscale_factor=1 / 3)
        e = expect(op, dt, 1.25, 1 / 3, shape=(16, 16))
        check(f"scaled {dt} op={op}", np.array_equal(y.numpy(), e),
              f"{y.numpy().tolist()} != {e.tolist()}")
        check(f"input untouched {dt}", np.array_equal(x.numpy(), data(r, (16, 16)).astype(NP[dt])))

x = torch.from_numpy(data(r).astype(np.float32))
raises("average+op", ValueError, lambda: hvd.allreduce(x, average=True, op=hvd.Sum))
check("average=False is Sum", np.array_equal(hvd.allreduce(x, average=False).numpy(),
                                             expect(hvd.Sum, torch.float32)))
t = x.clone()
check("allreduce_", hvd.allreduce_(t, op=hvd.Sum) is t
      and np.array_equal(t.numpy(), expect(hvd.Sum, torch.float32)))
raises("noncontig inplace", ValueError, lambda: hvd.allreduce_(torch.zeros(4, 4).t()))
h1 = hvd.allreduce_async(x, name="a1")
t2 = x.clone()
h2 = hvd.allreduce_async_(t2, op=hvd.Max, name="a2")
out1 = hvd.synchronize(h1)
check("poll", hvd.poll(h2) in (True, False))
check("async", np.array_equal(out1.numpy(), expect(hvd.Average, torch.float32))
      and hvd.synchronize(h2) is t2 and np.array_equal(t2.numpy(), expect(hvd.Max, torch.float32)))
check("sync unknown", hvd.synchronize(h1) is None)
ts = [x, torch.from_numpy(data(r).astype(np.float64)), torch.from_numpy(data(r).astype(np.int64))]
g = hvd.grouped_allreduce(ts, op=hvd.Sum)
check("grouped", all(np.array_equal(a.numpy(), expect(hvd.Sum, a.dtype)) for a in g))
ts2 = [a.clone() for a in ts]
hg = hvd.grouped_allreduce_async_(ts2, op=hvd.Sum, name="g")
check("grouped async_", all(a is b for a, b in zip(hvd.synchronize(hg), ts2)))
check("grouped async_ values",
      all(np.array_equal(a.numpy(), expect(hvd.Sum, a.dtype)) for a in ts2))

# the duplicate-name check: ranks > 0 hold 'dup' in flight while rank 0 waits
if r == 0:
    time.sleep(0.5)
hd = hvd.allreduce_async(x, name="dup")
if r > 0:
    raises("duplicate name", ValueError, lambda: hvd.allreduce_async(x, name="dup"))
hvd.synchronize(hd)

# allgather: first dims differ
xs = [np.full((k + 1, 3), k, dtype=np.float32) for k in range(n)]
ag = hvd.allgather(torch.from_numpy(xs[r]))
check("allgather", np.array_equal(ag.numpy(), np.concatenate(xs)))
ha = hvd.allgather_async(torch.from_numpy(xs[r]))
check("allgather_async", np.array_equal(hvd.synchronize(ha).numpy(), np.concatenate(xs)))
gg = hvd.grouped_allgather([torch.from_numpy(xs[r]), torch.tensor([r])])
check("grouped_allgather", gg[1].tolist() == list(range(n)))

# broadcast
root = n - 1
b = hvd.broadcast(torch.from_numpy(data(r).astype(np.float32)), root)
check("broadcast", np.array_equal(b.numpy(), data(root)))
bt = torch.from_numpy(data(r).astype(np.int64))
hvd.broadcast_(bt, 0)
check("broadcast_", np.array_equal(bt.numpy(), data(0)))
check("broadcast_async", np.array_equal(hvd.synchronize(hvd.broadcast_async(
    torch.from_numpy(data(r)), 1)).numpy(), data(1)))
raises("bad root", ValueError, lambda: hvd.broadcast(x, n))

# alltoall with splits: rank s sends (s + j) % 3 + 1 rows to rank j; rows encode (src, dst, i)
def sent(s):
    sp = [(s + j) % 3 + 1 for j in range(n)]
    rows = [[s, j, i] for j in range(n) for i in range(sp[j])]
    return np.array(rows, dtype=np.float64), sp
mine, sp = sent(r)
out, recv = hvd.alltoall(torch.from_numpy(mine), splits=sp)
exp_rows = np.concatenate([sent(s)[0][sent(s)[0][:, 1] == r] for s in range(n)])
check("alltoall", np.array_equal(out.numpy(), exp_rows) and recv.tolist() ==
      [sent(s)[1][r] for s in range(n)] and recv.dtype == torch.int32)
eq = hvd.alltoall(torch.arange(2 * n) + 100 * r)
check("alltoall equal", eq.tolist() == [100 * s + 2 * r + i for s in range(n) for i in (0, 1)])
o2, rs = hvd.synchronize(hvd.alltoall_async(torch.from_numpy(mine), torch.tensor(sp)))
check("alltoall_async", np.array_equal(o2.numpy(), exp_rows) and rs.dtype == torch.int64)

# reducescatter, uneven rows: the first (2n+1) % n ranks get one more row
rows = 2 * n + 1
full = sum(data(k, (rows, 2)) for k in range(n)).astype(np.float32)
cut = [0] + list(np.cumsum([rows // n + (1 if k < rows % n else 0) for k in range(n)]))
for op, f in ((hvd.Sum, 1.0), (hvd.Average, np.float32(1 / n))):
    rsout = hvd.reducescatter(torch.from_numpy(data(r, (rows, 2)).astype(np.float32)), op=op)
    want = (full * np.float32(f)).astype(np.float32)[cut[r]:cut[r + 1]]
    check(f"reducescatter op={op}", np.array_equal(rsout.numpy(), want), f"{rsout.tolist()}")
# Horovod refuses it when enqueued with HorovodInternalError, a RuntimeError
raises("reducescatter Max", RuntimeError, lambda: hvd.reducescatter(x, op=hvd.Max))

hvd.barrier()
time.sleep(0.3 * r)
check("join", hvd.join() == n - 1)
check("objects", hvd.broadcast_object({"r": r}, root_rank=root) == {"r": root}
      and hvd.allgather_object(r * 2) == [2 * k for k in range(n)])

# autograd
c = [torch.from_numpy(data(50 + k).astype(np.float64)) for k in range(n)]
xg = torch.from_numpy(data(r).astype(np.float64)).requires_grad_()
(hvd.allreduce(xg, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.25) * c[r]).sum().backward()
check("grad allreduce Sum", torch.equal(xg.grad, sum(c) * 0.5), f"{xg.grad}")
xg.grad = None
(hvd.allreduce(xg) * c[r]).sum().backward()
check("grad allreduce Average", torch.allclose(xg.grad, sum(c) / n))
ga = torch.ones(r + 1, 2, dtype=torch.float64, requires_grad=True)
total = n * (n + 1) // 2
C = [torch.from_numpy(data(70 + k, (total, 2)).astype(np.float64)) for k in range(n)]
(hvd.allgather(ga) * C[r]).sum().backward()
off = r * (r + 1) // 2
check("grad allgather", torch.allclose(ga.grad, (sum(C) / n)[off:off + r + 1]))
gb = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
(hvd.broadcast(gb, 1) * c[r]).sum().backward()
check("grad broadcast", torch.allclose(gb.grad, sum(c) / n if r == 1 else torch.zeros(3, 4,
                                       dtype=torch.float64)))
gt = torch.from_numpy(mine).requires_grad_()
y, _ = hvd.alltoall(gt, splits=sp)
(y * (r + 1)).sum().backward()
check("grad alltoall", gt.grad[:, 0].tolist() == [float(row[1] + 1) for row in mine])
gs = torch.ones(rows, 2, dtype=torch.float64, requires_grad=True)
Cr = [torch.full((cut[k + 1] - cut[k], 2), float(k + 1), dtype=torch.float64) for k in range(n)]
(hvd.reducescatter(gs) * Cr[r]).sum().backward()
check("grad reducescatter", torch.equal(gs.grad, torch.cat(Cr)))
g1, g2 = (torch.ones(2, dtype=torch.float64, requires_grad=True) for _ in range(2))
a1, a2 = hvd.grouped_allreduce([g1, g2], op=hvd.Sum)
(a1 * (r + 1) + a2 * 2).sum().backward()
check("grad grouped", g1.grad.tolist() == [total] * 2 and g2.grad.tolist() == [2.0 * n] * 2)

# Adasum: pairwise tree in Horovod's order
if n & (n - 1) == 0:
    vs = [data(90 + k, (5,)).astype(np.float64) for k in range(n)]
    while len(vs) > 1:
        nxt = []
        for a, bb in zip(vs[::2], vs[1::2]):
            d = a @ bb
            nxt.append((1 - d / (a @ a) / 2) * a + (1 - d / (bb @ bb) / 2) * bb)
        vs = nxt
    ad = hvd.allreduce(torch.from_numpy(data(90 + r, (5,)).astype(np.float64)), op=hvd.Adasum)
    check("adasum", np.allclose(ad.numpy(), vs[0], rtol=1e-12), f"{ad} vs {vs[0]}")

# parameters and optimizer state
torch.manual_seed(r)
m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
hvd.broadcast_parameters(m.state_dict(), root_rank=0)
sd = hvd.allgather_object({k: v.tolist() for k, v in m.state_dict().items()})
check("broadcast_parameters", all(s == sd[0] for s in sd))
torch.manual_seed(r)
m2 = torch.nn.Linear(4, 3)
hvd.broadcast_parameters(list(m2.named_parameters()), root_rank=1)
hvd.broadcast_parameters(list(m2.parameters()), root_rank=1)
check("broadcast named", len(set(map(str, hvd.allgather_object(m2.weight.tolist())))) == 1)
opt = torch.optim.Adam(m.parameters(), lr=0.01 * (r + 1))
if r == 0:
    m(torch.ones(2, 4)).sum().backward()
    opt.step()
hvd.broadcast_optimizer_state(opt, root_rank=0)
st = hvd.allgather_object(str(opt.state_dict()))
check("broadcast_optimizer_state", all(s == st[0] for s in st)
      and opt.param_groups[0]["lr"] == 0.01)

# process sets
gps = hvd.global_process_set
check("global set", (gps.size(), gps.rank(), gps.included(), gps.ranks)
      == (n, r, True, list(range(n))))
raises("add subset without dynamic", ValueError, lambda: hvd.add_process_set([0]))
raises("use an unregistered subset", ValueError,
       lambda: hvd.allreduce(x, process_set=hvd.ProcessSet([0])))
check("remove global", hvd.remove_process_set(gps) is False)


# DistributedOptimizer: equal on every rank, close to one process on the full batch
B = 6
X = torch.from_numpy(np.random.default_rng(7).normal(size=(n * B, 8)))
Y = torch.from_numpy(np.random.default_rng(8).normal(size=(n * B, 3)))
def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 3)).double()
def loss_fn(model, lo, hi, scale=1.0):
    return torch.nn.functional.mse_loss(model(X[lo:hi]), Y[lo:hi]) * scale
def reference(steps=4, clip=None, scale=1.0):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, 0, n * B, scale).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
def distributed(steps=4, passes=1, clip=None, **kw):
    model = net()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=model.named_parameters(),
                                   backward_passes_per_step=passes, **kw)
    lo, step = r * B, B // passes
    for _ in range(steps):
        opt.zero_grad()
        for k in range(passes):
            loss_fn(model, lo + k * step, lo + (k + 1) * step, 1.0 / passes).backward()
        if clip:
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    same = len({t.numpy().tobytes() for t in hvd.allgather_object(flat)}) == 1
    return flat, same, opt
ref = reference()
for label, kw, tol in (("plain", {}, 1e-12), ("passes=2", {"passes": 2}, 1e-12),
                       ("predivide", {"gradient_predivide_factor": 4.0}, 1e-12),
                       ("fp16", {"compression": hvd.Compression.fp16}, 2e-3),
                       ("clip", {"clip": 0.05}, 1e-12)):
    flat, same, _ = distributed(**kw)
    want = reference(clip=kw.get("clip")) if "clip" in kw else ref
    err = float((flat - want).abs().max())
    check(f"optimizer {label}", same and err < tol, f"same={same} err={err}")
flat, same, opt = distributed(op=hvd.Sum)
check("optimizer Sum", same and float((flat - reference(scale=n)).abs().max()) < 1e-12)
check("optimizer surface", opt.param_groups[0]["lr"] == 0.1 and "state" in opt.state_dict()
      and hasattr(opt, "synchronize") and opt.backward_passes_per_step == 1)
opt.load_state_dict(opt.state_dict())
model = net()
raises("dup names", ValueError, lambda: hvd.DistributedOptimizer(torch.optim.SGD(
    model.parameters(), lr=0.1), named_parameters=[("w", p) for p in model.parameters()]))
raises("unnamed", ValueError, lambda: hvd.DistributedOptimizer(torch.optim.SGD(
    model.parameters(), lr=0.1), named_parameters=list(model.named_parameters())[:2]))
raises("predivide+Sum", ValueError, lambda: hvd.DistributedOptimizer(torch.optim.SGD(
    model.parameters(), lr=0.1), op=hvd.Sum, gradient_predivide_factor=2.0))
check("adasum opt", type(hvd.DistributedOptimizer(torch.optim.SGD(   # Horovod's delta optimizer
    model.parameters(), lr=0.1), op=hvd.Adasum)).__name__ == "AdasumOptimizer")
class MyCompressor(hvd.compression.Compressor):
    pass
raises("custom compressor", NotImplementedError, lambda: hvd.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.1), compression=MyCompressor))
emb = torch.nn.Embedding(6, 2, sparse=True).double()
torch.nn.init.constant_(emb.weight, 1.0)
eopt = hvd.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=1.0),
                                named_parameters=emb.named_parameters())
emb(torch.tensor([r % 6, 5])).sum().backward()
eopt.synchronize()
sparse_ok = emb.weight.grad.is_sparse
with eopt.skip_synchronize():
    eopt.step()
want = torch.ones(6, 2, dtype=torch.float64)
for k in range(n):
    want[k % 6] -= 1.0 / n
want[5] -= 1.0
check("sparse grads", sparse_ok and torch.allclose(emb.weight.detach(), want), f"{emb.weight}")

# names differ: a stall, StallError (a CollectiveMismatch) on every rank after the stall time
# (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS, 2 s here), and the group is still usable
raises("name mismatch", px.CollectiveMismatch, lambda: hvd.allreduce(x, name=f"n{r}"))
check("after mismatch", np.array_equal(hvd.allreduce(x, op=hvd.Sum).numpy(),
                                       expect(hvd.Sum, torch.float32)))

# init / shutdown cycles
for cycle in range(2):
    hvd.shutdown()
    check("shut", not hvd.is_initialized())
    raises("size after shutdown", ValueError, hvd.size)
    hvd.init()
    check(f"reinit {cycle}", hvd.allreduce(torch.ones(2), op=hvd.Sum).tolist() == [n, n])

with open(f"{sys.argv[1]}/rank{r}.json", "w") as f:
    json.dump({"failures": fails, "checks": checks[0]}, f)
'''


@pytest.mark.timeout(150)
@pytest.mark.parametrize("n", [2, 4])
def test_horovod_api_on_real_processes(job, tmp_path, n) -> None:
    res = job(SCRIPT, n, script_args=(str(tmp_path),), timeout=140,
              env={"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "2"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for r in range(n):
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["failures"] == [], f"rank {r}: " + "\n".join(out["failures"])
        assert out["checks"] >= 100, out
