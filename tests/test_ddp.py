"""`px.DistributedDataParallel` against independent references, in real `phalanx run` jobs.

The reference is plain torch in one process: the same model and optimizer stepped on the
concatenation of every rank's batches (the mean of the ranks' losses), which is what averaging
gradients over ranks must reproduce. One job runs every configuration back to back (start-up
dominates on 2 cores); failures come back as data (conftest's CHECKS). The fault test kills a
worker mid-training and replays the steps the survivors logged in one process.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from conftest import CHECKS

EQUIVALENCE = CHECKS + r'''
import torch, phalanx as px
from phalanx.errors import ConfigError
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

torch.set_num_threads(1)
px.init()
r, n = px.rank(), px.size()
STEPS, K, B = 4, 3, 4

class Net(torch.nn.Module):
    """With `unused`: branch `a` runs on odd ranks only, branch `never` never runs."""
    def __init__(self, unused):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(6, 16), torch.nn.Linear(16, 3)
        if unused:
            self.a, self.never = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    def forward(self, x, use_a=False):
        h = torch.tanh(self.inp(x))
        if use_a:
            h = torch.tanh(self.a(h))
        return self.out(h)

def net(unused=False):
    torch.manual_seed(0)
    return Net(unused)

def batch(rank, step, micro):
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    return torch.randn(B, 6, generator=g), torch.randint(0, 3, (B,), generator=g)

def loss(m, rank, step, micro, unused):
    x, y = batch(rank, step, micro)
    return torch.nn.functional.cross_entropy(m(x, use_a=unused and rank % 2 == 1), y)

def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

def reference(k, unused):
    """One process, every rank's micro-batches: the mean over ranks of each rank's summed
    micro-batch losses."""
    m = net(unused)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    for s in range(STEPS):
        opt.zero_grad()
        sum(loss(m, q, s, i, unused) for q in range(n) for i in range(k)).div(n).backward()
        opt.step()
    return flat(m), [p.grad is None for p in m.parameters()]

def distributed(k, unused, **kw):
    m = px.DistributedDataParallel(net(unused), **kw)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    for s in range(STEPS):
        opt.zero_grad()
        for i in range(k):
            if i < k - 1:
                with m.no_sync():
                    loss(m, r, s, i, unused).backward()
            else:
                loss(m, r, s, i, unused).backward()
        opt.step()
    return m, flat(m), [p.grad is None for p in m.parameters()]

CONFIGS = [
    ("plain", 1, False, {}),
    ("no_sync x3", K, False, {}),
    ("unused", 1, True, {"find_unused_parameters": True}),
    ("unused + no_sync", K, True, {"find_unused_parameters": True}),
    ("bucket views, small buckets", K, False, {"gradient_as_bucket_view": True,
                                               "bucket_cap_mb": 0.001}),
    ("static graph", 1, False, {"static_graph": True}),
    ("comm thread", K, True, {"find_unused_parameters": True, "comm_thread": True}),
]
worst = {}
for label, k, unused, kw in CONFIGS:
    want, want_none = reference(k, unused)
    m, got, got_none = distributed(k, unused, **kw)
    worst[label] = (got - want).abs().max().item()
    check(label, worst[label] < 1e-6, f"max |difference| {worst[label]:.3g}")
    check(label + ": grads left None", got_none == want_none, f"{got_none} vs {want_none}")
    check(label + ": rank 0's model on every rank", torch.equal(
        px.broadcast(got, root=0), got), "ranks differ")

# compression: torch's stock fp16 hook becomes phalanx's fp16 reduction, close to exact
m = px.DistributedDataParallel(net())
m.register_comm_hook(None, default_hooks.fp16_compress_hook)
opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
for s in range(STEPS):
    opt.zero_grad(); loss(m, r, s, 0, False).backward(); opt.step()
want, _ = reference(1, False)
check("fp16 hook", (flat(m) - want).abs().max().item() < 1e-2, "far from exact")
check("fp16 hook: compressed", (flat(m) - want).abs().max().item() > 0, "bit-exact")
def averaging_hook(state, bucket):     # a user's own hook, reducing with phalanx's collectives
    state.append(bucket.index())
    fut = torch.futures.Future()
    fut.set_result(px.allreduce_(bucket.buffer(), op="avg"))
    return fut
m, seen = px.DistributedDataParallel(net()), []
m.register_comm_hook(seen, averaging_hook)
opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
for s in range(STEPS):
    opt.zero_grad(); loss(m, r, s, 0, False).backward(); opt.step()
check("custom hook", (flat(m) - want).abs().max().item() < 1e-6 and len(seen) >= STEPS, seen)
for comp in ("bf16", "1bit", "topk"):
    m = px.DistributedDataParallel(net(), compression=comp, topk_ratio=0.5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for s in range(STEPS):
        opt.zero_grad(); loss(m, r, s, 0, False).backward(); opt.step()
    check(f"{comp}: same model everywhere", torch.equal(px.broadcast(flat(m), root=0), flat(m)))

# DDP's face: module, state_dict keys, train/eval, no collectives for eval before training
inner = net()
m = px.DistributedDataParallel(inner, broadcast_buffers=False)
check("module", m.module is inner)
with torch.no_grad():
    m(torch.zeros(1, 6))
check("eval forward binds nothing", m.ddp is None)
keys = list(m.state_dict())
check("state_dict keys", keys == ["module." + k for k in inner.state_dict()], keys)
m.load_state_dict(m.state_dict())
check("parameters", [id(p) for p in m.parameters()] == [id(p) for p in inner.parameters()])
loss(m, r, 0, 0, False).backward()
check("bound to this generation", m.ddp is not None and m.process_group.generation ==
      px.generation() and m.process_group.size() == n)
m.eval()
check("eval reaches the module", not inner.training and not m.ddp.training)
raises("join", ConfigError, lambda: m.join())

print("RESULT " + json.dumps({"rank": r, "checks": checks[0], "fails": fails, "worst": worst}))
'''


def _results(out: str) -> list[dict]:
    return [json.loads(line.split("RESULT ", 1)[1]) for line in out.splitlines()
            if "RESULT " in line]


@pytest.mark.timeout(120)
def test_matches_one_process_on_the_concatenated_batches(job) -> None:
    """Plain, no_sync accumulation, unused parameters (some ranks, all ranks), bucket views,
    static graph and the comm-thread path all equal the one-process reference within 1e-6;
    compression keeps every rank on one model; DDP's face (module, keys) is DDP's."""
    res = job("import json\n" + EQUIVALENCE, 2, timeout=110)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = _results(res.stdout)
    assert len(results) == 2, res.stdout[-2000:]
    for r in results:
        assert r["checks"] > 30 and not r["fails"], r


def test_constructor_takes_ddp_arguments_and_names_what_it_refuses() -> None:
    """No job: the constructor only checks arguments (binding waits for the first forward)."""
    import phalanx as px
    from phalanx.errors import ConfigError
    model = torch.nn.Linear(2, 2)
    m = px.DistributedDataParallel(model, None, None, 0, bucket_cap_mb=1,
                                   find_unused_parameters=True, static_graph=False,
                                   gradient_as_bucket_view=True, broadcast_buffers=False)
    assert m.module is model and m.ddp is None
    assert list(m.state_dict()) == ["module.weight", "module.bias"]
    with pytest.raises(ConfigError, match="process_group=.*phalanx owns"):
        px.DistributedDataParallel(model, process_group=object())
    with pytest.raises(TypeError, match="bucket_size_mb.*bucket_cap_mb"):
        px.DistributedDataParallel(model, bucket_size_mb=1)
    with pytest.raises(ConfigError, match="compression='zip'"):
        px.DistributedDataParallel(model, compression="zip")
    with pytest.raises(ConfigError, match="already wrapped"):
        px.DistributedDataParallel(m)
    with pytest.raises(ConfigError, match="module=int"):
        px.DistributedDataParallel(3)


# A torchrun-style DDP script with the README's three-line change: px.init() for
# dist.init_process_group(), ShardedLoader for DistributedSampler, px.DistributedDataParallel
# for DDP; then State + @px.elastic.run around the loop.
ELASTIC = r'''
import json, os, sys, time
import torch, phalanx as px
from phalanx.data import ArrayDataset, ShardedLoader

out, epochs, pause, kw = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])
torch.set_num_threads(1)
px.init()
g = torch.Generator().manual_seed(7)
X = torch.randn(240, 6, generator=g, dtype=torch.float64)
Y = torch.randint(0, 3, (240,), generator=g)
loader = ShardedLoader(ArrayDataset(X, Y, torch.arange(240)), batch_size=8, seed=0)
torch.manual_seed(0)
model = px.DistributedDataParallel(torch.nn.Sequential(
    torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double(), **kw)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
state = px.elastic.State(model=model, optimizer=opt, loaders=[loader], epoch=0)
me = os.environ.get("PHALANX_WORKER_ID", "solo")
log = open(os.path.join(out, f"steps.{me}.jsonl"), "a", buffering=1)

@px.elastic.run
def train(state):
    for state.epoch in range(state.epoch, epochs):
        for x, y, idx in loader:
            plan = [p.tolist() for p in loader.pending_step]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            time.sleep(pause)
            log.write(json.dumps({"epoch": state.epoch, "step": state.step, "plan": plan}) + "\n")

first = model
train(state)
torch.save({"params": [p.detach().clone() for p in model.parameters()], "step": state.step,
            "same_object": model is first, "heals": [r["heal"] for r in state.recoveries],
            "bound": [model.process_group.generation, model.process_group.size()]},
           os.path.join(out, f"final.{me}.pt"))
'''


def _run_elastic(job, out: Path, *flags: str, epochs: int = 2, pause: float = 0.0,
                 ddp_kwargs: dict | None = None) -> list[dict]:
    out.mkdir()
    res = job(ELASTIC, 3, *flags, timeout=140,
              script_args=(str(out), str(epochs), str(pause), json.dumps(ddp_kwargs or {})))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    finals = [torch.load(p, weights_only=False) for p in sorted(out.glob("final.*.pt"))]
    steps: dict[int, dict] = {}
    for line in (ln for p in out.glob("steps.*.jsonl") for ln in p.read_text().splitlines()):
        s = json.loads(line)
        assert steps.setdefault(s["step"], s) == s, f"step {s['step']} has two histories"
    assert finals and sorted(steps) == list(range(1, finals[0]["step"] + 1)), res.stderr[-2000:]
    per_epoch: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for s in steps.values():
        per_epoch[s["epoch"]].update(i for part in s["plan"] for i in part)
    assert sorted(per_epoch) == list(range(epochs))
    for e, counts in per_epoch.items():
        assert sorted(counts) == list(range(240)), f"epoch {e}: samples missing"
        assert set(counts.values()) == {1}, f"epoch {e}: samples trained twice"
    assert sum(1 for f in finals if f["heals"]) >= 2, "the survivors did not recover"
    for f in finals:
        assert f["same_object"], "the wrapper was replaced"
        assert f["bound"] == [finals[0]["bound"][0], len(finals)], f["bound"]
        for a, b in zip(finals[0]["params"], f["params"]):
            assert torch.equal(a, b), "ranks ended with different parameters"
    _replay(steps, finals[0]["params"])
    return [{**f, "plans": [len(s["plan"]) for _, s in sorted(steps.items())],
             "stderr": res.stderr} for f in finals]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("ddp_kwargs", [{}, {"comm_thread": True, "bucket_cap_mb": 1e-4}],
                         ids=["inline", "comm-thread-many-buckets"])
def test_sigkill_survivors_equal_every_sample_once(job, tmp_path: Path, ddp_kwargs) -> None:
    """3 workers, rank 1 SIGKILLed at step 6: the 2 survivors re-form (the wrapper rebinds to
    generation 2 by itself), end with equal parameters, trained every sample of every epoch
    exactly once, and equal a one-process replay of the logged steps. Reducing inline in the
    hook (this machine's default) and on the comm thread, where the loss reaches backward
    through the end-of-backward callback."""
    finals = _run_elastic(job, tmp_path / "out", "--min-np", "2", "--chaos", "kill:rank=1,step=6",
                          ddp_kwargs=ddp_kwargs)
    assert len(finals) == 2 and finals[0]["bound"] == [2, 2]
    assert "continuing without it" in finals[0]["stderr"]
    assert finals[0]["plans"][:6] == [3] * 6 and set(finals[0]["plans"][6:]) == {2}


@pytest.mark.timeout(150)
def test_replacement_joins_and_heals(job, tmp_path: Path) -> None:
    """Rank 1 SIGKILLed and respawned: the replacement builds its wrapper while the others
    train, joins at a step boundary, heals from them, and all three end equal, with every
    sample once and no step's after-step code skipped."""
    finals = _run_elastic(job, tmp_path / "out", "--min-np", "2", "--max-restarts", "1",
                          "--chaos", "kill:rank=1,step=6", epochs=5, pause=0.15)
    assert len(finals) == 3 and finals[0]["bound"][1] == 3, finals[0]["stderr"][-2000:]
    assert finals[0]["bound"][0] >= 3   # killed (2), replacement in (3), maybe more re-forms
    assert any("heal from it" in h for f in finals for h in f["heals"]), finals[0]["heals"]


def _replay(steps: dict[int, dict], params: list[torch.Tensor]) -> None:
    """The logged steps in one process: each step's gradient is the mean over its parts (the
    ranks of that step) of each part's mean loss."""
    g = torch.Generator().manual_seed(7)
    X = torch.randn(240, 6, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (240,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in sorted(steps):
        parts = [torch.tensor(p) for p in steps[step]["plan"]]
        opt.zero_grad()
        sum(torch.nn.functional.cross_entropy(model(X[p]), Y[p])
            for p in parts).div(len(parts)).backward()
        opt.step()
    for want, got in zip(model.parameters(), params):
        assert (want.detach() - got).abs().max().item() < 1e-9
