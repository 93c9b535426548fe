"""`phalanx run` inside a Slurm allocation (`sbatch`, `salloc`): read the hosts and slots from
the allocation's environment, and start each host's `phalanx agent` as a job step with `srun`.

The allocation is `SLURM_JOB_NODELIST` (Slurm's hostlist syntax, expanded here with zero-padding
kept: `node[01-03,7]`, `rack[1-2]-n[3-4]`) and `SLURM_TASKS_PER_NODE` (`2(x3),1`), falling back
to `SLURM_NTASKS_PER_NODE`, then one task per node. Ranks are packed node by node, as `-H` packs
them, and each agent's host identity is its Slurm node name.

Each agent is one single-task step on its node (`srun --nodes=1 --ntasks=1 --nodelist=NODE
--overlap`), so a node whose step ends is a lost host, exactly as a broken SSH session is. The
job secret goes to the agent as it does over SSH: on srun's stdin, which srun forwards to the
task; never in argv or in any environment. srun's stdin stays open as the agent's lifeline.

By default Slurm kills (and requeues) a whole allocation when one of its nodes fails, about
SlurmdTimeout after the loss, long after phalanx has recovered from it; `sbatch --no-kill` keeps
the allocation. Slurm shows that flag nowhere (`scontrol show job` on 22.05 prints the same with
and without it), so `kill_on_node_loss` reads what submitted it: SBATCH_NO_KILL or
SALLOC_NO_KILL, the SubmitLine (Slurm 23.02 and later), the batch script's #SBATCH lines.
Parsing is pure; `node_address` and `kill_on_node_loss` run scontrol.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError
from .hosts import HostSlots
from .remote import AgentStarter

JOB_ID = "SLURM_JOB_ID"
JOB_NODELIST = "SLURM_JOB_NODELIST"
NODELIST = "SLURM_NODELIST"  # the older name of SLURM_JOB_NODELIST
TASKS_PER_NODE = "SLURM_TASKS_PER_NODE"
NTASKS_PER_NODE = "SLURM_NTASKS_PER_NODE"
NO_KILL_VARS = ("SBATCH_NO_KILL", "SALLOC_NO_KILL")
"""How sbatch and salloc take --no-kill from the environment (which the job then inherits)."""

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_TASKS = re.compile(r"(\d+)(?:\(x(\d+)\))?")
_MAX_HOSTS = 1 << 20  # a typo like n[0-99999999] must not exhaust memory


def _bad(var: str, value: str, why: str, example: str) -> ConfigError:
    return ConfigError(f"{var}={value!r} is not valid: {why} (expected e.g. {example})")


def _expand_ranges(body: str, var: str, value: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']: a range keeps the width of its lower bound."""
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.fullmatch(part.strip())
        if m is None:
            raise _bad(var, value, f"[{body}] holds {part!r}, not N or N-M", "node[01-04,7]")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise _bad(var, value, f"range {part!r} runs backwards", "node[01-04]")
        if int(hi) - int(lo) >= _MAX_HOSTS:
            raise _bad(var, value, f"range {part!r} is too large", "node[01-04]")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def _split_top(text: str, var: str) -> list[str]:
    """Split at the commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
            if depth > 1:
                raise _bad(var, text, "nested '['", "node[1-4],gpu[01-02]")
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise _bad(var, text, "']' without '['", "node[1-4]")
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise _bad(var, text, "'[' without ']'", "node[1-4]")
    return [*parts, text[start:]]


def expand_hostlist(text: str, var: str = JOB_NODELIST) -> list[str]:
    """Slurm's hostlist syntax, expanded in order: 'n[01-02],gpu5,r[1-2]-n[3-4]' -> ['n01',
    'n02', 'gpu5', 'r1-n3', 'r1-n4', 'r2-n3', 'r2-n4']. Raises ConfigError naming `var`."""
    hosts: list[str] = []
    for entry in _split_top(text.strip(), var):
        entry = entry.strip()
        if not entry:
            raise _bad(var, text, "an empty host name", "node[1-4],gpu5")
        names = [""]
        for piece in re.split(r"(\[[^\]]*\])", entry):
            if piece.startswith("["):
                choices = _expand_ranges(piece[1:-1], var, text)
            elif re.search(r"[\s\]]", piece):
                raise _bad(var, text, f"{piece!r} is not a host name", "node[1-4]")
            else:
                choices = [piece]
            names = [n + c for n in names for c in choices]
            if len(hosts) + len(names) > _MAX_HOSTS:
                raise _bad(var, text, "it names too many hosts", "node[01-04]")
        hosts += names
    return hosts


def parse_tasks_per_node(text: str, var: str = TASKS_PER_NODE) -> list[int]:
    """'2(x3),1' -> [2, 2, 2, 1]. Raises ConfigError naming `var`."""
    out: list[int] = []
    for part in text.strip().split(","):
        m = _TASKS.fullmatch(part.strip())
        if m is None or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
            raise _bad(var, text, f"{part!r} is not N or N(xK) with N, K >= 1", "2(x3),1")
        count = int(m.group(2) or 1)
        if len(out) + count > _MAX_HOSTS:
            raise _bad(var, text, "it counts too many nodes", "2(x3),1")
        out += [int(m.group(1))] * count
    return out


@dataclass(kw_only=True, slots=True, frozen=True)
class Allocation:
    """The Slurm allocation this process runs in."""

    job_id: str
    """SLURM_JOB_ID."""
    nodes: list[tuple[str, int]]
    """(node name, tasks on it), in Slurm's order: what `-H` parses into."""

    @property
    def total(self) -> int:
        return sum(n for _, n in self.nodes)

    def describe(self) -> str:
        return ",".join(f"{name}:{n}" for name, n in self.nodes)


