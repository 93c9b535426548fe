"""`phalanx run` inside a Slurm allocation.

The allocation's environment is parsed by pure functions, checked against expected lists and
against Slurm's own `scontrol show hostnames`. Real jobs run on a real Slurm (tests/slurmfix.py:
slurmctld and munged here, one slurmd per simulated host): `salloc` runs the launcher on this
machine and `sbatch` on the first node; either way `phalanx run` without -H reads the
allocation and srun starts one agent per node, which gets the job secret on its stdin.
A node that crashes under `sbatch --no-kill` is a lost host and the job trains on; without
--no-kill (which Slurm's default kills the allocation for) the launcher warns at start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from phalanx.errors import ConfigError
from phalanx.launch import slurm
from phalanx.launch.hosts import HostSlots
from slurmfix import own_slurm_cluster, slurm_cluster  # noqa: F401 - the fixtures
from test_multihost import JOB, PLACEMENT, _check_finished, _cmdline, _wait_for_steps

CLI = [sys.executable, "-m", "phalanx.launch.cli"]

HOSTLISTS = [
    ("node[01-03,7],gpu5,rack[1-2]-n[3-4]",
     ["node01", "node02", "node03", "node7", "gpu5", "rack1-n3", "rack1-n4", "rack2-n3",
      "rack2-n4"]),
    ("n[001-10]", [f"n{i:03d}" for i in range(1, 11)]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[98-101],m[0098-0099]", ["n98", "n99", "n100", "n101", "m0098", "m0099"]),
    ("n[7,1-2]", ["n7", "n1", "n2"]),
    ("x[1-2]y[01-02]", ["x1y01", "x1y02", "x2y01", "x2y02"]),
    ("a-b[0-0],single", ["a-b0", "single"]),
    ("phxs[1-2]", ["phxs1", "phxs2"]),
]


@pytest.mark.parametrize("text,expected", HOSTLISTS)
def test_hostlists_expand_in_order_with_padding(text, expected) -> None:
    assert slurm.expand_hostlist(text) == expected


@pytest.mark.timeout(60)
def test_hostlists_expand_as_scontrol_does(tmp_path) -> None:
    """Slurm's own expansion is the reference (scontrol needs a parsable slurm.conf)."""
    if shutil.which("scontrol") is None:
        if os.environ.get("SLURM_REQUIRE") == "1":
            pytest.fail("SLURM_REQUIRE=1 but scontrol is not installed")
        pytest.skip("scontrol is not installed (.ci/setup-slurm.sh)")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=ref\nSlurmctldHost=localhost\nNodeName=n1 State=UNKNOWN\n"
                    "PartitionName=p Nodes=ALL\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for text, _ in HOSTLISTS:
        res = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True,
                             text=True, timeout=10, env={**env, "SLURM_CONF": str(conf)},
                             check=False)
        assert res.returncode == 0, res.stderr
        assert slurm.expand_hostlist(text) == res.stdout.split(), text


def test_tasks_per_node() -> None:
    assert slurm.parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm.parse_tasks_per_node("4") == [4]
    assert slurm.parse_tasks_per_node("1(x2), 3(x1)") == [1, 1, 3]


@pytest.mark.parametrize("call,needle", [
    (lambda: slurm.expand_hostlist("n[1-3"), "'[' without ']'"),
    (lambda: slurm.expand_hostlist("n1-3]"), "']' without '['"),
    (lambda: slurm.expand_hostlist("n[3-1]"), "runs backwards"),
    (lambda: slurm.expand_hostlist("n[a-b]"), "not N or N-M"),
    (lambda: slurm.expand_hostlist("n[]"), "not N or N-M"),
    (lambda: slurm.expand_hostlist("n[[1]]"), "nested"),
    (lambda: slurm.expand_hostlist("a,,b"), "empty host name"),
    (lambda: slurm.expand_hostlist("n[0-99999999]"), "too large"),
    (lambda: slurm.parse_tasks_per_node("2(x0)"), "N(xK) with N, K >= 1"),
    (lambda: slurm.parse_tasks_per_node("two"), "not N or N(xK)"),
])
def test_bad_values_name_the_variable_and_value(call, needle) -> None:
    with pytest.raises(ConfigError) as e:
        call()
    msg = str(e.value)
    assert needle in msg and ("SLURM_JOB_NODELIST='" in msg or "SLURM_TASKS_PER_NODE='" in msg)


