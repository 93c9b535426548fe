"""`phalanx bench soak`: a long elastic job under a storm of mixed faults; does it lose anything?

One elastic job (`soak_worker.py`: an MLP on scikit-learn's digits, exactly-once loader,
DistributedOptimizer) runs under `phalanx run -np 4 --min-np 2 --max-restarts K --chaos SPEC`
and --faults step faults (default 100): SIGKILL, SIGSTOP (the coordinator fences the stopped
worker), severed coordinator links (cut), SIGTERM, each at its own step on a random rank; plus
10% as many rules that SIGKILL a worker in the middle of a recovery. The launcher respawns every
victim; replacements join at the next step boundary and heal from their peers.

What it reports (and checks; see soak_check.py for the exact definitions):
  faults         per kind: rules planned, faults injected (the workers' '[chaos] ...' lines),
                 victims the launcher replaced ('respawning it'), losses no rule caused
  integrity      committed steps lost (a step record off the final history), steps whose
                 record nobody logged, the step counter going backwards, final step = number
                 of distinct committed steps, and per epoch samples missing or duplicated
  accuracy       final test accuracy vs a fault-free run of the same job (target: 1 point)
  recovery       seconds per recovery (slowest rank, from State.recoveries): a worker lost,
                 lost with a replacement joining, replacements joining
  launcher       RSS, open fds and threads of the launcher process, sampled from /proc over
                 the run: min, median, max and trend (a leak per fault shows as a rise)

    phalanx bench soak --faults 100 --seed 0 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import soak_check as chk
from .recovery import BenchError, _Job

HERE = Path(__file__).resolve().parent
WORKER = HERE / "soak_worker.py"
TRAIN_SAMPLES = 1437
"""Samples in the 80% training split of scikit-learn's digits (one epoch)."""
ACCURACY_POINTS = 1.0
"""Target: the soak's final test accuracy within this many points of the fault-free run."""


def _say(msg: str) -> None:
    print(f"[soak] {msg}", flush=True)


class _Steps:
    """Incrementally read OUT/steps.<worker>.jsonl into records[worker]."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.records: dict[str, list[dict[str, Any]]] = {}
        self._offsets: dict[str, int] = {}
        self.last: dict[str, Any] = {}

    def poll(self) -> None:
        for path in self.folder.glob("steps.*.jsonl"):
            key = path.name[len("steps."):-len(".jsonl")]
            with open(path, "rb") as f:
                f.seek(self._offsets.get(key, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1   # leave a half-written last line for next time
            self._offsets[key] = self._offsets.get(key, 0) + end
            rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
            self.records.setdefault(key, []).extend(rows)
            for r in rows:
                if "s" in r and r["t"] >= self.last.get("t", 0):
                    self.last = r


def _proc_sample(pid: int) -> tuple[float, float, float] | None:
    """(RSS MiB, open fds, threads) of `pid` from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    return int(status["VmRSS"].split()[0]) / 1024, float(fds), float(status["Threads"])


def _launcher(args: argparse.Namespace) -> list[str]:
    return ["-np", str(args.np), "--min-np", str(args.min_np), "--max-restarts",
            str(args.max_restarts), "--heartbeat-timeout", str(args.heartbeat_timeout)]


def _worker_args(args: argparse.Namespace, out: Path) -> list[str]:
    return [str(WORKER), str(out), "--data", str(out.parent / "digits.npz"), "--epochs",
            str(args.epochs), "--seed", str(args.seed), "--np-full", str(args.np),
            "--degraded-sleep", str(args.degraded_sleep)]


def _prepare_data(path: Path, seed: int) -> None:
    """Standardised digits split 80/20 (as examples/train_digits.py) into an .npz for the
    workers, so that replacements need not import scikit-learn."""
    import numpy as np
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]
    from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(xtr)
    np.savez(path, x_train=scaler.transform(xtr).astype(np.float32), y_train=ytr.astype(np.int64),
             x_test=scaler.transform(xte).astype(np.float32), y_test=yte.astype(np.int64))
    if len(ytr) != TRAIN_SAMPLES:
        raise BenchError(f"expected {TRAIN_SAMPLES} training samples, got {len(ytr)}")


