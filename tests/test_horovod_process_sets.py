"""Horovod's process sets at 4 real ranks, and phalanx's own subgroups (`px.new_group`) under
them: collectives of every kind among a set's members only, checked against numpy; name
matching inside a set while other sets and the global set run; registration rules and errors
as real Horovod 0.28.1 gives them here (root_rank is a job rank, a non-member calling a set's
collective gets ValueError, duplicate and full sets are refused); sets rebuilt after a worker is
SIGKILLed and the job re-forms."""

from __future__ import annotations

import json

import pytest
from conftest import CHECKS

HEAD = r'''
import json, os, sys
import numpy as np, torch
import phalanx as px
import phalanx.horovod.torch as hvd
''' + CHECKS + r'''

def done():
    with open(f"{sys.argv[1]}/rank{r}.json", "w") as f:
        json.dump({"failures": fails, "checks": checks[0]}, f)

def val(k, rank, shape=(4,)):
    return np.random.default_rng(100 * rank + k).integers(-9, 10, size=shape).astype(np.float64)

def same(label, got, want):
    got = np.asarray(got.detach() if isinstance(got, torch.Tensor) else got)
    check(label, got.shape == np.shape(want) and np.allclose(got, want), f"{got.tolist()} != {np.asarray(want).tolist()}")
'''

