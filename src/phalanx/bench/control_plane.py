"""`phalanx bench control-plane`: how the coordinator holds up as the job grows to N workers.

For each N: the launcher's coordinator (`CoordServer`) runs in a process of its own; N simulated
workers (`control_plane_sim.py`, thousands per process, 8 a simulated host each with a loopback
address of its own) speak the real protocol to it: join, heartbeat with `hold`, rendezvous.
Phases, each bounded by --deadline: the first generation forms; a steady window of heartbeats
(false losses counted; the coordinator's threads, memory and CPU read from /proc); one worker
crashes (its connection closes, as on SIGKILL) and the survivors hear of it (fan-out) and
re-form among N-1; with --host-loss, every worker of one host then goes at once.

    phalanx bench control-plane --workers 64,256,1024 --json cp.json --plot cp.png

A phase that does not complete within its deadline reads "never" (null in the JSON).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..config import HEARTBEAT_TIMEOUT
from ..errors import ConfigError
from . import control_plane_inproc, plots
from .control_plane_coord import Child, ChildGone
from .control_plane_sim import worker_ids

HOLD = 0.25
"""Seconds the coordinator may hold a beat's reply (the workers' default heartbeat interval)."""
SETTLE = 1.0
POLL = 0.2
"""Seconds between the driver's looks at the generators while a phase runs."""
PROGRESS = 2.0
"""Seconds between progress lines on stderr."""
JOINING = 128
"""Simulated workers connecting and joining at once, over all generators: half the
coordinator's default cap on connections not yet authenticated (`max_pending`)."""
COLUMNS = (("workers", "workers", "{}"), ("first generation (s)", "first_generation_s", "{:.3f}"),
           ("loss fan-out p99 (s)", "fanout_p99_s", "{:.3f}"),
           ("re-form among N-1 (s)", "reform_s", "{:.3f}"), ("false losses", "false_losses", "{}"),
           ("coord threads", "coord_threads", "{}"), ("coord RSS MB", "coord_rss_mb", "{:.0f}"),
           ("coord CPU %", "coord_cpu_pct", "{:.0f}"),
           ("generator CPU s", "generator_cpu_s", "{:.1f}"))


def _say(msg: str) -> None:
    sys.stderr.write(f"[control-plane] {msg}\n")
    sys.stderr.flush()


def p99(values: list[float], expected: int) -> float | None:
    """Nearest-rank 99th percentile of `expected` samples of which `values` arrived (the rest
    never did: infinite); None if the percentile falls on one that never arrived."""
    if expected <= 0:
        return None
    ordered = sorted(values) + [math.inf] * max(0, expected - len(values))
    q = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return None if math.isinf(q) else q


def _merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The generators' reports as one."""
    out: dict[str, Any] = {k: sum(r[k] for r in reports)
                           for k in ("joined", "errors", "slow_beats")}
    out.update({k: max((r[k] for r in reports), default=0.0) for k in ("beat_max_s", "lag_max_s")})
    out["join_t_max"] = max((r["join_t_max"] for r in reports if r["join_t_max"] is not None),
                            default=None)
    out["current"] = sum((Counter(r["current"]) for r in reports), Counter())
    out["false_ids"] = set().union(*(r["false_ids"] for r in reports))
    out["error_sample"] = [e for r in reports for e in r["error_sample"]]
    return out


