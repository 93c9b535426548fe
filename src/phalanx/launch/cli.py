"""Entry point of the `phalanx` command: `phalanx run ...` and `phalanx bench ...`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from .program import resolve as resolve_program

BENCHES = ("allreduce", "train", "recovery", "iterative", "soak", "goodput", "control-plane")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) that point at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def chaos_help() -> dict[str, str]:
    from ..elastic.chaos import HELP
    return HELP


def _run_parser() -> _Parser:
    from ..config import HEARTBEAT_TIMEOUT, TIMEOUT
    p = _Parser(
        prog="phalanx run",
        description="Run a Python script on N workers with fault-tolerant collectives. The "
                    "launcher hosts the job's coordinator, prefixes each output line with the "
                    "worker's rank, and returns non-zero with a one-line reason if the job fails.",
        epilog="examples:\n  phalanx run -np 4 examples/train_digits.py --epochs 5\n"
               "  phalanx run -np 4 --min-np 2 --max-restarts 3 train.py\n"
               "  phalanx run -np 4 python -m mypkg.train --lr 0.1\n"
               "  phalanx run -np 2 pytest tests/test_dist.py\n"
               "  phalanx run -np 4 --chaos kill:rank=2,step=40 train.py\n"
               "  phalanx run -H node1:4,node2:4 train.py\n"
               "  phalanx run train.py   # in sbatch/salloc: the allocation's tasks, via srun",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-np", "--np", type=int, default=None, metavar="N",
                   help="number of workers to start (default 1, or every slot of -H/--hostfile, or "
                        "every task of the Slurm allocation this runs in)")
    p.add_argument("--min-np", type=int, default=None, metavar="N",
                   help="fewest workers the job continues with after losses (default: N, so "
                        "any loss fails the job unless --max-restarts is set)")
    p.add_argument("--max-np", type=int, default=None, metavar="N",
                   help="most workers one generation may hold when workers join (default: N)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="respawn lost workers up to K times in total (default 0)")
    p.add_argument("--timeout", type=float, default=TIMEOUT, metavar="SEC",
                   help="collective timeout before a silent peer counts as lost (default %(default)g)")
    p.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT, metavar="SEC",
                   help="heartbeat silence before a worker is declared lost and fenced (default "
                        "%(default)g); a "
                        "worker whose process is stopped (SIGSTOP) is fenced after 0.3 s")
    p.add_argument("--retry-errors", type=int, default=0, metavar="K",
                   help="treat up to K exceptions raised by workers as faults (e.g. flaky I/O): "
                        "respawned within --max-restarts. Default 0: an exception is a bug and "
                        "fails the job, naming the rank, the exception and where it was raised")
    p.add_argument("--chaos", default=None, metavar="SPEC",
                   help="inject real faults to test a job's resilience: KIND:WHO,WHEN rules "
                        "separated by ';'. KIND: " + "; ".join(
                            f"{k}: {v}" for k, v in chaos_help().items()) + ". WHO: rank=R (whoever holds "
                        "rank R then), worker=wR (the worker first started as rank R) or "
                        "random (with seed=N). WHEN: step=S (at the boundary after step S), "
                        "every=N (every N steps), recovery=K (during the K-th recovery of the "
                        "worker process) or after=Ts (T seconds into the job; any program, "
                        "not cut). E.g. kill:rank=2,step=40, stop:random,every=50,seed=1 or "
                        "kill:rank=1,after=5s. Rules for "
                        "ranks the job never has are refused; rules that never fired are "
                        "reported at the end")
    p.add_argument("-H", "--hosts", default=None, metavar="HOST:SLOTS,...",
                   help="run on these hosts, e.g. -H node1:4,node2:4: one `phalanx agent` per host "
                        "over SSH (BatchMode; same Python and working directory as here); ranks "
                        "are packed host by host")
    p.add_argument("--hostfile", default=None, metavar="FILE",
                   help="hosts from a file of 'HOST slots=N' lines (Horovod / Open MPI format)")
    p.add_argument("--no-slurm", action="store_true",
                   help="inside a Slurm allocation, run on this machine only (by default "
                        "`phalanx run` without -H uses the allocation: every node's tasks, "
                        "agents started with srun)")
    p.add_argument("--host-cooldown", type=float, default=60.0, metavar="SEC",
                   help="a lost host (crashed, or cut off) is blacklisted this long: no "
                        "replacement goes there; doubled at each further loss of the same host "
                        "(default 60). Past it, a replacement may start the host's agent again")
    p.add_argument("--ssh-config", default=None, metavar="FILE",
                   help="ssh_config file for reaching the hosts (passed as ssh -F FILE)")
    p.add_argument("-x", "--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="set NAME=VALUE for every worker, or forward NAME from here even if "
                        "it is one the launcher keeps back (repeatable). Workers on other "
                        "hosts get this launcher's environment, less its own machine's, "
                        "login's and terminal's variables (HOSTNAME, HOME, USER, PWD, SHLVL, "
                        "TERM, DISPLAY, SSH_*, SLURM_*, ...: see the README)")
    p.add_argument("--bind", default=None, metavar="ADDR",
                   help="address the coordinator listens on (default 127.0.0.1, or with remote "
                        "hosts the local address that routes to them)")
    p.add_argument("--etcd", default=None, metavar="HOST:PORT,...",
                   help="keep the job's membership (leader, generations, step, outcome) in this "
                        "etcd cluster; losing its quorum pauses membership changes, never "
                        "training (default: the embedded coordinator only)")
    p.add_argument("--etcd-cacert", default=None, metavar="FILE",
                   help="CA bundle for etcd's TLS (as etcdctl --cacert)")
    p.add_argument("--etcd-cert", default=None, metavar="FILE",
                   help="client certificate for etcd (as etcdctl --cert)")
    p.add_argument("--etcd-key", default=None, metavar="FILE",
                   help="client key for etcd (as etcdctl --key)")
    p.add_argument("--join-file", default=None, metavar="PATH",
                   help="write the coordinator address and job secret to PATH (mode 0600) so "
                        "more workers can join with `phalanx join PATH script.py` (with --max-np)")
    p.add_argument("--timeline", "--timeline-filename", default=None, metavar="FILE",
                   help="write a Chrome-trace timeline of every worker to FILE (open it in "
                        "https://ui.perfetto.dev): collectives with name, bytes and queue time, "
                        "fused gradient buckets, forward/backward, reduction wait and optimizer "
                        "spans, recoveries. Default: $HOROVOD_TIMELINE if set")
    p.add_argument("--metrics", default=None, metavar="FILE",
                   help="append each worker's per-step phases to FILE as JSON lines (rank, "
                        "step, step_s, forward_backward_s, sync_s, optimizer_s, boundary_s, "
                        "reduce_s, recovery_s); the same numbers as px.metrics()")
    p.add_argument("--progress", type=float, default=None, metavar="SEC",
                   help="print a progress line every SEC seconds: step, steps/s, workers, "
                        "faults so far")
    p.add_argument("--fresh", action="store_true",
                   help="start from step 0 even if the job's checkpoint directory holds "
                        "checkpoints (px.elastic.Checkpointer removes those of earlier runs). "
                        "Default: resume from the newest; fail if none of them loads")
    p.add_argument("--checkpoint-errors", choices=("fail", "warn"), default=None,
                   help="when checkpoint saves fail (e.g. a full disk): 'fail' the job after 3 "
                        "in a row (default) or 'warn' and train on; either way each failure is "
                        "logged on rank 0 and counted in the final summary")
    p.add_argument("script", metavar="PROGRAM", help="what every worker runs: a Python script "
                   "(train.py), `python train.py`, `python -m pkg.mod`, or any command on PATH")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def run_main(argv: list[str]) -> int:
    """`phalanx run`: validate arguments, then supervise the job."""
    p = _run_parser()
    a = p.parse_args(argv)
    hosts, starter = _placement(a, p)
    if a.np is None:
        a.np = 1
    if a.np < 1:
        p.error(f"-np must be at least 1, got {a.np}")
    if a.min_np is not None and not 1 <= a.min_np <= a.np:
        p.error(f"--min-np must be between 1 and -np ({a.np}), got {a.min_np}")
    if a.max_np is not None and a.max_np < a.np:
        p.error(f"--max-np must be at least -np ({a.np}), got {a.max_np}")
    if a.max_restarts < 0:
        p.error(f"--max-restarts must be >= 0, got {a.max_restarts}")
    if a.retry_errors < 0:
        p.error(f"--retry-errors must be >= 0, got {a.retry_errors}")
    if a.timeout <= 0 or a.heartbeat_timeout <= 0:
        p.error("--timeout and --heartbeat-timeout must be positive")
    if a.host_cooldown < 0:
        p.error(f"--host-cooldown must be >= 0 seconds, got {a.host_cooldown}")
    try:
        a.script, a.args = resolve_program(a.script, list(a.args))
    except ValueError as e:
        p.error(str(e))
    if a.progress is not None and not a.progress > 0:
        p.error(f"--progress must be > 0 seconds, got {a.progress}")
    from .. import env
    a.timeline = a.timeline or env.get_str(env.HOROVOD_TIMELINE) or None
    for flag, path in (("--timeline", a.timeline), ("--metrics", a.metrics)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"{flag} {path!r}: directory {os.path.dirname(os.path.abspath(path))!r} "
                    "does not exist; create it or choose another path")
    if a.chaos:
        from ..elastic.chaos import parse_chaos, validate
        try:
            validate(parse_chaos(a.chaos), max_rank=max(a.np, a.max_np or a.np))
        except ValueError as e:
            p.error(str(e))
    from .supervisor import RunConfig, Supervisor
    cfg = RunConfig(np=a.np, script=a.script, args=list(a.args), min_np=a.min_np,
                    max_np=a.max_np, max_restarts=a.max_restarts, retry_errors=a.retry_errors,
                    timeout=a.timeout,
                    heartbeat_timeout=a.heartbeat_timeout, chaos=a.chaos,
                    bind=a.bind or "127.0.0.1", join_file=a.join_file, hosts=hosts,
                    ssh_config=a.ssh_config, agent_starter=starter,
                    host_cooldown=a.host_cooldown, timeline=a.timeline, metrics=a.metrics,
                    progress=a.progress, extra_env={**_explicit_env(a.env, p),
                                                     **_checkpoint_env(a)},
                    etcd=_etcd(a, p))
    return Supervisor(cfg).run()


def _etcd(a: argparse.Namespace, p: _Parser) -> Any:
    """--etcd and its TLS options as settings (None without --etcd); bad ones end in usage."""
    from ..errors import ConfigError
    from .etcdjob import settings
    try:
        return settings(a.etcd, a.etcd_cacert, a.etcd_cert, a.etcd_key)
    except ConfigError as e:
        p.error(str(e))


def _explicit_env(specs: list[str], p: _Parser) -> dict[str, str]:
    """-x NAME=VALUE and -x NAME (its value here) as a dict; errors name the bad one."""
    import re

    from .. import env
    out = {}
    for spec in specs:
        name, eq, value = spec.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            p.error(f"-x {spec!r}: {name!r} is not a variable name (letters, digits and "
                    "underscores, not starting with a digit); e.g. -x EPOCHS=2 or -x EPOCHS")
        if name == env.SECRET:
            p.error(f"-x {name}: the job secret is made by the launcher and never forwarded")
        if not eq and name not in os.environ:
            p.error(f"-x {name}: {name} is not set here; set it, or give -x {name}=VALUE")
        out[name] = value if eq else os.environ[name]
    return out


def _checkpoint_env(a: argparse.Namespace) -> dict[str, str]:
    """--fresh and --checkpoint-errors, as the variables workers' Checkpointers read."""
    from .. import env
    out = {env.FRESH: "1"} if a.fresh else {}
    if a.checkpoint_errors:
        out[env.CHECKPOINT_ERRORS] = a.checkpoint_errors
    return out