def _finals(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("final.*.json"))]


def _run_job(args: argparse.Namespace, out: Path, name: str, chaos: str | None) -> dict[str, Any]:
    """Run one job to the end, sampling the launcher from /proc and printing progress."""
    out.mkdir()
    cmd = [sys.executable, "-m", "phalanx.launch.cli", "run", *_launcher(args)]
    if chaos:
        cmd += ["--chaos", chaos]
    cmd += _worker_args(args, out)
    steps = _Steps(out)
    samples: list[tuple[float, float, float, float]] = []
    t0 = time.monotonic()
    last_print = last_sample = t0
    last_step, last_progress = -1, t0
    with _Job(cmd, out, name, "pid.") as job:
        while job.alive():
            now = time.monotonic()
            if now - last_sample >= args.sample_every:
                last_sample = now
                got = _proc_sample(job.proc.pid)
                if got is not None:
                    samples.append((now - t0, *got))
            if now - last_print >= args.progress_every:
                last_print = now
                steps.poll()
                step = steps.last.get("s", 0)
                if step != last_step:
                    last_step, last_progress = step, now
                elif now - last_progress > args.stall_timeout:
                    raise job.fail(f"no step committed for {args.stall_timeout:.0f}s")
                log = job.log_path.read_text(errors="replace")
                faults = len(re.findall(r"\[chaos\] (?:sending|cutting)", log))
                rss = (f"{samples[-1][1]:.0f} MiB, {samples[-1][2]:.0f} fds, "
                       f"{samples[-1][3]:.0f} threads") if samples else "-"
                _say(f"{name} {now - t0:5.0f}s: step {step}, epoch "
                     f"{steps.last.get('e', 0) + 1}/{args.epochs}, world {steps.last.get('n', 0)}"
                     f", faults injected {faults}, respawns "
                     f"{len(re.findall(r'; respawning it', log))}, launcher {rss}")
            if now - t0 > args.timeout:
                raise job.fail(f"still running after --timeout {args.timeout:.0f}s")
            time.sleep(0.2)
        code = job.proc.wait()
    steps.poll()
    return {"code": code, "seconds": time.monotonic() - t0, "records": steps.records,
            "finals": _finals(out), "log": job.log_path.read_text(errors="replace"),
            "samples": samples, "command": " ".join(["phalanx", *cmd[3:]])}


# ---------------------------------------------------------------------- analysis and report
def _analyze(args: argparse.Namespace, soak: dict[str, Any], base: dict[str, Any] | None,
             plan: dict[str, Any]) -> dict[str, Any]:
    launcher = chk.parse_launcher_log(soak["log"])
    finals = soak["finals"]
    hist = chk.check_history(soak["records"], [f["history"] for f in finals], TRAIN_SAMPLES)
    recs = [r["r"] for rs in soak["records"].values() for r in rs if "r" in r]
    acc = finals[0]["acc"] if finals else None
    base_acc = base["finals"][0]["acc"] if base and base["finals"] else None
    final_step = finals[0]["step"] if finals else None
    res: dict[str, Any] = {
        "exit_code": soak["code"], "seconds": soak["seconds"],
        "faults": chk.fault_table(launcher["injected"], plan["planned"]),
        "launcher_log": {k: v for k, v in launcher.items() if k != "injected"},
        "injected": launcher["injected"], "integrity": hist,
        "final_step": final_step, "finished_workers": len(finals),
        "accuracy": {"soak": acc, "fault_free": base_acc,
                     "diff_points": None if acc is None or base_acc is None
                     else 100.0 * (acc - base_acc),
                     "fault_free_steps": base["finals"][0]["step"] if base and base["finals"]
                     else None},
        "recovery": chk.recovery_stats(recs),
        "launcher_resources": {
            what: chk.resource_stats([(s[0], s[i]) for s in soak["samples"]])
            for i, what in ((1, "rss_mib"), (2, "open_fds"), (3, "threads"))}}
    res["verdicts"] = _verdicts(res, args)
    return res