def test_the_allocation_from_the_environment() -> None:
    base = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[01-03]"}
    a = slurm.allocation({**base, "SLURM_TASKS_PER_NODE": "2(x2),1"})
    assert (a.job_id, a.nodes, a.total) == ("42", [("gpu01", 2), ("gpu02", 2), ("gpu03", 1)], 5)
    assert a.describe() == "gpu01:2,gpu02:2,gpu03:1"
    assert slurm.allocation({**base, "SLURM_NTASKS_PER_NODE": "4"}).total == 12
    assert slurm.allocation(base).nodes == [("gpu01", 1), ("gpu02", 1), ("gpu03", 1)]
    assert slurm.allocation({"SLURM_JOB_ID": "1", "SLURM_NODELIST": "a,b"}).total == 2
    assert not slurm.in_allocation({}) and slurm.in_allocation(base)
    for environ, needle in [
            ({**base, "SLURM_TASKS_PER_NODE": "2(x2)"}, "counts 2 node(s) but"),
            ({"SLURM_JOB_ID": "42"}, "SLURM_JOB_NODELIST is not"),
            ({**base, "SLURM_JOB_NODELIST": "a,a"}, "more than once"),
            ({}, "SLURM_JOB_ID is not set")]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            slurm.allocation(environ)


def test_srun_starts_one_task_on_the_named_node() -> None:
    argv = slurm.SrunStarter("42").command(HostSlots(name="gpu02", slots=4, first_rank=4),
                                          ["python", "-m", "phalanx.launch.cli", "agent"])
    assert argv[0] == "srun" and argv[-5:] == ["--", "python", "-m", "phalanx.launch.cli",
                                                "agent"]
    for opt in ("--jobid=42", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1",
                "--nodelist=gpu02", "--overlap", "--kill-on-bad-exit=0"):
        assert opt in argv
    assert slurm.SrunStarter("42").why_ended(HostSlots(name="gpu02", slots=1), 1) == \
        "its srun step exited with code 1"


def test_no_kill_is_read_from_options_scripts_and_the_environment(monkeypatch) -> None:
    """What submitted an allocation says of --no-kill: the last option wins, #SBATCH lines count
    up to the first command, SBATCH_NO_KILL / SALLOC_NO_KILL as sbatch and salloc read them."""
    assert slurm.no_kill_option(["-N2", "--no-kill", "x.sh"]) is True
    assert slurm.no_kill_option(["-k"]) is True and slurm.no_kill_option(["-N2"]) is None
    assert slurm.no_kill_option(["--no-kill", "--no-kill=off"]) is False
    script = ("#!/bin/bash\n# a comment\n#SBATCH -N 2 --ntasks-per-node=4  # two nodes\n\n"
              "#SBATCH --no-kill\nphalanx run train.py\n#SBATCH --no-kill=off\n")
    assert slurm.batch_directives(script) == ["-N", "2", "--ntasks-per-node=4", "--no-kill"]
    assert slurm.kill_on_node_loss("1", {"SBATCH_NO_KILL": "1"}) is False
    assert slurm.kill_on_node_loss("1", {"SALLOC_NO_KILL": "off"}) is True
    shows = {"batch": "JobId=7 BatchFlag=1 Restarts=0\n",
             "submit": "JobId=7 BatchFlag=0\n   SubmitLine=salloc -N2 --no-kill bash\n",
             "salloc": "JobId=7 BatchFlag=0 Restarts=0\n"}
    for show, script, expected in [("batch", "#!/bin/sh\n#SBATCH --no-kill\n", False),
                                   ("batch", "#!/bin/sh\nphalanx run x.py\n", True),
                                   ("submit", "", False), ("salloc", "", None)]:
        monkeypatch.setattr(slurm, "_scontrol", lambda *a, show=show, script=script:
                            shows[show] if a[0] == "show" else script)
        assert slurm.kill_on_node_loss("7", {}) is expected, (show, script)
    assert slurm.node_loss_warning("7", {"SALLOC_NO_KILL": "1"}) is None
    monkeypatch.setattr(slurm, "_scontrol", lambda *a: None)  # no scontrol: cannot tell
    warning = slurm.node_loss_warning("7", {})
    assert warning is not None and warning.startswith("warning: cannot tell whether Slurm "
                                                      "allocation 7 was submitted with --no-kill")
    assert "#SBATCH --no-kill" in warning


