"""The jobs behind `phalanx bench recovery --engines`: a driver program, and what its workers run.

    python -m phalanx.bench.recovery_engines_job ray OUT --np 4 --min-np 2 --max-restarts 4
    python -m phalanx.bench.recovery_engines_job spark OUT --np 4 --min-np 2 --master 'local[4,4]'
    python -m phalanx.bench.recovery_engines_job raytrain OUT --np 4 --max-failures 2

The driver starts a local Ray instance (ray.init) or SparkSession in its own process, runs one
training job on it, and exits 0 when the job finished (after the file OUT/stop appeared):

ray, spark   `phalanx.ray.run` / `phalanx.spark.run` of `phalanx_worker`, which is
             `recovery_worker.main` with --ft on --log-samples: the same MLP, digits data,
             exactly-once `ShardedLoader`, pid file OUT/pid.<worker> and step log
             OUT/steps.<worker>.jsonl as the `phalanx run` job of the benchmark. A killed
             actor or Spark Python worker is a lost worker; the survivors continue, and a
             replacement (a new actor, or Spark's retry of the task) joins.
raytrain     Ray Train's `TorchTrainer` running `raytrain_loop` on --np workers with
             FailureConfig(max_failures=--max-failures): the same MLP, data, per-worker batch
             and SGD as `recovery_torchrun_worker.py` (DDP via ray.train.torch.prepare_model, a
             DistributedSampler), rank 0 reporting a checkpoint every --checkpoint-every steps
             through ray.train.report. When a worker dies, Ray Train restarts every worker, and
             they resume from the latest checkpoint (mid-epoch). Each worker writes its pid to
             OUT/rtpid.<rank>.<attempt> and one JSON line per step to
             OUT/rtsteps.<rank>.<attempt>.jsonl: wall time t, global step s, epoch e, attempt
             a, samples in the step across the world b (the torchrun worker's format).

Nothing here imports Ray, Spark or torch until it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from typing import Any

ENGINES = ("ray", "spark", "raytrain")


# ---------------------------------------------------------------------- what the workers run
def phalanx_worker(out: str, hidden: int, batch_size: int) -> None:
    """One phalanx worker of the ray and spark jobs: the benchmark's own recovery worker."""
    from phalanx.bench import recovery_worker
    recovery_worker.main([out, "--ft", "on", "--log-samples", "--hidden", str(hidden),
                          "--batch-size", str(batch_size)])