SETS = r'''
evens, odds = hvd.ProcessSet([0, 2]), hvd.ProcessSet([1, 3])
hvd.init(process_sets=[evens, odds])
n, r = hvd.size(), hvd.rank()
mine, other = (evens, odds) if r % 2 == 0 else (odds, evens)
members = mine.ranks
me = torch.from_numpy(val(0, r))

check("ids", (evens.process_set_id, odds.process_set_id) == (1, 2), str(evens))
check("size/rank/included", (mine.size(), mine.rank(), mine.included(), other.included())
      == (2, members.index(r), True, False), f"{mine}")
# the same names in both sets: each set matches its own
same("set average", hvd.allreduce(me, name="x", process_set=mine), sum(val(0, q) for q in members) / 2)
same("set sum", hvd.allreduce(me, name="y", op=hvd.Sum, process_set=mine), sum(val(0, q) for q in members))
same("set allgather", hvd.allgather(torch.full((r + 1, 2), float(r)), process_set=mine),
     np.concatenate([np.full((q + 1, 2), float(q)) for q in members]))
root = members[-1]                              # a job rank, as in Horovod
same("set broadcast", hvd.broadcast(me, root_rank=root, process_set=mine), val(0, root))
out, got_splits = hvd.alltoall(torch.arange(4.0) + 10 * r, splits=[1, 3], process_set=mine)
want = np.concatenate([np.arange(4.0)[:1] + 10 * members[0], np.arange(4.0)[:1] + 10 * members[1]]) \
    if members.index(r) == 0 else np.concatenate([np.arange(4.0)[1:] + 10 * members[0], np.arange(4.0)[1:] + 10 * members[1]])
same("set alltoall", out, want)
check("set alltoall splits", got_splits.tolist() == ([1, 1] if members.index(r) == 0 else [3, 3]), str(got_splits))
rs = hvd.reducescatter(torch.from_numpy(val(1, r)), op=hvd.Sum, process_set=mine)
full = sum(val(1, q) for q in members)
same("set reducescatter", rs, full[:2] if members.index(r) == 0 else full[2:])
a, b = hvd.grouped_allreduce([me, me * 2], op=hvd.Sum, process_set=mine)
same("set grouped", b, 2 * sum(val(0, q) for q in members))
check("set broadcast_object", hvd.broadcast_object({"from": r}, root_rank=root, process_set=mine) == {"from": root})
check("set allgather_object", hvd.allgather_object(r, process_set=mine) == members)
hvd.barrier(process_set=mine)
x = me.clone().requires_grad_(True)
(hvd.allreduce(x, op=hvd.Sum, process_set=mine) * torch.arange(4.0)).sum().backward()
same("set allreduce gradient", x.grad, 2 * np.arange(4.0))   # the Sum of the same upstream grad
# name matching inside a set: rank order of submission rotated, synchronized in reverse
names = ["p", "q", "s"]
order = names if members.index(r) == 0 else names[::-1]
hs = {nm: hvd.allreduce_async(torch.from_numpy(val(ord(nm), r)), name=nm, op=hvd.Sum, process_set=mine) for nm in order}
for nm in names[::-1]:
    same(f"set rotated {nm}", hvd.synchronize(hs[nm]), sum(val(ord(nm), q) for q in members))
# the global set alongside
same("global after sets", hvd.allreduce(me, op=hvd.Sum, name="g"), sum(val(0, q) for q in range(n)))
# a set of three and an Adasum of two
trio = hvd.ProcessSet([0, 1, 3])
raises("add without dynamic", ValueError, lambda: hvd.add_process_set(trio))

# errors, as Horovod raises them
raises("non-member", ValueError, lambda: hvd.allreduce(me, process_set=other))
raises("root outside the set", ValueError, lambda: hvd.broadcast(me, root_rank=other.ranks[0], process_set=mine))
raises("unregistered set", ValueError, lambda: hvd.allreduce(me, process_set=hvd.ProcessSet([0, 1])))
# as in Horovod, a rank outside the set may build the set's optimizer: it steps locally
w = torch.nn.Parameter(torch.ones(1))
foreign = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.5), process_set=other)
w.grad = torch.full((1,), float(r))
foreign.step()
check("optimizer on a foreign set steps locally", w.item() == 1 - 0.5 * r, str(w))

# each set trains its own replica: DistributedOptimizer averages over the set's ranks only
def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

def data(q, k):
    g = torch.Generator().manual_seed(1000 * q + k)
    return torch.randn(5, 6, generator=g), torch.randn(5, 1, generator=g)

def loss(m, q, k):
    x, y = data(q, k)
    return torch.nn.functional.mse_loss(m(x), y)

model = net()
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                               named_parameters=model.named_parameters(), process_set=mine,
                               compression=hvd.Compression.fp16 if r % 2 else hvd.Compression.none)
ref = net()
ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
for k in range(4):
    opt.zero_grad()
    loss(model, r, k).backward()
    opt.step()
    ref_opt.zero_grad()
    (sum(loss(ref, q, k) for q in members) / len(members)).backward()
    ref_opt.step()
err = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), ref.parameters()))
check("set optimizer matches the set's replay", err < (2e-3 if r % 2 else 1e-6), f"{err:.3g}")
theirs = hvd.allgather_object([p.detach() for p in model.parameters()])
check("the two sets trained different replicas",
      any(not torch.equal(a, b) for a, b in zip(theirs[0], theirs[1])))
check("replicas equal within a set", all(torch.equal(a, b) for a, b in zip(theirs[members[0]], theirs[members[1]])))
opt.remove_hooks()
hvd.shutdown()

# dynamic sets: add, duplicate, full set, remove
hvd.init(process_sets="dynamic")
trio = hvd.add_process_set([0, 1, 3])
check("dynamic id", trio.process_set_id == 1, str(trio))
raises("duplicate set", ValueError, lambda: hvd.add_process_set([3, 1, 0]))
raises("set of every rank", ValueError, lambda: hvd.add_process_set(list(range(n))))
if trio.included():
    same("trio average", hvd.allreduce(me, process_set=trio), sum(val(0, q) for q in trio.ranks) / 3)
    same("trio allgather", hvd.allgather(torch.tensor([float(r)]), process_set=trio), [0.0, 1.0, 3.0])
pair = hvd.add_process_set([1, 2])
if pair.included():
    ad = hvd.allreduce(torch.from_numpy(val(5, r)), op=hvd.Adasum, process_set=pair)
    a0, a1 = val(5, 1), val(5, 2)
    dot = float(a0 @ a1)
    want = (1 - dot / (2 * float(a0 @ a0))) * a0 + (1 - dot / (2 * float(a1 @ a1))) * a1
    same("pair adasum", ad, want)
check("remove", hvd.remove_process_set(trio) is True)
check("remove again", hvd.remove_process_set(trio) is False)
from phalanx import runtime
check("the removed set's subgroup is closed and not rebuilt",
      (0, 1, 3) not in runtime.current().group.subgroups
      and (0, 1, 3) not in runtime.current().subgroup_members)
check("remove global", hvd.remove_process_set(hvd.global_process_set) is False)
raises("removed set", ValueError, lambda: hvd.allreduce(me, process_set=trio))
same("global at the end", hvd.allreduce(me, op=hvd.Sum), sum(val(0, q) for q in range(n)))
hvd.shutdown()

# phalanx's own API underneath
g = px.new_group([3, 1])
check("px group ranks", g.ranks == [1, 3] and g.size() == 2)
if g.included():
    same("px group allreduce", px.allreduce(torch.from_numpy(val(7, r)), group=g), val(7, 1) + val(7, 3))
    check("px group broadcast_object", px.broadcast_object(r, root=3, group=g) == 3)
else:
    raises("px non-member", px.ConfigError, lambda: px.allreduce(torch.ones(1), group=g))
    raises("px group rank", px.ConfigError, lambda: g.rank())
raises("px ranks disagree", px.ConfigError, lambda: px.new_group([0, 1 + (r % 2)]))
raises("px bad ranks", px.ConfigError, lambda: px.new_group([0, n]))
done()
'''

