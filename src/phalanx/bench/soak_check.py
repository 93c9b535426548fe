"""The pure half of `phalanx bench soak`: the chaos spec, and the checks of a finished soak job.

Nothing here starts processes; every function takes plain records (the workers' JSON step logs
as written by `soak_worker.py`, the launcher's output text, /proc samples), so the checks are
unit-tested on made-up logs. The verdicts:

  committed steps lost  step records (step, history hash) that are not on the final history:
                        the job committed them and later trained past them as if they never
                        happened (a rollback or a silent reset)
  unlogged steps        steps of the final history that no worker logged (the chain of
                        history hashes breaks): the sample checks are then inconclusive
  steps backwards       a worker logging a step not above its previous one, or a generation
                        logging a step not above every step of the generations before it
  samples missing/dup   per epoch of the final history, training samples never committed or
                        committed more than once (exactly-once)
"""

from __future__ import annotations

import itertools
import random
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

STEP_KINDS = ("kill", "stop", "cut", "term")
"""Faults fired at a step boundary by `--chaos KIND:random,seed=N,step=S` rules."""
RECOVERY_KIND = "kill-in-recovery"
"""SIGKILL fired in the middle of a recovery by `kill:rank=R,recovery=K` rules."""
KINDS = (*STEP_KINDS, RECOVERY_KIND)
RECOVERY_RANKS = (1, 2)
"""Ranks hit during recoveries. Never rank 0: the oldest survivor, at times the only holder of
the newest training state (killing it then loses the job's progress by design, not by a bug).
Rank 3 would rarely fire: it is mostly a replacement that has not been through a recovery."""


# ---------------------------------------------------------------------- the chaos spec
def make_spec(faults: int, *, seed: int, gap: tuple[int, int], warmup: int,
              recovery_share: float = 0.1) -> tuple[str, dict[str, Any]]:
    """A `--chaos` spec for at least `faults` faults, and what it plans: (spec, plan).

    `faults` step rules: kill, stop, cut and term in turn (shuffled), each at its own step,
    `gap` steps apart after `warmup` steps, on a random rank; they all fire if the job runs
    past the last one. On top, `recovery_share` of that many `kill:rank=R,recovery=K` rules,
    R in RECOVERY_RANKS and K = 1, 2, ...: each process counts its own recoveries (a
    replacement starts from 0) and each rule fires once per job, so only those whose rank
    holds a process that lives to its K-th recovery fire.
    """
    rng = random.Random(seed)
    n_rec = max(1, round(faults * recovery_share))
    kinds = [STEP_KINDS[i % len(STEP_KINDS)] for i in range(faults)]
    rng.shuffle(kinds)
    rules: list[str] = []
    step = warmup
    for kind in kinds:
        step += rng.randint(*gap)
        rules.append(f"{kind}:random,seed={rng.randrange(1 << 20)},step={step}")
    pairs = [(r, k) for k in range(1, n_rec + 1) for r in RECOVERY_RANKS][:n_rec]
    rules += [f"kill:rank={r},recovery={k}" for r, k in pairs]
    planned = Counter(kinds)
    plan = {"rules": len(rules), "last_step": step,
            "planned": {**{k: planned[k] for k in STEP_KINDS}, RECOVERY_KIND: n_rec}}
    return ";".join(rules), plan


# ---------------------------------------------------------------------- the launcher's log
_CHAOS = re.compile(r"\[chaos\] (?:sending (SIG\w+) to|cutting) rank (\d+) "
                    r"\((?:worker \S+, )?pid (\d+)\) "
                    r"(?:at step (\d+)|during recovery (\d+))")
_SIGNAL_KIND = {"SIGKILL": "kill", "SIGSTOP": "stop", "SIGTERM": "term"}
_EXIT = re.compile(r"\[phalanx\] rank \d+ \(worker (\S+), pid (\d+)\) (.*?); "
                   r"(respawning it|continuing without it)")


