"""What Horovod's own example programs and documented API hit in the facade (issue 24, part 3),
on real `phalanx run` jobs, checked against Horovod 0.28.1's documented behaviour and
independent references (numpy, or one torch process over the concatenated batch):

- 2 ranks: poll() of an operation a late peer has not submitted is False at once, then True
  (allreduce and fused reducescatter); broadcast_optimizer_state with a parameter that needs
  no gradient; DistributedOptimizer without named_parameters; step() after synchronize()
  warns with Horovod's text; Horovod's error types; SyncBatchNorm; sparse gradients.
- 4 ranks: the Adasum delta optimizer against numpy; DistributedOptimizer on a process set of
  2 while the other ranks wait at a global operation for longer than the collective timeout,
  inside hvd.elastic.run with joining enabled; then every rank agrees on what follows.
- elastic, 2 ranks: restore() before any commit(), and a replacement worker admitted at
  commit() only (HostsUpdatedInterrupt), never at an optimizer step.
- `phalanx.horovod.run(fn, args, np=2)`: per-rank results in rank order.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import CHECKS, REPO, run_cmd

HEAD = r'''
import json, os, sys, time, warnings
import numpy as np, torch
import phalanx.horovod.torch as hvd
''' + CHECKS + r'''

def done():
    with open(f"{sys.argv[1]}/rank{r}.json", "w") as f:
        json.dump({"failures": fails, "checks": checks[0]}, f)

def close(label, got, want, tol=1e-9):
    got = np.asarray(got.detach() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    ok = got.shape == want.shape and np.allclose(got, want, rtol=tol, atol=tol)
    check(label, ok, f"{got.tolist()} != {want.tolist()}")
'''

TWO = r'''
hvd.init()
r, n = hvd.rank(), hvd.size()
torch.set_default_dtype(torch.float64)

# 1. poll() is asynchronous: rank 1 submits 1.5 s late
for kind in ("allreduce", "reducescatter"):
    hvd.barrier()
    if r == 1:
        time.sleep(1.5)
    x = torch.arange(4.0) + 10 * r
    if kind == "allreduce":
        h = hvd.allreduce_async(x, name="late", op=hvd.Sum)
        want = [np.arange(4.0) * 2 + 10]
    else:
        h = hvd.grouped_reducescatter_async([x, 2 * x], name="late.rs", op=hvd.Sum)
        full = np.arange(4.0) * 2 + 10
        want = [full[2 * r:2 * r + 2], 2 * full[2 * r:2 * r + 2]]
    t0 = time.monotonic()
    first = hvd.poll(h)
    took = time.monotonic() - t0
    if r == 0:
        check(f"{kind}: poll False while the peer has not submitted", first is False, str(first))
        check(f"{kind}: poll returns at once", took < 0.5, f"{took:.3f}s")
    deadline = time.monotonic() + 30
    while not hvd.poll(h) and time.monotonic() < deadline:
        time.sleep(0.001)
    check(f"{kind}: poll True once the peer submitted", hvd.poll(h))
    if r == 0:
        check(f"{kind}: ... which took the peer's delay", time.monotonic() - t0 > 1.0)
    got = hvd.synchronize(h)
    got = got if isinstance(got, list) else [got]
    for i, (g, w) in enumerate(zip(got, want)):
        close(f"{kind}: result {i}", g, w)
    raises(f"{kind}: poll of a synchronized handle", ValueError, lambda: hvd.poll(h))

# 2. broadcast_optimizer_state with a parameter that has no gradient (Horovod's
#    test_broadcast_state_no_grad)
class ModelNoGrad(torch.nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a = torch.nn.Parameter(a.int(), requires_grad=False)
        self.b = torch.nn.Parameter(b)
    def forward(self, x):
        return torch.index_select(self.b, 0, self.a.long()) * x

torch.manual_seed(r)
model = ModelNoGrad(torch.tensor([1.0, 3.0]), torch.rand(4))
opt = torch.optim.SGD(model.parameters(), lr=0.001, weight_decay=1e-6, momentum=0.9, nesterov=True)
opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(opt, root_rank=0)
grad = opt.param_groups[0]["params"][1].grad
check("no-grad parameter keeps grad None", opt.param_groups[0]["params"][0].grad is None)
check("trainable parameter gets a zero gradient", isinstance(grad, torch.Tensor)
      and not grad.any(), str(grad))
if isinstance(grad, torch.Tensor):
    check("broadcast of that gradient", torch.equal(hvd.broadcast(grad, root_rank=0), grad))
states = hvd.allgather_object([v.tolist() for v in opt.state_dict()["state"][1].values()
                               if isinstance(v, torch.Tensor)])
check("optimizer state equal on every rank", all(s == states[0] for s in states), str(states))
opt.remove_hooks()

# 3. DistributedOptimizer without named_parameters (Horovod's
#    test_optimizer_no_named_parameters), and it trains as the average
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
ref.load_state_dict(net.state_dict())
opt = hvd.DistributedOptimizer(torch.optim.SGD(
    [{"params": net[0].parameters()}, {"params": net[1].parameters()}], lr=0.1))
names = opt._parameter_names
check("generated names unique", len(names) == 4 and len(set(names.values())) == 4, str(names))
check("Horovod's naming", sorted(names.values()) == [f"allreduce.noname.{i}.{j}"
                                                      for i in range(2) for j in range(2)])
check("same names on every rank", all(s == set(names.values())
                                      for s in hvd.allgather_object(set(names.values()))))
def batch(q, k):
    g = torch.Generator().manual_seed(100 * q + k)
    return torch.randn(6, 4, generator=g), torch.randn(6, 1, generator=g)
def loss(m, q, k):
    x, y = batch(q, k)
    return torch.nn.functional.mse_loss(m(x), y)
ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
for k in range(2):
    opt.zero_grad()
    loss(net, r, k).backward()
    opt.step()
    ref_opt.zero_grad()
    (sum(loss(ref, q, k) for q in range(n)) / n).backward()
    ref_opt.step()
for (nm, p), q in zip(net.named_parameters(), ref.parameters()):
    close(f"no-names optimizer {nm}", p, q.detach(), 1e-12)

# 4. step() after synchronize() without skip_synchronize() warns with Horovod's text
HOROVOD_TEXT = ("optimizer.step() called without optimizer.skip_synchronize() context after "
                "optimizer.synchronize(). This can cause training slowdown. You may want to "
                "consider using optimizer.skip_synchronize() context if you use "
                "optimizer.synchronize() in your code.")
def step_warnings(how):
    opt.zero_grad()
    loss(net, r, 9).backward()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        how()
    return [str(w.message) for w in got]
def sync_then_step():
    opt.synchronize()
    opt.step()
def sync_skip_step():
    opt.synchronize()
    with opt.skip_synchronize():
        opt.step()
check("warns after synchronize()", HOROVOD_TEXT in step_warnings(sync_then_step))
check("quiet inside skip_synchronize()", HOROVOD_TEXT not in step_warnings(sync_skip_step))
check("quiet for a plain step()", HOROVOD_TEXT not in step_warnings(opt.step))
opt.zero_grad()
loss(net, r, 10).backward()
raises("zero_grad() between backward() and step()", AssertionError, opt.zero_grad)
opt.step()
opt.remove_hooks()

# 5. error types of unsupported combinations, as Horovod raises them
v = torch.ones(4)
raises("reducescatter Adasum", RuntimeError, lambda: hvd.reducescatter(v, op=hvd.Adasum))
raises("reducescatter Max", RuntimeError, lambda: hvd.grouped_reducescatter([v], op=hvd.Max))
check("... not a lost peer", not isinstance(hvd.basics.OperationError("x"), hvd.HorovodInternalError))
aopt = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), op=hvd.Adasum)
def skip():
    with aopt.skip_synchronize():
        pass
raises("Adasum optimizer refuses skip_synchronize()", AssertionError, skip)

# 6. SyncBatchNorm against one BatchNorm over the concatenated batch (uneven batches)
counts = [3, 5]
def bn_input(q, k):
    g = torch.Generator().manual_seed(1000 + 10 * q + k)
    return torch.randn(counts[q], 3, 2, 2, generator=g) * (q + 1) + q
def upstream(q, k):
    return torch.randn(counts[q], 3, 2, 2, generator=torch.Generator().manual_seed(2000 + 10 * q + k))
sbn, bn = hvd.SyncBatchNorm(3), torch.nn.BatchNorm2d(3)
with torch.no_grad():
    for m in (sbn, bn):
        m.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
lo = sum(counts[:r])
for k in range(2):
    x = bn_input(r, k).requires_grad_(True)
    y = sbn(x)
    (y * upstream(r, k)).sum().backward()
    xs = torch.cat([bn_input(q, k) for q in range(n)]).requires_grad_(True)
    ys = bn(xs)
    (ys * torch.cat([upstream(q, k) for q in range(n)])).sum().backward()
    close(f"sync bn forward {k}", y, ys.detach()[lo:lo + counts[r]])
    close(f"sync bn input grad {k}", x.grad, xs.grad[lo:lo + counts[r]])
    close(f"sync bn running mean {k}", sbn.running_mean, bn.running_mean)
    close(f"sync bn running var {k}", sbn.running_var, bn.running_var)
    close(f"sync bn weight grad summed over ranks {k}",
          hvd.allreduce(sbn.weight.grad, op=hvd.Sum), bn.weight.grad)
    close(f"sync bn bias grad summed over ranks {k}",
          hvd.allreduce(sbn.bias.grad, op=hvd.Sum), bn.bias.grad)
    for m in (sbn, bn):
        m.weight.grad = m.bias.grad = None
check("sync bn counts batches", int(sbn.num_batches_tracked) == 2)
sbn.eval(), bn.eval()
close("sync bn eval uses running stats", sbn(bn_input(r, 5)), bn(bn_input(r, 5)).detach())

# 7. sparse: hvd.sparse_allreduce_async (Horovod's test_async_sparse_allreduce) ...
torch.manual_seed(r)
def random_sparse(*shape):
    t = torch.rand(*shape)
    t[t < 0.8] = 0
    return t.to_sparse()
tensors = [random_sparse(d0, 10) for d0 in (17, 32, 81, 12)]
dense = [hvd.allreduce(t.to_dense()) for t in tensors]
waits = [hvd.sparse_allreduce_async(t, op=hvd.Average, name=str(i)) for i, t in enumerate(tensors)]
for i, (want, wait) in enumerate(zip(dense, waits)):
    got = wait()
    check(f"sparse allreduce {i} is sparse", got.is_sparse)
    close(f"sparse allreduce {i}", got.to_dense(), want, 1e-6)

# ... and nn.Embedding(sparse=True) in DistributedOptimizer, sparse_as_dense both ways, against
# one process stepping on the average of both ranks' losses
inputs = [torch.LongTensor([[1, 2, 4, 5], [4, 3, 2, 9]]), torch.LongTensor([[1, 3, 4], [4, 7, 9]])]
def emb_loss(m, q, k):
    return m(inputs[q]).sum() * (q + 1 + k)
for sparse_as_dense in (False, True):
    torch.manual_seed(3)
    emb, ref = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Embedding(10, 3, sparse=True)
    ref.load_state_dict(emb.state_dict())
    eopt = hvd.DistributedOptimizer(torch.optim.SparseAdam(list(emb.parameters()), lr=0.1),
                                    named_parameters=emb.named_parameters(),
                                    sparse_as_dense=sparse_as_dense)
    ropt = torch.optim.SparseAdam(list(ref.parameters()), lr=0.1)
    for k in range(2):
        eopt.zero_grad()
        emb_loss(emb, r, k).backward()
        eopt.step()
        check(f"sparse_as_dense={sparse_as_dense}: gradient stays sparse", emb.weight.grad.is_sparse)
        ropt.zero_grad()
        (sum(emb_loss(ref, q, k) for q in range(n)) / n).backward()
        ropt.step()
    close(f"embedding sparse_as_dense={sparse_as_dense}", emb.weight, ref.weight.detach(), 1e-9)
    eopt.remove_hooks()

# 8. a peer that never reaches a negotiation: StallError naming it after the stall time, then
#    the group is usable (the wait happened in the coordinator, not in a collective)
os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] = "0.3"
os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = "1.5"
hvd.barrier()
if r == 0:
    t0 = time.monotonic()
    msg = raises("absent peer: StallError", hvd.negotiate.StallError,
                 lambda: hvd.synchronize(hvd.allreduce_async(torch.ones(1), name="absent")))
    took = time.monotonic() - t0
    check("absent peer: after the stall time", 1.4 < took < 4, f"{took:.2f}s")
    check("absent peer: named", "allreduce 'absent'" in msg and "rank(s) [1] have not" in msg, msg)
else:
    time.sleep(2.5)
close("usable afterwards", hvd.allreduce(torch.ones(1), op=hvd.Sum, name="after"), [n])
del os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"], os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"]
done()
'''

FOUR = r'''
pair = hvd.ProcessSet([0, 1])
hvd.init(process_sets=[pair])
r, n = hvd.rank(), hvd.size()
torch.set_default_dtype(torch.float64)

# 1. the Adasum delta optimizer: each rank steps SGD with momentum locally, the per-tensor
#    deltas are combined with Horovod's recursive pairwise Adasum; numpy reference
def data(q, k):
    g = np.random.default_rng(50 * q + k)
    return g.normal(size=(5, 3)), g.normal(size=(5, 1))
torch.manual_seed(0)
lin = torch.nn.Linear(3, 1)
hvd.broadcast_parameters(lin.state_dict(), root_rank=0)
W, B = lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy()
LR, MU = 0.1, 0.5
aopt = hvd.DistributedOptimizer(torch.optim.SGD(lin.parameters(), lr=LR, momentum=MU),
                                named_parameters=lin.named_parameters(), op=hvd.Adasum)

def adasum(vecs):
    while len(vecs) > 1:
        nxt = []
        for a, b in zip(vecs[::2], vecs[1::2]):
            d = float(a.ravel() @ b.ravel())
            nxt.append((1 - d / (2 * float(a.ravel() @ a.ravel()))) * a
                       + (1 - d / (2 * float(b.ravel() @ b.ravel()))) * b)
        vecs = nxt
    return vecs[0]

bufs = [None] * n
for k in range(3):
    x, y = data(r, k)
    aopt.zero_grad()
    torch.nn.functional.mse_loss(lin(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    aopt.step()
    dws, dbs = [], []
    for q in range(n):
        xq, yq = data(q, k)
        e = xq @ W.T + B - yq
        g = (2 / 5 * e.T @ xq, 2 / 5 * e.sum(0))
        bufs[q] = g if bufs[q] is None else (MU * bufs[q][0] + g[0], MU * bufs[q][1] + g[1])
        dws.append(-LR * bufs[q][0])
        dbs.append(-LR * bufs[q][1])
    W, B = W + adasum(dws), B + adasum(dbs)
    close(f"adasum optimizer weight, step {k}", lin.weight, W, 1e-10)
    close(f"adasum optimizer bias, step {k}", lin.bias, B, 1e-10)

# 2. DistributedOptimizer on the set {0, 1} in hvd.elastic.run (joining enabled): the members
#    train for longer than the collective timeout (--timeout 3) while ranks 2 and 3, which
#    built the same optimizer (it steps locally, as in Horovod), wait at a global operation
torch.manual_seed(1)
model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                               named_parameters=model.named_parameters(), process_set=pair)
state = hvd.elastic.TorchState(model=model, optimizer=opt)
t0 = time.monotonic()

@hvd.elastic.run
def train(state):
    if pair.included():
        k = 0
        while time.monotonic() - t0 < 5.0:
            g = torch.Generator().manual_seed(10 * r + k)
            x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            k += 1
            time.sleep(0.05)
        h = hvd.allreduce_async(torch.tensor([float(k)]), name="after.training", op=hvd.Min)
    else:
        h = hvd.allreduce_async(torch.tensor([1e9]), name="after.training", op=hvd.Min)
        w = model[0].weight.detach().clone()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        check("a rank outside the set steps locally", not torch.equal(w, model[0].weight))
    least = hvd.synchronize(h).item()
    state.commit()
    return least

least = train(state)
waited = time.monotonic() - t0
check("the members trained past the collective timeout", waited > 4.0, f"{waited:.1f}s")
check("the members stepped", 1 <= least < 1e9, str(least))
params = hvd.allgather_object([p.detach().clone() for p in model.parameters()])
check("members hold one replica", all(torch.equal(a, b) for a, b in zip(params[0], params[1])))
check("the members' replica differs from the others'",
      any(not torch.equal(a, b) for a, b in zip(params[0], params[2])))
got = hvd.allreduce(torch.tensor([float(r)]), op=hvd.Sum, name="then")
close("every rank agrees on the next collective", got, [sum(range(n))])
check("and the next object collective", hvd.allgather_object(r) == list(range(n)))
check("nobody was lost", hvd.size() == n)
done()
'''

ELASTIC = r'''
from phalanx.elastic.state import MembershipChanged
hvd.init()
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                               named_parameters=model.named_parameters())
state = hvd.elastic.TorchState(model=model, optimizer=opt, shrunk=False, regrown=-1)
built = model.weight.detach().clone()
with torch.no_grad():
    model.weight.add_(1.0)
state.restore()
r = hvd.rank()
check("restore() before any commit() returns to the state as built",
      torch.equal(model.weight, built))
events = []
t0 = time.monotonic()

@hvd.elastic.run
def train(state):
    if hvd.size() == 2 and state.shrunk and state.regrown < 0:
        state.regrown = state.step
    while (time.monotonic() - t0 < 60 if state.regrown < 0 else state.step < state.regrown + 5):
        opt.zero_grad()
        try:   # phalanx's own State would leave here, at the next step's first reduction
            model(torch.ones(3, 4)).sum().backward()
            opt.step()
        except MembershipChanged:
            events.append(["interrupt at a step", state.step])
            raise
        if hvd.size() == 1:
            state.shrunk = True
        events.append(["step", state.step, hvd.size()])
        time.sleep(0.02)
        if state.step % 10 == 0:
            try:
                state.commit()
            except hvd.elastic.HostsUpdatedInterrupt:
                events.append(["interrupt at commit", state.step])
                raise

train(state)
if hvd.rank() == 0:
    sizes = [e[2] for e in events if e[0] == "step"]
    check("shrank to 1 and grew back to 2", 1 in sizes and sizes[-1] == 2, str(sizes))
    check("never interrupted at a step", not any(e[0] == "interrupt at a step" for e in events))
    i = next((i for i, e in enumerate(events) if e[0] == "step" and e[2] == 1), None)
    j = next((j for j, e in enumerate(events) if i is not None and j > i and e[0] == "step"
              and e[2] == 2), None)
    check("growth follows an interrupt at commit", j is not None and j > 0
          and events[j - 1][0] == "interrupt at commit" and events[j - 1][1] % 10 == 0
          and events[j][1] == events[j - 1][1] + 1, str(events[max(0, (j or 1) - 3):(j or 0) + 2]))
    done()
'''

RUN = r'''
import os, stat, sys
import torch
import phalanx.horovod as horovod

def main(scale, offset=0.0):
    import phalanx.horovod.torch as hvd
    hvd.init()
    d = sys.argv[1]
    private = (stat.S_IMODE(os.stat(d).st_mode) == 0o700
               and stat.S_IMODE(os.stat(os.path.join(d, "payload.pkl")).st_mode) == 0o600)
    total = hvd.allreduce(torch.tensor([float(hvd.rank())]), op=hvd.Sum).item()
    return {"rank": hvd.rank(), "value": scale * total + offset, "private": private, "dir": d}

results = horovod.run(main, args=(10.0,), kwargs={"offset": 1.0}, np=2, hosts=None,
                      use_gloo=True, use_mpi=False)
print("LEFT", [os.path.exists(x.pop("dir")) for x in results])
print("RESULTS", json.dumps(results))
try:
    horovod.run(lambda: 1 / 0, np=2)
    print("FAILURE did not raise")
except RuntimeError as e:
    print("FAILURE raised", "failed" in str(e))
'''


def _results(tmp_path, ranks, least: int) -> None:
    for r in ranks:
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["failures"] == [], f"rank {r}: " + "\n".join(out["failures"])
        assert out["checks"] >= least, out


@pytest.mark.timeout(120)
def test_gaps_on_2_ranks(job, tmp_path) -> None:
    """poll, broadcast_optimizer_state, unnamed parameters, the step warning, error types,
    SyncBatchNorm and sparse gradients, in one 2-rank job."""
    res = job(HEAD + TWO, 2, script_args=(str(tmp_path),), timeout=110)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _results(tmp_path, range(2), 45)


@pytest.mark.timeout(120)
def test_adasum_and_a_process_set_optimizer_on_4_ranks(job, tmp_path) -> None:
    """Adasum optimizer vs numpy; a set's optimizer while the others wait past --timeout."""
    res = job(HEAD + FOUR, 4, "--timeout", "3", "--max-restarts", "1",
              script_args=(str(tmp_path),), timeout=110)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "lost" not in res.stderr, res.stderr[-3000:]
    _results(tmp_path, range(4), 12)


@pytest.mark.timeout(150)
def test_elastic_state_admits_workers_at_commit_only(job, tmp_path) -> None:
    """Rank 1 is SIGKILLed at step 5; its replacement joins at a commit(), not at a step."""
    res = job(HEAD + ELASTIC, 2, "--min-np", "1", "--max-restarts", "1", "--chaos",
              "kill:rank=1,step=5", script_args=(str(tmp_path),), timeout=140)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _results(tmp_path, [0], 4)


@pytest.mark.timeout(120)
def test_horovod_run_returns_each_ranks_result(tmp_path) -> None:
    """`phalanx.horovod.run(fn, args, kwargs, np=2)`, fn defined in __main__ (cloudpickle)."""
    pytest.importorskip("cloudpickle")
    path = tmp_path / "driver.py"
    path.write_text("import json\n" + RUN)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = run_cmd([sys.executable, str(path)], tmp_path, 110, env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    assert results == [{"rank": 0, "value": 11.0, "private": True},
                       {"rank": 1, "value": 11.0, "private": True}], results
    assert "FAILURE raised True" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    assert "LEFT [False, False]" in res.stdout, res.stdout[-2000:]
