"""`phalanx bench recovery -H A:2,B:2 ...`: what losing a whole host costs (crash and cut).

One elastic job (the MLP of `recovery_worker.py`) runs across the hosts given with -H (and
--ssh-config), with --min-np the workers of the other hosts. Per fault kind and repeat, once
every worker steps, the driver takes the last host down with a command you supply, as an
operator would (`--host-crash-cmd`: every process there SIGKILLed, or a power-off;
`--host-cut-cmd`: its network link down; `{host}` in a command is that host's name), noting the
time, lets the survivors run, stops the job, and brings the host back (`--host-restore-cmd`,
which must return once the host is up again). A fresh job runs each repeat. Per fault:

  MTTR          fault -> first step completed by a survivor in the re-formed generation
  steps lost    committed steps the survivors do not resume after (0 expected)
  samples lost  the samples of those steps (they must be trained again)
  max stall     the longest pause between two survivor steps after the fault (MTTR included;
                the JSON says when it began)

and every epoch of the run is checked for exactly-once. The hosts must share the working
directory (the workers write their step logs there), as `phalanx run -H` assumes.

On one machine, simulated hosts stand in (network namespaces with their own sshd), with the
faults injected through their Python API; run as root from the repository:

    python3 tests/bench_host_loss.py --repeat 3 --json host_loss.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from ..launch.hosts import parse_hosts, place
from .recovery import (
    DIGITS,
    WAIT_S,
    WORKER,
    BenchError,
    _fmt,
    _Job,
    _say,
    _Tail,
    _until,
    analyze_phalanx,
    exactly_once,
)

KINDS = ("crash", "cut")
"""Host faults: every process of the host killed, or its network link down."""


class HostFaults(ABC):
    """How the benchmark takes a host down and brings it back."""

    @abstractmethod
    def inject(self, kind: str, host: str) -> None:
        """Take `host` down now (`kind`: crash or cut); return at once."""

    @abstractmethod
    def restore(self, kind: str, host: str) -> None:
        """Bring `host` back; return once it can run an agent again."""


class CommandFaults(HostFaults):
    """Shell commands the user gave, with `{host}` replaced by the host's name."""

    def __init__(self, commands: dict[str, str], restore: str | None) -> None:
        self.commands, self.restore_cmd = commands, restore

    def _run(self, template: str, host: str, what: str) -> None:
        cmd = template.replace("{host}", shlex.quote(host))
        res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=WAIT_S,
                             check=False)
        if res.returncode != 0:
            raise BenchError(f"{what} command {cmd!r} failed with exit code {res.returncode}: "
                             f"{(res.stderr or res.stdout).strip()[-500:]}")

    def inject(self, kind: str, host: str) -> None:
        self._run(self.commands[kind], host, f"host {kind}")

    def restore(self, kind: str, host: str) -> None:
        if self.restore_cmd:
            self._run(self.restore_cmd, host, "host restore")


