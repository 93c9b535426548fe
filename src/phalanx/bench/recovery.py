"""`phalanx bench recovery`: how fast a training job recovers from lost workers, and what it loses.

One elastic phalanx job (MLP on scikit-learn's digits, `recovery_worker.py`) runs on --np workers
with respawns (`--min-np`, `--max-restarts`). This driver injects the faults itself, from outside,
as an operator or the kernel would: it waits until the job is at full strength, lets a random
number of steps pass, then sends a real SIGKILL or SIGSTOP to a random worker, noting the exact
time. A stopped worker is found by its missing heartbeats and fenced by the launcher.

Per fault, from the workers' own step logs:
  MTTR          signal -> first step completed by a survivor in the re-formed group
  steps lost    steps completed before the re-form that the survivors do not resume after
  samples lost  the samples of those steps (their update is gone and they must be trained again)
  back to full  signal -> first step with all --np workers again (replacement spawned and healed)
  join pause    the survivors' stall while the replacement joins (the second re-form)
The table gives per kind the median and max MTTR, the total steps and samples lost, and the
median back-to-full time and join pause.
Each epoch is also checked for exactly-once: every sample trained once, none missing or twice.

The reference, in the same run: the same job under torchrun + DDP (`recovery_torchrun_worker.py`,
--max-restarts, a checkpoint at each epoch end), with random workers SIGKILLed the same way.
Last, steady-state throughput without faults: the phalanx job as configured above (fault
tolerance on) vs the same loop bare under a non-elastic launcher (off), interleaved, best of
--repeat.

    phalanx bench recovery --np 4 --faults 10 --json recovery.json

With --engines ray,spark,raytrain it also measures phalanx on Ray and on Spark, and Ray Train's
TorchTrainer restarting from a checkpoint (opt-in; see recovery_engines.py).

With -H, the benchmark measures losing a whole host instead (crash, cut): see recovery_hosts.py,
`phalanx bench recovery -H A:2,B:2 --help`, and tests/bench_host_loss.py for simulated hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, Self

from . import plots

HERE = Path(__file__).resolve().parent
WORKER = HERE / "recovery_worker.py"
TORCHRUN_WORKER = HERE / "recovery_torchrun_worker.py"
KINDS: dict[str, signal.Signals] = {"SIGKILL": signal.SIGKILL, "SIGSTOP": signal.SIGSTOP}
"""Fault kinds injected into the phalanx job; torchrun gets SIGKILL only."""
DIGITS = 1797
"""Samples in scikit-learn's digits (one epoch)."""
TARGETS = {"mttr_sigkill_median_s": 1.0, "mttr_sigkill_aim_s": 0.25,
           "mttr_sigstop_median_s": 3.0, "steps_lost": 0, "overhead_pct": 3.0}
"""What the issue asks of phalanx."""
WAIT_S = 120.0
"""Longest wait for any one event (a job to start, recover, regain full strength, finish)."""


class BenchError(RuntimeError):
    """The benchmark could not measure: a job died or stalled (its log tail is in the message)."""


def _say(msg: str) -> None:
    print(f"[recovery] {msg}", flush=True)


