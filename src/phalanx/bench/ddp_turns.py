"""phalanx's DDP wrapper, its own API and torch's DDP taking turns inside one job.

    phalanx run -np 2 python -m phalanx.bench.ddp_turns many [ROUNDS] [STEPS]    # or mlp

On the `bench train` model (batch 32 per worker, one core and one torch thread each), the modes
below each train their own copy of the model, in turns (ROUNDS rounds, default 12, of 3 warm-up
and STEPS timed steps, default 20, in a rotated order), so all of them see the same machine and
the same processes; separate jobs (`bench train`) swing by more than what is compared here on a
busy machine. Rank 0 prints, per mode, the median step time and the median over rounds of its
ratio to `phalanx` (the round's own API time), the figure least moved by the machine's load.

- `phalanx`: `DistributedOptimizer` (its own API);
- `ddp-compat`: `px.DistributedDataParallel` with torch DDP's defaults;
- `ddp-compat-views`: the same with `gradient_as_bucket_view=True`;
- `torch-ddp`: torch's `DistributedDataParallel` over its own Gloo group in the same processes.
"""

from __future__ import annotations

import functools
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

MODES = ("phalanx", "ddp-compat", "ddp-compat-views", "torch-ddp")


def _torch_group() -> None:
    """torch's default Gloo group for the `torch-ddp` mode (rank 0 picks a free port)."""
    import torch.distributed as dist

    import phalanx as px
    port = None
    if px.rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = px.broadcast_object(port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=px.rank(),
                            world_size=px.size())


def _modes(model_name: str) -> dict[str, Callable[[], None]]:
    """One training step per mode, each on its own copy of the model (hooks are per model)."""
    import torch

    import phalanx as px
    from phalanx.bench.train import _build

    def sgd(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)

    def make() -> tuple[torch.nn.Module, int]:
        torch.manual_seed(0)
        model, width = _build(model_name)
        return model, width

    nets: dict[str, tuple[Any, Any]] = {}
    model, width = make()
    nets["phalanx"] = (model, px.DistributedOptimizer(sgd(model.parameters()), model=model))
    for mode, views in (("ddp-compat", False), ("ddp-compat-views", True)):
        net = px.DistributedDataParallel(make()[0], gradient_as_bucket_view=views)
        nets[mode] = (net, sgd(net.parameters()))
    net = torch.nn.parallel.DistributedDataParallel(make()[0])
    nets["torch-ddp"] = (net, sgd(net.parameters()))
    g = torch.Generator().manual_seed(px.rank())
    x = torch.randn(32, width, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(mode: str) -> None:
        net, opt = nets[mode]
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()

    return {m: functools.partial(step, m) for m in MODES}


def main(model_name: str, rounds: int = 12, steps: int = 20) -> None:
    import torch

    import phalanx as px
    from phalanx.bench.train import _pin
    px.init()
    torch.set_num_threads(1)
    _pin(px.rank())
    _torch_group()
    modes = _modes(model_name)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(rounds):
        for mode in MODES[i % len(MODES):] + MODES[:i % len(MODES)]:
            for _ in range(3):
                modes[mode]()
            px.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                modes[mode]()
            px.barrier()
            times[mode].append(1e3 * (time.perf_counter() - t0) / steps)
    if px.rank() == 0:
        print(f"{model_name}: ms per step, {rounds} rounds x {steps} steps per mode, taking turns")
        for m, ts in times.items():
            ratio = statistics.median(a / b for a, b in zip(ts, times["phalanx"]))
            print(f"  {m:17} median {statistics.median(ts):6.1f}  min {min(ts):6.1f}  "
                  f"step time / phalanx's: {ratio:.3f}")
    import torch.distributed as dist
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mlp",
         int(sys.argv[2]) if len(sys.argv) > 2 else 12,
         int(sys.argv[3]) if len(sys.argv) > 3 else 20)
