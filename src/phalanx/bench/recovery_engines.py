"""`phalanx bench recovery --engines ray,spark,raytrain`: the same measurement on other engines.

Opt-in parts of the recovery benchmark, each one training job started by a driver program of
its own (`recovery_engines_job.py`, which owns the local Ray instance or SparkSession), with
--engine-faults SIGKILLs injected from outside into random workers, as for the `phalanx run` job:

  phalanx/ray    `phalanx.ray.run`: workers are Ray actors, the coordinator is the driver; a
                 killed actor is a lost worker, survivors continue, a replacement actor joins
                 (max_restarts = faults + 2, min_workers = np // 2).
  phalanx/spark  `phalanx.spark.run`: workers are Spark tasks (default master local[NP,F],
                 F = faults + 2 task attempts); a killed Python worker fails its task, the
                 survivors continue, and Spark's retry of the task joins as a replacement.
  raytrain       Ray Train's TorchTrainer on the same model and data with
                 FailureConfig(max_failures = faults), rank 0 checkpointing every
                 --checkpoint-every K steps; a worker's death restarts every worker from the
                 latest checkpoint, so the steps since it are redone (lost). Each fault lands
                 1..K steps (uniformly) after a checkpoint the running attempt reported. Ray
                 Train registers a reported checkpoint only when its controller next polls the
                 workers (every 2 s by default): a restart soon after a report resumes from the
                 checkpoint before it (counted in newest_checkpoint_unused).

The phalanx rows run `recovery_worker.py` itself and are measured by `analyze_phalanx` (MTTR:
signal -> first step a survivor completes in the re-formed group) and checked exactly-once;
the raytrain row is measured like torchrun by `analyze_torchrun` (MTTR: signal -> first step of
the restarted group). An engine that does not import here is reported as skipped; one that
fails is reported with its error (and the benchmark exits 1).

    phalanx bench recovery --skip phalanx,torchrun,throughput --engines ray,spark,raytrain \\
        --np 4 --engine-faults 3
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..config import HEARTBEAT_TIMEOUT
from .recovery import (
    WAIT_S,
    BenchError,
    _env,
    _is_ours,
    _Job,
    _kind_summary,
    _reached,
    _say,
    _signal,
    _Tail,
    _until,
    analyze_torchrun,
    elastic_result,
    inject_elastic_faults,
    stop_job,
)
from .recovery_engines_job import ENGINES

JOB = "phalanx.bench.recovery_engines_job"
LABELS = {"ray": "phalanx/ray", "spark": "phalanx/spark", "raytrain": "raytrain"}
"""Row names in the table."""
NEEDS = {"ray": "ray", "spark": "pyspark", "raytrain": "ray.train.torch"}
"""The module each part imports; the part is skipped where it does not import."""
START_WAIT_S = 300.0
"""Longest wait for an engine's first full-strength step (Ray or a JVM starting, then every
worker importing torch, on a small machine)."""
WORKER_MARKERS = {"ray": "ray::", "spark": "pyspark", "raytrain": "ray::"}
"""A word in the command line of the engine's worker processes (for the last-resort cleanup)."""


# ---------------------------------------------------------------------- options
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the engine parts (added to `phalanx bench recovery`'s parser)."""
    p.add_argument("--engines", default="", metavar="LIST",
                   help="also measure these engines (comma list; none by default): ray "
                        "(phalanx.ray.run, workers as Ray actors), spark (phalanx.spark.run, "
                        "workers as Spark tasks), raytrain (Ray Train's TorchTrainer with "
                        "FailureConfig, restarting every worker from a checkpoint); SIGKILL "
                        "faults only. E.g. --skip phalanx,torchrun,throughput --engines ray,spark")
    p.add_argument("--engine-faults", type=int, default=None, metavar="N",
                   help="SIGKILLs per engine (default 2; 1 with --quick)")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="K",
                   help="raytrain: steps between checkpoints (ray.train.report) (default 100); "
                        "each fault lands 1..K steps after one (not --gap-steps)")
    p.add_argument("--spark-master", default=None, metavar="URL",
                   help="spark: master URL (default local[NP,F], F = --engine-faults + 2 task "
                        "attempts; local-cluster[NP,1,1024] runs one executor JVM per worker)")