def _placement(a: argparse.Namespace, p: _Parser) -> tuple[list, Any]:
    """(hosts, agent starter) from -H, --hostfile or the Slurm allocation this runs in; sets
    a.np and a.bind where they were left to default. ([], None): a local job."""
    from . import slurm
    use_slurm = not (a.hosts or a.hostfile or a.no_slurm) and slurm.in_allocation()
    if not (a.hosts or a.hostfile or use_slurm):
        return [], None
    from .hosts import is_local, parse_hostfile, parse_hosts, place, placement_line, route_address
    where, starter = "", None
    try:
        if a.hosts and a.hostfile:
            raise ValueError("give -H or --hostfile, not both")
        if use_slurm:
            where = " (inside a Slurm allocation; --no-slurm runs on this machine only)"
            alloc = slurm.allocation()  # raises with the hint above
            where = (f" (Slurm allocation {alloc.job_id} has {alloc.describe()}; --no-slurm "
                     "runs on this machine only)")
            entries, starter = alloc.nodes, slurm.SrunStarter(alloc.job_id)
        elif a.hosts:
            entries = parse_hosts(a.hosts)
        else:
            with open(a.hostfile) as f:
                entries = parse_hostfile(f.read(), a.hostfile)
        if a.np is None:
            a.np = sum(n for _, n in entries)
        hosts = place(entries, a.np)
        remote = [h.name for h in hosts if not is_local(h.name)]
        if a.bind is None and remote:
            a.bind = _slurm_bind(remote[0]) if use_slurm else route_address(remote[0])
        a.bind = a.bind or "127.0.0.1"
    except (OSError, ValueError) as e:
        p.error(f"{e}{where}")
    if use_slurm:
        lines = [placement_line(f"Slurm allocation {alloc.job_id}", hosts, "with srun "
                                "(--no-slurm: this machine only)")]
        warning = slurm.node_loss_warning(alloc.job_id) if len(hosts) > 1 else None
        lines += [warning] if warning else []
    else:
        source = "-H" if a.hosts else f"--hostfile {a.hostfile}"
        how = "over ssh" if len(remote) == len(hosts) else \
            "over ssh (this machine's directly)" if remote else "on this machine, without ssh"
        lines = [placement_line(f"the hosts of {source}", hosts, how)]
    sys.stderr.write("".join(f"[phalanx] {line}\n" for line in lines))
    sys.stderr.flush()
    return hosts, starter


