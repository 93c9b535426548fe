"""DistributedOptimizer on real multi-process jobs started by `phalanx run`.

Each test launches one job whose workers run several configurations back to back (process start-up
dominates on a 2-core machine) and save what they saw; the test then compares in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

EQUIVALENCE = r'''
import sys
from pathlib import Path
import torch
import phalanx as px
from phalanx.errors import PhalanxError
from phalanx.train import DistributedOptimizer

torch.set_num_threads(1)
px.init()
r, n = px.rank(), px.size()
STEPS, B = 5, 4
CONFIGS = [(kind, k, "none") for kind in ("sgd", "adamw") for k in (1, 2)]
CONFIGS += [("sgd", 1, "fp16"), ("adamw", 1, "fp16"), ("sgd", 1, "bf16")]

def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 3))

def make_opt(kind, m):
    if kind == "sgd":
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1)

def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()]).clone()

def run(m, opt, x, y, k, set_to_none=True):
    """x: (steps, k micro-batches, batch, 6); returns the parameters after every step."""
    snaps = []
    for xs, ys in zip(x, y):
        opt.zero_grad(set_to_none=set_to_none)
        for xm, ym in zip(xs, ys):
            (torch.nn.functional.cross_entropy(m(xm), ym) / k).backward()
        opt.step()
        snaps.append(flat(m))
    return torch.stack(snaps)

def in_buckets(m, opt):
    """Every gradient's storage lies inside its bucket's buffer (gradient_as_bucket_view)."""
    spans = [(b.buffer.data_ptr(), b.buffer.data_ptr() + b.numel * b.buffer.element_size())
             for b in opt.buckets]
    return all(any(lo <= p.grad.data_ptr() < hi for lo, hi in spans) for p in m.parameters())

out = {}
for kind, k, comp in CONFIGS:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, k, n * B, 6, generator=g)
    y = torch.randint(0, 3, (STEPS, k, n * B), generator=g)
    key = f"{kind}-k{k}-{comp}"
    # gradients as bucket views (default), then the copy path and views with zeroed gradients:
    # all three must give the same bits
    # (reduced inline, as on this machine by default; and once on the comm thread)
    for view, none, suffix in ((True, True, ""), (False, True, "-copy"), (True, False, "-zeroed"),
                               (True, True, "-thread")):
        m = model()
        opt = DistributedOptimizer(make_opt(kind, m), model=m, backward_passes_per_step=k,
                                   compression=comp, bucket_cap_mb=0.001,
                                   gradient_as_bucket_view=view,
                                   comm_thread=True if suffix == "-thread" else None)
        out[key + suffix] = run(m, opt, x[:, :, r * B:(r + 1) * B], y[:, :, r * B:(r + 1) * B],
                                k, set_to_none=none)
        if view:
            # ... inside buffers in shared memory, which the peers reduce in place
            out[key + suffix + "-views"] = in_buckets(m, opt) and all(
                b.home is not None and b.home.locate(b.buffer) >= 0 for b in opt.buckets
                if b.buffer.dtype == torch.float32 and comp == "none")
    if r == 0:
        ref = model()
        out[key + "-ref"] = run(ref, make_opt(kind, ref), x, y, k)

# Unused and frozen parameters: rank 0 uses branch a, the others branch b; nobody uses `never`.
torch.manual_seed(0)
mods = torch.nn.ModuleDict({name: torch.nn.Linear(3, 3) for name in ("a", "b", "never", "frozen")})
mods["frozen"].requires_grad_(False)
opt = DistributedOptimizer(torch.optim.SGD(mods.parameters(), lr=0.1), model=mods,
                           bucket_cap_mb=0.0001)
for step in range(3):
    opt.zero_grad()
    xin = torch.ones(2, 3)
    (mods["a"](xin) if r == 0 else mods["b"](mods["frozen"](xin))).sum().backward()
    opt.step()
out["unused-grad-never"] = mods["never"].weight.grad
out["unused-params"] = torch.cat([p.detach().reshape(-1) for p in mods.parameters()])

# Misuse on a live job: zero_grad() while reductions are in flight is refused, then step() works.
m = model()
opt = DistributedOptimizer(make_opt("sgd", m), model=m)
torch.nn.functional.cross_entropy(m(torch.ones(2, 6)), torch.tensor([0, 1])).backward()
try:
    opt.zero_grad()
    out["misuse"] = "no error"
except PhalanxError as e:
    out["misuse"] = str(e)
opt.step()
torch.save(out, Path(sys.argv[1]) / f"rank{r}.pt")
'''

DIGITS = r'''
import importlib.util, json, sys
from pathlib import Path
import torch
import phalanx as px

torch.set_num_threads(1)
px.init()
spec = importlib.util.spec_from_file_location("train_digits", sys.argv[2])
digits = importlib.util.module_from_spec(spec)
spec.loader.exec_module(digits)
acc = {}
for comp in ("none", "1bit", "topk"):
    args = digits.parse_args(["--epochs", "12", "--lr", "0.01", "--compression", comp,
                              "--topk-ratio", "0.1", "--quiet"])
    acc[comp] = digits.train(args)
if px.rank() == 0:
    (Path(sys.argv[1]) / "acc.json").write_text(json.dumps(acc))
'''


def _check(proc) -> None:
    assert proc.returncode == 0, f"job failed\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
def test_equivalence_identity_unused_and_misuse(job, tmp_path: Path, n: int) -> None:
    _check(job(EQUIVALENCE, n, script_args=(str(tmp_path),), timeout=100))
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(n)]
    for key, snaps in outs[0].items():
        if key.endswith(("-ref", "-copy", "-zeroed", "-thread", "-views")) or key.startswith(
                ("unused", "misuse")):
            continue
        for other in ("-copy", "-zeroed", "-thread"):   # no bit of the result changes
            assert torch.equal(snaps, outs[0][key + other]), f"{key}{other} differs from {key}"
        assert outs[0][key + "-views"] and outs[0][key + "-zeroed-views"], key
        for r in range(1, n):          # every rank, after every step: the same bits
            assert torch.equal(snaps, outs[r][key]), f"{key}: rank {r} differs from rank 0"
        ref = outs[0][key + "-ref"]
        # exact averaging matches one process at n x the batch; 16-bit wires within their epsilon
        tol = {"none": (1e-5, 1e-6), "fp16": (1e-3, 1e-4), "bf16": (1e-2, 2e-3)}[key.split("-")[2]]
        torch.testing.assert_close(snaps, ref, rtol=tol[0], atol=tol[1], msg=key)
    for r in range(n):
        assert outs[r]["unused-grad-never"] is None
        assert torch.equal(outs[r]["unused-params"], outs[0]["unused-params"])
        assert "zero_grad() called while" in outs[r]["misuse"]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_compressed_training_reaches_uncompressed_accuracy(job, tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    script_args = (str(tmp_path), str(REPO / "examples" / "train_digits.py"))
    _check(job(DIGITS, 2, script_args=script_args, timeout=140))
    acc = json.loads((tmp_path / "acc.json").read_text())
    assert acc["none"] > 0.95, acc
    assert acc["1bit"] >= acc["none"] - 0.01, acc
    assert acc["topk"] >= acc["none"] - 0.01, acc
