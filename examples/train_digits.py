"""Fault-tolerant data-parallel MLP on scikit-learn's digits (phalanx's main demo).

Run on 4 workers, kill one of them with a real SIGKILL at step 100, and watch the survivors
close ranks and carry on (rank 0 prints):

    phalanx run -np 4 --min-np 2 --chaos kill:rank=2,step=100 examples/train_digits.py

Without faults: `phalanx run -np 4 examples/train_digits.py --epochs 20 --compression fp16`;
plain `python examples/train_digits.py` is a one-worker job. Expect ~97% test accuracy.
"""

from __future__ import annotations

import argparse
import time

import torch

import phalanx as px
from phalanx.data import ArrayDataset, ShardedLoader
from phalanx.train import COMPRESSIONS, DistributedOptimizer, metric_average


def load(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised digits, split 80/20 with a fixed seed (the same on every rank)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(xtr)
    f = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


def make_model(hidden: int = 128) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10))


def train(args: argparse.Namespace) -> float:
    """Train elastically and return the test accuracy (identical on every rank).

    The loader hands each rank a disjoint part of every global batch (exactly once per epoch,
    even when workers leave or join); `@px.elastic.run` re-forms the group and heals from the
    most advanced rank when a worker is lost, so training carries on with the survivors.
    """
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load(args.seed)
    model = make_model(args.hidden)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
                               model=model, compression=args.compression,
                               topk_ratio=args.topk_ratio)
    loader = ShardedLoader(ArrayDataset(xtr, ytr), batch_size=args.batch_size, seed=args.seed)
    state = px.elastic.State(model=model, optimizer=opt, loaders=[loader], epoch=0, acc=0.0)
    if args.checkpoint_dir:
        state.checkpointer = px.elastic.Checkpointer(args.checkpoint_dir, every_steps=50)
    state.register_reset_callbacks([lambda: px.rank() == 0 and print(
        f"membership changed: now {px.size()} workers (generation {px.generation()})",
        flush=True)])
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")

    @px.elastic.run
    def fit(state: px.elastic.State) -> None:
        for state.epoch in range(state.epoch, args.epochs):
            model.train()
            total, steps = 0.0, 0
            for x, y in loader:
                opt.zero_grad()
                # Sum over the local batch / nominal batch: averaging across ranks then gives
                # the gradient of the whole global batch, even when the last one is uneven.
                loss = loss_fn(model(x), y) / args.batch_size
                loss.backward()
                opt.step()
                total += loss.item()
                steps += 1
            loss_avg = metric_average(total / max(steps, 1), name="train_loss")
            model.eval()
            with torch.no_grad():
                state.acc = (model(xte).argmax(1) == yte).float().mean().item()
            if px.rank() == 0 and not args.quiet:
                print(f"epoch {state.epoch + 1:3d}  step {state.step:5d}  workers {px.size()}  "
                      f"loss {loss_avg:.4f}  test accuracy {state.acc:.4f}", flush=True)

    fit(state)
    if state.checkpointer is not None:
        state.checkpointer.wait()
    return float(state.acc)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 0.05; 0.01 for the lossy 1bit and topk)")
    p.add_argument("--batch-size", type=int, default=16, help="per-worker batch size")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--compression", default="none", choices=COMPRESSIONS)
    p.add_argument("--topk-ratio", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="print only the final accuracy")
    p.add_argument("--checkpoint-dir", default=None,
                   help="save a durable checkpoint every 50 steps here, and resume from it")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 0.01 if args.compression in ("1bit", "topk") else 0.05
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    px.init()
    t0 = time.perf_counter()
    acc = train(args)
    if px.rank() == 0:
        print(f"final test accuracy {acc:.4f}  ({px.size()} workers, compression="
              f"{args.compression}, {time.perf_counter() - t0:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