def _slurm_bind(node: str) -> str:
    """The local address that routes to `node`, by name or else by the NodeAddr Slurm has."""
    from .hosts import route_address
    from .slurm import node_address
    try:
        return route_address(node)
    except ValueError:
        addr = node_address(node)
        if addr is None:
            raise
        return route_address(addr)


def join_main(argv: list[str]) -> int:
    """`phalanx join FILE script.py ...`: run one more worker in a running elastic job."""
    p = _Parser(prog="phalanx join",
                description="Start one worker that joins a running job (started with "
                            "`phalanx run --max-np ... --join-file FILE`) at its next step "
                            "boundary; it heals from its peers and trains with them.")
    p.add_argument("join_file", help="the file `phalanx run --join-file` wrote")
    p.add_argument("script", help="the job's training script")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    a = p.parse_args(argv)
    import json

    from .procs import read_private
    try:
        info = json.loads(read_private(a.join_file, "join file"))
        if not all(isinstance(info.get(k), str) for k in ("address", "secret", "job_id")):
            raise ValueError("it lacks address, secret or job_id")
    except (OSError, ValueError, AttributeError) as e:
        p.error(f"cannot read join file {a.join_file!r}: {e}")
    if not os.path.isfile(a.script):
        p.error(f"script {a.script!r} not found")
    from ..errors import RendezvousError
    from .joiner import run_joined
    try:
        return run_joined(info, a.script, list(a.args))
    except RendezvousError as e:
        sys.stderr.write(f"phalanx join: error: {e}\n")
        return 1