class SizeRun:
    """One N: the coordinator process, the generator processes, and the phases."""

    def __init__(self, n: int, args: argparse.Namespace, log: Any) -> None:
        self.n, self.args, self.per_host = n, args, args.per_host
        self.hosts = math.ceil(n / args.per_host)
        self.secret = secrets.token_hex(32)
        self.row: dict[str, Any] = {"workers": n, "per_host": args.per_host}
        self.peak_threads = 0
        self.last_say = 0.0
        self.coord = Child("phalanx.bench.control_plane_coord", {
            "secret": self.secret, "target_np": n, "min_np": max(1, n - args.per_host - 1),
            "max_np": n, "heartbeat_timeout": HEARTBEAT_TIMEOUT, "settle": SETTLE,
            "limits": args.limits}, stderr=log)
        self.gens: list[Child] = []
        self.ranges: list[tuple[int, int]] = []

    def start(self) -> None:
        addr = self.coord.read(30.0)["address"]
        procs = min(self.args.procs, self.hosts)
        bounds = [round(i * self.hosts / procs) for i in range(procs + 1)]
        self.ranges = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
        for a, b in self.ranges:
            self.gens.append(Child("phalanx.bench.control_plane_sim", {
                "address": addr, "secret": self.secret, "hosts": [a, b],
                "per_host": self.per_host, "limit": self.n - a * self.per_host, "hold": HOLD,
                "deadline": self.args.deadline, "one_address": self.args.one_address,
                "joining": max(1, JOINING // len(self.ranges))}))
        self.row.update(procs=len(self.gens), coord_pid=self.coord.pid,
                        generator_pids=[g.pid for g in self.gens])

    def close(self) -> None:
        for child in [*self.gens, self.coord]:
            child.close()

    # ------------------------------------------------------------ looking
    def look(self) -> dict[str, Any]:
        agg = _merge([g.ask({"cmd": "report"}) for g in self.gens])
        stats = self.coord.stats()
        if stats is None:
            raise ChildGone(f"the coordinator process (pid {self.coord.pid}) exited")
        self.peak_threads = max(self.peak_threads, int(stats["threads"]))
        return agg

    def wait(self, phase: str, label: str, done: Any, deadline: float) -> dict[str, Any]:
        """Look until `done(agg)` or `deadline`; progress lines on stderr meanwhile. The
        generators' worst event-loop lag is kept by phase: a big one means the simulated
        workers, not the coordinator, set the times of that phase."""
        t0 = time.monotonic()
        lags = self.row.setdefault("generator_lag_s", {})
        while True:
            agg = self.look()
            lags[phase] = round(max(lags.get(phase, 0.0), agg["lag_max_s"]), 3)
            now = time.monotonic()
            if done(agg) or now >= deadline:
                return agg
            if now - self.last_say >= PROGRESS:
                self.last_say = now
                gens = ", ".join(f"generation {g}: {c}" for g, c in sorted(agg["current"].items()))
                _say(f"{self.n} workers: {label}, joined {agg['joined']}/{self.n}, {gens or '-'}"
                     f", {len(agg['false_ids'])} false losses ({now - t0:.1f} s)")
            time.sleep(POLL)

    def detail(self, gen: int) -> tuple[list[Any], list[float | None]]:
        assigned: list[Any] = []
        loss: list[float | None] = []
        for g in self.gens:
            d = g.ask({"cmd": "detail", "gen": gen}, 60.0)
            assigned += d["assigned"]
            loss += d["loss_t"]
        return assigned, loss

    def formed(self, gen: int, size: int) -> float | None:
        """When the last worker got its place in `gen`, if all `size` ranks went out once."""
        got = [a for a in self.detail(gen)[0] if a is not None]
        ranks = sorted(a[1] for a in got)
        if ranks != list(range(size)) or any(a[2] != size for a in got):
            _say(f"{self.n} workers: generation {gen} is not {size} distinct ranks "
                 f"({len(got)} assignments, sizes {sorted({a[2] for a in got})})")
            return None
        return max(a[0] for a in got)

    # ------------------------------------------------------------ phases
    def first_generation(self) -> bool:
        agg = self.wait("first_generation", "forming generation 1",
                        lambda a: a["current"].get("1", 0) == self.n,
                        time.monotonic() + self.args.deadline)
        last = self.formed(1, self.n) if agg["current"].get("1", 0) == self.n else None
        ok = last is not None and agg["join_t_max"] is not None
        self.row["formed"] = ok
        self.row["first_generation_s"] = round(last - agg["join_t_max"], 4) if ok else None
        return ok

    def steady(self) -> None:
        """Beats only: the coordinator's threads, memory and CPU (and the generators' CPU)."""
        def stats() -> list[dict[str, float]]:
            got = [c.stats() for c in (self.coord, *self.gens)]
            if any(s is None for s in got):
                raise ChildGone("a process exited during the steady window")
            return got  # type: ignore[return-value]
        before, t0 = stats(), time.monotonic()
        self.wait("steady", "steady heartbeats", lambda a: False, t0 + self.args.steady)
        after, t1 = stats(), time.monotonic()
        used = [100 * (b["cpu_s"] - a["cpu_s"]) / (t1 - t0) for a, b in zip(before, after)]
        self.row.update(coord_threads=int(after[0]["threads"]),
                        coord_rss_mb=round(after[0]["rss_mb"], 1), coord_cpu_pct=round(used[0], 1),
                        generator_cpu_pct=round(sum(used[1:]), 1))

    def loss(self, victims: list[str], prev: int, survivors: int, key: str) -> int | None:
        """Kill `victims`; the survivors' fan-out and re-form. The new generation, or None."""
        for g in self.gens:
            g.ask({"cmd": "expect", "workers": victims})
        host = int(victims[0][1:].split("-")[0])
        owner = next(i for i, (a, b) in enumerate(self.ranges) if a <= host < b)
        t_kill = self.gens[owner].ask({"cmd": "kill", "workers": victims})["t"]

        def new_gen(a: dict[str, Any]) -> int | None:
            return next((int(g) for g, c in a["current"].items()
                         if int(g) > prev and c == survivors), None)
        agg = self.wait(key.rstrip("_") or "crash", f"re-forming without {len(victims)}",
                        lambda a: new_gen(a) is not None, t_kill + self.args.deadline)
        heard = [t - t_kill for t in self.detail(prev)[1] if t is not None]
        fan = p99(heard, survivors)
        self.row[f"{key}fanout_p99_s"] = round(fan, 4) if fan is not None else None
        self.row[f"{key}fanout_max_s"] = round(max(heard), 4) if len(heard) == survivors else None
        gen = new_gen(agg)
        last = self.formed(gen, survivors) if gen is not None else None
        self.row[f"{key}reform_s"] = round(last - t_kill, 4) if last is not None else None
        return gen if last is not None else None

    def finish(self, agg: dict[str, Any]) -> None:
        self.row.update(false_losses=len(agg["false_ids"]),
                        false_loss_sample=sorted(agg["false_ids"])[:5],
                        coord_threads_peak=self.peak_threads,
                        errors=agg["errors"], error_sample=agg["error_sample"][:3],
                        slow_beats=agg["slow_beats"],
                        beat_reply_max_s=round(agg["beat_max_s"], 3))
        cpu = self.coord.stats()
        self.row["coord_cpu_s"] = round(cpu["cpu_s"], 2) if cpu else None
        gens = [g.stats() for g in self.gens]
        self.row["generator_cpu_s"] = round(sum(s["cpu_s"] for s in gens if s), 2)


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every phase for N workers; a row of the table (None for what never completed)."""
    nulls = dict.fromkeys(("first_generation_s", "fanout_p99_s", "reform_s", "coord_threads",
                           "coord_rss_mb", "coord_cpu_pct", "generator_cpu_s", "false_losses"))
    if args.host_loss:
        nulls.update(dict.fromkeys(("host_loss_fanout_p99_s", "host_loss_reform_s")))
    with tempfile.TemporaryFile("w+") as log:
        run = SizeRun(n, args, log)
        run.row.update(nulls, formed=False)
        try:
            run.start()
            _say(f"{n} workers on {run.hosts} simulated hosts, {len(run.gens)} generator "
                 f"process(es); coordinator pid {run.coord.pid}")
            if run.first_generation():
                run.steady()
                gen = run.loss([worker_ids(run.hosts // 2, 1)[0]], 1, n - 1, "")
                if args.host_loss and gen is not None and run.hosts > 1:  # host 0: rank 0's
                    victims = worker_ids(0, args.per_host)
                    run.loss(victims, gen, n - 1 - len(victims), "host_loss_")
            run.finish(run.look())
        except ChildGone as e:
            run.row["error"] = str(e)
            _say(f"{n} workers: {e}")
        finally:
            run.close()
        _tail(log, n, run.row)
    return run.row


def _tail(log: Any, n: int, row: dict[str, Any]) -> None:
    """Show the coordinator's last log lines when a phase never completed."""
    if row.get("reform_s") is not None and "error" not in row:
        return
    log.seek(0)
    lines = log.read().splitlines()
    shown = lines if len(lines) <= 8 else [*lines[:5], f"... {len(lines) - 7} more ...",
                                           *lines[-2:]]
    for line in shown:
        _say(f"{n} workers: coordinator log: {line[:300]}")


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The result as a markdown table; "never" for what did not complete."""
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        v = row.get(key)
        return "never" if v is None else fmt.format(v)
    out = ["| " + " | ".join(c[0] for c in COLUMNS) + " |",
           "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    out += ["| " + " | ".join(cell(r, k, f) for _, k, f in COLUMNS) + " |" for r in rows]
    return out


def plot(rows: list[dict[str, Any]], path: str) -> Path:
    """First generation, fan-out p99 and re-form vs workers (log x); 'never' marked on top."""
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    top = max([r[k] for r in rows for _, k, _ in COLUMNS[1:4] if r.get(k)] or [1.0]) * 1.3
    for i, ((label, key, _), marker) in enumerate(zip(COLUMNS[1:4], "osv")):
        done = [(r["workers"], r[key]) for r in rows if r.get(key) is not None]
        never = [r["workers"] for r in rows if r.get(key) is None]
        color = f"C{i}"
        if done:
            ax.plot(*zip(*done), marker=marker, color=color, label=label)
        if never:
            ax.scatter(never, [top * (1 + 0.05 * i)] * len(never), marker="x", color=color,
                       label=f"{label}: never")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("workers")
    ax.set_ylabel("seconds")
    ax.set_title("coordinator at scale (simulated workers, real protocol)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots._save(fig, path)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "integers, e.g. 64,256,1024") from None
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: every N must be at least 2 (a loss needs "
                                         "a survivor)")
    return sizes


def _limits(text: str) -> dict[str, float]:
    from ..coord.server import ConnectionLimits
    try:
        out = {k.strip(): (float(v) if "." in v else int(v))
               for k, v in (item.split("=", 1) for item in text.split(","))}
        ConnectionLimits(**out)  # type: ignore[arg-type]
    except (ValueError, TypeError, ConfigError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=VALUE pairs of ConnectionLimits "
                                         f"fields, e.g. max_connections=30000 ({e})") from None
    return out


class _Parser(argparse.ArgumentParser):
    """One-line errors naming the flag, exit 2 (as `phalanx run`'s)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="phalanx bench control-plane", description=__doc__.split("\n\n")[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=_sizes, default=None, metavar="N[,N...]",
                   help="job sizes to measure, one row each (default 64,256, or none with "
                        "--in-process)")
    p.add_argument("--per-host", type=int, default=8, metavar="K",
                   help="simulated workers per simulated host (default 8)")
    p.add_argument("--procs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2)),
                   metavar="P", help="load-generator processes (default: half the cores, 1-4)")
    p.add_argument("--steady", type=float, default=5.0, metavar="SEC",
                   help="seconds of steady heartbeats to measure (default 5)")
    p.add_argument("--deadline", type=float, default=60.0, metavar="SEC",
                   help="most seconds any phase may take before it reads 'never' (default 60)")
    p.add_argument("--host-loss", action="store_true",
                   help="after the crash, also lose every worker of one host at once")
    p.add_argument("--limits", type=_limits, default=None, metavar="NAME=V,...",
                   help="the coordinator's ConnectionLimits (default: its defaults)")
    p.add_argument("--one-address", action="store_true",
                   help="every simulated host connects from 127.0.0.1 (default: one loopback "
                        "address per host, as the per-address caps see real hosts)")
    p.add_argument("--in-process", type=_sizes, default=[], metavar="N[,N...]",
                   help="also run the coordinator's state machine alone for these sizes (no "
                        "sockets): CPU time per step and every message's size vs the limits")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw the times vs N")
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, value, low in (("--per-host", args.per_host, 1), ("--procs", args.procs, 1)):
        if value < low:
            p.error(f"argument {flag}: {value} must be at least {low}")
    for flag, value in (("--steady", args.steady), ("--deadline", args.deadline)):
        if not (math.isfinite(value) and value > 0):
            p.error(f"argument {flag}: {value} must be a positive number of seconds")
    plots.check_plot_arg(p, args.plot)


def main(argv: list[str] | None = None) -> int:
    """Measure every N in --workers; print the table (and write --json, --plot)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    if args.workers is None:
        args.workers = [] if args.in_process else [64, 256]

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every run's cleanup

    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, on_term) if in_main else None
    rows: list[dict[str, Any]] = []
    inproc: list[dict[str, Any]] = []
    try:
        for n in args.workers:
            rows.append(run_size(n, args))
        for n in args.in_process:
            _say(f"{n} workers in-process (the coordinator's state machine alone)")
            inproc.append(control_plane_inproc.costs(n, args.per_host))
    except KeyboardInterrupt:
        sys.stderr.write("phalanx bench control-plane: interrupted; every process stopped\n")
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
    print("\n".join(table(rows)))
    if inproc:
        print("\nIn-process (no sockets):\n" + "\n".join(control_plane_inproc.table(inproc)))
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "control-plane", "rows": rows,
                                               "in_process": inproc}, indent=1))
    if args.plot:
        print(f"plot: {plot(rows, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
