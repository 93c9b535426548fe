"""Each strategy of `phalanx bench goodput` as a model of goodput_sim, built from the inputs of
goodput_params; ETTR per (strategy, N) averaged over seeded traces; the sensitivity sweep.

  phalanx          survivors continue; pause = detection + re-form + data-plane bootstrap
                   (today's measured control plane, extrapolated) + the step in flight redone;
                   replacements join after `replace_s` at a step boundary (a new generation and
                   a heal of state_bytes over the link); training at N-k meanwhile.
  phalanx-target   the same with issue 22's control-plane targets (not measured).
  torchft          the replica group holding the fault drops out; detection by timeouts; one
                   step discarded; replacements heal without stalling the others.
  inprocess        restart in place on every rank, warm spares, roll back to the last in-memory
                   checkpoint (Young/Daly interval).
  ckpt-restart     whole-job restart (scheduler, startup, checkpoint load), roll back to the
                   last durable checkpoint (Young/Daly interval).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .goodput_params import (
    DAY,
    CheckpointRestartParams,
    Curve,
    FailureClass,
    FailureModel,
    InprocessParams,
    JobParams,
    PhalanxParams,
    TorchftParams,
    phalanx_target,
)
from .goodput_sim import (
    ContinueModel,
    Fault,
    RestartModel,
    daly_interval,
    make_trace,
    run_continue,
    run_restart,
)

STRATEGIES = ("phalanx", "phalanx-target", "torchft", "inprocess", "ckpt-restart")


@dataclass(kw_only=True, slots=True)
class Inputs:
    """Everything one simulation needs besides N and the seed."""

    failures: FailureModel = field(default_factory=FailureModel)
    """The failure process (cited rates and mix)."""
    job: JobParams = field(default_factory=JobParams)
    """The job (step time, state size, link, replacements, steady overhead)."""
    phalanx: PhalanxParams = field(default_factory=PhalanxParams)
    """phalanx as measured today."""
    target: PhalanxParams = field(default_factory=phalanx_target)
    """phalanx with issue 22's control plane."""
    torchft: TorchftParams = field(default_factory=TorchftParams)
    """torchft's documented defaults."""
    inprocess: InprocessParams = field(default_factory=InprocessParams)
    """NVIDIA resiliency extension's documented defaults."""
    ckpt: CheckpointRestartParams = field(default_factory=CheckpointRestartParams)
    """torchrun-style restart (measured small-N, cited large-N anchors)."""


def _phalanx(p: PhalanxParams, n: int, job: JobParams) -> ContinueModel:
    # Memoised: a trace asks for the same (kind, workers left) over and over.
    return ContinueModel(
        n=n, pause=functools.cache(p.pause_s), redo_s=job.step_s / 2, replace_s=job.replace_s,
        join=functools.cache(lambda a: p.join_pause_s(a, job.state_bytes, job.link_bytes_s)),
        overhead=job.steady_overhead, min_workers=p.min_workers)


def _torchft(p: TorchftParams, n: int, job: JobParams) -> ContinueModel:
    g = p.replica_gpus
    return ContinueModel(
        n=n, pause=lambda kind, _alive: p.detect_s[kind] + p.reconfigure_s,
        redo_s=p.steps_discarded * job.step_s, drop=lambda w: g * math.ceil(w / g),
        replace_s=job.replace_s, join=lambda _alive: p.reconfigure_s,
        overhead=job.steady_overhead)


def _mtbf(inp: Inputs, n: int) -> float:
    rate = inp.failures.rate_per_gpu_day * n / DAY
    return 1 / rate if rate > 0 else math.inf


def _inprocess(p: InprocessParams, n: int, inp: Inputs) -> RestartModel:
    restore = inp.job.state_bytes / inp.job.link_bytes_s   # a spare loads a peer's copy
    tau = daly_interval(p.checkpoint_s, _mtbf(inp, n))
    return RestartModel(restart=lambda kind: p.detect_s[kind] + p.restart_s + restore,
                        interval_s=min(tau, 30 * DAY), checkpoint_s=p.checkpoint_s)


def _ckpt(p: CheckpointRestartParams, n: int, inp: Inputs) -> RestartModel:
    base = p.restart_s(n)
    tau = daly_interval(p.checkpoint_s, _mtbf(inp, n))
    return RestartModel(
        restart=lambda kind: base + (p.hang_timeout_s if kind in ("hang", "cut") else 0.0),
        interval_s=min(tau, 30 * DAY), checkpoint_s=p.checkpoint_s)


def model(name: str, n: int, inp: Inputs) -> ContinueModel | RestartModel:
    """The simulation model of strategy `name` at `n` workers."""
    builders: dict[str, Callable[[], ContinueModel | RestartModel]] = {
        "phalanx": lambda: _phalanx(inp.phalanx, n, inp.job),
        "phalanx-target": lambda: _phalanx(inp.target, n, inp.job),
        "torchft": lambda: _torchft(inp.torchft, n, inp.job),
        "inprocess": lambda: _inprocess(inp.inprocess, n, inp),
        "ckpt-restart": lambda: _ckpt(inp.ckpt, n, inp)}
    if name not in builders:
        raise ValueError(f"strategy {name!r} is not one of {', '.join(STRATEGIES)}")
    return builders[name]()


Traces = dict[tuple[FailureModel, int, float, int], list[Fault]]
"""Traces already drawn, by (failure model, N, horizon, seed): pass one dict to every `ettr`
call of a run so that strategies and sensitivity variants share (and reuse) their traces."""