def _env() -> dict[str, str]:
    src = str(HERE.parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------------- processes and logs
def _is_ours(pid: int, marker: str) -> bool:
    """Is `pid` alive (not a zombie) and started with `marker` in its command line?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except (OSError, IndexError):
        return False


class _Job:
    """A launcher (phalanx run or torchrun) in its own session, its output in a file.

    Both launchers put each worker in a session of its own, so `close()` stops the launcher
    (which stops its workers) and then SIGKILLs any worker still alive, found by pid files.
    """

    def __init__(self, cmd: list[str], out: Path, name: str, pid_prefix: str,
                 env: dict[str, str] | None = None) -> None:
        self.out, self.name, self.pid_prefix = out, name, pid_prefix
        self.log_path = out / f"{name}.log"
        # Open for the job's whole life (closed in close()), so no `with` here.
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**_env(), **(env or {})}, cwd=out,
                                     start_new_session=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def fail(self, what: str) -> BenchError:
        return BenchError(f"{self.name}: {what} (exit code {self.proc.poll()}); last lines of "
                          f"{self.log_path}:\n{self.tail()}")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    pass
                if self.wait(grace) is not None:
                    break
        marker = str(self.out)
        for pid_file in self.out.glob(self.pid_prefix + "*"):
            try:
                pid = int(pid_file.read_text() or 0)
            except (OSError, ValueError):
                continue
            if pid and _is_ours(pid, marker):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()


class _Tail:
    """Incrementally read the JSON-lines step logs OUT/<prefix><key>.jsonl into records[key]."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder, self.prefix = folder, prefix
        self.records: dict[str, list[dict[str, Any]]] = {}
        self._offsets: dict[str, int] = {}

    def poll(self) -> None:
        for path in self.folder.glob(f"{self.prefix}*.jsonl"):
            key = path.name[len(self.prefix):-len(".jsonl")]
            with open(path, "rb") as f:
                f.seek(self._offsets.get(key, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1   # leave a half-written last line for next time
            self._offsets[key] = self._offsets.get(key, 0) + end
            rows = self.records.setdefault(key, [])
            rows.extend(json.loads(line) for line in data[:end].splitlines() if line.strip())

    def all(self) -> Iterable[tuple[str, dict[str, Any]]]:
        for key, rows in self.records.items():
            for r in rows:
                yield key, r

    def max_step(self) -> int:
        return max((r["s"] for _, r in self.all()), default=0)


def _until(job: _Job, tail: _Tail, done: Callable[[], Any], what: str,
           timeout: float = WAIT_S) -> Any:
    """Poll the logs until `done()` returns something truthy; BenchError if the job dies."""
    deadline = time.monotonic() + timeout
    while True:
        tail.poll()
        got = done()
        if got:
            return got
        if not job.alive():
            raise job.fail(f"exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise job.fail(f"no {what} within {timeout:.0f}s")
        time.sleep(0.02)


def _reached(tail: _Tail, step: int) -> Callable[[], bool]:
    return lambda: tail.max_step() >= step


def _signal(pid: int, sig: signal.Signals) -> float:
    """Send `sig` to `pid`; returns the wall time just before sending."""
    t = time.time()
    os.kill(pid, sig)
    return t


def _summary(values: list[float]) -> dict[str, float | None]:
    return {"median": statistics.median(values) if values else None,
            "max": max(values) if values else None}


# ---------------------------------------------------------------------- analysis (pure)
def analyze_phalanx(records: dict[str, list[dict[str, Any]]], faults: list[dict[str, Any]],
                    np_full: int) -> list[dict[str, Any]]:
    """Per fault: MTTR, steps and samples lost, time back to full strength (see module doc).

    `records[worker]` are a worker's step-log lines; each fault has victim (worker id),
    t (signal time) and g (the generation the victim was in).
    """
    rows = [(w, r) for w, rs in records.items() for r in rs]
    out = []
    for f in faults:
        after = [r for w, r in rows if w != f["victim"] and r["g"] > f["g"] and r["t"] > f["t"]]
        before = [r for _, r in rows if r["g"] <= f["g"]]
        if not after:
            out.append({**f, "recovered": False})
            continue
        first = min(after, key=lambda r: r["t"])
        committed = max((r["s"] for r in before), default=0)
        resumed_from = first["s"] - 1
        lost_steps = {r["s"]: r["b"] for r in before if r["s"] > resumed_from}
        full = [r["t"] for r in after if r["n"] == np_full]
        # While the replacement joins, the survivors leave at a step boundary and re-form again.
        t_full = min(full) if full else None
        pause = (t_full - max(r["t"] for _, r in rows if r["t"] < t_full)
                 if t_full is not None else None)
        epoch_at = max((r for r in before if r["t"] <= f["t"]), key=lambda r: r["t"],
                       default={"e": 0})["e"]
        out.append({**f, "recovered": True, "mttr_s": first["t"] - f["t"],
                    "step_at_signal": max((r["s"] for r in before if r["t"] <= f["t"]),
                                          default=0),
                    "committed_step": committed, "resumed_from_step": resumed_from,
                    "steps_lost": max(0, committed - resumed_from),
                    "samples_lost": sum(lost_steps.values()), "epoch": epoch_at,
                    "back_to_full_s": (t_full - f["t"]) if t_full is not None else None,
                    "join_pause_s": pause})
    return out


def exactly_once(records: dict[str, list[dict[str, Any]]], num_samples: int,
                 last_epoch_complete: bool) -> dict[str, Any]:
    """Check every complete epoch trained each sample once, from the logged per-step plans.

    Where two logs disagree on a step number (a step applied only by a worker that then died,
    and redone differently by the survivors), the survivors' later version is the one that
    counts, and the step is reported as redone.
    """
    by_step: dict[int, list[dict[str, Any]]] = {}
    for rs in records.values():
        for r in rs:
            if "p" in r:
                by_step.setdefault(r["s"], []).append(r)
    redone = [s for s, rs in by_step.items()
              if len({json.dumps(r["p"]) for r in rs}) > 1]
    epochs: dict[int, list[int]] = {}
    for s in sorted(by_step):
        r = max(by_step[s], key=lambda r: r["t"])
        epochs.setdefault(r["e"], []).extend(i for part in r["p"] for i in part)
    if not epochs:
        return {"epochs_checked": 0, "samples_missing": 0, "samples_duplicated": 0,
                "steps_redone": len(redone), "per_epoch": {}}
    last = max(epochs)
    per_epoch = {}
    for e, idx in sorted(epochs.items()):
        if e == last and not last_epoch_complete:
            continue
        unique = len(set(idx))
        per_epoch[e] = {"missing": num_samples - unique, "duplicated": len(idx) - unique}
    return {"epochs_checked": len(per_epoch),
            "samples_missing": sum(v["missing"] for v in per_epoch.values()),
            "samples_duplicated": sum(v["duplicated"] for v in per_epoch.values()),
            "steps_redone": len(redone), "per_epoch": per_epoch}


def analyze_torchrun(records: dict[str, list[dict[str, Any]]],
                     faults: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fault: MTTR (signal -> first step of the restarted group), steps and samples lost
    (the steps since the last epoch checkpoint, redone after the restart)."""
    rows = [r for rs in records.values() for r in rs]
    out = []
    for f in faults:
        after = [r for r in rows if r["a"] > f["a"] and r["t"] > f["t"]]
        before = [r for r in rows if r["a"] <= f["a"]]
        if not after:
            out.append({**f, "recovered": False})
            continue
        first = min(after, key=lambda r: r["t"])
        committed = max((r["s"] for r in before), default=0)
        resumed_from = first["s"] - 1
        lost = {r["s"]: r["b"] for r in before if r["a"] == f["a"] and r["s"] > resumed_from}
        out.append({**f, "recovered": True, "mttr_s": first["t"] - f["t"],
                    "step_at_signal": max((r["s"] for r in before if r["t"] <= f["t"]),
                                          default=0),
                    "committed_step": committed, "resumed_from_step": resumed_from,
                    "steps_lost": max(0, committed - resumed_from),
                    "samples_lost": sum(lost.values()),
                    "back_to_full_s": first["t"] - f["t"]})   # the whole group restarts
    return out


def _kind_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["recovered"]]
    mttr = _summary([r["mttr_s"] for r in ok])
    full = _summary([r["back_to_full_s"] for r in ok if r.get("back_to_full_s") is not None])
    pause = _summary([r["join_pause_s"] for r in ok if r.get("join_pause_s") is not None])
    return {"n": len(rows), "recovered": len(ok),
            "mttr_median_s": mttr["median"], "mttr_max_s": mttr["max"],
            "steps_lost_total": sum(r["steps_lost"] for r in ok),
            "steps_lost_max": max((r["steps_lost"] for r in ok), default=0),
            "samples_lost_total": sum(r["samples_lost"] for r in ok),
            "back_to_full_median_s": full["median"], "join_pause_median_s": pause["median"],
            "faults": rows}


# ---------------------------------------------------------------------- the three measurements
def _worker_args(args: argparse.Namespace) -> list[str]:
    return ["--hidden", str(args.hidden), "--batch-size", str(args.batch_size)]


def _phalanx_faults(args: argparse.Namespace, out: Path, rng: random.Random) -> dict[str, Any]:
    kinds = [k for k in KINDS for _ in range(args.faults)]
    rng.shuffle(kinds)
    n = args.np
    launcher = ["--min-np", str(max(1, n // 2)), "--max-restarts", str(len(kinds) + 2),
                "--heartbeat-timeout", str(args.heartbeat_timeout)]
    cmd = [sys.executable, "-m", "phalanx.launch.cli", "run", "-np", str(n), *launcher,
           str(WORKER), str(out), "--ft", "on", "--log-samples", *_worker_args(args)]
    _say(f"phalanx: {len(kinds)} faults, `phalanx run -np {n} {' '.join(launcher)}`")
    tail = _Tail(out, "steps.")
    with _Job(cmd, out, "phalanx", "pid.") as job:
        faults = inject_elastic_faults(job, tail, kinds, n, rng, args, "phalanx")
        code = stop_job(job)
    result: dict[str, Any] = elastic_result(tail, faults, n, code, job, KINDS)
    result["timeline"] = plots.step_timeline(tail.records, faults)
    result["launcher"] = f"phalanx run -np {n} {' '.join(launcher)}"
    return result


def inject_elastic_faults(job: _Job, tail: _Tail, kinds: list[str], n: int,
                          rng: random.Random, args: argparse.Namespace, label: str,
                          first_wait: float = WAIT_S) -> list[dict[str, Any]]:
    """Signal a random worker of a full generation once per kind in `kinds`, each time after a
    random gap of steps, and wait until the survivors step again; the faults, as analysed by
    `analyze_phalanx`. Used for `phalanx run` and for phalanx on Ray and Spark."""
    faults: list[dict[str, Any]] = []

    def full_generation() -> tuple[int, list[str]] | None:
        """(generation, its workers) once all n workers completed a step in the newest one."""
        g = max((r["g"] for _, r in tail.all()), default=0)
        members = sorted({w for w, r in tail.all() if r["g"] == g and r["n"] == n})
        return (g, members) if g and len(members) == n else None

    for i, kind in enumerate(kinds, 1):
        g, members = _until(job, tail, full_generation, f"all {n} workers stepping",
                            timeout=first_wait if i == 1 else WAIT_S)
        target = tail.max_step() + rng.randint(args.gap_steps[0], args.gap_steps[1])
        _until(job, tail, _reached(tail, target), f"step {target}")
        victim = rng.choice(members)
        pid = int((job.out / f"{job.pid_prefix}{victim}").read_text())
        step = tail.max_step()
        t = _signal(pid, KINDS[kind])
        faults.append({"kind": kind, "victim": victim, "pid": pid, "t": t, "g": g,
                       "step_seen": step})

        def recovered(victim: str = victim, g: int = g) -> float | None:
            ts = [r["t"] for w, r in tail.all() if w != victim and r["g"] > g]
            return min(ts) if ts else None
        t_rec = _until(job, tail, recovered, f"recovery from {kind}")
        _say(f"{label} fault {i}/{len(kinds)}: {kind} -> worker {victim} (pid {pid}) near "
             f"step {step}; survivors stepping again after {t_rec - t:.3f}s")
    _until(job, tail, full_generation, f"all {n} workers stepping")
    return faults


def stop_job(job: _Job) -> int:
    """Ask the job to finish (the workers watch for the stop file); its exit code."""
    (job.out / "stop").touch()
    code = job.wait(WAIT_S)
    if code is None:
        raise job.fail("did not finish after the stop file")
    return code


def elastic_result(tail: _Tail, faults: list[dict[str, Any]], n: int, code: int, job: _Job,
                   kinds: Iterable[str]) -> dict[str, Any]:
    """Per-kind summaries, the exactly-once check and the losses nobody injected."""
    tail.poll()
    rows = analyze_phalanx(tail.records, faults, n)
    result: dict[str, Any] = {
        kind: _kind_summary([r for r in rows if r["kind"] == kind]) for kind in kinds}
    result["exactly_once"] = exactly_once(tail.records, DIGITS, last_epoch_complete=code == 0)
    result["exit_code"] = code
    # Losses the coordinator declared that were not our faults (e.g. a starved heartbeat).
    victims = {f["victim"] for f in faults}
    result["unplanned_losses"] = [
        m.group(0) for m in re.finditer(r"worker (\S+) lost: .*",
                                        job.log_path.read_text(errors="replace"))
        if m.group(1) not in victims]
    return result


def _torchrun_faults(args: argparse.Namespace, out: Path, rng: random.Random) -> dict[str, Any]:
    n, k = args.np, args.torchrun_faults
    launcher = ["--standalone", "--nproc-per-node", str(n), "--max-restarts", str(k + 1)]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(TORCHRUN_WORKER),
           str(out), *_worker_args(args)]
    _say(f"torchrun: {k} SIGKILL faults, `torchrun {' '.join(launcher)}`, checkpoint per epoch")
    tail = _Tail(out, "tsteps.")
    faults: list[dict[str, Any]] = []

    def full_attempt() -> int | None:
        a = max((r["a"] for _, r in tail.all()), default=-1)
        ranks = {w.split(".")[0] for w, r in tail.all() if r["a"] == a}
        return a + 1 if a >= 0 and len(ranks) == n else None   # +1: attempt 0 is truthy too

    # Without this, restarted workers can read the previous attempt's Gloo addresses from the
    # rendezvous store torchrun shares with them (pytorch/pytorch#135712) and fail to connect.
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with _Job(cmd, out, "torchrun", "tpid.", env=env) as job:
        for i in range(1, k + 1):
            a = _until(job, tail, full_attempt, f"all {n} torchrun workers stepping") - 1
            target = tail.max_step() + rng.randint(args.gap_steps[0], args.gap_steps[1])
            _until(job, tail, _reached(tail, target), f"torchrun step {target}")
            victim = rng.randrange(n)
            pid = int((out / f"tpid.{victim}.{a}").read_text())
            step = tail.max_step()
            t = _signal(pid, signal.SIGKILL)
            faults.append({"kind": "SIGKILL", "victim": victim, "pid": pid, "t": t, "a": a,
                           "step_seen": step})

            def restarted(a: int = a) -> float | None:
                ts = [r["t"] for _, r in tail.all() if r["a"] > a]
                return min(ts) if ts else None
            t_rec = _until(job, tail, restarted, "torchrun restart")
            _say(f"torchrun fault {i}/{k}: SIGKILL -> rank {victim} (pid {pid}) near step "
                 f"{step}; stepping again after {t_rec - t:.3f}s")
        code = stop_job(job)
    tail.poll()
    rows = analyze_torchrun(tail.records, faults)
    return {"SIGKILL": _kind_summary(rows), "exit_code": code,
            "launcher": f"torchrun {' '.join(launcher)}",
            "timeline": plots.step_timeline(tail.records, faults)}


def _throughput_once(args: argparse.Namespace, out: Path, ft: str) -> tuple[float, float]:
    """Samples/s of one fault-free phalanx job over the steps after the first 20%, and the CPU
    milliseconds per step summed over its workers (all threads) in the same window."""
    out.mkdir()
    n = args.np
    launcher = (["--min-np", str(max(1, n // 2)), "--max-restarts", str(2 * args.faults + 2)]
                if ft == "on" else [])
    cmd = [sys.executable, "-m", "phalanx.launch.cli", "run", "-np", str(n), *launcher,
           str(WORKER), str(out), "--ft", ft, "--steps", str(args.throughput_steps),
           *_worker_args(args)]
    with _Job(cmd, out, f"throughput-{ft}", "pid.") as job:
        code = job.wait(WAIT_S)
        if code != 0:
            raise job.fail("fault-free run failed" if code is not None else "ran too long")
    tail = _Tail(out, "steps.")
    tail.poll()
    rows = sorted(tail.records.get("w0", []), key=lambda r: r["s"])
    warm = len(rows) // 5
    if len(rows) - warm < 2:
        raise BenchError(f"throughput run ({ft}) logged {len(rows)} steps; raise "
                         f"--throughput-steps (got {args.throughput_steps})")
    window = rows[warm:]
    first, last = window[0]["s"], window[-1]["s"]
    cpu = 0.0
    for rs in tail.records.values():
        ends = [r for r in rs if r["s"] in (first, last)]
        if len(ends) == 2:
            cpu += (ends[1]["c"] - ends[0]["c"]) / (last - first)
    return sum(r["b"] for r in window[1:]) / (window[-1]["t"] - window[0]["t"]), 1e3 * cpu


def _throughput(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    runs: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    for rep in range(args.repeat):    # interleaved, so machine noise hits both alike
        for ft in ("on", "off"):
            thr, ms = _throughput_once(args, out / f"thr-{ft}-{rep}", ft)
            runs[ft].append(thr)
            cpu[ft].append(ms)
            _say(f"throughput, fault tolerance {ft} (run {rep + 1}/{args.repeat}): "
                 f"{thr:.0f} samples/s, {ms:.1f} CPU ms/step")
    on, off = max(runs["on"]), max(runs["off"])
    cpu_on, cpu_off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    # Run-to-run spread of the same configuration: a difference smaller than this is noise.
    spread = max(100.0 * (max(v) - min(v)) / max(v) for v in runs.values())
    return {"on_samples_per_s": on, "off_samples_per_s": off,
            "overhead_pct": 100.0 * (off - on) / off, "runs": runs,
            "spread_pct": spread if args.repeat > 1 else None,
            "cpu_spread_pct": (max(100.0 * (max(v) - min(v)) / max(v) for v in cpu.values())
                               if args.repeat > 1 else None),
            "cpu_ms_per_step": cpu, "cpu_on_ms_per_step": cpu_on, "cpu_off_ms_per_step": cpu_off,
            "cpu_overhead_pct": 100.0 * (cpu_on - cpu_off) / cpu_off,
            "on": f"elastic State + @run under `phalanx run -np {args.np} --min-np "
                  f"{max(1, args.np // 2)} --max-restarts K`",
            "off": f"the same loop bare under `phalanx run -np {args.np}`"}


# ---------------------------------------------------------------------- report
def _fmt(x: float | None, unit: str = "s") -> str:
    return "-" if x is None else f"{x:.3f}{unit}"


def _row(job: str, kind: str, s: dict[str, Any]) -> str:
    """One line of the table from a `_kind_summary`."""
    return (f"{job:13} {kind:8} {s['n']:>3} {_fmt(s['mttr_median_s']):>9} "
            f"{_fmt(s['mttr_max_s']):>9} {s['steps_lost_total']:>10} "
            f"{s['samples_lost_total']:>12} {_fmt(s['back_to_full_median_s']):>12} "
            f"{_fmt(s['join_pause_median_s']):>10}")


def _report(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    from .recovery_engines import report_lines
    lines = [(f"recovery: {args.np} workers, MLP 64-{args.hidden}-{args.hidden}-10 on digits, "
              f"batch {args.batch_size}/worker ({DIGITS} samples/epoch)"),
             (f"{'job':13} {'fault':8} {'n':>3} {'MTTR med':>9} {'MTTR max':>9} "
              f"{'steps lost':>10} {'samples lost':>12} {'back to full':>12} {'join pause':>10}")]
    for job, kinds in (("phalanx", list(KINDS)), ("torchrun", ["SIGKILL"])):
        if job not in res:
            continue
        for kind in kinds:
            lines.append(_row(job, kind, res[job][kind]))
    lines += report_lines(res, _row)
    if "phalanx" in res:
        eo = res["phalanx"]["exactly_once"]
        lines.append(f"phalanx exactly-once: {eo['epochs_checked']} epochs checked, "
                     f"{eo['samples_missing']} samples missing, {eo['samples_duplicated']} "
                     f"duplicated, {eo['steps_redone']} steps redone")
        unplanned = res["phalanx"]["unplanned_losses"]
        lines.append(f"phalanx losses not injected by the benchmark: {len(unplanned)}"
                     + "".join(f"\n  {u}" for u in unplanned))
    if "throughput" in res:
        t = res["throughput"]
        lines.append(f"steady state (best of {args.repeat}): fault tolerance on "
                     f"{t['on_samples_per_s']:.0f} samples/s, off {t['off_samples_per_s']:.0f} "
                     f"samples/s, overhead {t['overhead_pct']:+.1f}% (run-to-run spread "
                     f"{'-' if t['spread_pct'] is None else format(t['spread_pct'], '.0f')}%); "
                     f"CPU per step (median, all workers) on {t['cpu_on_ms_per_step']:.1f} ms, "
                     f"off {t['cpu_off_ms_per_step']:.1f} ms, overhead "
                     f"{t['cpu_overhead_pct']:+.1f}%")
        runs = t.get("runs", {})
        if len(runs.get("on", [])) > 1 and len(runs.get("off", [])) > 1:
            # Medians resist the odd run where two workers briefly shared a core.
            med_on, med_off = statistics.median(runs["on"]), statistics.median(runs["off"])
            lines.append(f"steady state (median of {len(runs['on'])}): on {med_on:.0f} samples/s, "
                         f"off {med_off:.0f} samples/s, overhead "
                         f"{100 * (1 - med_on / med_off):+.1f}%")
    lines += [f"target {name}: {verdict}" for name, verdict in res.get("verdicts", {}).items()]
    return lines


def _verdicts(res: dict[str, Any]) -> dict[str, str]:
    v: dict[str, str] = {}
    px = res.get("phalanx")
    if px:
        for kind, key in (("SIGKILL", "mttr_sigkill_median_s"), ("SIGSTOP", "mttr_sigstop_median_s")):
            m = px[kind]["mttr_median_s"]
            if m is not None:
                v[f"median MTTR {kind} <= {TARGETS[key]:g}s"] = (
                    f"{'met' if m <= TARGETS[key] else 'MISSED'} ({m:.3f}s)")
        lost = px["SIGKILL"]["steps_lost_total"] + px["SIGSTOP"]["steps_lost_total"]
        v["zero committed steps lost"] = f"{'met' if lost == 0 else 'MISSED'} ({lost})"
    if "throughput" in res:
        t, limit = res["throughput"], TARGETS["overhead_pct"]
        o, spread = t["overhead_pct"], t["spread_pct"]
        for what, o, spread in (("throughput", t["overhead_pct"], t["spread_pct"]),
                                ("CPU per step", t["cpu_overhead_pct"], t["cpu_spread_pct"])):
            if spread is None or spread > limit:
                # On a shared or oversubscribed machine such a difference is mostly noise.
                why = "one run per mode" if spread is None else f"run-to-run spread {spread:.0f}%"
                verdict = f"INCONCLUSIVE ({o:+.1f}%, but {why} > {limit:g}%)"
            else:
                verdict = f"{'met' if o <= limit else 'MISSED'} ({o:+.1f}%)"
            v[f"FT overhead <= {limit:g}% ({what})"] = verdict
    return v


# ---------------------------------------------------------------------- entry point
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phalanx bench recovery", description=__doc__.split("\n")[0])
    p.add_argument("--np", type=int, default=4, help="workers (default 4, at least 2)")
    p.add_argument("--faults", type=int, default=None,
                   help="faults per kind (SIGKILL, SIGSTOP) in the phalanx job (default 10)")
    p.add_argument("--torchrun-faults", type=int, default=None,
                   help="SIGKILLs in the torchrun job (default 3; each restart takes seconds)")
    p.add_argument("--repeat", type=int, default=None,
                   help="fault-free throughput runs per mode, interleaved, best kept (default 3)")
    p.add_argument("--throughput-steps", type=int, default=None,
                   help="steps per throughput run (default 300)")
    p.add_argument("--heartbeat-timeout", type=float, default=1.0,
                   help="phalanx run --heartbeat-timeout: how soon a stopped worker is declared "
                        "lost (default 1.0)")
    p.add_argument("--hidden", type=int, default=512, help="MLP hidden width (default 512)")
    p.add_argument("--batch-size", type=int, default=32, help="per-worker batch (default 32)")
    p.add_argument("--gap-steps", type=int, nargs=2, default=(5, 25), metavar=("MIN", "MAX"),
                   help="steps at full strength before each fault, drawn uniformly (default 5 25)")
    p.add_argument("--seed", type=int, default=0, help="seed for victims, kinds and gaps")
    p.add_argument("--skip", default="", help="comma list of parts to skip: phalanx,torchrun,"
                                              "throughput")
    p.add_argument("--quick", action="store_true",
                   help="1 fault per kind, 1 torchrun fault, 1 short throughput run per mode "
                        "(a smoke test, not a measurement)")
    p.add_argument("--keep", metavar="DIR", help="keep the workers' logs in DIR (must not exist)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--plot", metavar="FILE.png", help="draw each job's steps over time with "
                   "the faults marked (needs matplotlib)")
    from .recovery_engines import add_arguments
    add_arguments(p)
    p.add_argument("-H", "--hosts", metavar="HOST:SLOTS,...",
                   help="measure losing a whole host (crash, cut) on these hosts instead; "
                        "`phalanx bench recovery -H A:2,B:2 --help` lists its options")
    return p


def _validate(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    quick = a.quick
    a.faults = a.faults if a.faults is not None else (1 if quick else 10)
    a.torchrun_faults = (a.torchrun_faults if a.torchrun_faults is not None
                         else (1 if quick else 3))
    a.repeat = a.repeat if a.repeat is not None else (1 if quick else 3)
    a.throughput_steps = (a.throughput_steps if a.throughput_steps is not None
                          else (100 if quick else 300))
    skip = {s for s in a.skip.split(",") if s}
    bad_skip = skip - {"phalanx", "torchrun", "throughput"}
    if a.np < 2:
        p.error(f"--np must be at least 2 (one worker is lost per fault), got {a.np}")
    if a.faults < 1 or a.torchrun_faults < 1 or a.repeat < 1:
        p.error(f"--faults, --torchrun-faults and --repeat must be >= 1, got {a.faults}, "
                f"{a.torchrun_faults}, {a.repeat}")
    if a.throughput_steps < 10:
        p.error(f"--throughput-steps must be >= 10, got {a.throughput_steps}")
    if not 0 < a.heartbeat_timeout <= 60:
        p.error(f"--heartbeat-timeout must be in (0, 60] seconds, got {a.heartbeat_timeout}")
    if a.hidden < 1 or a.batch_size < 1:
        p.error(f"--hidden and --batch-size must be >= 1, got {a.hidden}, {a.batch_size}")
    lo, hi = a.gap_steps
    if not 1 <= lo <= hi:
        p.error(f"--gap-steps MIN MAX must satisfy 1 <= MIN <= MAX, got {lo} {hi}")
    if bad_skip:
        p.error(f"--skip {a.skip!r}: unknown part(s) {sorted(bad_skip)}; choose from "
                "phalanx, torchrun, throughput")
    if a.keep and os.path.exists(a.keep):
        p.error(f"--keep {a.keep!r} already exists; name a new folder")
    plots.check_plot_arg(p, a.plot)
    a.skip = skip
    from .recovery_engines import validate
    validate(p, a)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (0 even when a target is missed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(x in ("-H", "--hosts") or x.startswith("--hosts=") for x in argv):
        from .recovery_hosts import main as host_loss
        return host_loss(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="phalanx-bench-recovery-")).resolve()
    res: dict[str, Any] = {"bench": "recovery", "config": {
        "np": args.np, "faults_per_kind": args.faults, "torchrun_faults": args.torchrun_faults,
        "heartbeat_timeout_s": args.heartbeat_timeout, "hidden": args.hidden,
        "batch_size": args.batch_size, "gap_steps": list(args.gap_steps), "seed": args.seed,
        "repeat": args.repeat, "throughput_steps": args.throughput_steps, "quick": args.quick},
        "targets": TARGETS}
    t0 = time.monotonic()

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")   # unwinds through _Job.close()

    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, on_term) if in_main else None
    try:
        if "phalanx" not in args.skip:
            (work / "phalanx").mkdir()
            res["phalanx"] = _phalanx_faults(args, work / "phalanx", rng)
        if "torchrun" not in args.skip:
            (work / "torchrun").mkdir()
            res["torchrun"] = _torchrun_faults(args, work / "torchrun", rng)
        if args.engines:
            from . import recovery_engines
            res["engines"] = recovery_engines.run(args, work, rng)
        if "throughput" not in args.skip:
            (work / "throughput").mkdir()
            res["throughput"] = _throughput(args, work / "throughput")
    except BenchError as e:
        sys.stderr.write(f"phalanx bench recovery: error: {e}\nlogs kept in {work}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"phalanx bench recovery: interrupted; logs kept in {work}\n")
        return 130
    else:
        if args.keep:
            shutil.move(str(work), args.keep)
        else:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
    res["seconds"] = time.monotonic() - t0
    res["verdicts"] = _verdicts(res)
    for line in _report(res, args):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    if args.plot:
        print(f"wrote {plots.recovery(res, args.plot)}")
    from .recovery_engines import failed
    return 1 if failed(res) else 0


if __name__ == "__main__":
    raise SystemExit(main())