def parse_launcher_log(text: str) -> dict[str, Any]:
    """Faults injected (from the workers' '[chaos] ...' lines) and what the launcher did about
    each: respawned, continued without, fenced; plus losses no chaos rule caused."""
    injected: list[dict[str, Any]] = []
    for m in _CHAOS.finditer(text):
        sig, rank, pid, step, rec = m.groups()
        kind = RECOVERY_KIND if rec is not None else (_SIGNAL_KIND[sig] if sig else "cut")
        injected.append({"kind": kind, "rank": int(rank), "pid": int(pid),
                         "step": int(step) if step else None,
                         "recovery": int(rec) if rec else None})
    exits = {int(m.group(2)): {"worker": m.group(1), "how": m.group(3), "then": m.group(4)}
             for m in _EXIT.finditer(text)}
    chaos_pids = {f["pid"] for f in injected}
    for f in injected:
        e = exits.get(f["pid"])
        f["exit"] = e["how"] if e else None
        f["replaced"] = bool(e and e["then"] == "respawning it")
    return {"injected": injected,
            "respawns": len(re.findall(r"; respawning it \(", text)),
            "continued_without": len(re.findall(r"; continuing without it", text)),
            "fenced": len(re.findall(r"\[phalanx\] fencing worker ", text)),
            "unplanned": [f"{e['worker']} (pid {pid}) {e['how']}" for pid, e in exits.items()
                          if pid not in chaos_pids],
            "unfired_rules": re.findall(r"chaos rule '([^']*)' never fired", text),
            "finished": "[phalanx] job finished in" in text,
            "failure": next(iter(re.findall(r"\[phalanx\] job failed: (.*)", text)), None)}