def in_allocation(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a Slurm job (sbatch script, salloc shell, srun task)."""
    return bool((os.environ if environ is None else environ).get(JOB_ID))


def allocation(environ: Mapping[str, str] | None = None) -> Allocation:
    """The allocation described by the environment; ConfigError if it is missing or malformed."""
    e = os.environ if environ is None else environ
    job_id = e.get(JOB_ID, "")
    if not job_id:
        raise ConfigError(f"{JOB_ID} is not set: not inside a Slurm allocation (use sbatch or "
                          "salloc, or give -H)")
    var = JOB_NODELIST if e.get(JOB_NODELIST) else NODELIST
    if not e.get(var):
        raise ConfigError(f"{JOB_ID}={job_id} is set but {JOB_NODELIST} is not: cannot tell "
                          "which nodes the allocation has")
    names = expand_hostlist(e[var], var)
    tvar = TASKS_PER_NODE if e.get(TASKS_PER_NODE) else NTASKS_PER_NODE
    if e.get(tvar):
        tasks = parse_tasks_per_node(e[tvar], tvar)
        if tvar == NTASKS_PER_NODE and len(tasks) == 1:
            tasks = tasks * len(names)  # one count for every node
    else:
        tasks = [1] * len(names)  # what Slurm itself assumes without --ntasks
    if len(tasks) != len(names):
        raise ConfigError(f"{tvar}={e[tvar]!r} counts {len(tasks)} node(s) but "
                          f"{var}={e[var]!r} names {len(names)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{var}={e[var]!r} names node(s) {dup} more than once")
    return Allocation(job_id=job_id, nodes=list(zip(names, tasks)))


def _scontrol(*args: str) -> str | None:
    """scontrol's output, or None if it is missing, fails or hangs."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    try:
        res = subprocess.run([scontrol, *args], check=False, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def node_address(name: str) -> str | None:
    """A node's NodeAddr as Slurm knows it (for nodes whose names do not resolve here)."""
    m = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", "--oneliner", name) or "")
    return m.group(1) if m else None


def no_kill_option(words: list[str]) -> bool | None:
    """What sbatch/salloc options say of --no-kill: True (`-k`, `--no-kill`), False
    (`--no-kill=off`), None (not mentioned). The last mention wins, as in sbatch."""
    said = None
    for w in words:
        if w in ("-k", "--no-kill"):
            said = True
        elif w.startswith("--no-kill="):
            said = w.partition("=")[2].strip().lower() != "off"
    return said


def batch_directives(script: str) -> list[str]:
    """The options of a batch script's `#SBATCH` lines, which sbatch reads up to the first
    line that is neither blank nor a comment."""
    words: list[str] = []
    for line in script.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            try:
                words += shlex.split(line[len("#SBATCH"):], comments=True)
            except ValueError:
                continue  # unbalanced quotes: sbatch would refuse the script anyway
    return words


def kill_on_node_loss(job_id: str, environ: Mapping[str, str] | None = None) -> bool | None:
    """Whether Slurm kills allocation `job_id` when one of its nodes fails: False if it was
    submitted with --no-kill, True if what submitted it can be read and does not say so (the
    default), None if it cannot be told (an salloc allocation on Slurm before 23.02)."""
    e = os.environ if environ is None else environ
    for var in NO_KILL_VARS:
        if e.get(var) is not None:
            return not no_kill_option([f"--no-kill={e[var]}" if e[var] else "--no-kill"])
    show = _scontrol("show", "job", job_id)
    if show is None:
        return None
    submit = re.search(r"^\s*SubmitLine=(.*)$", show, re.MULTILINE)
    try:
        said = no_kill_option(shlex.split(submit.group(1))) if submit else None
    except ValueError:
        said = None
    batch = re.search(r"\bBatchFlag=1\b", show) is not None
    if said is None and batch:
        said = no_kill_option(batch_directives(_scontrol("write", "batch_script", job_id, "-")
                                               or ""))
    if said is not None:
        return not said
    return True if submit or batch else None


def node_loss_warning(job_id: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The launcher's warning when allocation `job_id` may be killed on a node's loss."""
    kill = kill_on_node_loss(job_id, environ)
    if kill is False:
        return None
    fix = ("submit with --no-kill (`#SBATCH --no-kill` in the script, `sbatch --no-kill`, "
           "`salloc --no-kill`, or SBATCH_NO_KILL=1 / SALLOC_NO_KILL=1)")
    what = (f"Slurm allocation {job_id} was not submitted with --no-kill (neither its #SBATCH "
            "lines nor SBATCH_NO_KILL/SALLOC_NO_KILL say so)" if kill else
            f"cannot tell whether Slurm allocation {job_id} was submitted with --no-kill")
    return (f"warning: {what}: without it Slurm kills the whole allocation when any of its "
            "nodes fails, about SlurmdTimeout after phalanx has already recovered from the "
            f"loss; to keep training through a lost node, {fix}")


class SrunStarter(AgentStarter):
    """Starts each host's agent as a one-task step of the allocation on that node."""

    def __init__(self, job_id: str, srun: str = "srun") -> None:
        self.job_id, self.srun = job_id, srun

    def channel(self, host: HostSlots) -> str:
        return "its srun step"

    def command(self, host: HostSlots, argv: list[str]) -> list[str]:
        # --ntasks-per-node=1 overrides SLURM_NTASKS_PER_NODE inherited from sbatch/salloc;
        # --overlap: the agents' steps never wait on each other or on the user's steps;
        # --kill-on-bad-exit=0: one node's end is a lost host, not the end of the job;
        # --cpu-bind=none: under task/affinity one task would be pinned to one CPU, and the
        # agent's workers need all of them; no --exact: the step gets all of the job's CPUs
        # (and by default its GRES) on the node.
        return [self.srun, f"--jobid={self.job_id}", "--nodes=1", "--ntasks=1",
                "--ntasks-per-node=1", f"--nodelist={host.name}", "--overlap",
                "--kill-on-bad-exit=0", "--cpu-bind=none", "--mpi=none", "--quiet",
                "--job-name=phalanx-agent", f"--chdir={os.getcwd()}", "--", *argv]
