"""The Horovod facade's DistributedOptimizer against phalanx's own, alternating inside one job.

    phalanx run -np 2 python -m phalanx.bench.facade_alternate many    # or mlp

Both optimizers train a copy of the same `bench train` model (same data, one core per worker);
they take turns, 10 rounds of 5 warm-up and 20 timed steps, the first of each pair switching
every round, so both see the same machine. Rank 0 prints the median step time of each and
their ratio. Separate jobs (`bench train --horovod`) swing by more than the few percent this
compares.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any


def main(model_name: str) -> None:
    import torch

    import phalanx as px
    import phalanx.horovod.torch as hvd
    from phalanx.bench.train import _build, _pin
    from phalanx.train import DistributedOptimizer
    px.init()
    hvd.init()
    torch.set_num_threads(1)
    _pin(px.rank())

    def make(kind: str) -> tuple[Any, Any, int]:
        torch.manual_seed(0)
        model, width = _build(model_name)
        base = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
        opt = (DistributedOptimizer(base, model=model) if kind == "native" else
               hvd.DistributedOptimizer(base, named_parameters=model.named_parameters()))
        return model, opt, width

    runs = {k: make(k) for k in ("native", "facade")}
    g = torch.Generator().manual_seed(px.rank())
    x = torch.randn(32, runs["native"][2], generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    loss = torch.nn.CrossEntropyLoss()
    times: dict[str, list[float]] = {"native": [], "facade": []}
    for rnd in range(10):
        for kind in (("native", "facade") if rnd % 2 else ("facade", "native")):
            model, opt, _ = runs[kind]
            for i in range(25):
                if i == 5:
                    px.barrier()
                    t0 = time.perf_counter()
                opt.zero_grad()
                loss(model(x), y).backward()
                opt.step()
            px.barrier()
            times[kind].append((time.perf_counter() - t0) / 20 * 1e3)
    if px.rank() == 0:
        a, b = statistics.median(times["native"]), statistics.median(times["facade"])
        print(f"{model_name}: native {a:.2f} ms, facade {b:.2f} ms per step (median of 10 "
              f"rounds of 20 steps); facade speed = {a / b:.3f} x native", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mlp")
