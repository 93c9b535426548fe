"""`phalanx bench train`: data-parallel training throughput, phalanx (its own API, and
`px.DistributedDataParallel` as a DDP script uses it: `ddp-compat`) vs torch DDP (Gloo) vs one
process, on a compute-bound ~10M-parameter MLP and on a model of many small tensors (where fusion
matters). Every worker uses one torch thread; warm-up steps are not timed.

    phalanx bench train --np 2 --steps 30 --json train.json

Reports samples/s for each, the phalanx/DDP ratio, scaling efficiency thr(N) / (N * thr(1)) and
where a phalanx step's time goes (forward+backward, waiting for reductions, optimizer step).
This file is also the worker script: the launcher, DDP and the single run start it with --worker.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from phalanx.bench.train_modes import (
    meet,
    parse_result,
    run_all,
    run_horovodrun,
    run_independent,
    worker_env,
)

MODELS = ("mlp", "many")
"""mlp: 4 Linear layers, ~9.4M parameters; many: 128 residual blocks of Linear(64)+LayerNorm."""
_PHALANX_RUN = ("phalanx", "phalanx-copy", "horovod", "ddp-compat")
"""The modes that run under `phalanx run` (the others start their own processes)."""


def _build(model: str) -> Any:
    import torch
    nn = torch.nn
    if model == "mlp":
        return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                             nn.Linear(2048, 1536), nn.ReLU(), nn.Linear(1536, 10)), 1024

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm = nn.Linear(64, 64), nn.LayerNorm(64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.relu(self.norm(self.fc(x)))

    return nn.Sequential(*[Block() for _ in range(128)], nn.Linear(64, 10)), 64


def _pin(rank: int) -> None:
    """One core per worker, the same for every mode (mpirun's --bind-to core): freshly
    started workers otherwise share a core until the scheduler spreads them, which makes
    short timings noisy."""
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})


def _worker(args: argparse.Namespace) -> None:
    """Time `steps` training steps after `warmup`; rank 0 prints one JSON line."""
    import torch
    torch.set_num_threads(1)
    rank, world = (args.rank, 1) if args.worker == "single" else (0, 1)
    if args.worker in _PHALANX_RUN:
        import phalanx as px
        from phalanx.train import DistributedOptimizer, broadcast_parameters
        px.init()
        rank, world = px.rank(), px.size()
        if args.worker == "horovod":      # a Horovod script, the import line changed
            import phalanx.horovod.torch as hvd
            hvd.init()
    elif args.worker == "ddp":
        import torch.distributed as dist
        rank, world = args.rank, args.world
    elif args.worker == "horovod-real":   # Horovod itself, started by horovodrun
        import horovod.torch as hvd
        hvd.init()
        rank, world = hvd.rank(), hvd.size()
    if args.worker == "ddp":
        # NCCL needs a GPU per rank; ranks sharing one reduce CUDA tensors over Gloo.
        backend = ("nccl" if args.device == "cuda" and torch.cuda.device_count() >= world
                   else "gloo")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{args.port}", rank=rank,
                                world_size=world)
    _pin(rank)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    model, width = _build(args.model)
    model.to(device)
    # torch's multi-tensor SGD in every mode (DistributedOptimizer would pick it on CPU by
    # itself; one process and DDP get it here, so the comparison stays like for like)
    opt: Any = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    net: Any = model
    if args.worker in ("phalanx", "phalanx-copy"):
        opt = DistributedOptimizer(opt, model=model, compression=args.compression,
                                   gradient_as_bucket_view=args.worker == "phalanx")
        broadcast_parameters(model.state_dict(), root=0)
    elif args.worker in ("horovod", "horovod-real"):
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    elif args.worker in ("ddp", "ddp-compat"):   # the same DDP script; ddp-compat: phalanx's DDP
        device_ids = [device.index] if device.type == "cuda" else None
        if args.worker == "ddp":
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        else:
            net = px.DistributedDataParallel(model, device_ids=device_ids,
                                             compression=args.compression)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch_size, width, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def barrier() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        if args.worker in _PHALANX_RUN:
            px.allreduce(torch.zeros(1), op="sum", name="bench.barrier")
        elif args.worker == "horovod-real":
            hvd.allreduce(torch.zeros(1), name="bench.barrier")
        elif args.worker == "ddp":
            dist.barrier()

    def step() -> None:
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()

    if args.ready_dir:          # independent runs: start together, each on its own core
        meet(Path(args.ready_dir), rank, args.world)
    for _ in range(args.warmup):
        step()
    barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    barrier()
    elapsed = time.perf_counter() - t0
    if rank == 0 or args.worker == "single":
        n_params = sum(p.numel() for p in model.parameters())
        thr = world * args.batch_size * args.steps / elapsed
        print("BENCH " + json.dumps({"samples_per_s": thr,
                                     "step_ms": 1e3 * elapsed / args.steps, "params": n_params,
                                     "tensors": len(list(model.parameters())),
                                     "phases_ms": _phases_ms(args)}), flush=True)
    if args.worker == "ddp":
        dist.destroy_process_group()


def _phases_ms(args: argparse.Namespace) -> dict[str, float] | None:
    """Mean per-step phases of the timed steps (DistributedOptimizer's step records), in ms;
    the first timed step is left out where there are more (its compute phase holds the
    barrier before the timing)."""
    if args.worker not in ("phalanx", "phalanx-copy", "horovod"):
        return None
    from phalanx import runtime
    from phalanx.observe.recorder import PHASES
    steps = list(runtime.current().recorder.steps)[-max(1, args.steps - 1):]
    return {k.removesuffix("_s"): 1e3 * sum(s[k] for s in steps) / max(1, len(steps))
            for k in (*PHASES, "reduce_s")}


def _gpu_names() -> str:
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("phalanx bench train: --device cuda but torch sees no CUDA device")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} GPU(s): {', '.join(sorted(set(names)))}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(mode: str, model: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    common = [__file__, "--worker", mode, "--model", model, "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
              "--device", args.device, "--compression", args.compression]
    timeout = 600
    if mode in _PHALANX_RUN:
        cmd = [sys.executable, "-m", "phalanx.launch.cli", "run", "-np", str(n), *common]
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=worker_env(),
                           timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"phalanx run failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return parse_result([p.stdout], mode)
    if mode == "horovod-real":
        return run_horovodrun(common, n, timeout)
    if mode == "independent":
        return run_independent(common, n, timeout)
    if mode == "single":
        p = subprocess.run([sys.executable, *common], check=False, capture_output=True,
                           text=True, env=worker_env(), timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"single-process run failed:\n{p.stdout}\n{p.stderr}")
        return parse_result([p.stdout], "single")
    port = _free_port()
    outs = run_all([[sys.executable, *common, "--rank", str(r), "--world", str(n), "--port",
                     str(port)] for r in range(n)], timeout, "DDP run")
    return parse_result(outs, "ddp")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phalanx bench train", description=__doc__.split("\n")[0])
    p.add_argument("--np", type=int, default=2, help="workers for phalanx and DDP (default 2)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=20,
                   help="untimed steps first (default 20: fresh workers can share a core until the "
                        "scheduler spreads them)")
    p.add_argument("--batch-size", type=int, default=32, help="per-worker batch (default 32)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each mode this many times, interleaved (default 1)")
    p.add_argument("--stat", choices=("median", "best"), default="median",
                   help="which of the repeats to report (default median)")
    p.add_argument("--compare-copy", action="store_true",
                   help="also time phalanx with gradient_as_bucket_view=False (gradients packed "
                        "into and unpacked from the buckets: the path before zero-copy)")
    p.add_argument("--compare-independent", action="store_true",
                   help="also time --np one-process runs at once, each on its own core and "
                        "sharing nothing: the rate this machine allows without communication, "
                        "the ceiling of scaling efficiency")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of mlp,many")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="train on the CPU (default) or on CUDA: a GPU per worker where there "
                        "are enough (phalanx and DDP use NCCL), else the workers share them and "
                        "reduce through host memory (phalanx) or Gloo (DDP)")
    p.add_argument("--compression", default="none",
                   choices=("none", "fp16", "bf16", "1bit", "topk"),
                   help="phalanx's gradient compression (default none: exact, as DDP)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--plot", metavar="FILE.png", help="draw samples/s and scaling efficiency "
                   "per model (needs matplotlib)")
    p.add_argument("--horovod", action="store_true",
                   help="also time the Horovod facade (phalanx.horovod.torch's "
                        "DistributedOptimizer, as a Horovod script uses it) next to phalanx's "
                        "own API")
    p.add_argument("--real-horovod", action="store_true",
                   help="also time real Horovod (needs `import horovod.torch` and horovodrun), "
                        "the same script with Horovod's own import line")
    p.add_argument("--worker", choices=(*_PHALANX_RUN, "ddp", "single", "horovod-real"),
                   help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ready-dir", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --worker, one worker of it); returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad or args.np < 1 or args.steps < 1 or args.warmup < 0 or args.repeat < 1:
        parser.error(f"--models must name {MODELS}, --np and --steps be >= 1 (got models={bad}, "
                     f"np={args.np}, steps={args.steps}, warmup={args.warmup}, "
                     f"repeat={args.repeat})")
    from phalanx.bench import plots  # not at the top: this file also runs as a script
    plots.check_plot_arg(parser, args.plot)
    rows = [_row(model, _measure(model, args), args) for model in models]
    _report(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "train", "results": rows}, indent=2))
    if args.plot:
        print(f"wrote {plots.train(rows, args.plot)}")
    return 0


def _measure(model: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every mode `repeat` times, interleaved and in a rotated order (damps machine noise and
    order effects); per mode the median run
    by samples/s (the lower middle one for an even count) or the best, as --stat says."""
    modes = [("single", 1), ("ddp", args.np), ("phalanx", args.np), ("ddp-compat", args.np)]
    modes += [("phalanx-copy", args.np)] if args.compare_copy else []
    modes += [("independent", args.np)] if args.compare_independent else []
    modes += [("horovod", args.np)] if args.horovod else []
    modes += [("horovod-real", args.np)] if args.real_horovod else []
    runs: dict[str, list[dict[str, Any]]] = {}
    for i in range(args.repeat):
        for mode, n in modes[i % len(modes):] + modes[:i % len(modes)]:   # no mode always last
            print(f"  {model}: {mode} on {n} worker(s), repeat {i + 1}/{args.repeat}",
                  file=sys.stderr, flush=True)
            runs.setdefault(mode, []).append(_run(mode, model, n, args))
    out = {}
    for mode, rs in runs.items():
        rs.sort(key=lambda r: r["samples_per_s"])
        out[mode] = rs[-1] if args.stat == "best" else rs[(len(rs) - 1) // 2]
        out[mode]["all_samples_per_s"] = [r["samples_per_s"] for r in rs]
    return out


def _row(model: str, res: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    one = res["single"]["samples_per_s"]
    px = res["phalanx"]["samples_per_s"]
    row: dict[str, Any] = {
        "model": model, "params": res["single"]["params"], "device": args.device,
        "tensors": res["single"]["tensors"], "np": args.np, "batch_per_worker": args.batch_size,
        "stat": args.stat, "repeat": args.repeat, "compression": args.compression,
        "single_samples_per_s": one, "ddp_samples_per_s": res["ddp"]["samples_per_s"],
        "phalanx_samples_per_s": px, "phalanx_over_ddp": px / res["ddp"]["samples_per_s"],
        "phalanx_scaling_efficiency": px / (args.np * one),
        "ddp_scaling_efficiency": res["ddp"]["samples_per_s"] / (args.np * one),
        "single_step_ms": res["single"]["step_ms"],
        "phases_ms": {m: r["phases_ms"] | {"step": r["step_ms"]}
                      for m, r in res.items() if r.get("phases_ms")},
        "runs_samples_per_s": {m: r["all_samples_per_s"] for m, r in res.items()},
    }
    row["ddp_compat_over_ddp"] = (res["ddp-compat"]["samples_per_s"]
                                  / res["ddp"]["samples_per_s"])
    for mode in ("ddp-compat", "phalanx-copy", "independent", "horovod", "horovod-real"):
        if mode in res:
            key = mode.replace("-", "_")
            row[f"{key}_samples_per_s"] = res[mode]["samples_per_s"]
            row[f"{key}_over_phalanx"] = res[mode]["samples_per_s"] / px
            row[f"{key}_scaling_efficiency"] = res[mode]["samples_per_s"] / (args.np * one)
    return row


def _report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    where = "CPU, one core each" if args.device == "cpu" else _gpu_names()
    print(f"train throughput on {where}, {args.np} workers, batch {args.batch_size}/worker, "
          f"{args.steps} timed steps, {args.stat} of {args.repeat} (samples/s)"
          + (f", phalanx with compression={args.compression}" if args.compression != "none"
             else ""))
    print(f"{'model':6} {'params':>9} {'tensors':>7} {'1-proc/s':>9} {'DDP/s':>9} "
          f"{'phalanx/s':>9} {'px/DDP':>7} {'eff px':>7} {'eff DDP':>7}")
    for r in rows:
        print(f"{r['model']:6} {r['params']:>9,} {r['tensors']:>7} "
              f"{r['single_samples_per_s']:>9.1f} {r['ddp_samples_per_s']:>9.1f} "
              f"{r['phalanx_samples_per_s']:>9.1f} {r['phalanx_over_ddp']:>7.2f} "
              f"{r['phalanx_scaling_efficiency']:>7.2f} {r['ddp_scaling_efficiency']:>7.2f}")
    for r in rows:
        print(f"{r['model']:6} px.DistributedDataParallel (ddp-compat): "
              f"{r['ddp_compat_samples_per_s']:.1f} samples/s = {r['ddp_compat_over_ddp']:.3f} x "
              f"torch DDP, {r['ddp_compat_over_phalanx']:.3f} x phalanx's own API")
        for mode, what in (("phalanx_copy", "phalanx, copy path (no bucket views)"),
                           ("independent", f"{args.np} independent processes (no communication)"),
                           ("horovod", "Horovod facade"),
                           ("horovod_real", "real Horovod")):
            if f"{mode}_samples_per_s" in r:
                print(f"{r['model']:6} {what}: {r[f'{mode}_samples_per_s']:.1f} samples/s = "
                      f"{r[f'{mode}_over_phalanx']:.3f} x phalanx (eff. "
                      f"{r[f'{mode}_scaling_efficiency']:.2f})")
    print("columns: samples/s of one process, torch DDP and phalanx; px/DDP their ratio; eff = "
          "samples/s / (workers x one process)")
    print("where a step's time goes (ms, rank 0, mean of the timed steps; reduce = time "
          "collectives ran, overlapping the rest):")
    print(f"  {'model':6} {'mode':13} {'step':>6} {'fwd+bwd':>8} {'wait':>6} {'optim':>6} "
          f"{'boundary':>8} {'reduce':>7}   one process: step")
    for r in rows:
        for mode, ph in r["phases_ms"].items():
            print(f"  {r['model']:6} {mode:13} {ph['step']:>6.1f} {ph['forward_backward']:>8.1f} "
                  f"{ph['sync']:>6.1f} {ph['optimizer']:>6.1f} {ph['boundary']:>8.1f} "
                  f"{ph['reduce']:>7.1f}   {r['single_step_ms']:.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
