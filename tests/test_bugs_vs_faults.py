"""No silent harm in the launcher's verdicts (issue 20, items 5, 6, 9, 10, 11, 12): real jobs,
real exits and signals, checked against what the user asked for.

- a collective mismatch is a bug: the job fails at once and the last line names it;
- an exit status the script chose is a bug, never respawned, even when the coordinator saw the
  worker go first; `sys.exit(0)` mid-training is reported as a worker that left early;
- a worker killed by the kernel's OOM killer is named so (a real memory cgroup);
- a non-elastic job that loses a worker says how to make it elastic;
- output prefixes and chaos rules speak of the stable worker id after ranks are renumbered;
- a replacement that never joined is not counted as a finished worker;
- `after=` chaos rules fire in any program, elastic API or not.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid

import pytest

# An elastic loop. exit=R:S:HOW makes the worker first started as rank R leave at step S by
# HOW: `os3` (os._exit(3)) or `sys0` (sys.exit(0)).
JOB = """
import os, sys, time
import torch, phalanx as px
px.init()
args = dict(a.split("=") for a in sys.argv[1:])
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model=model)
state = px.elastic.State(model=model, optimizer=opt)
steps, pause = int(args.get("steps", 40)), float(args.get("pause", 0.02))
who, at, how = args.get("exit", "-:-1:-").split(":")

@px.elastic.run
def train(state):
    while state.step < steps:
        if os.environ["PHALANX_WORKER_ID"] == who and state.step == int(at):
            os._exit(3) if how == "os3" else sys.exit(0)
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        time.sleep(pause)

