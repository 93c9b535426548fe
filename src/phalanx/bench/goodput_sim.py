"""The pure event simulation behind `phalanx bench goodput`: one data-parallel job of N workers
under a failure trace, for each strategy; goodput as ETTR.

ETTR (effective training time ratio) = committed progress / wall-clock time, where progress is
counted in seconds of full-strength training: a second at N-k of N workers is worth (N-k)/N.

Two engines, both event-driven (a step is never simulated on its own):

  continue   the survivors keep training (phalanx, torchft-style). Each fault adds a pause to a
             queue (a fault during a pause waits for it), removes workers until a replacement
             arrives `replace_s` later, and each arrival adds a join pause. Faults come at
             times (Poisson traces) or at step numbers (a soak run's chaos schedule).
  restart    the whole job restarts (checkpoint-restart, in-process restart). Training resumes
             `restart(kind)` after a fault (a fault during a restart starts it again) from the
             last checkpoint; checkpoints cost `checkpoint_s` every `interval_s` of work. This
             is Daly's model, whose exact expectation `daly_ettr` the tests check.

Seeded traces (`make_trace`) are shared by every strategy (common random numbers).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .goodput_params import DAY, FailureModel

INF = math.inf


@dataclass(kw_only=True, slots=True, frozen=True)
class Fault:
    """One fault of a trace."""

    t: float = -1.0
    """Seconds since the start (timed faults); -1 for step-scheduled ones."""
    kind: str
    """A goodput_params.KINDS member, 'stop' (soak), or 'straggler' (a common-mode slowdown)."""
    workers: int = 1
    """Workers it takes out (0 for a straggler)."""
    step: int | None = None
    """Fires when the step counter reaches this (a soak run's `step=S` chaos rules)."""
    slow_s: float = 0.0
    """For a straggler: the progress it costs, in seconds of full-strength training."""


def make_trace(model: FailureModel, n: int, horizon_s: float, seed: int) -> list[Fault]:
    """Poisson faults for `n` workers over `horizon_s` (rate n x per-GPU rate), classes drawn
    by the mix's weights, plus straggler episodes; sorted by time."""
    rng = random.Random(seed)
    cum = list(itertools.accumulate(c.count for c in model.mix))
    lam = model.rate_per_gpu_day * n / DAY
    out: list[Fault] = []
    t = rng.expovariate(lam) if lam > 0 else INF
    while t < horizon_s:
        c = model.mix[bisect.bisect_right(cum, rng.random() * cum[-1])]
        out.append(Fault(t=t, kind=c.kind,
                         workers=1 if c.scope == "gpu" else min(n, model.gpus_per_host)))
        t += rng.expovariate(lam)
    lam_s = model.straggler_rate_per_gpu_day * n / DAY
    t = rng.expovariate(lam_s) if lam_s > 0 else INF
    cost = model.straggler_s * (1 - 1 / model.straggler_slowdown)
    while t < horizon_s:
        out.append(Fault(t=t, kind="straggler", workers=0, slow_s=cost))
        t += rng.expovariate(lam_s)
    out.sort(key=lambda f: f.t)
    return out


# ---------------------------------------------------------------------- the continue engine
@dataclass(kw_only=True, slots=True)
class ContinueModel:
    """What a survivors-continue strategy does about each fault."""

    n: int
    """Workers at full strength."""
    pause: Callable[[str, int], float]
    """(kind, workers left) -> seconds every survivor stops."""
    redo_s: float = 0.0
    """Work lost per timed fault (the step in flight), seconds; step-scheduled faults land on
    a step boundary and lose none."""
    drop: Callable[[int], int] = lambda w: w
    """Workers hit -> workers that drop out (a replica group rounds up)."""
    replace_s: float = 600.0
    """Seconds from a fault until its replacements are ready to join."""
    join: Callable[[int], float] = lambda n: 0.0
    """(workers after the join) -> seconds the job stops to admit replacements."""
    overhead: float = 0.0
    """Fraction of fault-free throughput lost at every step."""
    min_workers: int = 1
    """Below this many workers the job waits for a replacement."""
    step_time: Callable[[int], float] = lambda n: 1.0
    """(workers) -> seconds per step; ETTR uses its ratio to step_time(n)."""


@dataclass(kw_only=True, slots=True)
class _Run:
    alive: int
    t: float = 0.0
    busy_until: float = 0.0
    progress: float = 0.0
    steps: float = 0.0
    returns: list[tuple[float, int]] = field(default_factory=list)
    running_s: float = 0.0


def _advance(st: _Run, m: ContinueModel, *, until_t: float = INF, until_step: float = INF,
             until_progress: float = INF) -> None:
    """Move time forward until the first of the three limits (or forever stuck: until_t)."""
    full = m.step_time(m.n)
    while True:
        if st.steps >= until_step - 1e-9 or st.progress >= until_progress - 1e-12:
            return   # e.g. a second fault at the same step fires at once, even mid-pause
        if st.returns and st.returns[0][0] <= st.t:
            _, w = heapq.heappop(st.returns)
            st.alive += w
            start = max(st.busy_until, st.t)
            st.busy_until = start + m.join(st.alive)
            continue
        nxt = st.returns[0][0] if st.returns else INF
        if st.t < st.busy_until or st.alive < m.min_workers:
            stop = min(st.busy_until if st.alive >= m.min_workers else nxt, nxt, until_t)
            if stop == INF:
                raise RuntimeError("the job can never resume: no replacement is coming")
            st.t = stop
            if stop == until_t:
                return
            continue
        tstep = m.step_time(st.alive)
        srate = (1 - m.overhead) / tstep
        prate = (st.alive / m.n) * (full / tstep) * (1 - m.overhead)
        dt = min(until_t - st.t, nxt - st.t, (until_step - st.steps) / srate,
                 (until_progress - st.progress) / prate)
        st.t += dt
        st.running_s += dt
        st.steps += srate * dt
        st.progress += prate * dt
        if st.t >= until_t or st.steps >= until_step - 1e-9 or \
                st.progress >= until_progress - 1e-12:
            return


def _fault(st: _Run, m: ContinueModel, f: Fault) -> None:
    start = max(st.busy_until, st.t)
    if f.kind == "straggler":
        st.busy_until = start + f.slow_s
        return
    out = min(m.drop(f.workers), st.alive)
    st.alive -= out
    heapq.heappush(st.returns, (st.t + m.replace_s, out))
    p = m.pause(f.kind, max(st.alive, 1)) + (m.redo_s if f.step is None else 0.0)
    st.busy_until = start + p


def run_continue(m: ContinueModel, faults: Sequence[Fault], *, horizon_s: float | None = None,
                 target_progress: float | None = None,
                 stats: dict[str, float] | None = None) -> tuple[float, float]:
    """(ETTR, wall seconds) until `horizon_s`, or until `target_progress` seconds of
    full-strength work are done (then ETTR = target / wall). `stats`, if given, receives
    'running_s' and 'stopped_s' (pauses, joins and waits for replacements)."""
    if (horizon_s is None) == (target_progress is None):
        raise ValueError("give exactly one of horizon_s and target_progress")
    end_t = INF if horizon_s is None else horizon_s
    end_p = INF if target_progress is None else target_progress
    st = _Run(alive=m.n)
    for f in faults:
        if f.step is None:
            _advance(st, m, until_t=min(f.t, end_t), until_progress=end_p)
        else:
            _advance(st, m, until_t=end_t, until_step=f.step, until_progress=end_p)
        if st.t >= end_t or st.progress >= end_p - 1e-12:
            break
        _fault(st, m, f)
    if st.t < end_t and st.progress < end_p - 1e-12:
        _advance(st, m, until_t=end_t, until_progress=end_p)
    if stats is not None:
        stats.update(running_s=st.running_s, stopped_s=st.t - st.running_s)
    return st.progress / st.t if st.t > 0 else 1.0, st.t


# ---------------------------------------------------------------------- the restart engine
@dataclass(kw_only=True, slots=True)
class RestartModel:
    """What a whole-job-restart strategy does about each fault."""

    restart: Callable[[str], float]
    """kind -> seconds from the fault until training resumes (detection + restart + load)."""
    interval_s: float
    """Work between two checkpoints, seconds (Young/Daly: `daly_interval`)."""
    checkpoint_s: float
    """Wall seconds one checkpoint blocks training."""
    overhead: float = 0.0
    """Fraction of fault-free throughput lost at every step."""


def _cycles(m: RestartModel, run_s: float, *, tail: bool) -> float:
    """Committed work in `run_s` seconds of training from a fresh start: whole checkpoint
    cycles only, or also the unfinished last interval when the run simply ends (`tail`)."""
    cycle = m.interval_s / (1 - m.overhead) + m.checkpoint_s
    k = math.floor(run_s / cycle)
    work = k * m.interval_s
    if tail:
        work += min(m.interval_s, (run_s - k * cycle) * (1 - m.overhead))
    return work


def run_restart(m: RestartModel, faults: Sequence[Fault], *, horizon_s: float) -> float:
    """ETTR of a restart strategy over `horizon_s`."""
    up, work = 0.0, 0.0
    for f in faults:
        if f.t >= horizon_s:
            break
        if f.kind == "straggler":
            if f.t >= up:
                up += f.slow_s   # the job simply trains slower for a while: a delay
            continue
        if f.t >= up:
            work += _cycles(m, f.t - up, tail=False)
            up = f.t + m.restart(f.kind)
        else:
            up = f.t + m.restart(f.kind)   # a fault during the restart starts it again
    if horizon_s > up:
        work += _cycles(m, horizon_s - up, tail=True)
    return work / horizon_s


def daly_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum checkpoint interval (J. T. Daly, "A higher order estimate
    of the optimum checkpoint interval for restart dumps", FGCS 22(3), 2006); Young's
    sqrt(2 delta M) is its first term."""
    d, m = checkpoint_s, mtbf_s
    if d >= 2 * m:
        return m
    x = d / (2 * m)
    return math.sqrt(2 * d * m) * (1 + math.sqrt(x) / 3 + x / 9) - d


def daly_ettr(*, interval_s: float, checkpoint_s: float, restart_s: float,
              mtbf_s: float) -> float:
    """The exact expected ETTR of the restart model under Poisson faults (Daly 2006, eq. 13):
    each interval of work plus its checkpoint needs an uninterrupted stretch, and a restart
    hit by a fault starts again: wall per interval = M e^(R/M) (e^((tau+delta)/M) - 1)."""
    m = mtbf_s
    wall = m * math.exp(restart_s / m) * math.expm1((interval_s + checkpoint_s) / m)
    return interval_s / wall