def attach_main(argv: list[str]) -> int:
    """`phalanx attach --etcd H:P,... [JOB]`: follow a job recorded in etcd, from any host."""
    p = _Parser(prog="phalanx attach",
                description="Follow a job started with `phalanx run --etcd` from any host: its "
                            "generations, progress and final one-line summary (exit status: "
                            "the job's). Without JOB, list the jobs recorded there.")
    p.add_argument("--etcd", required=True, metavar="HOST:PORT,...", help="the job's etcd")
    p.add_argument("--etcd-cacert", default=None, metavar="FILE", help="as etcdctl --cacert")
    p.add_argument("--etcd-cert", default=None, metavar="FILE", help="as etcdctl --cert")
    p.add_argument("--etcd-key", default=None, metavar="FILE", help="as etcdctl --key")
    p.add_argument("job", nargs="?", default=None, help="the job id `phalanx run` printed")
    a = p.parse_args(argv)
    from .attach import main as attach
    return attach(p, _etcd(a, p), a.job)


def bench_main(argv: list[str]) -> int:
    """`phalanx bench NAME ...`: dispatch to phalanx.bench.NAME.main."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: phalanx bench {{{','.join(BENCHES)}}} [options]\n\n"
              "Benchmarks that measure phalanx against its peers in the same run:\n"
              "  allreduce  time per op and busbw: phalanx vs raw Gloo vs raw TCP\n"
              "  train      samples/s: phalanx vs torch DDP vs one process\n"
              "  recovery   time to recover from killed/stopped workers vs torchrun\n"
              "  iterative  cached shards vs re-reading vs scikit-learn (vs Spark)\n"
              "  soak       100 mixed chaos faults on one job: nothing lost, no leaks\n"
              "  goodput    simulated ETTR at up to 100,000 GPUs vs the peers, calibrated on a soak\n"
              "  control-plane  the coordinator under N simulated workers: formation, loss\n"
              "             fan-out, re-formation, false losses, threads, memory\n"
              "Run `phalanx bench NAME --help` for a benchmark's options.")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        sys.stderr.write(f"phalanx bench: error: unknown benchmark {name!r}; choose one of "
                         f"{', '.join(BENCHES)}\n")
        return 2
    try:
        mod = importlib.import_module(f"phalanx.bench.{name.replace('-', '_')}")
    except ModuleNotFoundError:
        sys.stderr.write(f"phalanx bench: error: benchmark {name!r} is not available in this "
                         "version\n")
        return 2
    return int(mod.main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: phalanx {run,join,attach,agent,bench} ...\n\n"
              "  run     run a script on N fault-tolerant workers (phalanx run --help)\n"
              "  join    add a worker to a running job (phalanx join --help)\n"
              "  attach  follow a job recorded in etcd, from any host (phalanx attach --help)\n"
              "  agent   start one host's workers for a coordinator elsewhere (phalanx agent "
              "--help)\n"
              "  bench   benchmarks against DDP, Gloo, TCP, torchrun (phalanx bench --help)")
        return 0
    if argv[0] in ("--version", "-V"):
        from importlib.metadata import PackageNotFoundError, version
        try:
            print(f"phalanx {version('phalanx')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print("phalanx (not installed)")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        return run_main(rest)
    if cmd == "bench":
        return bench_main(rest)
    if cmd == "join":
        return join_main(rest)
    if cmd == "attach":
        return attach_main(rest)
    if cmd == "agent":
        from .agent import main as agent_main
        return agent_main(rest)
    sys.stderr.write(f"phalanx: error: unknown command {cmd!r}; use run or bench "
                     "(see `phalanx --help`)\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