def validate(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Check and complete the engine options (a.engines becomes a list)."""
    engines = [e for e in a.engines.split(",") if e]
    bad = sorted(set(engines) - set(ENGINES))
    if bad:
        p.error(f"--engines {a.engines!r}: unknown engine(s) {bad}; choose from "
                f"{', '.join(ENGINES)}")
    a.engines = list(dict.fromkeys(engines))
    if a.engine_faults is None:
        a.engine_faults = 1 if a.quick else 2
    if a.engine_faults < 1:
        p.error(f"--engine-faults must be >= 1, got {a.engine_faults}")
    if a.checkpoint_every < 1:
        p.error(f"--checkpoint-every must be >= 1, got {a.checkpoint_every}")
    if a.spark_master is None:
        a.spark_master = f"local[{a.np},{a.engine_faults + 2}]"


# ---------------------------------------------------------------------- processes
class _EngineJob(_Job):
    """The driver program of one engine part. Ray's and Spark's processes share its process
    group (it is a session leader), so `close()` reaches them, and then SIGKILLs workers still
    alive (found by their pid files and a word of their command line)."""

    def __init__(self, cmd: list[str], out: Path, name: str, pid_prefix: str,
                 marker: str) -> None:
        super().__init__(cmd, out, name, pid_prefix)
        self.marker = marker

    def close(self) -> None:
        super().close()
        # Ray's or Spark's processes may outlive the driver for a moment as they shut down;
        # what is still in its process group after a grace period is killed.
        group, deadline = self.proc.pid, time.monotonic() + 10.0
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid_file in self.out.glob(self.pid_prefix + "*"):   # workers that left the group
            try:
                pid = int(pid_file.read_text() or 0)
            except (OSError, ValueError):
                continue
            if pid and _is_ours(pid, self.marker):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _importable(module: str) -> str | None:
    """None if `module` imports in a fresh interpreter here; else why not (one line)."""
    try:
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], check=False,
                              env=_env(), capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return f"`import {module}` took more than 180s"
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return f"`import {module}` failed: {lines[-1] if lines else proc.returncode}"


def _job_cmd(engine: str, args: argparse.Namespace, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", JOB, engine, str(out), "--np", str(args.np),
            "--hidden", str(args.hidden), "--batch-size", str(args.batch_size), *extra]


# ---------------------------------------------------------------------- the parts
def _phalanx_engine(engine: str, args: argparse.Namespace, out: Path,
                    rng: random.Random) -> dict[str, Any]:
    """phalanx on Ray or Spark: SIGKILL random workers, measure as for `phalanx run`."""
    n, k = args.np, args.engine_faults
    min_np, restarts = max(1, n // 2), k + 2
    extra = ["--min-np", str(min_np), "--max-restarts", str(restarts),
             "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)]
    if engine == "ray":
        how = (f"phalanx.ray.run(num_workers={n}, min_workers={min_np}, max_restarts={restarts}"
               f", heartbeat_timeout={HEARTBEAT_TIMEOUT:g}) on a local Ray")
    else:
        extra += ["--master", args.spark_master]
        how = (f"phalanx.spark.run(num_workers={n}, min_workers={min_np}, heartbeat_timeout="
               f"{HEARTBEAT_TIMEOUT:g}) on Spark master {args.spark_master}")
    _say(f"{LABELS[engine]}: {k} SIGKILL faults, {how}")
    tail = _Tail(out, "steps.")
    with _EngineJob(_job_cmd(engine, args, out, *extra), out, engine, "pid.",
                    WORKER_MARKERS[engine]) as job:
        faults = inject_elastic_faults(job, tail, ["SIGKILL"] * k, n, rng, args,
                                       LABELS[engine], first_wait=START_WAIT_S)
        code = stop_job(job)
        if code != 0:
            raise job.fail("the driver failed")
    return {"job": LABELS[engine], "launcher": how,
            **elastic_result(tail, faults, n, code, job, ["SIGKILL"])}


def _raytrain(args: argparse.Namespace, out: Path, rng: random.Random) -> dict[str, Any]:
    """Ray Train's TorchTrainer: SIGKILL random workers, measure as for torchrun."""
    n, k, every = args.np, args.engine_faults, args.checkpoint_every
    how = (f"TorchTrainer(ScalingConfig(num_workers={n}), FailureConfig(max_failures={k})), "
           f"checkpoint every {every} steps")
    _say(f"raytrain: {k} SIGKILL faults, {how}")
    tail = _Tail(out, "rtsteps.")
    faults: list[dict[str, Any]] = []

    def full_attempt() -> int | None:
        a = max((r["a"] for _, r in tail.all()), default=-1)
        ranks = {w.split(".")[0] for w, r in tail.all() if r["a"] == a}
        return a + 1 if a >= 0 and len(ranks) == n else None   # +1: attempt 0 is truthy too

    cmd = _job_cmd("raytrain", args, out, "--max-failures", str(k),
                   "--checkpoint-every", str(every))
    with _EngineJob(cmd, out, "raytrain", "rtpid.", WORKER_MARKERS["raytrain"]) as job:
        for i in range(1, k + 1):
            a = _until(job, tail, full_attempt, f"all {n} Ray Train workers stepping",
                       timeout=START_WAIT_S if i == 1 else WAIT_S) - 1
            # A uniformly random phase of the checkpoint interval, after a checkpoint this
            # attempt reported (as a fault hits a long job at any time).
            target = (tail.max_step() // every + 1) * every + rng.randint(1, every)
            _until(job, tail, _reached(tail, target), f"Ray Train step {target}")
            victim = rng.randrange(n)
            pid = int((out / f"rtpid.{victim}.{a}").read_text())
            step = tail.max_step()
            t = _signal(pid, signal.SIGKILL)
            faults.append({"kind": "SIGKILL", "victim": victim, "pid": pid, "t": t, "a": a,
                           "step_seen": step, "checkpoint_reported": (step - 1) // every * every})

            def restarted(a: int = a) -> float | None:
                ts = [r["t"] for _, r in tail.all() if r["a"] > a]
                return min(ts) if ts else None
            t_rec = _until(job, tail, restarted, "Ray Train restart", timeout=START_WAIT_S)
            _say(f"raytrain fault {i}/{k}: SIGKILL -> rank {victim} (pid {pid}) near step "
                 f"{step}; stepping again after {t_rec - t:.3f}s")
        code = stop_job(job)
        if code != 0:
            raise job.fail("the driver failed")
    tail.poll()
    rows = analyze_torchrun(tail.records, faults)
    # Ray Train registers a reported checkpoint when its controller next polls the workers
    # (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default); one reported shortly before
    # the fault is not used, and the restart resumes from an older one (or from scratch).
    unused = sum(1 for r in rows if r["recovered"]
                 and r["resumed_from_step"] < r["checkpoint_reported"])
    return {"job": LABELS["raytrain"], "launcher": how, "checkpoint_every": every,
            "SIGKILL": _kind_summary(rows), "exit_code": code,
            "newest_checkpoint_unused": unused}


def run(args: argparse.Namespace, work: Path, rng: random.Random) -> dict[str, Any]:
    """Run each part of args.engines in its own folder under `work`; {engine: result}, where a
    result is measured rows, {"skipped": why} or {"error": what}."""
    res: dict[str, Any] = {}
    for engine in args.engines:
        why = _importable(NEEDS[engine])
        if why is not None:
            _say(f"{LABELS[engine]}: skipped, {why}")
            res[engine] = {"job": LABELS[engine], "skipped": why}
            continue
        out = work / f"engine-{engine}"
        out.mkdir()
        try:
            if engine == "raytrain":
                res[engine] = _raytrain(args, out, rng)
            else:
                res[engine] = _phalanx_engine(engine, args, out, rng)
        except BenchError as e:   # the other engines still run; main() exits 1
            _say(f"{LABELS[engine]}: error: {e}")
            res[engine] = {"job": LABELS[engine], "error": str(e)}
    return res


def failed(res: dict[str, Any]) -> bool:
    """Did any engine part fail (not merely skip)?"""
    return any("error" in r for r in res.get("engines", {}).values())


# ---------------------------------------------------------------------- report
def report_lines(res: dict[str, Any], row: Any) -> list[str]:
    """Table rows for the engine parts; `row(job, kind, summary)` formats a measured one."""
    lines = []
    for r in res.get("engines", {}).values():
        if "skipped" in r:
            lines.append(f"{r['job']:13} SIGKILL  skipped: {r['skipped']}")
        elif "error" in r:
            lines.append(f"{r['job']:13} SIGKILL  ERROR: {r['error'].splitlines()[0]}")
        else:
            lines.append(row(r["job"], "SIGKILL", r["SIGKILL"]))
    for r in res.get("engines", {}).values():
        if "exactly_once" in r:
            eo = r["exactly_once"]
            lines.append(f"{r['job']} exactly-once: {eo['epochs_checked']} epochs checked, "
                         f"{eo['samples_missing']} samples missing, {eo['samples_duplicated']} "
                         f"duplicated, {eo['steps_redone']} steps redone; losses not injected: "
                         f"{len(r['unplanned_losses'])}"
                         + "".join(f"\n  {u}" for u in r["unplanned_losses"]))
        elif "newest_checkpoint_unused" in r:
            lines.append(f"raytrain: {r['launcher']}; steps lost = steps redone since the "
                         f"checkpoint resumed from; in {r['newest_checkpoint_unused']} of "
                         f"{r['SIGKILL']['recovered']} restarts the newest reported checkpoint "
                         "was not yet registered and an older one (or none) was used")
    return lines