def ettr(name: str, n: int, inp: Inputs, *, days: float, seeds: int, seed: int = 0,
         traces: Traces | None = None) -> float:
    """Mean ETTR of strategy `name` over `seeds` traces (the same traces for every strategy)."""
    horizon = days * DAY
    m = model(name, n, inp)
    traces = {} if traces is None else traces
    vals = []
    for s in range(seed, seed + seeds):
        key = (inp.failures, n, horizon, s)
        if key not in traces:
            traces[key] = make_trace(inp.failures, n, horizon, s)
        trace = traces[key]
        if isinstance(m, ContinueModel):
            vals.append(run_continue(m, trace, horizon_s=horizon)[0])
        else:
            vals.append(run_restart(m, trace, horizon_s=horizon))
    return statistics.fmean(vals)


# ---------------------------------------------------------------------- sensitivity
def _scale_curve(c: Curve, f: float) -> Curve:
    return Curve(points=tuple((n, v * max(f, 1e-12)) for n, v in c.points), beyond=c.beyond)


def _ph(which: str, inp: Inputs, **changes: object) -> Inputs:
    return replace(inp, **{which: replace(getattr(inp, which), **changes)})


def _detect(which: str, kind: str) -> Callable[[Inputs, float], Inputs]:
    def apply(inp: Inputs, f: float) -> Inputs:
        p = getattr(inp, which)
        return _ph(which, inp, detect_s={**p.detect_s, kind: p.detect_s[kind] * f})
    return apply


def _job(name: str) -> Callable[[Inputs, float], Inputs]:
    return lambda inp, f: replace(inp, job=replace(inp.job, **{name: getattr(inp.job, name) * f}))


def knobs(which: str) -> list[tuple[str, Callable[[Inputs, float], Inputs]]]:
    """(label, apply(inputs, factor)) for each input of phalanx model `which` ('phalanx' or
    'target'), scaled by a factor (0 = the component costs nothing)."""
    return [
        ("data-plane bootstrap, O(N^2) (measured at 256)", lambda inp, f: _ph(
            which, inp, bootstrap_256_s=getattr(inp, which).bootstrap_256_s * f)),
        ("control-plane re-form vs N (measured 4/64/256)", lambda inp, f: _ph(
            which, inp, reform=_scale_curve(getattr(inp, which).reform, f))),
        ("crash detection 0.11 s (measured)", _detect(which, "crash")),
        ("host-crash detection 0.035 s (measured)", _detect(which, "host_crash")),
        ("cut: heartbeat timeout 3 s (configured)", _detect(which, "cut")),
        ("hang: collective timeout 30 s (configured)", _detect(which, "hang")),
        ("join pause 0.184 s at N=4 (measured)", lambda inp, f: _ph(
            which, inp, join_s=getattr(inp, which).join_s * f)),
        ("heal: 64 GB state over the link (assumed)", _job("state_bytes")),
        ("replacement ready after 600 s (assumed)", _job("replace_s")),
        ("step time 2 s: the step in flight redone (assumed)", _job("step_s")),
        ("steady overhead 0.7% (measured)", _job("steady_overhead")),
        ("failure rate (cited)", lambda inp, f: replace(inp, failures=replace(
            inp.failures, rate_per_gpu_day=inp.failures.rate_per_gpu_day * f))),
    ]


def sensitivity(which: str, n: int, inp: Inputs, *, days: float, seeds: int,
                seed: int = 0, factors: tuple[float, ...] = (0.0, 0.5, 2.0),
                traces: Traces | None = None) -> list[dict[str, object]]:
    """ETTR of phalanx model `which` at `n` with each input scaled by each factor, sorted by
    how much ETTR the input costs (ETTR with it free minus the baseline); the failure rate,
    not a phalanx component, comes last."""
    name = "phalanx" if which == "phalanx" else "phalanx-target"
    traces = {} if traces is None else traces
    base = ettr(name, n, inp, days=days, seeds=seeds, seed=seed, traces=traces)
    rows: list[dict[str, object]] = []
    for label, apply in knobs(which):
        vals = {str(f): ettr(name, n, apply(inp, f), days=days, seeds=seeds, seed=seed,
                             traces=traces) for f in factors}
        rows.append({"input": label, "baseline": base, "ettr": vals,
                     "cost_points": 100 * (vals[str(factors[0])] - base),
                     "environment": label.startswith("failure rate")})
    # phalanx's own components first, by what they cost; the environment last
    rows.sort(key=lambda r: (bool(r["environment"]), -float(r["cost_points"])))  # type: ignore[arg-type]
    return rows


def what_ifs(n: int, inp: Inputs, *, days: float, seeds: int, seed: int = 0,
             traces: Traces | None = None) -> list[dict[str, object]]:
    """ETTR of every strategy at `n` under alternatives to an assumed or cited input."""
    mix = (FailureClass(kind="hang", scope="gpu", count=268, causes="GPU hardware, as hangs"),
           FailureClass(kind="crash", scope="gpu", count=56, causes="software bug, dependency"),
           *inp.failures.mix[1:])
    cases = [
        ("as simulated", inp),
        ("GPU hardware faults hang, not crash",
         replace(inp, failures=replace(inp.failures, mix=mix))),
        ("stragglers 1e-4/GPU-day, 1.5x, 10 min (assumed)",
         replace(inp, failures=replace(inp.failures, straggler_rate_per_gpu_day=1e-4))),
        ("torchft charged FT-HSDP's 3 min a failure",
         replace(inp, torchft=replace(inp.torchft, reconfigure_s=180.0)))]
    return [{"case": label, "ettr": {s: ettr(s, n, i, days=days, seeds=seeds, seed=seed,
                                             traces=traces) for s in STRATEGIES}}
            for label, i in cases]