train(state)
print("done at step", state.step)
"""


def last_line(res: subprocess.CompletedProcess[str]) -> str:
    return res.stderr.strip().splitlines()[-1]


def test_collective_mismatch_is_a_bug_and_never_respawned(job) -> None:
    script = """
    import torch, phalanx as px
    px.init()
    px.allreduce(torch.ones(4 if px.rank() == 0 else 5))
    """
    res = job(script, 2, "--min-np", "1", "--max-restarts", "3", timeout=60)
    line = last_line(res)
    assert res.returncode == 1, res.stderr
    assert "respawning" not in res.stderr and "ProgressLost" not in res.stderr
    assert line.startswith("[phalanx] job failed: rank ") and "raised CollectiveMismatch" in line
    assert "allreduce" in line and "rank(s) [0]" in line and "rank(s) [1]" in line
    assert "shape=(4,)" in line and "shape=(5,)" in line
    assert re.search(r"\(at \S+job\.py:4\)$", line), line


def test_an_exit_status_the_script_chose_is_a_bug_not_a_fault(job) -> None:
    res = job(JOB, 3, "--min-np", "1", "--max-restarts", "2", script_args=("exit=w1:10:os3",),
              timeout=60)
    assert res.returncode == 3, res.stderr
    # The survivors may have re-formed before the launcher reaped the exit; it is still a bug.
    assert "respawning" not in res.stderr and "fault(s) recovered" not in res.stderr
    assert re.search(r"job failed: rank 1 \(worker w1, pid \d+\) exited with code 3 \(an exit "
                     r"status the program chose: a bug, not a fault\)", last_line(res)), res.stderr


def test_sys_exit_0_mid_training_is_a_worker_that_left_early(job) -> None:
    res = job(JOB, 3, "--min-np", "1", script_args=("exit=w1:10:sys0",), timeout=60)
    assert res.returncode == 0, res.stderr
    line = last_line(res)
    assert "2 worker(s) finished (started with 3)" in line, line
    assert re.search(r"1 left early \(rank 1 \(worker w1, pid \d+\) exited with code 0 at step 10; "
                     r"the job went on to step 40\)", line), line


def test_a_replacement_that_never_joined_is_not_counted_as_finished(job) -> None:
    # The survivors finish within ~50 ms of the kill; the replacement needs seconds to start.
    res = job(JOB, 2, "--min-np", "1", "--max-restarts", "1", "--chaos", "kill:rank=1,step=38",
              timeout=60)
    assert res.returncode == 0, res.stderr
    line = last_line(res)
    assert "respawning it" in res.stderr
    assert "1 worker(s) finished (started with 2)" in line, line
    assert "1 replacement(s) never joined (the job ended first)" in line, line


def test_prefixes_and_chaos_rules_follow_the_stable_worker_id(job) -> None:
    # w0 dies at step 5, so w2 becomes rank 1; `worker=w2` still finds it at step 15.
    res = job(JOB, 3, "--min-np", "1", "--chaos", "kill:rank=0,step=5;kill:worker=w2,step=15",
              timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert re.search(r"\[rank1 w2\]: \[chaos\] sending SIGKILL to rank 1 \(worker w2, pid \d+\) "
                     r"at step 15", out), out
    assert "never fired" not in out
    assert "[rank0 w1]: done at step 40" in out, out


def test_timed_chaos_fires_in_any_program_and_non_elastic_loss_names_the_fix(job) -> None:
    plain = """
    import time
    time.sleep(30)
    """
    res = job(plain, 2, "--chaos", "kill:rank=1,after=0.5s", timeout=60)
    assert res.returncode == 137, res.stderr
    assert re.search(r"\[chaos\] sending SIGKILL to worker w1 \(pid \d+\) \d+\.\ds into the job",
                     res.stderr), res.stderr
    line = last_line(res)
    assert "was killed by SIGKILL" in line and "--min-np" in line and "--max-restarts" in line


def test_a_timed_rule_that_was_not_due_is_reported(job) -> None:
    res = job("print('hi')\n", 1, "--chaos", "stop:rank=0,after=100s", timeout=60)
    assert res.returncode == 0, res.stderr
    assert "chaos rule 'stop:rank=0,after=100s' never fired (the job ended" in res.stderr


# --------------------------------------------------------------------------- OOM kills
def _memory_cgroup_root() -> str | None:
    from phalanx.launch import oom
    root = oom.memory_cgroup(os.getpid())
    if os.geteuid() != 0 or root is None or not os.access(root, os.W_OK):
        return None
    return root


@pytest.fixture
def small_cgroup():
    """A memory cgroup limited to 200 MiB, removed after the test."""
    root = _memory_cgroup_root()
    if root is None:
        pytest.skip("needs root and a writable memory cgroup to make a real OOM kill")
    path = os.path.join(root, f"phalanx-test-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    try:
        limit = "memory.max" if os.path.exists(os.path.join(path, "memory.max")) \
            else "memory.limit_in_bytes"
        with open(os.path.join(path, limit), "w") as f:
            f.write(str(200 << 20))
        yield path
    finally:
        os.rmdir(path)


def test_an_oom_kill_is_named_as_such(job, small_cgroup) -> None:
    hog = f"""
    import os
    with open({os.path.join(small_cgroup, "cgroup.procs")!r}, "w") as f:
        f.write(str(os.getpid()))
    blocks = [bytearray(32 << 20) for _ in range(64)]  # 2 GiB against a 200 MiB limit
    """
    res = job(hog, 1, timeout=60)
    assert res.returncode == 137, res.stderr
    assert re.search(r"rank 0 \(worker w0, pid \d+\) was killed by SIGKILL \((probably )?out of "
                     r"memory", last_line(res)), res.stderr


# --------------------------------------------------------------------------- pure decisions
def test_chaos_rules_name_workers_and_wall_clock_times() -> None:
    from phalanx.elastic.chaos import parse_chaos, should_fire, timed_victims
    by_worker, timed, rand = parse_chaos("kill:worker=w2,step=5;stop:rank=1,after=1.5s;"
                                         "term:random,seed=3,after=2")
    assert (by_worker.worker, by_worker.step, timed.after, rand.after) == ("w2", 5, 1.5, 2.0)
    assert should_fire(by_worker, rank=1, size=2, step=5, worker="w2")
    assert not should_fire(by_worker, rank=2, size=3, step=5, worker="w1")
    assert not should_fire(timed, rank=1, size=2, step=5, worker="w1")  # not a step rule
    rules = [by_worker, timed, rand]
    assert timed_victims(rules, elapsed=1.0, fired=set(), np=4) == []
    assert timed_victims(rules, elapsed=1.6, fired=set(), np=4) == [(timed, "w1")]
    assert timed_victims(rules, elapsed=9, fired={1}, np=4)[0][0] is rand
    for bad, needle in (("kill:rank=1,worker=w1,step=3", "not both"),
                        ("cut:rank=1,after=2s", "cut needs"),
                        ("kill:rank=1,after=soon", "not a duration"),
                        ("kill:worker=x1,step=3", "not a worker id"),
                        ("kill:rank=1,step=3,after=1s", "exactly one")):
        with pytest.raises(ValueError, match=needle):
            parse_chaos(bad)


def test_exit_verdicts() -> None:
    from phalanx.launch.report import Exit, summary
    chose = Exit(slot=1, worker="w1", pid=9, code=3, seen=0.0, lost=True)
    assert not chose.is_fault and "a bug, not a fault" in chose.why()
    assert Exit(slot=1, worker="w1", pid=9, code=-9, seen=0.0).is_fault
    cascade = Exit(slot=1, worker="w1", pid=9, code=1, seen=0.0,
                   error={"type": "WorkerLost", "cascade": True})
    assert cascade.is_fault
    exits = [Exit(slot=0, worker="w0", pid=1, code=0, seen=0.0, step=40),
             Exit(slot=1, worker="w1", pid=2, code=0, seen=0.0, step=10),
             Exit(slot=1, worker="w1.1", pid=3, code=0, seen=0.0, joined=False)]
    line = summary(seconds=1.0, started=2, exits=exits, generations=2, restarts=1,
                   last_step=40)
    assert "1 worker(s) finished (started with 2), 1 left early" in line
    assert "1 replacement(s) never joined" in line and line.endswith("no faults")
