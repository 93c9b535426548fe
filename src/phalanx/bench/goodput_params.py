"""The inputs of `phalanx bench goodput`: cited failure rates, the peers' documented parameters,
and phalanx's own measurements with the rule that extrapolates them in N.

Every number here is one of three things, and says which in its docstring:

  measured   measured on this project's machine by a phalanx benchmark (the command and the
             BENCHMARKS.md section are named);
  cited      published by someone else (the source is named);
  assumed    neither: a stated choice, shown in the sensitivity table so its weight is visible.

The extrapolation rule for a term measured at a few N (`Curve`): piecewise linear in log-log
through the measured points; beyond the largest measured N, either the slope of the last
segment continues (`power`, the measured trend) or the value grows with log N (`log`).
Nothing here runs at import; the functions are pure.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DAY = 86400.0

# ---------------------------------------------------------------------- failure processes
LLAMA3_RATE = 419 / (54 * 16384)
"""cited: Llama 3 405B pre-training saw 419 unexpected interruptions in 54 days on 16,384 H100s
(Llama Team, "The Llama 3 Herd of Models", arXiv:2407.21783, section 3.3.4 and Table 5):
4.74e-4 interruptions per GPU-day."""
ANT_RATE = 0.08 / 30
"""cited (as quoted in issue 23): Ant Group reports about 8% of GPUs failing per month,
2.7e-3 per GPU-day, 5.6x Llama 3's rate."""
RATES = {"llama3": LLAMA3_RATE, "ant": ANT_RATE}
KINDS = ("crash", "hang", "host_crash", "cut")
"""crash: one worker's process dies; hang: one worker stops progressing while its process (and
heartbeat thread) live on; host_crash: a host's workers all die; cut: a host's (or one GPU's
NIC's) network is cut while the processes live on."""


@dataclass(kw_only=True, slots=True, frozen=True)
class FailureClass:
    """One row of the failure mix: a kind of symptom, its blast radius and its share."""

    kind: str
    """One of KINDS."""
    scope: str
    """'gpu' (one worker lost) or 'host' (every worker of the host lost)."""
    count: int
    """Llama 3's interruptions of this class in 54 days (Table 5), i.e. its weight."""
    causes: str
    """The Table 5 rows read as this class (our reading: the table gives causes, not symptoms)."""


LLAMA3_MIX = (
    FailureClass(kind="crash", scope="gpu", count=324,
                 causes="faulty GPU 148, GPU HBM3 72, GPU SRAM 19, GPU system processor 17, "
                        "silent data corruption 6, GPU thermal 6, software bug 54, dependency 2"),
    FailureClass(kind="hang", scope="gpu", count=7, causes="NCCL watchdog timeouts 7"),
    FailureClass(kind="host_crash", scope="host", count=46,
                 causes="host maintenance 32, SSD 3, power supply 3, chassis 2, "
                        "IO expansion board 2, CPU 2, system memory 2"),
    FailureClass(kind="cut", scope="host", count=35, causes="network switch/cable 35"),
    FailureClass(kind="cut", scope="gpu", count=7, causes="NIC 7 (one NIC per GPU)"),
)
"""cited: Llama 3 Table 5 (419 interruptions, about 78% hardware), mapped to symptoms by us."""


@dataclass(kw_only=True, slots=True, frozen=True)
class FailureModel:
    """The failure process of one job: Poisson arrivals, total rate = N x per-GPU rate."""

    rate_per_gpu_day: float = LLAMA3_RATE
    """Interruptions per GPU-day, all classes together (cited: see RATES)."""
    mix: tuple[FailureClass, ...] = LLAMA3_MIX
    """Which class each interruption is, in proportion to `count` (cited: Llama 3 Table 5)."""
    gpus_per_host: int = 8
    """Workers lost with a host (cited: 8 H100s per server in Llama 3's cluster)."""
    straggler_rate_per_gpu_day: float = 0.0
    """Slow-worker episodes per GPU-day (assumed; 0 by default: no published per-GPU rate is
    used). A straggler slows a synchronous job for every strategy alike."""
    straggler_slowdown: float = 1.5
    """Step-time factor while a straggler lasts (assumed)."""
    straggler_s: float = 600.0
    """Length of one straggler episode, seconds (assumed)."""

    def __post_init__(self) -> None:
        if self.rate_per_gpu_day < 0 or self.gpus_per_host < 1:
            raise ValueError(f"rate_per_gpu_day must be >= 0 and gpus_per_host >= 1, got "
                             f"{self.rate_per_gpu_day}, {self.gpus_per_host}")
        if self.straggler_slowdown < 1 or self.straggler_rate_per_gpu_day < 0:
            raise ValueError("straggler_slowdown must be >= 1 and the straggler rate >= 0")