@pytest.mark.timeout(60)
def test_run_inside_an_allocation_refuses_more_workers_than_tasks(tmp_path) -> None:
    """Without -H, an allocation is used: its size bounds -np, the error says so and names
    the way out (--no-slurm), which runs a plain local job."""
    (tmp_path / "x.py").write_text("import phalanx as px\npx.init()\nprint('size', px.size())\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)"}
    res = subprocess.run([*CLI, "run", "-np", "5", str(tmp_path / "x.py")], env=env,
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 2
    assert "Slurm allocation 7 has n1:2,n2:2" in res.stderr and "--no-slurm" in res.stderr
    bad = {**env, "SLURM_JOB_NODELIST": "n[2-1]"}
    res = subprocess.run([*CLI, "run", str(tmp_path / "x.py")], env=bad, capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode == 2 and "SLURM_JOB_NODELIST='n[2-1]'" in res.stderr, res.stderr
    res = subprocess.run([*CLI, "run", "--no-slurm", str(tmp_path / "x.py")],
                         env=env, capture_output=True, text=True, timeout=50, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "size 1" in res.stdout and "Slurm" not in res.stderr


# ------------------------------------------------------------------ on a real Slurm cluster
def _env(cluster) -> dict[str, str]:
    return {**cluster.env, "PYTHONPATH": str(REPO / "src")}


def _stop(proc: subprocess.Popen) -> None:
    """End salloc/sbatch and every process of its session: salloc runs its command in a
    process group of its own, which outlives a killed salloc."""
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(stat[3]) == proc.pid and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.communicate()


def _environ(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _ppid_comm(pid: str) -> str:
    try:
        ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        return Path(f"/proc/{ppid}/comm").read_text().strip()
    except (OSError, IndexError):
        return ""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_salloc_job_runs_on_the_allocation_and_keeps_the_secret(slurm_cluster,  # noqa: F811
                                                                 tmp_path) -> None:
    """`salloc -N 2 --ntasks-per-node=2 phalanx run p.py`: 4 workers packed node by node, each
    with its node's hostname and Horovod's local/cross ranks; the agents are srun tasks (their
    parent is slurmstepd). While the job runs the secret is in no process's argv, and in the
    environment of the workers only; afterwards it is in no output, log or Slurm state file."""
    cluster = slurm_cluster
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "p.py"
    script.write_text(PLACEMENT + "\nimport time\ntime.sleep(3)  # stay up for the checks\n")
    join = tmp_path / "join.json"
    proc = subprocess.Popen(
        ["salloc", "-N2", "--ntasks-per-node=2", "--quiet", "--immediate=30", *CLI, "run",
         "--join-file", str(join), str(script), str(out)],
        env=_env(cluster), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.glob("out*.json"))) < 4 and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert join.exists(), proc.communicate(timeout=30)
        secret = json.loads(join.read_text())["secret"]
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        in_argv = [p for p in pids if secret in _cmdline(int(p))]
        in_env = {p: _cmdline(int(p)) for p in pids if secret.encode() in _environ(p)}
        agents = [p for p in pids if _cmdline(int(p)).startswith(f"{CLI[0]} -m phalanx.launch"
                                                                  ".cli agent ")
                  and str(script) in _cmdline(int(p))]  # not srun's; not other tests'
        parents = sorted({_ppid_comm(p) for p in agents})
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 0, stderr[-3000:] + cluster.logs()
    assert not in_argv, f"the secret is in the argv of pids {in_argv}"
    assert in_env and all(str(script) in c for c in in_env.values()), \
        f"the secret is in the environment of non-workers: {in_env}"
    assert len(agents) == 2 and parents == ["slurmstepd"], (agents, parents)
    nodes = cluster.nodes
    assert "using Slurm allocation" in stderr and \
        f"{nodes[0]}:2 (ranks 0-1), {nodes[1]}:2 (ranks 2-3)" in stderr
    warning = [ln for ln in stderr.splitlines() if ln.startswith("[phalanx] warning:")]
    assert len(warning) == 1 and "--no-kill" in warning[0], stderr[-3000:]  # salloc's default
    outs = [json.loads((out / f"out{r}.json").read_text()) for r in range(4)]
    for r, o in enumerate(outs):
        assert (o["rank"], o["size"], o["host"]) == (r, 4, nodes[r // 2])
        assert o["local"] == [r % 2, 2] and o["cross"] == [r // 2, 2]
        assert o["obj"] == [0, 10, 20, 30]
    files = [p for p in cluster.dir.rglob("*") if p.is_file() and not p.is_socket()]
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaked and secret not in stdout + stderr, leaked


def _sbatch(cluster, args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(["sbatch", "--wait", "--parsable", "-N2", "--ntasks-per-node=2", "-o",
                             str(log), *args], env=_env(cluster), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(cluster, proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """sbatch --wait's output; past `timeout` (or on failure) every job of ours is cancelled."""
    stdout = stderr = ""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        _stop(proc)
        if proc.returncode != 0:  # a job outlives its sbatch --wait; this cluster is ours
            cluster.run(["scancel", "--user=root"])
    return stdout, stderr


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sbatch_without_no_kill_warns_at_start(slurm_cluster, tmp_path) -> None:  # noqa: F811
    """`sbatch --wait -N 2 --ntasks-per-node=2 --wrap 'phalanx run p.py'`: the launcher runs on
    the first node (node names resolve only through Slurm there), says where each rank runs,
    then warns that Slurm's default kills the allocation when a node fails."""
    cluster = slurm_cluster
    (tmp_path / "p.py").write_text("import phalanx as px\npx.init()\n")
    log = tmp_path / "slurm.out"
    cmd = f"exec {sys.executable} -m phalanx.launch.cli run {tmp_path / 'p.py'}"
    stdout, stderr = _finish(cluster, _sbatch(cluster, ["--wrap", cmd], log, tmp_path), 50)
    text = log.read_text() if log.exists() else ""
    assert stdout.strip() and "job finished" in text, stderr + text[-3000:] + cluster.logs()
    lines = text.splitlines()
    assert lines[0] == (f"[phalanx] using Slurm allocation {stdout.strip()}: 4 worker(s) on "
                        f"{cluster.nodes[0]}:2 (ranks 0-1), {cluster.nodes[1]}:2 (ranks 2-3), "
                        "agents started with srun (--no-slurm: this machine only)"), text[:2000]
    assert lines[1].startswith(f"[phalanx] warning: Slurm allocation {stdout.strip()} was not "
                               "submitted with --no-kill"), text[:2000]
    assert "#SBATCH --no-kill" in lines[1], lines[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_no_kill_job_trains_past_a_crashed_node(own_slurm_cluster, tmp_path) -> None:  # noqa: F811
    """`#SBATCH --no-kill`, 4 workers on 2 nodes: node 2 crashes (its slurmd, agent and workers
    at once). The launcher reports the lost host (its name, the workers' pids there; no Gloo
    essay), the 2 survivors re-form and keep training past the moment Slurm sets the node DOWN
    (which would have killed the allocation without --no-kill), and finish with bitwise-equal
    parameters, every sample exactly once per epoch. No warning at start."""
    cluster = own_slurm_cluster
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "job.py").write_text(JOB)
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/sh\n#SBATCH --no-kill\nexec {sys.executable} -m "
                      "phalanx.launch.cli run --min-np 2 --heartbeat-timeout 1.5 "
                      f"{tmp_path / 'job.py'} {out} 0 0.05\n")
    log = tmp_path / "slurm.out"
    proc = _sbatch(cluster, [str(script)], log, tmp_path)
    lost = cluster.nodes[1]
    try:
        _wait_for_steps(out, 8, timeout=60)
        job = cluster.run(["squeue", "--noheader", "--format=%i"]).stdout.split()
        assert len(job) == 1, job
        cluster.crash_node(1)
        deadline = time.monotonic() + 60  # Slurm gives up on it ~2 SlurmdTimeouts (10 s) later
        while cluster.job_nodes(job[0]) != cluster.nodes[0] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cluster.job_nodes(job[0]) == cluster.nodes[0], cluster.logs()
        time.sleep(2)  # the moment Slurm would have cancelled the job without --no-kill
        assert proc.poll() is None, log.read_text()[-3000:]
        (out / "stop").touch()
        _, stderr = _finish(cluster, proc, 60)
    finally:
        if proc.poll() is None:
            _stop(proc)
            cluster.run(["scancel", "--user=root"])
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, stderr + text[-3000:] + cluster.logs()
    assert "[phalanx] warning" not in text and "(ranks 2-3)" in text.splitlines()[0], text[:2000]
    gone = [ln for ln in text.splitlines() if f"host {lost} lost:" in ln and "rank" in ln]
    assert gone and all(re.search(r"\(worker w[23], pid [1-9]\d*\)", ln) for ln in gone), text
    assert "pid -1" not in text and "This is typically caused" not in text, text[-3000:]
    assert "job finished" in text.strip().splitlines()[-1], text[-3000:]
    _check_finished(out, size=2, epochs=None)
