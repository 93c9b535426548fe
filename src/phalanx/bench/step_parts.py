"""Where a 2-worker training step's time goes, measured by taking parts away inside one job.

    phalanx run -np 2 python -m phalanx.bench.step_parts mlp [ROUNDS]    # or many

On the `bench train` model (batch 32 per worker, one core and one torch thread each), rank 0
prints the median step time and its phases, per rank, for:

- `free`: the wrapped SGD alone, no communication at all (what each core does by itself);
- `lockstep`: the same, plus a one-element allreduce per step (the ranks wait for each other);
- `reduce-only`: only the gradient buckets' allreduce, nothing else;
- `thread`: DistributedOptimizer reducing on the comm thread while backward runs;
- `inline`: DistributedOptimizer reducing in backward's gradient hooks on the calling thread.

The modes take turns (8 rounds of 5 warm-up and 15 timed steps), so all see the same machine;
separate jobs swing by more than the differences measured here. Each DistributedOptimizer has
its own copy of the model (its hooks would fire on any other mode's backward).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

MODES = ("free", "lockstep", "reduce-only", "thread", "inline")


def _modes(model_name: str) -> dict[str, Callable[[], tuple[float, float, float, float]]]:
    """Each mode as a function timing one step: (step, forward+backward, wait, optimizer)."""
    import torch

    import phalanx as px
    from phalanx.bench.train import _build
    from phalanx.train import DistributedOptimizer

    def make() -> tuple[Any, Any, int]:
        torch.manual_seed(0)
        model, width = _build(model_name)
        return model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9,
                                      foreach=True), width

    plain, plain_opt, width = make()
    wrapped = {}
    for kind in ("thread", "inline"):
        model, base, _ = make()
        wrapped[kind] = (model, DistributedOptimizer(base, model=model,
                                                     comm_thread=kind == "thread"))
    g = torch.Generator().manual_seed(px.rank())
    x = torch.randn(32, width, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss()

    def bare(sync: bool) -> tuple[float, float, float, float]:
        t0 = time.perf_counter()
        plain_opt.zero_grad()
        loss_fn(plain(x), y).backward()
        t1 = time.perf_counter()
        if sync:
            px.allreduce_(torch.zeros(1), name="step_parts.tick")
        t2 = time.perf_counter()
        plain_opt.step()
        t3 = time.perf_counter()
        return t3 - t0, t1 - t0, t2 - t1, t3 - t2

    def distributed(kind: str) -> tuple[float, float, float, float]:
        model, opt = wrapped[kind]
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        t1 = time.perf_counter()
        opt.synchronize()
        t2 = time.perf_counter()
        with opt.skip_synchronize():
            opt.step()
        t3 = time.perf_counter()
        return t3 - t0, t1 - t0, t2 - t1, t3 - t2

    distributed("inline")           # gives the inline optimizer its buckets
    buckets = [b.buffer for b in wrapped["inline"][1].buckets]

    def reduce_only() -> tuple[float, float, float, float]:
        t0 = time.perf_counter()
        for buf in buckets:
            px.allreduce_(buf, op="avg", name="step_parts.bucket")
        took = time.perf_counter() - t0
        return took, 0.0, took, 0.0

    return {"free": lambda: bare(False), "lockstep": lambda: bare(True),
            "reduce-only": reduce_only, "thread": lambda: distributed("thread"),
            "inline": lambda: distributed("inline")}


def main(model_name: str, rounds: int = 8) -> None:
    import torch

    import phalanx as px
    from phalanx.bench.train import _pin
    px.init()
    torch.set_num_threads(1)
    _pin(px.rank())
    modes = _modes(model_name)
    times: dict[str, list[tuple[float, ...]]] = {m: [] for m in MODES}
    for i in range(rounds):
        if px.rank() == 0:
            print(f"round {i + 1}/{rounds}", file=sys.stderr, flush=True)
        for mode in MODES[i % len(MODES):] + MODES[:i % len(MODES)]:
            for _ in range(5):
                modes[mode]()
            px.barrier()
            times[mode] += [modes[mode]() for _ in range(15)]
    medians = {m: [1e3 * statistics.median(col) for col in zip(*v)] for m, v in times.items()}
    every = px.allgather_object(medians)
    if px.rank() != 0:
        return
    print(f"{model_name}: median ms per step, {rounds} rounds x 15 steps per mode "
          "(step = fwd+bwd + wait + optimizer; wait: for the peer or the reductions after backward)")
    for m in MODES:
        print(f"  {m:12} " + " | ".join(
            f"rank {r}: step {o[m][0]:6.1f} fwd+bwd {o[m][1]:5.1f} wait {o[m][2]:5.1f} "
            f"optim {o[m][3]:5.1f}" for r, o in enumerate(every)))
    step = {m: statistics.mean(o[m][0] for o in every) for m in MODES}
    print(f"  inline / thread step time: {step['inline'] / step['thread']:.3f}; "
          f"efficiency ceiling with this reduction, lockstep / (lockstep + reduce-only): "
          f"{step['lockstep'] / (step['lockstep'] + step['reduce-only']):.2f}; "
          f"inline against lockstep: {step['lockstep'] / step['inline']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mlp", int(sys.argv[2]) if len(sys.argv) > 2 else 8)
