"""`phalanx bench goodput`: what ETTR would phalanx give at 100,000 GPUs? A discrete-event
simulation, calibrated on a real soak run of phalanx.

One data-parallel job of N accelerators (8 a host) runs for --days under Poisson failures at
published rates (Llama 3: 4.7e-4 per GPU-day; Ant Group: 2.7e-3), crashes, hangs, host losses
and network cuts in Llama 3's proportions. Side by side, on the same seeded traces: phalanx as
measured today (its control plane extrapolated in N), phalanx with issue 22's control-plane
targets, torchft-style, in-process restart (NVRx-style) and checkpoint-restart (torchrun-style).
See goodput_params.py for every input and whether it is measured, cited or assumed;
goodput_models.py for each strategy; goodput_sim.py for the engine.

Calibration: by default a small real `phalanx bench soak` runs (4 workers, 3 step faults plus a
kill during a recovery, about a minute), and the simulator, fed that run's parameters, predicts
its goodput (target: within 3 points of the measurement). --no-soak skips it; --soak-dir reads
a `phalanx bench soak --keep DIR` folder; --soak-json reads a trace saved with --save-soak.

    phalanx bench goodput --json goodput.json --plot docs/img/goodput.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import goodput_calib as calib
from .goodput_models import STRATEGIES, Inputs, ettr, sensitivity, what_ifs
from .goodput_params import RATES, FailureModel, control_plane_from_json

CALIBRATION_POINTS = 3.0
"""Target: the prediction of the soak run's goodput within this many points."""
GOAL = 0.95
"""Target: phalanx's ETTR at the largest N under the Llama 3 rate."""


def _say(msg: str) -> None:
    print(f"[goodput] {msg}", flush=True)


def _inputs(args: argparse.Namespace, rate: str) -> Inputs:
    inp = Inputs(failures=FailureModel(rate_per_gpu_day=RATES[rate]))
    if args.control_plane_json:
        inp = replace(inp, phalanx=replace(inp.phalanx,
                                           reform=control_plane_from_json(args.control_plane_json)))
    return inp