# ---------------------------------------------------------------------- extrapolation
@dataclass(kw_only=True, slots=True, frozen=True)
class Curve:
    """A cost measured at a few N, and the rule that gives it at any N."""

    points: tuple[tuple[float, float], ...]
    """(N, seconds) pairs, N increasing; at least one."""
    beyond: str = "power"
    """Past the largest N: 'power' (the last segment's log-log slope continues) or 'log'
    (value x ln N / ln N_last)."""

    def __post_init__(self) -> None:
        ns = [n for n, _ in self.points]
        if not ns or ns != sorted(ns) or any(n <= 1 or v <= 0 for n, v in self.points):
            raise ValueError(f"Curve points must be (N > 1, seconds > 0) with N increasing, "
                             f"got {self.points}")
        if self.beyond not in ("power", "log"):
            raise ValueError(f"Curve beyond must be 'power' or 'log', got {self.beyond!r}")

    def __call__(self, n: float) -> float:
        pts = self.points
        if len(pts) == 1 or n <= pts[0][0]:
            (n0, v0), (n1, v1) = pts[0], pts[min(1, len(pts) - 1)]
            return v0 if n1 == n0 else v0 * (n / n0) ** _slope(n0, v0, n1, v1)
        for (n0, v0), (n1, v1) in itertools.pairwise(pts):
            if n <= n1:
                return v0 * (n / n0) ** _slope(n0, v0, n1, v1)
        (n0, v0), (n1, v1) = pts[-2], pts[-1]
        if self.beyond == "log":
            return v1 * math.log(n) / math.log(n1)
        return v1 * (n / n1) ** _slope(n0, v0, n1, v1)


def _slope(n0: float, v0: float, n1: float, v1: float) -> float:
    return math.log(v1 / v0) / math.log(n1 / n0)


def log_interp(n: float, small: tuple[float, float], large: tuple[float, float]) -> float:
    """Linear in ln N between a small-N anchor and a large-N anchor (clamped outside)."""
    (n0, v0), (n1, v1) = small, large
    x = min(1.0, max(0.0, math.log(n / n0) / math.log(n1 / n0)))
    return v0 + x * (v1 - v0)


# ---------------------------------------------------------------------- the job itself
@dataclass(kw_only=True, slots=True)
class JobParams:
    """What the simulated job is, independent of the strategy."""

    step_s: float = 2.0
    """Seconds per training step at full strength (assumed; enters as the partial step redone
    per fault and torchft's discarded step)."""
    state_bytes: float = 64e9
    """Model + optimizer state per worker (assumed: a 4B-parameter model in mixed-precision
    Adam, 16 bytes a parameter, the largest full replica an 80 GB GPU holds with activations)."""
    link_bytes_s: float = 50e9
    """Per-GPU network link (cited: 400 Gbit/s RoCE/InfiniBand per GPU in Llama 3's cluster)."""
    replace_s: float = 600.0
    """Seconds from a loss until a replacement (a hot spare) can join (assumed)."""
    steady_overhead: float = 0.007
    """Fraction of fault-free throughput a per-step membership agreement costs (measured:
    `phalanx bench recovery --np 2 --skip phalanx,torchrun --repeat 5 --throughput-steps
    1000`, +0.7% by the median, within the run-to-run noise; BENCHMARKS.md, 2026-11-26)."""