def fault_table(injected: Sequence[Mapping[str, Any]],
                planned: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Per kind: planned rules, faults injected, and victims the launcher replaced."""
    rows = {k: {"planned": planned.get(k, 0), "injected": 0, "replaced": 0} for k in KINDS}
    for f in injected:
        row = rows.setdefault(f["kind"], {"planned": 0, "injected": 0, "replaced": 0})
        row["injected"] += 1
        row["replaced"] += int(bool(f.get("replaced")))
    rows["total"] = {c: sum(r[c] for r in rows.values()) for c in ("planned", "injected",
                                                                     "replaced")}
    return rows


# ---------------------------------------------------------------------- the step logs
def check_history(records: Mapping[str, Sequence[Mapping[str, Any]]],
                  final_hashes: Iterable[str], num_samples: int) -> dict[str, Any]:
    """Committed steps lost, steps backwards and exactly-once, from the step logs.

    `records[worker]` are the worker's step lines (s, e, g, h, hp, p); `final_hashes` the
    history hashes the finishing workers ended with (they must agree).
    """
    steps = [r for rs in records.values() for r in rs if "s" in r]
    by_hash: dict[str, Mapping[str, Any]] = {}
    for r in steps:
        by_hash.setdefault(r["h"], r)
    finals = sorted(set(final_hashes))
    out: dict[str, Any] = {"final_hashes_agree": len(finals) == 1, "records": len(steps)}
    chain: list[Mapping[str, Any]] = []
    unlogged = 0
    h = finals[0] if finals else ""
    while h:
        rec = by_hash.get(h)
        if rec is None:
            unlogged = 1   # at least one; nothing links past it
            break
        if chain and rec["s"] != chain[-1]["s"] - 1:
            break
        chain.append(rec)
        h = rec["hp"]
    chain.reverse()
    top = chain[-1]["s"] if chain else 0
    if chain and chain[0]["s"] != 1:
        unlogged = max(unlogged, chain[0]["s"] - 1)
    on_chain = {r["h"] for r in chain}
    lost = sorted({(r["s"], r["h"]) for r in steps if r["h"] not in on_chain})
    out.update({"final_step": top, "distinct_committed_steps": len({r["s"] for r in steps}),
                "history_steps": len(chain), "unlogged_steps": unlogged,
                "committed_steps_lost": len(lost),
                "lost_examples": [f"step {s} ({h})" for s, h in lost[:5]]})
    out["backwards"] = _backwards(records)
    out.update(_exactly_once(chain, num_samples))
    return out


def _backwards(records: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """Places where the step counter went backwards: within a worker's log, or from one
    generation to a later one."""
    bad = []
    for w, rs in records.items():
        ss = [r["s"] for r in rs if "s" in r]
        bad += [f"worker {w}: step {a} then {b}" for a, b in itertools.pairwise(ss)
                if b <= a]
    hi_before = 0
    per_gen: dict[int, list[int]] = {}
    for rs in records.values():
        for r in rs:
            if "s" in r:
                per_gen.setdefault(r["g"], []).append(r["s"])
    for g in sorted(per_gen):
        lo, hi = min(per_gen[g]), max(per_gen[g])
        if lo <= hi_before:
            bad.append(f"generation {g} logged step {lo} after step {hi_before} was committed")
        hi_before = max(hi_before, hi)
    return bad


def _exactly_once(chain: Sequence[Mapping[str, Any]], num_samples: int) -> dict[str, Any]:
    epochs: dict[int, Counter[int]] = {}
    for r in chain:
        c = epochs.setdefault(r["e"], Counter())
        c.update(i for part in r["p"] for i in part)
    per_epoch = {}
    for e, c in sorted(epochs.items()):
        missing = sum(1 for i in range(num_samples) if i not in c)
        dup = sum(n - 1 for n in c.values() if n > 1)
        per_epoch[e] = {"missing": missing, "duplicated": dup,
                        "foreign": sum(1 for i in c if not 0 <= i < num_samples)}
    return {"epochs": sorted(epochs), "per_epoch": per_epoch,
            "samples_missing": sum(v["missing"] for v in per_epoch.values()),
            "samples_duplicated": sum(v["duplicated"] for v in per_epoch.values())}


# ---------------------------------------------------------------------- recoveries, resources
def recovery_stats(recoveries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Seconds to recover per generation formed (the slowest rank's `seconds`), by kind:

    lost          a worker was lost; the survivors re-formed on their own
    lost+joined   a worker was lost and the new generation took in a replacement too (with
                  one survivor left, --min-np 2 makes it wait for a replacement to start)
    joined        replacements joined (MembershipChanged): the survivors' pause
    """
    worst: dict[int, Mapping[str, Any]] = {}
    for r in recoveries:
        g = int(r.get("generation", -1))
        if g not in worst or r["seconds"] > worst[g]["seconds"]:
            worst[g] = r

    def kind(r: Mapping[str, Any]) -> str:
        if r.get("cause") == "MembershipChanged":
            return "joined"
        return "lost+joined" if r["new_size"] > len(r.get("survivors", ())) else "lost"
    out: dict[str, Any] = {}
    for k in ("lost", "lost+joined", "joined"):
        secs = sorted(r["seconds"] for r in worst.values() if kind(r) == k)
        if secs:
            out[k] = {"n": len(secs), "median_s": statistics.median(secs),
                      "p90_s": secs[min(len(secs) - 1, int(0.9 * len(secs)))],
                      "max_s": secs[-1]}
    return out


def resource_stats(samples: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """min/median/max of (t, value) samples, the least-squares trend per minute, and the
    medians of the first and last fifth (a leak shows as a steady rise in both)."""
    if not samples:
        return {"n": 0}
    vals = [v for _, v in samples]
    n, fifth = len(samples), max(1, len(samples) // 5)
    ts = [t for t, _ in samples]
    mt, mv = statistics.fmean(ts), statistics.fmean(vals)
    var = sum((t - mt) ** 2 for t in ts)
    slope = sum((t - mt) * (v - mv) for t, v in samples) / var if var > 0 else 0.0
    return {"n": n, "min": min(vals), "median": statistics.median(vals), "max": max(vals),
            "first_fifth_median": statistics.median(vals[:fifth]),
            "last_fifth_median": statistics.median(vals[-fifth:]),
            "trend_per_min": 60.0 * slope}