def _table(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for rate in args.rates:
        inp = _inputs(args, rate)
        out[rate] = {s: {str(n): ettr(s, n, inp, days=args.days, seeds=args.seeds,
                                      seed=args.seed, traces=args.traces) for n in args.sizes}
                     for s in STRATEGIES}
    return out


def _waterfall(args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    inp = _inputs(args, "llama3")
    steps = [("phalanx today (measured, extrapolated)", inp),
             ("+ data-plane bootstrap folded into re-form",
              replace(inp, phalanx=replace(inp.phalanx, bootstrap_256_s=0.0))),
             ("+ re-form at issue 22's target (< 2 s at 10k)",
              replace(inp, phalanx=inp.target))]
    return [{"step": label, "ettr": ettr("phalanx", n, i, days=args.days, seeds=args.seeds,
                                         seed=args.seed, traces=args.traces)}
            for label, i in steps]


def _calibrate(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.no_soak:
        return None
    if args.soak_json:
        trace = calib.SoakTrace.from_json(Path(args.soak_json).read_text())
        source = f"--soak-json {args.soak_json}"
    elif args.soak_dir:
        trace = calib.load_soak_dir(args.soak_dir)
        source = f"--soak-dir {args.soak_dir}"
    else:
        work = Path(tempfile.mkdtemp(prefix="phalanx-goodput-"))
        cmd = (f"phalanx bench soak --faults {args.soak_faults} --seed {args.soak_seed} "
               f"--gap-steps {args.soak_gap[0]} {args.soak_gap[1]} --degraded-sleep "
               f"{args.soak_degraded_sleep:g} --no-baseline --keep DIR")
        _say(f"calibration soak (about a minute): {cmd}")
        try:
            trace = calib.run_soak(work / "soak", faults=args.soak_faults, seed=args.soak_seed,
                                   gap=tuple(args.soak_gap),
                                   degraded_sleep=args.soak_degraded_sleep)
        finally:
            shutil.rmtree(work, ignore_errors=True)   # --save-soak keeps what is needed
        source = cmd
    if args.save_soak:
        Path(args.save_soak).write_text(trace.to_json())
    res = calib.calibration(trace)
    res["source"] = source
    return res


# ---------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def _report(res: dict[str, Any]) -> list[str]:
    cfg = res["config"]
    lines = [(f"goodput: one data-parallel job, {cfg['days']:g} days, {cfg['seeds']} seeded "
             f"traces per cell, {cfg['gpus_per_host']} accelerators a host")]
    for rate, table in res["ettr_by_rate"].items():
        lines += ["", f"ETTR, {rate} failure rate ({RATES[rate]:.2e} per GPU-day)",
                  f"{'strategy':16}" + "".join(f"{int(n):>10,}" for n in cfg["sizes"])]
        for name, row in table.items():
            lines.append(f"{name:16}" + "".join(f"{_pct(row[str(n)]):>10}"
                                                for n in cfg["sizes"]))
    n = cfg["largest_n"]
    for key, title in (("sensitivity", "phalanx today"),
                       ("sensitivity_no_bootstrap", "phalanx today, bootstrap folded in"),
                       ("sensitivity_target", "phalanx with issue 22's control plane")):
        base = res[key][0]["baseline"]
        lines += ["", (f"sensitivity: {title} at N = {n:,}, Llama 3 rate (baseline "
                  f"{_pct(base).strip()}); ETTR with the input free / halved / doubled"),
                  f"{'input':52} {'free':>7} {'x0.5':>7} {'x2':>7} {'costs':>8}"]
        for r in res[key]:
            e = r["ettr"]
            lines.append(f"{r['input']:52} {_pct(e['0.0'])} {_pct(e['0.5'])} {_pct(e['2.0'])} "
                         f"{r['cost_points']:+7.1f}p")
    lines += ["", f"from phalanx today to issue 22's control plane, N = {n:,}, Llama 3 rate"]
    lines += [f"  {r['step']:52} {_pct(r['ettr'])}" for r in res["waterfall"]]
    lines += ["", f"what if, N = {n:,}, Llama 3 rate",
              f"{'case':48}" + "".join(f"{s:>15}" for s in STRATEGIES)]
    lines += [f"{r['case']:48}" + "".join(f"{_pct(r['ettr'][s]):>15}" for s in STRATEGIES)
              for r in res["what_if"]]
    c = res["calibration"]
    if c is not None:
        lines += ["", (f"calibration on a real soak run ({c['workers']} workers, --min-np "
                  f"{c['min_workers']}, {c['steps']} steps, faults {c['faults']})"),
                  (f"  measured goodput {_pct(c['measured'])}, predicted {_pct(c['predicted'])} "
                  f"({c['error_points']:+.1f} points); wall {c['wall_s']['measured']:.1f} s "
                  f"measured, {c['wall_s']['predicted']:.1f} s predicted"),
                  (f"  of which stopped (pauses, joins, waits for a replacement): "
                   f"{c['stopped_s']['measured']:.2f} s measured, "
                   f"{c['stopped_s']['predicted']:.2f} s predicted"),
                  ("  fed: mean step per world size " + ", ".join(
                      f"{n}: {1000 * v:.1f} ms" for n, v in c["step_s"].items())
                   + f"; replacements ready {c['replace_s_mean']:.1f} s after their fault "
                   "(mean); the chaos schedule by step")]
    lines += [""] + [f"target {k}: {v}" for k, v in res["verdicts"].items()]
    return lines


def _verdicts(res: dict[str, Any]) -> dict[str, str]:
    n = str(res["config"]["largest_n"])
    out = {}
    if "llama3" in res["ettr_by_rate"]:
        for name in ("phalanx", "phalanx-target"):
            v = res["ettr_by_rate"]["llama3"][name][n]
            out[f"{name} ETTR >= {GOAL:.0%} at N = {int(n):,}, Llama 3 rate"] = (
                f"{'met' if v >= GOAL else 'MISSED'} ({100 * v:.1f}%)")
    c = res["calibration"]
    if c is not None:
        ok = abs(c["error_points"]) <= CALIBRATION_POINTS
        out[f"calibration within {CALIBRATION_POINTS:g} points"] = (
            f"{'met' if ok else 'MISSED'} ({c['error_points']:+.1f} points)")
    return out


# ---------------------------------------------------------------------- entry point
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phalanx bench goodput", description=__doc__.split("\n")[0])
    p.add_argument("--days", type=float, default=30.0, help="simulated wall time (default 30)")
    p.add_argument("--sizes", default="1000,4000,16000,64000,100000",
                   help="accelerator counts N, comma-separated (default 1000,...,100000)")
    p.add_argument("--rates", default="llama3,ant", help=f"failure rates: {', '.join(RATES)}")
    p.add_argument("--seeds", type=int, default=3, help="traces per cell (default 3)")
    p.add_argument("--seed", type=int, default=0, help="first trace seed (default 0)")
    p.add_argument("--no-soak", action="store_true", help="skip the calibration soak run")
    p.add_argument("--soak-dir", help="calibrate on this `phalanx bench soak --keep DIR` folder")
    p.add_argument("--soak-json", help="calibrate on a trace saved with --save-soak")
    p.add_argument("--save-soak", metavar="FILE", help="save the calibration soak's trace here")
    p.add_argument("--soak-faults", type=int, default=3,
                   help="step faults in the soak (default 3, plus one kill during a recovery)")
    p.add_argument("--soak-seed", type=int, default=0, help="the soak's seed (default 0)")
    p.add_argument("--soak-gap", type=int, nargs=2, default=(600, 800), metavar=("MIN", "MAX"),
                   help="steps between the soak's faults (default 600 800: replacements, "
                        "about 10 s to start here, mostly rejoin before the next fault)")
    p.add_argument("--soak-degraded-sleep", type=float, default=0.005, metavar="SEC",
                   help="the soak's --degraded-sleep (default 0.005: about one worker's share "
                        "of a 4-worker step here, so that fewer workers train proportionally "
                        "less, as on accelerators, instead of faster on 2 shared cores)")
    p.add_argument("--control-plane-json", metavar="FILE",
                   help="re-form times from `phalanx bench control-plane --json FILE`")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--plot", metavar="FILE.png", help="draw ETTR vs N and the waterfall")
    return p


def _validate(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    try:
        a.sizes = sorted({int(x) for x in a.sizes.split(",") if x.strip()})
    except ValueError:
        p.error(f"--sizes must be integers separated by commas, got {a.sizes!r}")
    a.rates = [r.strip() for r in a.rates.split(",") if r.strip()]
    bad = [r for r in a.rates if r not in RATES]
    if bad or not a.rates:
        p.error(f"--rates {bad or a.rates!r}: choose from {', '.join(RATES)}")
    if not a.sizes or a.sizes[0] < 8 or a.days <= 0 or a.seeds < 1:
        p.error(f"--sizes must be >= 8, --days > 0 and --seeds >= 1, got {a.sizes}, "
                f"{a.days}, {a.seeds}")
    if sum(bool(x) for x in (a.no_soak, a.soak_dir, a.soak_json)) > 1:
        p.error("give at most one of --no-soak, --soak-dir and --soak-json")
    if a.soak_faults < 2 or not 100 <= a.soak_gap[0] <= a.soak_gap[1]:
        p.error(f"--soak-faults must be >= 2 and --soak-gap MIN MAX within 100 <= MIN <= MAX "
                f"(shorter runs say little), got {a.soak_faults}, {a.soak_gap}")
    if a.plot:
        from .plots import check_plot_arg
        check_plot_arg(p, a.plot)


def main(argv: list[str] | None = None) -> int:
    """Run the simulation (and the calibration soak); returns 0 even if a target is missed."""
    parser = _parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    args.traces = {}   # failure traces shared by every strategy and variant of this run
    n = args.sizes[-1]
    res: dict[str, Any] = {"bench": "goodput", "config": {
        "days": args.days, "sizes": args.sizes, "rates": args.rates, "seeds": args.seeds,
        "seed": args.seed, "largest_n": n, "gpus_per_host": FailureModel().gpus_per_host}}
    res["ettr_by_rate"] = _table(args)
    res["ettr"] = res["ettr_by_rate"].get("llama3", next(iter(res["ettr_by_rate"].values())))
    inp = _inputs(args, "llama3")
    folded = replace(inp, phalanx=replace(inp.phalanx, bootstrap_256_s=0.0))
    for key, which, i in (("sensitivity", "phalanx", inp),
                          ("sensitivity_no_bootstrap", "phalanx", folded),
                          ("sensitivity_target", "target", inp)):
        res[key] = sensitivity(which, n, i, days=args.days, seeds=args.seeds, seed=args.seed,
                               traces=args.traces)
    res["waterfall"] = _waterfall(args, n)
    res["what_if"] = what_ifs(n, inp, days=args.days, seeds=args.seeds, seed=args.seed,
                              traces=args.traces)
    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")   # unwinds through run_soak's cleanup

    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, on_term) if in_main else None
    try:
        res["calibration"] = _calibrate(args)
    except (RuntimeError, OSError, ValueError) as e:
        sys.stderr.write(f"phalanx bench goodput: calibration failed: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("phalanx bench goodput: interrupted during the calibration soak\n")
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
    res["verdicts"] = _verdicts(res)
    for line in _report(res):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.plot:
        from .goodput_plot import goodput as draw
        _say(f"wrote {draw(res, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