# ---------------------------------------------------------------------- phalanx
CONTROL_PLANE_TODAY = Curve(points=((4, 0.033), (64, 0.47), (256, 1.525)), beyond="power")
"""measured: seconds to re-form among the survivors after a loss. N=4: the soak's median
'lost' recovery (`phalanx bench soak`, 78 recoveries, 2026-11-25; re-form + process group +
heal). N=64 and N=256: 're-form among N-1' of the control-plane load generator (simulated
workers speaking the real protocol against the launcher's coordinator; issue 22's table,
midpoints of 0.41-0.53 s and 1.4-1.65 s; measured from the loss, so it holds the fan-out).
At 512 it never completed (3 of 3): past 256 the curve is what today's code would cost if it
did not collapse, an optimistic reading."""
BOOTSTRAP_AT_256_S = 120.0
"""measured: Gloo's data-plane bootstrap through the coordinator store at 256 workers, about
2 minutes of store traffic per generation (issue 22's table). Its code costs 1 + 3N
authenticated round trips per rank, so the rule is O(N^2), anchored at 0 for N=4 (where the
re-form measurement already contains it)."""
CONTROL_PLANE_TARGET = Curve(points=((4, 0.033), (10000, 2.0)), beyond="log")
"""assumed (a target, not a measurement): issue 22's goal of a new generation formed < 2 s
after a loss at 10,000 workers, data-plane bootstrap included (an address book per group);
past 10,000 it grows with log N."""


@dataclass(kw_only=True, slots=True)
class PhalanxParams:
    """phalanx: survivors continue; pause = detection + re-form + bootstrap (+ the step in
    flight redone); replacements join at a step boundary and heal from a peer."""

    detect_s: dict[str, float] = field(default_factory=lambda: {
        "crash": 0.110, "host_crash": 0.035, "hang": 30.0, "cut": 3.0, "stop": 0.30})
    """Seconds from the fault until the survivors start re-forming. crash (measured): SIGKILL
    MTTR 0.143 s (`phalanx bench recovery --skip torchrun,throughput --faults 6`, median of
    the 2026-11-26 runs) less the 0.033 s re-form; host_crash (measured): host crash MTTR
    0.068 s (`python3 tests/bench_host_loss.py --repeat 3`) less 0.033 s; cut (configured and
    measured): the heartbeat timeout, 3 s by default (the host-cut MTTR was 1.031 s with
    --heartbeat-timeout 1); hang (configured): a live but stuck worker is found by the
    collective timeout (`--timeout`, 30 s by default; not benchmarked); stop (measured):
    SIGSTOP MTTR 0.33 s less the re-form, the 0.3 s fence of a stopped process (soak only)."""
    reform: Curve = CONTROL_PLANE_TODAY
    """Re-form seconds vs N (see CONTROL_PLANE_TODAY / CONTROL_PLANE_TARGET)."""
    bootstrap_256_s: float = BOOTSTRAP_AT_256_S
    """Data-plane bootstrap at 256 workers, extrapolated as O(N^2); 0 when folded into
    `reform` (the target)."""
    join_s: float = 0.184
    """Survivors' pause while a replacement is admitted and healed at N=4 (measured: the join
    pause of `phalanx bench recovery --skip torchrun,throughput --faults 6`, 2026-11-26)."""
    link_efficiency: float = 0.81
    """Share of the link a heal reaches (measured: the hierarchical allreduce at 64 MB reached
    81% of a shaped 2 Gbit/s link; `tests/simhosts_run.py ... phalanx bench allreduce -H`)."""
    min_workers: int = 1
    """Fewest workers the job trains with (`--min-np`); below it the survivors wait for a
    replacement."""

    def recover_s(self, n: int) -> float:
        """Seconds to re-form among `n` workers and build their process group."""
        boot = self.bootstrap_256_s * max(0.0, (n * n - 16) / (256 * 256 - 16))
        return self.reform(n) + boot

    def pause_s(self, kind: str, n: int) -> float:
        """Survivors' pause for one fault of `kind` in a job of `n` workers (no step redo)."""
        return self.detect_s[kind] + self.recover_s(n)

    def join_pause_s(self, n: int, state_bytes: float, link_bytes_s: float) -> float:
        """Survivors' pause when replacements join: a new generation and one heal."""
        heal = state_bytes / (self.link_efficiency * link_bytes_s) if state_bytes else 0.0
        return self.join_s + self.recover_s(n) - self.reform(4) + heal


