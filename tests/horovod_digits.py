"""A Horovod-style PyTorch training script on scikit-learn's digits, run by phalanx.

It is written the way Horovod's PyTorch examples are (a DistributedSampler per rank, the
learning rate scaled by the number of workers, parameters and optimizer state broadcast from
rank 0, metrics averaged with hvd.allreduce); the only phalanx-specific line is the import.
Each rank writes its test accuracy and a digest of its parameters to OUT/rank<r>.json.

    phalanx run -np 2 tests/horovod_digits.py --epochs 5 --out OUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import phalanx.horovod.torch as hvd


class Net(torch.nn.Module):
    """A small convolutional net for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, kernel_size=3)
        self.fc1 = torch.nn.Linear(8 * 6 * 6, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x)).flatten(1)
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


def datasets() -> tuple[TensorDataset, TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def metric_average(value: float, name: str) -> float:
    return float(hvd.allreduce(torch.tensor(value), name=name))


def train_epoch(model, optimizer, loader, sampler, epoch: int) -> None:
    model.train()
    sampler.set_epoch(epoch)
    for batch_idx, (data, target) in enumerate(loader):
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        if batch_idx % 20 == 0 and hvd.rank() == 0:
            print(f"epoch {epoch} [{batch_idx * len(data)}/{len(sampler)}] loss {loss.item():.4f}")


def evaluate(model, loader, sampler) -> float:
    model.eval()
    correct = 0.0
    with torch.no_grad():
        for data, target in loader:
            correct += float((model(data).argmax(1) == target).sum())
    return metric_average(correct / len(sampler), "avg_accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description="Horovod-style digits example")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--fp16-allreduce", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    train_set, test_set = datasets()
    train_sampler = DistributedSampler(train_set, num_replicas=hvd.size(), rank=hvd.rank(),
                                       seed=args.seed)
    test_sampler = DistributedSampler(test_set, num_replicas=hvd.size(), rank=hvd.rank(),
                                      shuffle=False)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler)
    test_loader = DataLoader(test_set, batch_size=256, sampler=test_sampler)

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.5)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression, op=hvd.Average)

    for epoch in range(args.epochs):
        train_epoch(model, optimizer, train_loader, train_sampler, epoch)
    accuracy = evaluate(model, test_loader, test_sampler)
    if hvd.rank() == 0:
        print(f"test accuracy {accuracy:.4f} on {hvd.size()} workers")
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                     for p in model.parameters())).hexdigest()
    with open(os.path.join(args.out, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump({"accuracy": accuracy, "params": digest, "size": hvd.size()}, f)


if __name__ == "__main__":
    main()
