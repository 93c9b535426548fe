"""Worker of `phalanx bench recovery` (run under `phalanx run`; started by the benchmark).

An MLP on scikit-learn's digits with an exactly-once `ShardedLoader` and `DistributedOptimizer`.
With ``--ft on`` the loop is an elastic `State` + `@phalanx.elastic.run`; with ``--ft off`` the
same loop runs bare (no State, no @run), for the steady-state overhead of fault tolerance.

Each worker writes its pid to OUT/pid.<worker> and, per completed step, one JSON line to
OUT/steps.<worker>.jsonl: wall time ``t``, step ``s`` (steps applied by the job), generation
``g``, world size ``n``, loader epoch ``e``, samples in the step across the world ``b``, the
process's CPU seconds so far ``c`` and,
with --log-samples, the step's per-rank sample indices ``p`` (the whole world's plan, so a
step is accounted for even if one of its ranks died).
The job ends after --steps steps, or at the first epoch end after the file OUT/stop appears.

    phalanx run -np 4 --min-np 2 --max-restarts 3 src/phalanx/bench/recovery_worker.py OUT --ft on
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recovery_worker", description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for pid and step-log files")
    p.add_argument("--ft", choices=("on", "off"), default="on",
                   help="elastic State + @run (on) or a bare loop (off)")
    p.add_argument("--steps", type=int, default=0,
                   help="stop after this many steps (0: run until OUT/stop appears)")
    p.add_argument("--hidden", type=int, default=512, help="MLP hidden width (default 512)")
    p.add_argument("--batch-size", type=int, default=32, help="per-worker batch (default 32)")
    p.add_argument("--log-samples", action="store_true", help="log each step's sample indices")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import torch
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    import phalanx as px
    from phalanx import env
    from phalanx.data import ArrayDataset, ShardedLoader

    torch.set_num_threads(1)
    # Load the data before joining: load_digits parses text holding the GIL for ~0.3 s (more on
    # a loaded machine), which would starve the heartbeat thread that px.init() starts.
    digits = load_digits()
    x_all = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y_all = torch.tensor(digits.target)
    loader = ShardedLoader(ArrayDataset(x_all, y_all), batch_size=args.batch_size, seed=0)
    px.init()
    me = env.get_str(env.WORKER_ID, "solo")
    with open(os.path.join(args.out, f"pid.{me}"), "w") as f:
        f.write(str(os.getpid()))
    torch.manual_seed(0)
    h = args.hidden
    nn = torch.nn
    model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                          nn.Linear(h, 10))
    opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  model=model)
    log = open(os.path.join(args.out, f"steps.{me}.jsonl"), "a", buffering=1)  # noqa: SIM115
    stop_file = os.path.join(args.out, "stop")
    state = (px.elastic.State(model=model, optimizer=opt, loaders=[loader], epoch=0)
             if args.ft == "on" else None)
    bare_steps = [0]   # steps applied, for --ft off (State.step counts them with --ft on)

    def applied() -> int:
        return state.step if state is not None else bare_steps[0]

    def one_step(x: torch.Tensor, y: torch.Tensor) -> None:
        pending = loader.pending_step or []
        plan = pending if args.log_samples else None
        samples = sum(len(p) for p in pending)
        epoch = loader.epoch
        before = applied()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        try:
            opt.step()
            if state is None:
                bare_steps[0] += 1
        finally:
            # With --ft on the step is applied even if opt.step() then raises at the boundary
            # (MembershipChanged, or a peer lost during the membership check): log it anyway.
            if applied() > before:
                rec: dict[str, Any] = {"t": time.time(), "s": applied(), "g": px.generation(),
                                       "n": px.size(), "e": epoch, "b": samples,
                                       "c": time.process_time()}
                if plan is not None:
                    rec["p"] = [p.tolist() for p in plan]
                log.write(json.dumps(rec) + "\n")

    def should_stop() -> bool:
        # One tiny collective per epoch so that every rank leaves at the same boundary.
        flag = torch.tensor([1.0 if os.path.exists(stop_file) else 0.0])
        return bool(px.allreduce(flag, op="max", name="bench.stop").item() > 0)

    def epochs() -> None:
        while True:
            for x, y in loader:
                one_step(x, y)
                if args.steps and applied() >= args.steps:
                    return
            if not args.steps and should_stop():
                return

    try:
        if state is not None:
            px.elastic.run(lambda st: epochs())(state)
        else:
            epochs()
    finally:
        log.close()
    px.barrier()


if __name__ == "__main__":
    main()