def phalanx_target() -> PhalanxParams:
    """phalanx with issue 22's control plane (a target, not a measurement)."""
    return PhalanxParams(reform=CONTROL_PLANE_TARGET, bootstrap_256_s=0.0)


def control_plane_from_json(path: str | Path) -> Curve:
    """The re-form curve from `phalanx bench control-plane --json FILE` rows (`workers`,
    `reform_s`; rows whose re-form never completed are skipped), with N=4 kept."""
    rows = json.loads(Path(path).read_text())["rows"]
    pts = {4: 0.033}
    for r in rows:
        if r.get("reform_s"):
            pts[int(r["workers"])] = float(r["reform_s"])
    return Curve(points=tuple(sorted(pts.items())), beyond="power")


# ---------------------------------------------------------------------- the peers
@dataclass(kw_only=True, slots=True)
class TorchftParams:
    """torchft-style: the failed replica group drops out; one step is discarded; the survivors
    find out by timeouts (its documented defaults)."""

    detect_s: dict[str, float] = field(default_factory=lambda: {
        "crash": 5.0, "host_crash": 5.0, "hang": 60.0, "cut": 60.0})
    """cited: the Lighthouse drops a replica after `heartbeat_timeout_ms` = 5000 (torchft
    src/lighthouse.rs); a live but stuck or cut-off peer surfaces at the Manager's `timeout`,
    60 s by default (torchft/manager.py)."""
    steps_discarded: float = 1.0
    """cited: a failed step's gradients are discarded (`should_commit` false) and redone."""
    reconfigure_s: float = 0.1
    """cited: one quorum tick (`quorum_tick_ms` = 100); the new process group's setup at N is
    not charged (optimistic: Meta's FT-HSDP reports 3 min per failure at O(100K) GPUs)."""
    replica_gpus: int = 8
    """Workers in one replica group, the unit that drops out (assumed: one host, HSDP)."""


@dataclass(kw_only=True, slots=True)
class InprocessParams:
    """NVIDIA resiliency extension style: every rank restarts in place within seconds, warm
    spares replace lost ranks, the job rolls back to its last in-memory checkpoint."""

    detect_s: dict[str, float] = field(default_factory=lambda: {
        "crash": 1.0, "host_crash": 30.0, "hang": 60.0, "cut": 30.0})
    """cited (nvidia-resiliency-ext inprocess Wrapper defaults): a raised fault is seen within
    one 1 s monitor interval; a missing rank at `heartbeat_timeout` = 30 s; a hang at
    `soft_timeout` = 60 s."""
    restart_s: float = 10.0
    """Seconds to restart the wrapped function in place on every rank (assumed: 'seconds';
    NCCL re-initialisation at N is not charged)."""
    checkpoint_s: float = 2.6
    """Blocking cost of one in-memory checkpoint (assumed: 64 GB state copied to host memory
    at 25 GB/s)."""


@dataclass(kw_only=True, slots=True)
class CheckpointRestartParams:
    """torchrun-style: any failure stops the whole job; it restarts from the last durable
    checkpoint, written every Young/Daly-optimal interval."""

    restart_small: tuple[float, float] = (4, 12.4)
    """measured: torchrun restart at 4 workers, 12.4 s from SIGKILL to the first step after
    the restart (`phalanx bench recovery --np 4 --faults 3 --torchrun-faults 2 ...`,
    2026-11-26)."""
    restart_large: tuple[float, float] = (100000, 600.0)
    """cited: 10 minutes of stall per failure for synchronous training at O(100K) GPUs
    (Salpekar et al., "Training LLMs with Fault Tolerant HSDP on 100,000 GPUs",
    arXiv:2602.00277). Between the two anchors the restart grows linearly in ln N."""
    hang_timeout_s: float = 600.0
    """cited: a hang or cut surfaces at the NCCL process-group timeout, 10 min by default in
    torch.distributed."""
    checkpoint_s: float = 10.0
    """Blocking cost of one durable checkpoint (assumed; asynchronous checkpointing)."""

    def restart_s(self, n: int) -> float:
        return log_interp(n, self.restart_small, self.restart_large)


def with_changes(obj: Any, **changes: Any) -> Any:
    """dataclasses.replace, re-exported so the sensitivity sweep needs one import."""
    return replace(obj, **changes)