# ---------------------------------------------------------------------- analysis (pure)
def max_stall(records: dict[str, list[dict[str, Any]]], survivors: list[str],
              t: float) -> tuple[float, float]:
    """The longest pause after time `t` between two steps of a survivor (the first pause runs
    from `t`), and when it began, in seconds after `t`."""
    best = (0.0, 0.0)
    for w in survivors:
        times = sorted(r["t"] for r in records.get(w, []) if r["t"] > t)
        for a, b in zip([t, *times], times):
            best = max(best, (b - a, a - t))
    return best


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per fault kind: medians and maxima over the repeats, totals of what was lost."""
    ok = [r for r in rows if r["recovered"]]
    mttr = [r["mttr_s"] for r in ok]
    stall = [r["max_stall_s"] for r in ok]
    return {"n": len(rows), "recovered": len(ok),
            "mttr_median_s": statistics.median(mttr) if mttr else None,
            "mttr_max_s": max(mttr) if mttr else None,
            "steps_lost_total": sum(r["steps_lost"] for r in ok),
            "samples_lost_total": sum(r["samples_lost"] for r in ok),
            "max_stall_median_s": statistics.median(stall) if stall else None,
            "max_stall_max_s": max(stall) if stall else None,
            "samples_missing": sum(r["exactly_once"]["samples_missing"] for r in rows),
            "samples_duplicated": sum(r["exactly_once"]["samples_duplicated"] for r in rows),
            "stop_to_exit_median_s": statistics.median(r["stop_to_exit_s"] for r in rows)
            if rows and all("stop_to_exit_s" in r for r in rows) else None,
            "runs": rows}


# ---------------------------------------------------------------------- one run
def _command(a: argparse.Namespace, out: Path, min_np: int) -> list[str]:
    cmd = [sys.executable, "-m", "phalanx.launch.cli", "run", "-H", a.hosts, "--min-np",
           str(min_np), "--heartbeat-timeout", str(a.heartbeat_timeout), "--timeout",
           str(a.timeout)]
    if a.ssh_config:
        cmd += ["--ssh-config", a.ssh_config]
    return [*cmd, str(WORKER), str(out), "--ft", "on", "--log-samples", "--hidden",
            str(a.hidden), "--batch-size", str(a.batch_size)]


def run_once(a: argparse.Namespace, faults: HostFaults, kind: str, out: Path) -> dict[str, Any]:
    """One job, one fault on the last host; the row for it (see the module docstring)."""
    entries = parse_hosts(a.hosts)
    np_full = sum(n for _, n in entries)
    lost = place(entries, np_full)[-1]
    victims = [f"w{lost.first_rank + i}" for i in range(lost.slots)]
    survivors = [f"w{r}" for r in range(lost.first_rank)]
    tail = _Tail(out, "steps.")

    def full() -> int | None:
        g = max((r["g"] for _, r in tail.all()), default=0)
        n = len({w for w, r in tail.all() if r["g"] == g and r["n"] == np_full})
        return g if g and n == np_full else None

    with _Job(_command(a, out, lost.first_rank), out, f"host-{kind}", "pid.") as job:
        g = _until(job, tail, full, f"all {np_full} workers stepping")
        target = tail.max_step() + a.gap_steps
        _until(job, tail, lambda: tail.max_step() >= target, f"step {target}")
        t = time.time()
        faults.inject(kind, lost.name)
        t_rec = _until(job, tail, lambda: min((r["t"] for w, r in tail.all()
                                               if w in survivors and r["g"] > g), default=None),
                       f"recovery from host {kind}")
        _say(f"host {kind} on {lost.name}: survivors stepping again after {t_rec - t:.3f}s")
        settle = time.monotonic() + a.observe_s
        after = tail.max_step() + a.gap_steps
        _until(job, tail, lambda: tail.max_step() >= after and time.monotonic() >= settle,
               f"step {after} after the recovery", timeout=WAIT_S + a.observe_s)
        (out / "stop").touch()
        t_stop = time.time()
        code = job.wait(WAIT_S)
        if code is None:
            raise job.fail("did not finish after the stop file")
        stop_to_exit = time.time() - t_stop
    tail.poll()
    (row,) = analyze_phalanx(tail.records, [{"kind": kind, "victim": victims[0], "t": t,
                                             "g": g}], np_full)
    stall, stall_at = max_stall(tail.records, survivors, t)
    row.update(victims=victims, exit_code=code, host=lost.name, stop_to_exit_s=stop_to_exit,
               max_stall_s=max(row["mttr_s"], stall) if row["recovered"] else None,
               max_stall_at_s=stall_at if row["recovered"] else None,
               exactly_once=exactly_once(tail.records, DIGITS, last_epoch_complete=code == 0))
    if code != 0:
        raise job.fail(f"exited with code {code} after the host {kind}")
    return row


def run(a: argparse.Namespace, faults: HostFaults) -> dict[str, Any]:
    """Every fault kind `a.repeat` times; the results as a JSON-able dict."""
    work = Path(tempfile.mkdtemp(prefix="phalanx-bench-hosts-", dir=a.workdir)).resolve()
    res: dict[str, Any] = {"bench": "recovery-hosts", "config": {
        k: getattr(a, k) for k in ("hosts", "faults", "repeat", "heartbeat_timeout", "timeout",
                                   "hidden", "batch_size", "gap_steps", "observe_s")}}
    try:
        for kind in a.faults:
            rows = []
            for rep in range(a.repeat):
                out = work / f"{kind}-{rep}"
                out.mkdir()
                try:
                    rows.append(run_once(a, faults, kind, out))
                finally:
                    faults.restore(kind, parse_hosts(a.hosts)[-1][0])
            res[kind] = summarize(rows)
    except BaseException:
        sys.stderr.write(f"logs kept in {work}\n")
        raise
    if a.keep:
        shutil.move(str(work), a.keep)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return res


def report(res: dict[str, Any]) -> list[str]:
    c = res["config"]
    lines = [(f"host loss: -H {c['hosts']}, fault on the last host, heartbeat timeout "
              f"{c['heartbeat_timeout']:g}s, collective timeout {c['timeout']:g}s"),
             (f"{'fault':6} {'n':>2} {'MTTR med':>9} {'MTTR max':>9} {'steps lost':>10} "
              f"{'samples lost':>12} {'stall med':>9} {'stall max':>9} {'missing/dup':>11}")]
    for kind in c["faults"]:
        s = res[kind]
        lines.append(f"{kind:6} {s['n']:>2} {_fmt(s['mttr_median_s']):>9} "
                     f"{_fmt(s['mttr_max_s']):>9} {s['steps_lost_total']:>10} "
                     f"{s['samples_lost_total']:>12} {_fmt(s['max_stall_median_s']):>9} "
                     f"{_fmt(s['max_stall_max_s']):>9} "
                     f"{s['samples_missing']:>5}/{s['samples_duplicated']}")
    return lines


# ---------------------------------------------------------------------- entry point
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phalanx bench recovery -H HOSTS",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("-H", "--hosts", required=True, metavar="HOST:SLOTS,...",
                   help="at least 2 hosts; the last one is taken down")
    p.add_argument("--ssh-config", default=None, metavar="FILE", help="ssh -F FILE")
    p.add_argument("--faults", default="crash,cut", help="comma list of crash, cut")
    p.add_argument("--host-crash-cmd", default=None, metavar="CMD",
                   help="shell command that crashes host {host} (e.g. power it off)")
    p.add_argument("--host-cut-cmd", default=None, metavar="CMD",
                   help="shell command that cuts host {host} off the network")
    p.add_argument("--host-restore-cmd", default=None, metavar="CMD",
                   help="shell command that brings host {host} back and returns once it is up")
    p.add_argument("--repeat", type=int, default=3, help="runs per fault (default 3)")
    p.add_argument("--heartbeat-timeout", type=float, default=1.0,
                   help="phalanx run --heartbeat-timeout (default 1.0)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="phalanx run --timeout: the collective timeout (default 30)")
    p.add_argument("--hidden", type=int, default=512, help="MLP hidden width (default 512)")
    p.add_argument("--batch-size", type=int, default=32, help="per-worker batch (default 32)")
    p.add_argument("--gap-steps", type=int, default=10,
                   help="steps before the fault and after the recovery (default 10)")
    p.add_argument("--observe-s", type=float, default=40.0,
                   help="seconds the survivors run after the recovery, to see later stalls "
                        "(default 40: longer than the default collective timeout)")
    p.add_argument("--workdir", default=None, help="where the runs' logs go (default: a "
                   "temporary folder; it must be shared with the hosts)")
    p.add_argument("--keep", metavar="DIR", help="keep the workers' logs in DIR")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    return p


def _validate(p: argparse.ArgumentParser, a: argparse.Namespace, commands: bool) -> None:
    try:
        entries = parse_hosts(a.hosts)
    except ValueError as e:
        p.error(str(e))
    if len(entries) < 2:
        p.error(f"-H {a.hosts!r} names {len(entries)} host; host loss needs at least 2")
    a.faults = [f for f in a.faults.split(",") if f]
    bad = sorted(set(a.faults) - set(KINDS))
    if bad or not a.faults:
        p.error(f"--faults {','.join(a.faults)!r}: choose from {', '.join(KINDS)}")
    if commands:
        for kind in a.faults:
            if not getattr(a, f"host_{kind}_cmd"):
                p.error(f"--faults includes {kind}: give --host-{kind}-cmd (e.g. "
                        f"'ssh {{host}} ...'), or leave {kind} out of --faults")
    if a.repeat < 1 or a.gap_steps < 1 or a.observe_s < 0:
        p.error(f"--repeat and --gap-steps must be >= 1 and --observe-s >= 0, got {a.repeat}, "
                f"{a.gap_steps}, {a.observe_s}")
    if a.heartbeat_timeout <= 0 or a.timeout <= 0:
        p.error("--heartbeat-timeout and --timeout must be positive")
    if a.keep and Path(a.keep).exists():
        p.error(f"--keep {a.keep!r} already exists; name a new folder")


def main(argv: list[str], faults: HostFaults | None = None) -> int:
    """Run it; `faults` (tests/bench_host_loss.py gives one) stands in for the commands."""
    p = parser()
    a = p.parse_args(argv)
    _validate(p, a, commands=faults is None)
    if faults is None:
        faults = CommandFaults({"crash": a.host_crash_cmd or "", "cut": a.host_cut_cmd or ""},
                               a.host_restore_cmd)
    t0 = time.monotonic()

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")   # unwinds through _Job.close()

    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, on_term) if in_main else None
    try:
        res = run(a, faults)
    except BenchError as e:
        sys.stderr.write(f"phalanx bench recovery: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("phalanx bench recovery: interrupted\n")
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
    res["seconds"] = time.monotonic() - t0
    for line in report(res):
        print(line)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return 0
