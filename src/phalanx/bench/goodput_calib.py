"""Calibration of `phalanx bench goodput`: a real `phalanx bench soak` run, its measured goodput,
and what the simulator predicts for it from the run's parameters.

The soak run's record (`SoakTrace`) is read from a `phalanx bench soak --keep DIR` folder (the
workers' step logs and the launcher's log) and boiled down to what the calibration needs: per
step the commit time (the slowest rank's), world size and generation; the recoveries; the
injected faults in order. It round-trips through a small JSON (`--save-soak`, `--soak-json`).

Measured goodput: sum over committed steps of (world size / N) x T_N, over the wall time from
the first to the last committed step, where T_N is the mean step interval at full strength
inside one generation (fault-free stretches). A step at N-k workers is worth (N-k)/N of a full
one: it trains that share of a full step's samples.

Predicted goodput: the continue engine of goodput_sim run to the same amount of work, fed with
the run's own parameters (workers, --min-np, mean step time per world size, the chaos schedule
by step, the mean time a replacement took to be ready) and phalanx's pause model with its
measured N=4 constants from goodput_params (detection per kind, re-form, join pause): not
with the pauses this run measured.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import soak_check
from .goodput_params import PhalanxParams
from .goodput_sim import ContinueModel, Fault, run_continue

SOAK_KIND = {"kill": "crash", "term": "crash", "cut": "crash", "stop": "stop",
             soak_check.RECOVERY_KIND: "crash"}
"""Soak fault -> phalanx pause kind. SIGTERM and a severed coordinator link end the worker's
process at once (as a crash); their MTTR is not benchmarked separately (an assumption)."""


@dataclass(kw_only=True, slots=True)
class SoakTrace:
    """The parts of one soak run the calibration uses."""

    np: int
    """Workers at full strength (`-np`)."""
    min_np: int
    """`--min-np`: below it the survivors wait for a replacement."""
    steps: list[tuple[int, float, int, int]] = field(default_factory=list)
    """(step, commit time = the slowest rank's log time, world size, generation), by step."""
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    """Per generation formed, the slowest rank's State.recoveries record."""
    faults: list[dict[str, Any]] = field(default_factory=list)
    """Injected faults in log order: kind (soak's), step (None for kill-in-recovery)."""

    def to_json(self) -> str:
        """Compact JSON: step intervals in microseconds, (step, n, generation) where they
        change, times relative to the first step."""
        s0, t0 = self.steps[0][0], self.steps[0][1]
        dt = [round(1e6 * (b[1] - a[1])) for a, b in zip(self.steps, self.steps[1:])]
        segs = [[s, n, g] for i, (s, _, n, g) in enumerate(self.steps)
                if i == 0 or (n, g) != self.steps[i - 1][2:]]
        recs = [{**r, "t": round(r["t"] - t0, 6)} for r in self.recoveries]
        return json.dumps({"np": self.np, "min_np": self.min_np, "first_step": s0,
                           "dt_us": dt, "segments": segs, "recoveries": recs,
                           "faults": self.faults}, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> SoakTrace:
        d = json.loads(text)
        times = [0.0, *itertools.accumulate(x / 1e6 for x in d["dt_us"])]
        segs = {s: (n, g) for s, n, g in d["segments"]}
        steps, ng = [], segs[d["first_step"]]
        for i, t in enumerate(times):
            s = d["first_step"] + i
            ng = segs.get(s, ng)
            steps.append((s, t, ng[0], ng[1]))
        return SoakTrace(np=d["np"], min_np=d["min_np"], steps=steps,
                         recoveries=d["recoveries"], faults=d["faults"])


# ---------------------------------------------------------------------- reading a run
def load_soak_dir(folder: str | Path, *, np: int | None = None, min_np: int = 2) -> SoakTrace:
    """A `phalanx bench soak --keep DIR` folder (DIR/soak/steps.*.jsonl and soak.log); `np`
    defaults to the largest world any step logged; `min_np` to the soak's fixed 2."""
    d = Path(folder) / "soak"
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is missing: give the folder `phalanx bench soak --keep "
                                f"DIR` wrote")
    per_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
    recs = []
    for p in sorted(d.glob("steps.*.jsonl")):
        for line in p.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if "s" in r:
                per_step[r["s"]].append(r)
            elif "r" in r:
                recs.append(r["r"])
    steps = [(s, max(r["t"] for r in rs), rs[0]["n"], rs[0]["g"])
             for s, rs in sorted(per_step.items())]
    worst: dict[int, dict[str, Any]] = {}
    for r in recs:
        g = int(r.get("generation", -1))
        if g not in worst or r["seconds"] > worst[g]["seconds"]:
            worst[g] = {k: r[k] for k in ("cause", "seconds", "old_size", "new_size",
                                          "generation", "survivors", "t") if k in r}
    injected = soak_check.parse_launcher_log((d / "soak.log").read_text(errors="replace"))
    faults = [{"kind": f["kind"], "step": f["step"]} for f in injected["injected"]]
    if not steps:
        raise ValueError(f"no step records in {d}")
    return SoakTrace(np=np or max(n for _, _, n, _ in steps), min_np=min_np, steps=steps,
                     recoveries=[worst[g] for g in sorted(worst)], faults=faults)


def run_soak(folder: Path, *, faults: int, seed: int, gap: tuple[int, int],
             degraded_sleep: float, timeout_s: float = 600.0) -> SoakTrace:
    """Run a small `phalanx bench soak` (no fault-free baseline) keeping its logs in `folder`
    (must not exist), and read it. `degraded_sleep` (seconds per missing worker per step)
    stands in for the missing workers' capacity: on this oversubscribed machine fewer workers
    would otherwise step faster, unlike accelerators."""
    cmd = [sys.executable, "-m", "phalanx.launch.cli", "bench", "soak", "--faults", str(faults),
           "--seed", str(seed), "--gap-steps", str(gap[0]), str(gap[1]), "--degraded-sleep",
           str(degraded_sleep), "--no-baseline", "--keep", str(folder), "--progress-every", "15"]
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)   # the soak stops its job on it
        out, _ = proc.communicate(timeout=60)
        raise RuntimeError(f"the calibration soak ran past {timeout_s:.0f}s:\n{out[-3000:]}")
    except BaseException:   # interrupted: stop the soak (and its job) before going
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        raise
    if proc.returncode != 0 or not (folder / "soak").is_dir():
        raise RuntimeError(f"the calibration soak failed (exit {proc.returncode}):\n"
                           f"{out[-3000:]}")
    return load_soak_dir(folder)


# ---------------------------------------------------------------------- measuring it
@dataclass(kw_only=True, slots=True)
class Measured:
    """What the soak run measured, and the run parameters the prediction is fed."""

    goodput: float
    """Committed work (full-strength seconds) / wall seconds."""
    wall_s: float
    """First to last committed step."""
    work_s: float
    """Sum over steps 2.. of (world size / N) x T_N."""
    step_s: dict[int, float]
    """Mean step interval per world size inside one generation (T_N at n = N)."""
    paused_s: float
    """Wall time of intervals that cross a generation change, less one step each: the
    pauses, joins and waits for a replacement."""
    replace_s: float
    """Mean seconds from a fault until its replacement was ready to join (the mean, since the
    time spent short of workers is linear in it)."""
    replace_all: list[float]
    """Every replacement delay paired (first lost, first replaced)."""


def _step_means(steps: list[tuple[int, float, int, int]]) -> dict[int, float]:
    gaps: dict[int, list[float]] = defaultdict(list)
    for (_, t0, n0, g0), (_, t1, n1, g1) in itertools.pairwise(steps):
        if g0 == g1 and n0 == n1:
            gaps[n1].append(t1 - t0)
    return {n: statistics.fmean(v) for n, v in gaps.items() if len(v) >= 3}


def _fault_times(tr: SoakTrace) -> list[float]:
    """Time of each injected fault: its step's commit time; a kill during a recovery takes
    the time of the step fault that started that recovery."""
    at = {s: t for s, t, _, _ in tr.steps}
    out, last = [], tr.steps[0][1]
    for f in tr.faults:
        if f["step"] is not None:
            last = at.get(f["step"], last)
        out.append(last)
    return out


def _replacement_delays(tr: SoakTrace) -> list[float]:
    """Pair each lost worker with the next replacement to join (first in, first out)."""
    ready = []
    for r in tr.recoveries:
        joined = r["new_size"] - len(r.get("survivors", ()))
        if joined > 0:
            # A plain join: its recovery began when the newcomer was ready. A lone survivor's
            # wait ends when the replacement arrives, right before its recovery ends.
            t = r["t"] - r["seconds"] if r["cause"] == "MembershipChanged" else r["t"]
            ready += [t] * joined
    lost = sorted(_fault_times(tr))
    return [max(0.0, r - f) for f, r in zip(lost, sorted(ready))]


def measure(tr: SoakTrace) -> Measured:
    """Measured goodput and the run parameters of a soak trace."""
    if len(tr.steps) < 10:
        raise ValueError(f"a soak trace needs at least 10 steps, got {len(tr.steps)}")
    means = _step_means(tr.steps)
    if tr.np not in means:
        raise ValueError("the soak trace has no fault-free stretch at full strength")
    t_full = means[tr.np]
    wall = tr.steps[-1][1] - tr.steps[0][1]
    work = sum(n / tr.np * t_full for _, _, n, _ in tr.steps[1:])
    paused = sum(t1 - t0 - means.get(n1, t_full)
                 for (_, t0, _, g0), (_, t1, n1, g1) in zip(tr.steps, tr.steps[1:]) if g0 != g1)
    delays = _replacement_delays(tr)
    # No replacement joined before the job ended: they took longer than the run (censored).
    replace = statistics.fmean(delays) if delays else wall + 1.0
    return Measured(goodput=work / wall, wall_s=wall, work_s=work, step_s=means,
                    paused_s=paused, replace_s=replace, replace_all=delays)


def predict(tr: SoakTrace, m: Measured, params: PhalanxParams | None = None,
            stats: dict[str, float] | None = None) -> tuple[float, float]:
    """(predicted goodput, predicted wall seconds) for the soak run `tr`; `stats` receives
    the predicted running and stopped seconds."""
    p = params or PhalanxParams()
    full = m.step_s[tr.np]
    faults = [Fault(kind=SOAK_KIND[f["kind"]], workers=1,
                    step=(f["step"] if f["step"] is not None else prev) - 1)
              for f, prev in zip(tr.faults, _previous_steps(tr))]
    model = ContinueModel(
        n=tr.np, pause=p.pause_s, replace_s=m.replace_s, min_workers=tr.min_np,
        join=lambda n: p.join_pause_s(n, 0.0, 1.0),
        step_time=lambda n: m.step_s.get(n, full))
    return run_continue(model, faults, target_progress=m.work_s, stats=stats)


def _previous_steps(tr: SoakTrace) -> list[int]:
    out, last = [], tr.steps[0][0]
    for f in tr.faults:
        if f["step"] is not None:
            last = f["step"]
        out.append(last)
    return out


def calibration(tr: SoakTrace, params: PhalanxParams | None = None) -> dict[str, Any]:
    """Measured vs predicted, with the run parameters used (for the report and the JSON)."""
    m = measure(tr)
    stats: dict[str, float] = {}
    pred, wall = predict(tr, m, params, stats)
    kinds: dict[str, int] = defaultdict(int)
    for f in tr.faults:
        kinds[f["kind"]] += 1
    return {"predicted": pred, "measured": m.goodput, "error_points": 100 * (pred - m.goodput),
            "wall_s": {"measured": m.wall_s, "predicted": wall},
            "stopped_s": {"measured": m.paused_s, "predicted": stats["stopped_s"]},
            "steps": len(tr.steps), "workers": tr.np,
            "min_workers": tr.min_np, "faults": dict(kinds),
            "step_s": {str(n): v for n, v in sorted(m.step_s.items())},
            "replace_s_mean": m.replace_s, "replace_s_all": m.replace_all}
