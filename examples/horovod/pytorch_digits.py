"""Horovod's PyTorch MNIST example, shape for shape, on scikit-learn's 8x8 digits.

The script is written the way Horovod's `pytorch_mnist.py` is (a DistributedSampler per rank,
the learning rate scaled by the number of workers, parameters and optimizer state broadcast
from rank 0, a DistributedOptimizer with optional fp16 compression or Adasum, test metrics
averaged with hvd.allreduce). The digits ship with scikit-learn, so nothing is downloaded.
The import line is the only phalanx-specific line: change it to `import horovod.torch as hvd`
and the script runs under `horovodrun` unchanged.

    phalanx run -np 4 python examples/horovod/pytorch_digits.py --epochs 10
    horovodrun -np 4 -H localhost:4 python pytorch_digits.py --epochs 10    # with real Horovod

Rank 0 prints `Test set: Average loss: ..., Accuracy: ...%` after every epoch. With `--out DIR`
each rank also writes DIR/rank<r>.json: its test accuracy and a digest of its parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import phalanx.horovod.torch as hvd

parser = argparse.ArgumentParser(description="Horovod-style PyTorch example on 8x8 digits")
parser.add_argument("--batch-size", type=int, default=32, metavar="N",
                    help="input batch size per worker for training (default: 32)")
parser.add_argument("--test-batch-size", type=int, default=1000, metavar="N",
                    help="input batch size for testing (default: 1000)")
parser.add_argument("--epochs", type=int, default=10, metavar="N",
                    help="number of epochs to train (default: 10)")
parser.add_argument("--lr", type=float, default=0.05, metavar="LR",
                    help="learning rate of one worker, scaled by the number of workers "
                         "(default: 0.05)")
parser.add_argument("--momentum", type=float, default=0.5, metavar="M",
                    help="SGD momentum (default: 0.5)")
parser.add_argument("--no-cuda", action="store_true", default=False,
                    help="disables CUDA training")
parser.add_argument("--seed", type=int, default=42, metavar="S",
                    help="random seed (default: 42)")
parser.add_argument("--log-interval", type=int, default=10, metavar="N",
                    help="how many batches to wait before logging training status")
parser.add_argument("--fp16-allreduce", action="store_true", default=False,
                    help="use fp16 compression during allreduce")
parser.add_argument("--use-adasum", action="store_true", default=False,
                    help="use adasum algorithm to do reduction")
parser.add_argument("--gradient-predivide-factor", type=float, default=1.0,
                    help="apply gradient predivide factor in optimizer (default: 1.0)")
parser.add_argument("--data-dir",
                    help="accepted for compatibility and ignored: the digits ship with "
                         "scikit-learn")
parser.add_argument("--out", help="directory for each rank's rank<r>.json (optional)")


class Net(nn.Module):
    """Two small convolutions and two dense layers, sized for 8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.conv2_drop = nn.Dropout2d(0.25)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


def digits_datasets() -> tuple[TensorDataset, TensorDataset]:
    """The same 80/20 split on every rank, normalised with the training set's mean and std."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0,
                                                        stratify=y)
    mean, std = x_train.mean(), x_train.std()

    def tensors(images, labels) -> TensorDataset:
        images = torch.tensor((images - mean) / std, dtype=torch.float32).view(-1, 1, 8, 8)
        return TensorDataset(images, torch.tensor(labels))

    return tensors(x_train, y_train), tensors(x_test, y_test)


def train(epoch: int) -> None:
    model.train()
    # Horovod: set the epoch on the sampler, so each epoch is shuffled differently.
    train_sampler.set_epoch(epoch)
    for batch_idx, (data, target) in enumerate(train_loader):
        if args.cuda:
            data, target = data.cuda(), target.cuda()
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        if batch_idx % args.log_interval == 0 and hvd.rank() == 0:
            # Horovod: len(train_sampler) is the number of samples this rank sees per epoch.
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_sampler)} "
                  f"({100.0 * batch_idx / len(train_loader):.0f}%)]\tLoss: {loss.item():.6f}")


def metric_average(value: float, name: str) -> float:
    # Horovod: hvd.allreduce averages across workers by default.
    return hvd.allreduce(torch.tensor(value), name=name).item()


def test() -> float:
    model.eval()
    test_loss, test_correct = 0.0, 0.0
    with torch.no_grad():
        for data, target in test_loader:
            if args.cuda:
                data, target = data.cuda(), target.cuda()
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            test_correct += output.argmax(dim=1).eq(target).sum().item()
    # Horovod: each rank tested its own shard; average the per-rank means.
    test_loss = metric_average(test_loss / len(test_sampler), "avg_loss")
    test_accuracy = metric_average(test_correct / len(test_sampler), "avg_accuracy")
    if hvd.rank() == 0:
        print(f"\nTest set: Average loss: {test_loss:.4f}, "
              f"Accuracy: {100.0 * test_accuracy:.2f}%\n", flush=True)
    return test_accuracy


def write_result(directory: str, accuracy: float) -> None:
    raw = b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())
    path = os.path.join(directory, f"rank{hvd.rank()}.json")
    with open(path, "w") as f:
        json.dump({"rank": hvd.rank(), "size": hvd.size(), "accuracy": accuracy,
                   "params": hashlib.sha256(raw).hexdigest()}, f)


if __name__ == "__main__":
    args = parser.parse_args()
    args.cuda = not args.no_cuda and torch.cuda.is_available()

    # Horovod: initialize the library.
    hvd.init()
    torch.manual_seed(args.seed)
    if args.cuda:
        # Horovod: pin one GPU per process (its local rank).
        torch.cuda.set_device(hvd.local_rank())
        torch.cuda.manual_seed(args.seed)
    # Horovod: one thread per worker, so workers sharing a host do not oversubscribe it.
    torch.set_num_threads(1)

    train_dataset, test_dataset = digits_datasets()
    # Horovod: a DistributedSampler hands each rank its own part of the data.
    train_sampler: DistributedSampler = DistributedSampler(
        train_dataset, num_replicas=hvd.size(), rank=hvd.rank())
    train_loader = DataLoader(train_dataset, batch_size=args.batch_size, sampler=train_sampler)
    test_sampler: DistributedSampler = DistributedSampler(
        test_dataset, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=False)
    test_loader = DataLoader(test_dataset, batch_size=args.test_batch_size, sampler=test_sampler)

    model = Net()
    # Horovod: scale the learning rate by the number of workers (the global batch grows with
    # it); Adasum needs no scaling, except by the local size when it reduces over NCCL.
    lr_scaler = 1 if args.use_adasum else hvd.size()
    if args.cuda:
        model.cuda()
        if args.use_adasum and hvd.nccl_built():
            lr_scaler = hvd.local_size()
    optimizer = optim.SGD(model.parameters(), lr=args.lr * lr_scaler, momentum=args.momentum)

    # Horovod: every rank starts from rank 0's parameters and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    # Horovod: wrap the optimizer, so gradients are averaged across workers in backward.
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression,
                                         op=hvd.Adasum if args.use_adasum else hvd.Average,
                                         gradient_predivide_factor=args.gradient_predivide_factor)

    accuracy = 0.0
    for epoch in range(1, args.epochs + 1):
        train(epoch)
        accuracy = test()
    if args.out:
        write_result(args.out, accuracy)
