"""Reference worker of `phalanx bench recovery`: the same job under torchrun + DDP (Gloo).

The same MLP, data (scikit-learn's digits), per-worker batch and optimizer as
`recovery_worker.py`, written the way a torchrun job survives faults: rank 0 saves a checkpoint
at each epoch end, and every (re)start resumes from the latest one. torchrun restarts the whole
worker group when any worker dies (--max-restarts), so the steps since that checkpoint are redone.

Each worker writes its pid to OUT/tpid.<rank>.<attempt> and, per completed step, one JSON line
to OUT/tsteps.<rank>.<attempt>.jsonl: wall time ``t``, global step ``s``, epoch ``e``, restart
``a`` and samples in the step across the world ``b``. The job ends at the first epoch end after
the file OUT/stop appears.

    python -m torch.distributed.run --standalone --nproc-per-node 4 --max-restarts 3 \\
        src/phalanx/bench/recovery_torchrun_worker.py OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="recovery_torchrun_worker", description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for pid, step-log and checkpoint files")
    p.add_argument("--hidden", type=int, default=512, help="MLP hidden width (default 512)")
    p.add_argument("--batch-size", type=int, default=32, help="per-worker batch (default 32)")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    with open(os.path.join(args.out, f"tpid.{rank}.{attempt}"), "w") as f:
        f.write(str(os.getpid()))
    digits = load_digits()
    data = TensorDataset(torch.tensor(digits.data / 16.0, dtype=torch.float32),
                         torch.tensor(digits.target))
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)
    torch.manual_seed(0)
    h = args.hidden
    nn = torch.nn
    model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                          nn.Linear(h, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ckpt = os.path.join(args.out, "ckpt.pt")
    epoch = step = 0
    if os.path.exists(ckpt):
        sd = torch.load(ckpt, weights_only=False)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
        epoch, step = int(sd["epoch"]), int(sd["step"])
    ddp = nn.parallel.DistributedDataParallel(model)
    log = open(os.path.join(args.out, f"tsteps.{rank}.{attempt}.jsonl"), "a",  # noqa: SIM115
               buffering=1)   # one line per step, flushed: the benchmark tails it live
    per_step_world = args.batch_size * world
    per_epoch = math.ceil(len(sampler) / args.batch_size)
    while True:
        sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            step += 1
            b = len(x) * world if i == per_epoch - 1 else per_step_world
            log.write(json.dumps({"t": time.time(), "s": step, "e": epoch, "a": attempt,
                                  "b": b}) + "\n")
        epoch += 1
        if rank == 0:
            tmp = ckpt + ".tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "epoch": epoch, "step": step}, tmp)
            os.replace(tmp, ckpt)
        flag = torch.tensor([1.0 if os.path.exists(os.path.join(args.out, "stop")) else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            break
    log.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