def _claim_attempt(out: str) -> int:
    """The lowest attempt number no earlier start of the job claimed (rank 0 only)."""
    k = 0
    while True:
        try:
            os.close(os.open(os.path.join(out, f"rtattempt.{k}"),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return k
        except FileExistsError:
            k += 1


def raytrain_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker (train_loop_per_worker): resume from the latest checkpoint, if any,
    train until an epoch ends after OUT/stop appears, checkpoint every K steps."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    out, every = str(config["out"]), int(config["checkpoint_every"])
    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    claim = torch.tensor([_claim_attempt(out) if rank == 0 else 0])
    dist.broadcast(claim, src=0)   # every worker of this start logs the same attempt number
    attempt = int(claim.item())
    with open(os.path.join(out, f"rtpid.{rank}.{attempt}"), "w") as f:
        f.write(str(os.getpid()))
    digits = load_digits()
    data = TensorDataset(torch.tensor(digits.data / 16.0, dtype=torch.float32),
                         torch.tensor(digits.target))
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=int(config["batch_size"]), sampler=sampler)
    torch.manual_seed(0)
    h = int(config["hidden"])
    nn = torch.nn
    net = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    epoch = step = done_in_epoch = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            sd = torch.load(os.path.join(d, "state.pt"), weights_only=False)
        net.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
        epoch, step, done_in_epoch = int(sd["epoch"]), int(sd["step"]), int(sd["batch"])
    model = ray.train.torch.prepare_model(net)   # DDP (Gloo on CPU)
    log = open(os.path.join(out, f"rtsteps.{rank}.{attempt}.jsonl"), "a",  # noqa: SIM115
               buffering=1)   # one line per step, flushed: the benchmark tails it live
    per_step_world = int(config["batch_size"]) * world
    per_epoch = math.ceil(len(sampler) / int(config["batch_size"]))
    stop_file = os.path.join(out, "stop")
    while True:
        sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if i < done_in_epoch:   # trained before the checkpoint this start resumed from
                continue
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            b = len(x) * world if i == per_epoch - 1 else per_step_world
            log.write(json.dumps({"t": time.time(), "s": step, "e": epoch, "a": attempt,
                                  "b": b}) + "\n")
            if step % every == 0:
                _report(ray.train, torch, rank, step, {
                    "model": net.state_dict(), "optimizer": opt.state_dict(),
                    "epoch": epoch, "step": step, "batch": i + 1})
        epoch += 1
        done_in_epoch = 0
        flag = torch.tensor([1.0 if os.path.exists(stop_file) else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            break
    log.close()


def _report(train: Any, torch: Any, rank: int, step: int, state: dict[str, Any]) -> None:
    """ray.train.report on every worker (it is a barrier); rank 0 attaches the checkpoint."""
    if rank != 0:
        train.report({"step": step}, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, os.path.join(d, "state.pt"))
        train.report({"step": step}, checkpoint=train.Checkpoint.from_directory(d))


# ---------------------------------------------------------------------- the driver
def _here() -> Any:
    """This module under its own name: run as `python -m`, it is __main__, and the engines would
    pickle functions of __main__ by value instead of importing them in the workers."""
    import importlib
    return importlib.import_module("phalanx.bench.recovery_engines_job")


def _run_ray(a: argparse.Namespace) -> None:
    import ray

    import phalanx.ray as pxray
    # Ray's processes inherit PYTHONPATH (phalanx's source): actors start from pooled workers.
    ray.init(num_cpus=a.np + 2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        pxray.run(_here().phalanx_worker, num_workers=a.np, min_workers=a.min_np,
                  max_restarts=a.max_restarts, heartbeat_timeout=a.heartbeat_timeout,
                  kwargs={"out": a.out, "hidden": a.hidden, "batch_size": a.batch_size})
    finally:
        ray.shutdown()


def _run_spark(a: argparse.Namespace) -> None:
    from pyspark.sql import SparkSession

    import phalanx.spark as pxs
    session = (SparkSession.builder.master(a.master).appName("phalanx-bench-recovery")
               .config("spark.ui.enabled", "false")
               .config("spark.driver.memory", "1g")
               .config("spark.task.maxFailures", str(a.max_restarts + 1))
               .config("spark.executorEnv.PYTHONPATH", os.environ.get("PYTHONPATH", ""))
               .config("spark.executorEnv.OMP_NUM_THREADS", "1")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    try:
        pxs.run(_here().phalanx_worker, num_workers=a.np, min_workers=a.min_np, spark=session,
                heartbeat_timeout=a.heartbeat_timeout,
                kwargs={"out": a.out, "hidden": a.hidden, "batch_size": a.batch_size})
    finally:
        session.stop()


def _run_raytrain(a: argparse.Namespace) -> None:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    ray.init(num_cpus=a.np + 2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        trainer = TorchTrainer(
            _here().raytrain_loop,
            train_loop_config={"out": a.out, "hidden": a.hidden, "batch_size": a.batch_size,
                               "checkpoint_every": a.checkpoint_every},
            scaling_config=ScalingConfig(num_workers=a.np, use_gpu=False),
            run_config=RunConfig(name="phalanx-bench-recovery",
                                 storage_path=os.path.join(a.out, "raytrain-storage"),
                                 failure_config=FailureConfig(max_failures=a.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))
        trainer.fit()
    finally:
        ray.shutdown()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recovery_engines_job", description=__doc__.split("\n")[0])
    p.add_argument("engine", choices=ENGINES)
    p.add_argument("out", help="folder for pid, step-log and stop files (shared with workers)")
    p.add_argument("--np", type=int, default=4, help="workers")
    p.add_argument("--min-np", type=int, default=2, help="ray, spark: min_workers")
    p.add_argument("--max-restarts", type=int, default=4,
                   help="ray: replacement actors; spark: retries per task (maxFailures - 1)")
    p.add_argument("--heartbeat-timeout", type=float, default=3.0, help="ray, spark")
    p.add_argument("--master", default="local[4,4]", help="spark: master URL")
    p.add_argument("--max-failures", type=int, default=1, help="raytrain: FailureConfig")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="raytrain: steps between checkpoints")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    a.out = os.path.abspath(a.out)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s [%(name)s] %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")   # unwinds through ray/Spark shutdown

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.time()
    {"ray": _run_ray, "spark": _run_spark, "raytrain": _run_raytrain}[a.engine](a)
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump({"engine": a.engine, "seconds": time.time() - t0}, f)
    print(f"recovery_engines_job: {a.engine} job finished in {time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