def _verdicts(res: dict[str, Any], args: argparse.Namespace) -> dict[str, str]:
    h, f = res["integrity"], res["faults"]["total"]

    def v(ok: bool, detail: Any) -> str:
        return f"{'met' if ok else 'MISSED'} ({detail})"
    out = {
        f"at least {args.faults} faults injected": v(f["injected"] >= args.faults, f["injected"]),
        "job finished (exit 0)": v(res["exit_code"] == 0, res["exit_code"]),
        "every victim replaced": v(f["replaced"] == f["injected"],
                                   f"{f['replaced']}/{f['injected']}"),
        "0 committed steps lost": v(h["committed_steps_lost"] == 0 and h["unlogged_steps"] == 0,
                                    f"{h['committed_steps_lost']} lost, "
                                    f"{h['unlogged_steps']} unlogged"),
        "step counter never went backwards": v(not h["backwards"], len(h["backwards"])),
        "final step = distinct committed steps": v(
            res["final_step"] == h["distinct_committed_steps"] == h["history_steps"],
            f"{res['final_step']} vs {h['distinct_committed_steps']}"),
        "finishing workers agree on the history": v(h["final_hashes_agree"],
                                                    res["finished_workers"]),
        "every epoch trained, each sample exactly once": v(
            h["epochs"] == list(range(args.epochs)) and h["samples_missing"] == 0
            and h["samples_duplicated"] == 0,
            f"{len(h['epochs'])} epochs, {h['samples_missing']} missing, "
            f"{h['samples_duplicated']} duplicated")}
    d = res["accuracy"]["diff_points"]
    if d is not None:
        out[f"accuracy within {ACCURACY_POINTS:g} point of fault-free"] = v(
            abs(d) <= ACCURACY_POINTS, f"{d:+.2f} points")
    return out


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _report(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    s = res["soak"]
    h, a, ll = s["integrity"], s["accuracy"], s["launcher_log"]
    lines = [(f"soak: {args.np} workers (--min-np {args.min_np}), MLP 64-128-128-10 on digits "
              f"({TRAIN_SAMPLES} training samples/epoch), {args.epochs} epochs, seed "
              f"{args.seed}, {s['seconds']:.0f}s"),
             "",
             f"{'fault':18} {'planned':>8} {'injected':>9} {'replaced':>9}"]
    for kind, row in s["faults"].items():
        lines.append(f"{kind:18} {row['planned']:>8} {row['injected']:>9} {row['replaced']:>9}")
    lines += [
        ("  planned: rules in the --chaos spec (--faults step rules, which all fire, plus "
         "kill-in-recovery rules, which fire only if a process at that rank lives to its K-th "
         "recovery); injected: faults that happened (the workers' '[chaos] sending/cutting' "
         "lines); replaced: victims the launcher respawned (its 'respawning it' lines)"),
        (f"  launcher: {ll['respawns']} respawns, {ll['fenced']} fenced, "
         f"{ll['continued_without']} continued without, {len(ll['unplanned'])} losses no rule "
         f"caused, {len(ll['unfired_rules'])} rules never fired"),
        "",
        f"{'integrity check':34} {'result':>11}"]
    checks = [
        ("committed steps lost", h["committed_steps_lost"],
         "step records (step, history hash) off the final history: rolled back or redone"),
        ("committed steps nobody logged", h["unlogged_steps"],
         "breaks in the chain of history hashes (sample checks then inconclusive)"),
        ("step counter went backwards", len(h["backwards"]),
         "a worker or a later generation logging a step not above an earlier one"),
        ("final step / distinct steps", f"{s['final_step']}/{h['distinct_committed_steps']}",
         "equal: every committed step is in the final count, none twice"),
        ("epochs checked", len(h["epochs"]), f"of --epochs {args.epochs}"),
        ("samples missing", h["samples_missing"],
         "training samples of an epoch never committed (all epochs)"),
        ("samples duplicated", h["samples_duplicated"],
         "training samples committed twice in one epoch (all epochs)")]
    lines += [f"{name:34} {value!s:>11}  {what}" for name, value, what in checks]
    lines += [
        "",
        (f"accuracy: soak {_fmt(a['soak'], '.4f')} vs fault-free {_fmt(a['fault_free'], '.4f')} "
         f"({_fmt(a['diff_points'], '+.2f')} points; {s['final_step']} vs "
         f"{_fmt(a['fault_free_steps'], 'd')} steps: fewer workers take more steps per epoch)"),
        "",
        f"{'recovery':18} {'n':>4} {'median s':>9} {'p90 s':>7} {'max s':>7}"]
    for cause, r in s["recovery"].items():
        lines.append(f"{cause:18} {r['n']:>4} {r['median_s']:>9.3f} {r['p90_s']:>7.3f} "
                     f"{r['max_s']:>7.3f}")
    lines += [
        ("  per generation formed: the slowest rank's State.recoveries 'seconds' (leave the "
         "broken group, re-form, heal). lost: the survivors re-formed alone; lost+joined: "
         "with a replacement (a lone survivor waits for one, --min-np 2); joined: the "
         "survivors' pause while replacements join"),
        "",
        (f"{'launcher':10} {'min':>8} {'median':>8} {'max':>8} {'first 1/5':>10} "
         f"{'last 1/5':>9} {'trend/min':>10}")]
    for what, r in s["launcher_resources"].items():
        if r.get("n"):
            lines.append(f"{what:10} {r['min']:>8.1f} {r['median']:>8.1f} {r['max']:>8.1f} "
                         f"{r['first_fifth_median']:>10.1f} {r['last_fifth_median']:>9.1f} "
                         f"{r['trend_per_min']:>+10.2f}")
    lines += [
        (f"  the launcher process (coordinator included) sampled every {args.sample_every:g}s "
         "from /proc/<pid>: RSS MiB, open fds, threads; first/last 1/5: medians of the first "
         "and last fifth of the samples; trend: least-squares slope per minute"),
        ""]
    lines += [f"target {k}: {v}" for k, v in s["verdicts"].items()]
    return lines


# ---------------------------------------------------------------------- entry point
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phalanx bench soak", description=__doc__.split("\n")[0])
    p.add_argument("--faults", type=int, default=100,
                   help="step faults to inject (default 100), plus 10%% as many rules that "
                        "kill a worker during a recovery")
    p.add_argument("--seed", type=int, default=0, help="seed for the spec and the job")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs (default: enough for every step fault to fall inside the job)")
    p.add_argument("--np", type=int, default=4, help="workers (default 4)")
    p.add_argument("--gap-steps", type=int, nargs=2, default=(6, 12), metavar=("MIN", "MAX"),
                   help="steps between step faults, drawn uniformly (default 6 12)")
    p.add_argument("--heartbeat-timeout", type=float, default=1.0,
                   help="phalanx run --heartbeat-timeout (default 1.0)")
    p.add_argument("--degraded-sleep", type=float, default=0.15,
                   help="seconds each step sleeps per missing worker, so faults do not outpace "
                        "replacements (default 0.15)")
    p.add_argument("--no-baseline", action="store_true", help="skip the fault-free run")
    p.add_argument("--timeout", type=float, default=1800.0, help="longest run of one job (s)")
    p.add_argument("--stall-timeout", type=float, default=120.0,
                   help="fail if no step is committed for this long (s)")
    p.add_argument("--progress-every", type=float, default=5.0, help="progress line period (s)")
    p.add_argument("--sample-every", type=float, default=1.0, help="/proc sample period (s)")
    p.add_argument("--keep", metavar="DIR", help="keep the jobs' logs in DIR (must not exist)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    return p


def _validate(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict[str, Any]:
    """Check the arguments, fill in derived ones, and return the chaos plan."""
    lo, hi = a.gap_steps
    if a.faults < 1 or a.np < 3:
        p.error(f"--faults must be >= 1 and --np >= 3, got {a.faults}, {a.np}")
    if not 1 <= lo <= hi:
        p.error(f"--gap-steps MIN MAX must satisfy 1 <= MIN <= MAX, got {lo} {hi}")
    if not 0 < a.heartbeat_timeout <= 60 or a.degraded_sleep < 0:
        p.error("--heartbeat-timeout must be in (0, 60] and --degraded-sleep >= 0")
    if a.keep and os.path.exists(a.keep):
        p.error(f"--keep {a.keep!r} already exists; name a new folder")
    a.spec, plan = chk.make_spec(a.faults, seed=a.seed, gap=(lo, hi), warmup=10)
    per_epoch = math.ceil(TRAIN_SAMPLES / (a.np * 16))   # fewest steps an epoch can take
    need = math.ceil((plan["last_step"] + hi) / per_epoch)
    if a.epochs is None:
        a.epochs = max(need, 5)
    elif a.epochs < need:
        p.error(f"--epochs {a.epochs} may end before the last step fault (step "
                f"{plan['last_step']}, {per_epoch} steps per epoch at full strength); use "
                f"--epochs {need} or more, or fewer --faults")
    a.min_np = 2
    a.max_restarts = 2 * a.faults + 20
    return plan


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when the job ran (even if a target is missed)."""
    parser = _parser()
    args = parser.parse_args(argv)
    plan = _validate(parser, args)
    work = Path(tempfile.mkdtemp(prefix="phalanx-bench-soak-")).resolve()
    res: dict[str, Any] = {"bench": "soak", "config": {
        k: getattr(args, k) for k in ("faults", "seed", "epochs", "np", "min_np", "max_restarts",
                                      "heartbeat_timeout", "degraded_sleep")},
        "gap_steps": list(args.gap_steps), "chaos": args.spec, "plan": plan}
    _say(f"{plan['rules']} chaos rules {plan['planned']}, last step fault at step "
         f"{plan['last_step']}; {args.epochs} epochs")

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")   # unwinds through _Job.close()

    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, on_term) if in_main else None
    try:
        _prepare_data(work / "digits.npz", args.seed)
        base = None
        if not args.no_baseline:
            _say("fault-free run of the same job")
            base = _run_job(args, work / "baseline", "baseline", None)
            if base["code"] != 0:
                raise BenchError(f"the fault-free run failed (exit {base['code']}); logs in "
                                 f"{work / 'baseline'}")
        _say(f"soak run: `phalanx run {' '.join(_launcher(args))} --chaos SPEC ...`")
        soak = _run_job(args, work / "soak", "soak", args.spec)
    except BenchError as e:
        sys.stderr.write(f"phalanx bench soak: error: {e}\nlogs kept in {work}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"phalanx bench soak: interrupted; logs kept in {work}\n")
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
    res["command"] = soak["command"]
    res["soak"] = _analyze(args, soak, base, plan)
    res["baseline"] = None if base is None else {"seconds": base["seconds"],
                                                 "finals": base["finals"]}
    for line in _report(res, args):
        print(line)
    if args.keep:
        shutil.move(str(work), args.keep)
        _say(f"logs kept in {args.keep}")
    elif any("MISSED" in v for v in res["soak"]["verdicts"].values()):
        _say(f"a target was missed: logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
