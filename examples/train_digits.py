"""Data-parallel MLP on scikit-learn's digits with phalanx's DistributedOptimizer.

Run on 4 workers (each trains on its shard; rank 0 prints):

    phalanx run -np 4 examples/train_digits.py --epochs 20 --compression none

(or `python -m phalanx.launch.cli run -np 4 examples/train_digits.py`); plain
`python examples/train_digits.py` is a one-worker job. Expect ~95%+ test accuracy in a few seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

import phalanx as px
from phalanx.train import (
    COMPRESSIONS,
    DistributedOptimizer,
    broadcast_optimizer_state,
    broadcast_parameters,
    metric_average,
    shard_indices,
)


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
    """Train on this rank's shard and return the test accuracy (identical on every rank)."""
    torch.manual_seed(args.seed + px.rank())       # different init per rank: broadcast fixes it
    xtr, ytr, xte, yte = load(args.seed)
    model = make_model(args.hidden)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
                               model=model, compression=args.compression,
                               topk_ratio=args.topk_ratio)
    broadcast_parameters(model.state_dict(), root=0)
    broadcast_optimizer_state(opt, root=0)
    rank, size = px.rank(), px.size()
    loss_fn = torch.nn.CrossEntropyLoss()
    acc = 0.0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(epoch))
        mine = perm[list(shard_indices(len(xtr), rank, size))]
        model.train()
        total = 0.0
        steps = 0
        for i in range(0, len(mine) - args.batch_size + 1, args.batch_size):
            idx = mine[i:i + args.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
        loss_avg = metric_average(total / max(steps, 1), name="train_loss")
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        if rank == 0 and not args.quiet:
            print(f"epoch {epoch + 1:3d}  loss {loss_avg:.4f}  test accuracy {acc:.4f}",
                  flush=True)
    return acc


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