REFORM = r'''
px.init()
n0 = px.size()
pair = px.new_group([0, 1])
last = px.new_group([0, n0 - 1])
state = px.elastic.State()
log = []

@px.elastic.run
def train(state):
    while state.step < 8:
        r, n = px.rank(), px.size()
        if pair.included():
            got = px.allreduce(torch.tensor([float(r + 1)]), group=pair)
            log.append((state.step, n, "pair", got.item()))
        if n < n0:                              # rank n0-1 is gone: the set naming it is refused
            try:
                px.allreduce(torch.ones(1), group=last)
                log.append((state.step, n, "last", "ran"))
            except px.ConfigError as e:
                log.append((state.step, n, "last", "refused" if "re-formed" in str(e) else str(e)))
        px.barrier()
        state.end_step()
        if state.step == 4 and r == n0 - 1 and n == n0:
            os.kill(os.getpid(), 9)

train(state)
r = px.rank()
check("pair sums 1 + 2 before and after the loss", all(v == 3.0 for s, n, k, v in log if k == "pair"), str(log))
check("the lost rank's set is refused after", [v for s, n, k, v in log if k == "last"] != [] and
      all(v == "refused" for s, n, k, v in log if k == "last"), str(log))
check("the job re-formed smaller", px.size() == n0 - 1, str(px.size()))
done()
'''


def _results(tmp_path, ranks, least: int) -> None:
    for r in ranks:
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["failures"] == [], f"rank {r}: " + "\n".join(out["failures"])
        assert out["checks"] >= least, out


@pytest.mark.timeout(100)
def test_process_sets_4_ranks(job, tmp_path) -> None:
    """Evens and odds run the same names at once; every kind; errors; dynamic sets; px API."""
    res = job(HEAD + SETS, 4, script_args=(str(tmp_path),), timeout=90)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _results(tmp_path, range(4), 30)


@pytest.mark.timeout(100)
def test_subgroups_rebuilt_after_a_worker_is_killed(job, tmp_path) -> None:
    """3 workers; the last is SIGKILLed at step 4; the survivors re-form, the group of ranks
    0 and 1 keeps working and the group naming rank 2 is refused with a clear error."""
    res = job(HEAD + REFORM, 3, "--min-np", "2", script_args=(str(tmp_path),), timeout=90)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _results(tmp_path, range(2), 3)
