"""Worker of `phalanx bench soak` (run under `phalanx run`; started by the benchmark).

An MLP on scikit-learn's digits (80/20 split, standardised, as in examples/train_digits.py;
the benchmark prepares it in an .npz, so replacements start without importing scikit-learn)
with an elastic `State`, `@phalanx.elastic.run`, an exactly-once `ShardedLoader` and
`DistributedOptimizer`.

Every rank appends one JSON line per committed step (right after `opt.step()` applied it, i.e.
once `state.step` advanced) to OUT/steps.<worker>.jsonl: wall time ``t``, step ``s``, loader
epoch ``e`` (the epoch the step's samples belong to), generation ``g``, world size ``n``, the
step's whole-world sample plan ``p`` (per-rank indices into the training split, so the step is
accounted for even if some of its ranks die before logging), ``h``, a hash chained over every
committed step so far (kept in the State, so replacements heal it from their peers), and ``hp``,
the hash before this step. Two lines with the same ``s`` and different ``h`` mean the job
committed step ``s`` twice with different training histories (progress lost and redone). Each
entry this process adds to `State.recoveries` is logged as a line ``{"r": {...}}``.

At the end each worker writes OUT/final.<worker>.json (step, epoch, test accuracy, recoveries).
Each worker writes its pid to OUT/pid.<worker> (so the benchmark can clean up after a crash).
While the world is below --np-full workers, each step sleeps --degraded-sleep seconds per
missing worker: faults are placed by step, and this keeps them from outpacing replacements
(which take seconds to start), so that faults rarely meet a generation reduced to its last
holder of the training state.

    phalanx run -np 4 --min-np 2 --max-restarts 200 src/phalanx/bench/soak_worker.py OUT --data D.npz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soak_worker", description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for pid, step-log and final files")
    p.add_argument("--data", required=True,
                   help="the .npz with x_train, y_train, x_test, y_test the benchmark prepared")
    p.add_argument("--epochs", type=int, default=30, help="epochs to train (default 30)")
    p.add_argument("--hidden", type=int, default=128, help="MLP hidden width (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="per-worker batch (default 16)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="init and shuffle seed")
    p.add_argument("--np-full", type=int, default=0,
                   help="the job's full strength (0: never throttle)")
    p.add_argument("--degraded-sleep", type=float, default=0.0,
                   help="seconds each step sleeps per worker missing from --np-full (default 0)")
    return p


def chain(prev: str, step: int, epoch: int, plan: list[list[int]]) -> str:
    """The history hash after committing `step` with `plan` on top of history `prev`."""
    text = f"{prev}|{step}|{epoch}|{json.dumps(plan, separators=(',', ':'))}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import numpy as np
    import torch

    import phalanx as px
    from phalanx import env
    from phalanx.data import ArrayDataset, ShardedLoader

    torch.set_num_threads(1)
    with np.load(args.data) as d:
        x_train, y_train = torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])
        x_test, y_test = torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"])
    loader = ShardedLoader(ArrayDataset(x_train, y_train), batch_size=args.batch_size,
                           seed=args.seed)
    torch.manual_seed(args.seed)
    nn, h = torch.nn, args.hidden
    model = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                          nn.Linear(h, 10))
    # Built before joining: the first torch optimizer a process builds imports torch._dynamo
    # (seconds on a loaded machine), and the peers wait for a joining replacement to be ready.
    sgd = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    px.init()
    me = env.get_str(env.WORKER_ID, "solo")
    with open(os.path.join(args.out, f"pid.{me}"), "w") as f:
        f.write(str(os.getpid()))
    opt = px.DistributedOptimizer(sgd, model=model)
    state = px.elastic.State(model=model, optimizer=opt, loaders=[loader], epoch=0,
                             history="", acc=0.0)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    log = open(os.path.join(args.out, f"steps.{me}.jsonl"), "a", buffering=1)  # noqa: SIM115
    logged = [0]   # entries of state.recoveries written to the log

    def one_step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        plan = [p.tolist() for p in (loader.pending_step or [])]
        epoch, before = loader.epoch, state.step
        opt.zero_grad()
        # Sum over the local batch / nominal batch: the average across ranks is then the
        # gradient of the whole global batch, even when the last one is uneven.
        (loss_fn(model(xb), yb) / args.batch_size).backward()
        try:
            opt.step()
        finally:
            # The step is applied once state.step advanced, even if something raises after
            # the boundary: log it (and extend the history) whenever that happened.
            if state.step > before:
                prev, state.history = state.history, chain(state.history, state.step, epoch,
                                                           plan)
                rec: dict[str, Any] = {"t": time.time(), "s": state.step, "e": epoch,
                                       "g": px.generation(), "n": px.size(),
                                       "h": state.history, "hp": prev, "p": plan}
                log.write(json.dumps(rec, separators=(",", ":")) + "\n")
        while logged[0] < len(state.recoveries):   # this process's recoveries, as they happen
            log.write(json.dumps({"r": state.recoveries[logged[0]]}, default=str) + "\n")
            logged[0] += 1
        if args.degraded_sleep > 0 and px.size() < args.np_full:
            time.sleep(args.degraded_sleep * (args.np_full - px.size()))

    @px.elastic.run
    def fit(state: px.elastic.State) -> None:
        for state.epoch in range(state.epoch, args.epochs):  # noqa: B020 (the elastic idiom)
            # set_epoch: a recovery between the epoch's last step and the next epoch must not
            # make the loader start a new epoch under the old epoch number.
            loader.set_epoch(state.epoch)
            model.train()
            for xb, yb in loader:
                one_step(xb, yb)
            model.eval()
            with torch.no_grad():
                state.acc = float((model(x_test).argmax(1) == y_test).float().mean())

    try:
        fit(state)
    finally:
        log.close()
    final = {"worker": me, "step": state.step, "epoch": state.epoch, "acc": state.acc,
             "size": px.size(), "history": state.history, "recoveries": state.recoveries}
    with open(os.path.join(args.out, f"final.{me}.json"), "w") as f:
        json.dump(final, f, default=str)


if __name__ == "__main__":
    main()
