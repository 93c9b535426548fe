"""`phalanx.lightning.PhalanxStrategy` in real `phalanx run` jobs with real Lightning 2.6.

A standard Lightning program (a LightningModule, DataLoaders, `trainer.fit`, `self.log(...,
sync_dist=True)`, a ModelCheckpoint) runs with the strategy as the only change. The reference
is plain torch in one process: every global step's per-rank batches (as the ranks logged them)
replayed with the mean of the ranks' mean losses, which is what averaging gradients over the
ranks must reproduce. The fault test SIGKILLs a worker mid-epoch (`--chaos`) and checks the
survivors against that replay, every sample trained exactly once per epoch, and
`trainer.global_step` equal to a fault-free run's.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

N, BATCH, EPOCHS, LR = 48, 2, 2, 0.05
JOB = r'''
import json, os, sys
import torch, lightning as L
from torch.utils.data import DataLoader, Dataset
from phalanx.lightning import PhalanxStrategy

torch.set_num_threads(1)
N, BATCH, EPOCHS, LR = %(N)d, %(BATCH)d, %(EPOCHS)d, %(LR)r
OUT = sys.argv[1]
ACCUMULATE = int(sys.argv[2]) if len(sys.argv) > 2 else 1
KILL = os.environ.get("KILL_AT", "")  # "train" / "val": the first worker SIGKILLs itself there

def maybe_die(where, trainer, batch_idx):
    if KILL == where and os.environ.get("PHALANX_WORKER_ID") == "w1" and \
            trainer.current_epoch == 0 and batch_idx == 1 and not trainer.sanity_checking:
        os.kill(os.getpid(), 9)

class Indexed(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64) + 0.1
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return i, self.x[i], self.y[i]

class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1).double()
        self.log_file = None
    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        maybe_die("train", self.trainer, batch_idx)
        if self.log_file is None:
            self.log_file = open(os.path.join(OUT, f"steps-{os.getpid()}.jsonl"), "a")
        self.log_file.write(json.dumps([self.global_step, idx.tolist()]) + "\n")
        self.log_file.flush()
        loss = torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss
    def on_train_start(self):
        with open(os.path.join(OUT, f"init-{os.getpid()}.json"), "w") as f:
            json.dump([p.detach().reshape(-1).tolist() for p in self.parameters()], f)
    def validation_step(self, batch, batch_idx):
        _, x, y = batch
        maybe_die("val", self.trainer, batch_idx)
        self.log("val_loss", torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y),
                 sync_dist=True)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

torch.manual_seed(os.getpid())  # ranks start different: the strategy must equalise them
model = Model()
trainer = L.Trainer(strategy=PhalanxStrategy(), max_epochs=EPOCHS, accelerator="cpu",
                    logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=OUT, accumulate_grad_batches=ACCUMULATE,
                    callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=OUT)])
train = DataLoader(Indexed(N, 0), batch_size=BATCH, shuffle=True)
val = DataLoader(Indexed(12, 1), batch_size=2)
trainer.fit(model, train, val)
fit_val = float(trainer.callback_metrics["val_loss"])
validated = trainer.validate(model, val, verbose=False)[0]["val_loss"]
with open(os.path.join(OUT, f"final-{os.getpid()}.json"), "w") as f:
    json.dump({"rank": trainer.global_rank, "size": trainer.world_size,
               "global_step": trainer.global_step, "epoch": trainer.current_epoch,
               "recoveries": len(trainer.strategy.recoveries),
               "params": [p.detach().reshape(-1).tolist() for p in model.parameters()],
               "val_loss": fit_val, "validate_loss": validated}, f)
''' % {"N": N, "BATCH": BATCH, "EPOCHS": EPOCHS, "LR": LR}  # noqa: UP031 (braces in it)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64) + 0.1


def _steps(out: Path) -> dict[int, list[list[int]]]:
    """global step -> the batches of every rank that trained it (a redone step: last try)."""
    per_proc = []
    for f in sorted(out.glob("steps-*.jsonl")):
        last: dict[int, list[int]] = {}
        for line in f.read_text().splitlines():
            step, idx = json.loads(line)
            last[step] = idx
        per_proc.append(last)
    steps: dict[int, list[list[int]]] = collections.defaultdict(list)
    for last in per_proc:
        for step, idx in last.items():
            steps[step].append(idx)
    return dict(sorted(steps.items()))


def _replay(steps: dict[int, list[list[int]]], init: list[list[float]]) -> torch.Tensor:
    """One process: each step's gradient is the mean over ranks of each rank's mean loss."""
    x, y = _data(N, 0)
    w = torch.tensor(init[0], dtype=torch.float64).reshape(1, 4).requires_grad_()
    b = torch.tensor(init[1], dtype=torch.float64).requires_grad_()
    for batches in steps.values():
        parts = [torch.nn.functional.mse_loss((x[i] @ w.T).squeeze(-1) + b, y[i])
                 for i in map(torch.tensor, batches) if len(i)]
        loss = sum(parts) / len(parts)
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            w -= LR * gw
            b -= LR * gb
    return torch.cat([w.detach().reshape(-1), b.detach().reshape(-1)])


def _run(job, tmp_path: Path, np: int, *args: str,
         env: dict[str, str] | None = None) -> tuple[list[dict], dict, list[list[float]]]:
    out = tmp_path / "out"
    out.mkdir()
    res = job(JOB, np, *args, script_args=(str(out),), timeout=150, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    finals = [json.loads(f.read_text()) for f in out.glob("final-*.json")]
    inits = {json.dumps(json.loads(f.read_text())) for f in out.glob("init-*.json")}
    assert len(inits) == 1, f"ranks started from different parameters: {inits}"
    return finals, _steps(out), json.loads(inits.pop())


KILLS = {"step boundary": ((("--chaos", "kill:rank=1,step=5")), None),
         "inside training_step": ((), {"KILL_AT": "train"}),
         "inside validation": ((), {"KILL_AT": "val"})}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("where", list(KILLS))
def test_fit_equals_one_process_and_survives_a_sigkill_mid_epoch(job, tmp_path, where) -> None:
    steps_per_epoch = -(-N // (BATCH * 3))
    args, env = KILLS[where]
    finals, steps, init = _run(job, tmp_path, 3, "--min-np", "2", *args, env=env)
    assert len(finals) == 2, finals                       # the killed worker wrote nothing
    assert {f["size"] for f in finals} == {2}
    assert all(f["recoveries"] == 1 for f in finals)
    # global_step is what a fault-free run's is: the epoch kept its number of steps
    assert {f["global_step"] for f in finals} == {EPOCHS * steps_per_epoch}
    assert finals[0]["params"] == finals[1]["params"]     # survivors bit-equal
    # every sample trained exactly once per epoch, the killed worker's share included
    for epoch in range(EPOCHS):
        seen = [i for s, parts in steps.items() if s // steps_per_epoch == epoch
                for part in parts for i in part]
        assert sorted(seen) == list(range(N)), (epoch, collections.Counter(seen).most_common(3))
    assert len(steps[0]) == 3 and len(steps[EPOCHS * steps_per_epoch - 1]) == 2
    # and the survivors' parameters are those of one process replaying the same batches
    want = _replay(steps, init)
    got = torch.tensor([v for p in finals[0]["params"] for v in p], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=1e-9), (got, want)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_static_fit_equals_one_process_and_checkpoints(job, tmp_path) -> None:
    finals, steps, init = _run(job, tmp_path, 2)
    assert {f["global_step"] for f in finals} == {EPOCHS * -(-N // (BATCH * 2))}
    assert all(len(parts) == 2 for parts in steps.values())
    want = _replay(steps, init)
    for f in finals:
        got = torch.tensor([v for p in f["params"] for v in p], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=0, atol=1e-9), (got, want)
    # the metric logged with sync_dist is the mean of the ranks' validation losses
    assert len({f["val_loss"] for f in finals}) == 1
    # trainer.validate after fit (the strategy set up for evaluation) sees the same model
    assert all(f["validate_loss"] == pytest.approx(f["val_loss"], abs=1e-12) for f in finals)
    assert list((tmp_path / "out").glob("*.ckpt")), "ModelCheckpoint saved nothing"


@pytest.mark.timeout(120)
def test_accumulation_in_an_elastic_job_is_refused_with_the_fix(job, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    res = job(JOB, 2, "--min-np", "1", script_args=(str(out), "2"), timeout=100)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "accumulate_grad_batches=2" in last and "raise the batch size" in last, last
