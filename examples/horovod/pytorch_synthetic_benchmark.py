"""Horovod's PyTorch synthetic benchmark, shape for shape: images per second of data-parallel
SGD on random data, per worker and in total.

The import line is the only phalanx-specific line: change it to `import horovod.torch as hvd`
and the script runs under `horovodrun` unchanged, so the two can be compared.

    phalanx run -np 2 python examples/horovod/pytorch_synthetic_benchmark.py
    phalanx run -np 4 python examples/horovod/pytorch_synthetic_benchmark.py --model convnet

`--model` takes the built-in `mlp` (the default) or `convnet`, which need nothing beyond torch,
or any torchvision model name (`resnet50`, as in Horovod's benchmark) when torchvision is
installed. Rank 0 prints one `Iter #i: X img/sec per CPU` line per iteration, then the mean
with a 95% interval per worker and in total (`Total img/sec on N CPU(s): ...`).
"""

from __future__ import annotations

import argparse
import timeit

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn, optim

import phalanx.horovod.torch as hvd

parser = argparse.ArgumentParser(description="PyTorch synthetic benchmark, Horovod-style",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--fp16-allreduce", action="store_true", default=False,
                    help="use fp16 compression during allreduce")
parser.add_argument("--model", type=str, default="mlp",
                    help="mlp, convnet, or a torchvision model name such as resnet50")
parser.add_argument("--batch-size", type=int, default=32, help="input batch size per worker")
parser.add_argument("--num-warmup-batches", type=int, default=10,
                    help="number of warm-up batches that don't count towards benchmark")
parser.add_argument("--num-batches-per-iter", type=int, default=10,
                    help="number of batches per benchmark iteration")
parser.add_argument("--num-iters", type=int, default=10, help="number of benchmark iterations")
parser.add_argument("--no-cuda", action="store_true", default=False,
                    help="disables CUDA training")
parser.add_argument("--use-adasum", action="store_true", default=False,
                    help="use adasum algorithm to do reduction")


def mlp() -> nn.Module:
    """Three dense layers over a flattened 3x32x32 image (about 3.4M parameters)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1024), nn.ReLU(),
                         nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10))


def convnet() -> nn.Module:
    """A small CIFAR-sized convolutional net (3x32x32 images, 10 classes)."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(),
                         nn.Linear(256, 10))


# name: (factory, image shape, number of classes)
BUILTIN_MODELS = {"mlp": (mlp, (3, 32, 32), 10), "convnet": (convnet, (3, 32, 32), 10)}


def make_model(name: str) -> tuple[nn.Module, tuple[int, int, int], int]:
    """The model, the shape of one input image and the number of classes."""
    if name in BUILTIN_MODELS:
        factory, shape, classes = BUILTIN_MODELS[name]
        return factory(), shape, classes
    try:
        from torchvision import models
    except ImportError:
        raise SystemExit(f"--model {name!r}: not a built-in model {sorted(BUILTIN_MODELS)}, "
                         "and torchvision, which provides the others, is not installed; "
                         "pip install torchvision, or pick a built-in model") from None
    if not callable(getattr(models, name, None)):
        raise SystemExit(f"--model {name!r}: torchvision.models has no such model; try "
                         f"resnet50, or a built-in model {sorted(BUILTIN_MODELS)}")
    return getattr(models, name)(), (3, 224, 224), 1000


def benchmark_step() -> None:
    optimizer.zero_grad()
    output = model(data)
    loss = F.cross_entropy(output, target)
    loss.backward()
    optimizer.step()


def log(text: str) -> None:
    if hvd.rank() == 0:
        print(text, flush=True)


if __name__ == "__main__":
    args = parser.parse_args()
    args.cuda = not args.no_cuda and torch.cuda.is_available()

    hvd.init()
    if args.cuda:
        # Horovod: pin one GPU per process (its local rank).
        torch.cuda.set_device(hvd.local_rank())
        torch.backends.cudnn.benchmark = True

    model, image_shape, num_classes = make_model(args.model)
    # Horovod: scale the learning rate by the number of workers (Adasum: by the local size
    # when it reduces over NCCL, else not at all).
    lr_scaler = 1 if args.use_adasum else hvd.size()
    if args.cuda:
        model.cuda()
        if args.use_adasum and hvd.nccl_built():
            lr_scaler = hvd.local_size()
    optimizer = optim.SGD(model.parameters(), lr=0.01 * lr_scaler)

    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression,
                                         op=hvd.Adasum if args.use_adasum else hvd.Average)

    # Horovod: every rank starts from rank 0's parameters and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    # Synthetic data: one random batch, reused for every step.
    data = torch.randn(args.batch_size, *image_shape)
    target = torch.randint(0, num_classes, (args.batch_size,))
    if args.cuda:
        data, target = data.cuda(), target.cuda()

    device = "GPU" if args.cuda else "CPU"
    log(f"Model: {args.model}")
    log(f"Batch size: {args.batch_size}")
    log(f"Number of {device}s: {hvd.size()}")

    log("Running warmup...")
    timeit.timeit(benchmark_step, number=args.num_warmup_batches)

    log("Running benchmark...")
    img_secs = []
    for x in range(args.num_iters):
        seconds = timeit.timeit(benchmark_step, number=args.num_batches_per_iter)
        img_sec = args.batch_size * args.num_batches_per_iter / seconds
        log(f"Iter #{x}: {img_sec:.1f} img/sec per {device}")
        img_secs.append(img_sec)

    # Results: the mean with a 95% interval (1.96 standard deviations).
    img_sec_mean = np.mean(img_secs)
    img_sec_conf = 1.96 * np.std(img_secs)
    log(f"Img/sec per {device}: {img_sec_mean:.1f} +-{img_sec_conf:.1f}")
    log(f"Total img/sec on {hvd.size()} {device}(s): {hvd.size() * img_sec_mean:.1f} "
        f"+-{hvd.size() * img_sec_conf:.1f}")
