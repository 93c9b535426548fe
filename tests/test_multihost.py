"""Jobs across simulated hosts (network namespaces with their own address, hostname, /dev/shm
and PID space, reached over real SSH): placement, collectives, losing a whole host.

`phalanx run -H a:2,b:2` starts one `phalanx agent` per host over SSH; the coordinator runs in
the launcher, on the bridge address the hosts route to.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from simhosts import simhosts  # noqa: F401 - the fixture

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}
# Elastic softmax regression on digits. After each committed step every rank logs the whole
# step's sample plan (all ranks), so a crash that kills a worker between its reduction and a log
# line of its own cannot hide samples that were trained. With EPOCHS 0 it trains until the file
# OUT/stop appears (checked by every rank at each epoch end).
JOB = """
import json, os, socket, sys, time
import torch
from sklearn.datasets import load_digits
import phalanx as px
from phalanx.data import ArrayDataset, ShardedLoader
out, epochs, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(1)
px.init()
d = load_digits()
X, Y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
loader = ShardedLoader(ArrayDataset(X, Y), batch_size=32, seed=0)
torch.manual_seed(0)
model = torch.nn.Linear(64, 10)
opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model=model)
state = px.elastic.State(model=model, optimizer=opt, loaders=[loader], epoch=0)
log = open(os.path.join(out, "steps." + os.environ["PHALANX_WORKER_ID"] + ".jsonl"), "a",
           buffering=1)

@px.elastic.run
def train(state):
    for state.epoch in range(state.epoch, epochs or 1 << 30):
        for x, y in loader:
            plan = [p.tolist() for p in loader.pending_step]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y, reduction="sum").div(32).backward()
            time.sleep(pause)
            opt.step()
            log.write(json.dumps({"e": state.epoch, "s": state.step, "plan": plan}) + "\\n")
        stop = float(os.path.exists(os.path.join(out, "stop")))
        if not epochs and px.allreduce(stop, op="max", name="test.stop") > 0:
            break

train(state)
torch.save({"params": [p.detach().clone() for p in model.parameters()], "size": px.size(),
            "host": socket.gethostname(), "worker": os.environ["PHALANX_WORKER_ID"]},
           os.path.join(out, f"rank{px.rank()}.pt"))
px.barrier()
"""

PLACEMENT = """
import json, os, socket, sys
import numpy as np, torch, phalanx as px
px.init()
r, n = px.rank(), px.size()
x = np.arange(6.0).reshape(2, 3) * (r + 1)
out = {"rank": r, "size": n, "local": [px.local_rank(), px.local_size()],
       "cross": [px.cross_rank(), px.cross_size()], "host": socket.gethostname(),
       "sum": px.allreduce(x, op="sum").tolist(), "max": px.allreduce(x, op="max").tolist(),
       "gather": px.allgather(torch.full((r + 1,), float(r))).tolist(),
       "bcast": px.broadcast(x, root=n - 1).tolist(), "obj": px.allgather_object(r * 10),
       "path": "hier" if px.runtime.current().group.hier is not None else "flat",
       "env": {k: os.environ.get(k) for k in ("PHX_FWD", "PHX_SET", "SSH_PHX_DENIED",
                                              "SSH_PHX_FORCED")}}
big = np.arange(100_003, dtype=np.float64) * (r + 1)   # several shared-memory rounds
out["big"] = bool(np.array_equal(px.allreduce(big, op="sum"), np.arange(100_003.0) * n * (n + 1) / 2))
with open(os.path.join(sys.argv[1], f"out{r}.json"), "w") as f:
    json.dump(out, f)
"""


def launch(hosts, slots: int, *args: str, wait: bool = True, env=None, **kw):
    spec = ",".join(f"{h.addr}:{slots}" for h in hosts)
    cmd = [sys.executable, "-m", "phalanx.launch.cli", "run", "-H", spec, "--ssh-config",
           str(hosts.ssh_config), *args]
    if wait:
        return subprocess.run(cmd, env=env or ENV, capture_output=True, text=True, timeout=150,
                              **kw)
    return subprocess.Popen(cmd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algo", ["auto", "gloo"])
def test_placement_and_collectives_across_hosts(simhosts, tmp_path, algo) -> None:  # noqa: F811
    """2 hosts x 2 ranks: placement (the launcher's first line says which ranks run where), and
    every collective against numpy on the hierarchical path ('auto' picks it for this layout)
    and on flat Gloo. The launcher's environment reaches the remote workers (its PHALANX_*
    settings too), less the variables it keeps back (SSH_*), which `-x NAME` forwards anyway;
    `-x NAME=VALUE` sets one."""
    hosts = simhosts(2)
    (tmp_path / "p.py").write_text(PLACEMENT)
    env = {**ENV, "PHALANX_ALLREDUCE": algo, "PHALANX_SHM_MAX_BYTES": str(64 << 10),
           "PHALANX_HIER_MIN_BYTES": "0",   # small tensors go hierarchical too
           "PHX_FWD": "from the launcher", "PHX_SET": "overridden", "SSH_PHX_DENIED": "1",
           "SSH_PHX_FORCED": "2"}
    res = launch(hosts, 2, "-x", "PHX_SET=by -x", "-x", "SSH_PHX_FORCED",
                 str(tmp_path / "p.py"), str(tmp_path), cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.startswith(f"[phalanx] using the hosts of -H: 4 worker(s) on "
                                 f"{hosts[0].addr}:2 (ranks 0-1), {hosts[1].addr}:2 (ranks 2-3), "
                                 "agents started over ssh\n"), res.stderr[:500]
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(4)]
    x = [[[c * (r + 1) for c in row] for row in ([0.0, 1.0, 2.0], [3.0, 4.0, 5.0])]
         for r in range(4)]
    for r, o in enumerate(outs):
        assert o["host"] == hosts[r // 2].name  # packed host by host
        assert o["local"] == [r % 2, 2] and o["cross"] == [r // 2, 2]
        assert o["sum"] == [[sum(x[q][i][j] for q in range(4)) for j in range(3)]
                            for i in range(2)]
        assert o["max"] == x[3] and o["bcast"] == x[3]
        assert o["gather"] == [0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]
        assert o["obj"] == [0, 10, 20, 30] and o["big"]
        assert o["path"] == ("hier" if algo == "auto" else "flat")
        assert o["env"] == {"PHX_FWD": "from the launcher", "PHX_SET": "by -x",
                            "SSH_PHX_DENIED": None, "SSH_PHX_FORCED": "2"}, o["env"]


def _wait_for_steps(out: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = sum(len(p.read_text().splitlines()) for p in out.glob("steps.*.jsonl"))
        if lines >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"the job did not reach {n} logged steps within {timeout}s")


def _check_finished(out: Path, size: int, epochs: int | None) -> list[dict]:
    """Every rank's final parameters equal, every sample once per epoch (`epochs` of them, or
    however many a job run until its stop file trained); the final records."""
    finals = [torch.load(p, weights_only=False) for p in sorted(out.glob("rank*.pt"))]
    assert len(finals) == size, [f["size"] for f in finals]
    assert all(f["size"] == size for f in finals), [f["size"] for f in finals]
    for f in finals[1:]:
        for a, b in zip(finals[0]["params"], f["params"]):
            assert torch.equal(a, b), "ranks ended with different parameters"
    steps: dict[int, dict] = {}
    for p in out.glob("steps.*.jsonl"):
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            assert steps.setdefault(rec["s"], rec) == rec, "two histories for one step"
    per_epoch: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for rec in steps.values():
        per_epoch[rec["e"]].update(i for part in rec["plan"] for i in part)
    assert sorted(per_epoch) == list(range(epochs if epochs else len(per_epoch)))
    for e, counts in per_epoch.items():
        assert set(counts) == set(range(1797)), f"epoch {e}: samples missing"
        assert all(c == 1 for c in counts.values()), f"epoch {e}: samples trained twice"
    return finals


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["crash", "cut"])
def test_losing_a_whole_host(simhosts, tmp_path, fault) -> None:  # noqa: F811
    """Host 2 (two workers and its agent) crashes or is cut off mid-training: the workers on
    host 1 re-form once and finish with bitwise-equal parameters, every sample exactly once;
    nothing of the job is left running on the lost host. The launcher names the lost host, how
    it went (its ssh session's end, or its silence) and each lost worker's pid there."""
    hosts = simhosts(2)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "job.py").write_text(JOB)
    proc = launch(hosts, 2, "--min-np", "2", "--heartbeat-timeout", "1.5",
                  str(tmp_path / "job.py"), str(out), "3", "0.05", wait=False, cwd=tmp_path)
    try:
        _wait_for_steps(out, 24, timeout=90)
        (hosts[1].crash if fault == "crash" else hosts[1].cut)()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    _check_finished(out, size=2, epochs=3)
    last = stderr.strip().splitlines()[-1]
    assert "2 fault(s) recovered" in last, last
    how = ("its ssh session exited with code 255 (ssh's status when the connection fails or "
           "drops)" if fault == "crash" else "its agent has been silent for more than 1.5s and "
           "every worker there is lost: the host crashed or its network is cut")
    lost = [ln for ln in stderr.splitlines() if f"host {hosts[1].addr} lost: {how}" in ln]
    assert lost and all(re.search(r"\(worker w[23], pid [1-9]\d*\)", ln) for ln in lost
                        if "rank" in ln), stderr[-3000:]
    assert "pid -1" not in stderr
    time.sleep(1 if fault == "crash" else 2)  # the cut-off agent stops its workers by itself
    left = [p for p in hosts[1].pids() if "python" in _cmdline(p)]
    assert not left, f"processes of the job left on the lost host: {left}"


@pytest.mark.timeout(150)
def test_agents_fire_timed_chaos_and_prefix_with_the_stable_worker_id(simhosts, tmp_path) -> None:  # noqa: F811
    """-H a:1,b:1 --chaos kill:worker=w0,after=...: host a's agent sends the real SIGKILL (the
    program needs no chaos hook), w1 on host b becomes rank 0 and host b's agent prefixes its
    lines `[rank0 w1]`; the launcher counts the rule as fired."""
    hosts = simhosts(2)
    out = tmp_path / "out"
    out.mkdir()
    # A line printed well after the re-formation: by then the agent has heard the new ranks
    # (a line printed within milliseconds of it may still carry the old prefix).
    (tmp_path / "job.py").write_text(JOB + "print('finished as', os.environ['PHALANX_WORKER_ID'], "
                                           "file=sys.stderr, flush=True)\n")
    proc = launch(hosts, 1, "--min-np", "1", "--chaos", "kill:worker=w0,after=25s",
                  str(tmp_path / "job.py"), str(out), "0", "0.05", wait=False, cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")),
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 110
        while not any("recovered in" in ln for ln in lines) and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.2)
        (out / "stop").touch()
        proc.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert proc.returncode == 0, text[-3000:]
    assert re.search(r"\[phalanx agent \S+\] \[chaos\] sending SIGKILL to worker w0 \(pid \d+\) "
                     r"\d+\.\ds into the job", text), text[-3000:]
    assert "never fired" not in text
    # The coordinator may see its heartbeat stop and fence it before its agent reaps it.
    assert re.search(r"rank 0 \(worker w0, pid \d+\) was killed by SIGKILL( \(fenced by the "
                     r"launcher\))?; continuing without", text), text[-3000:]
    assert "[rank0 w1]: finished as w1" in text, text[-3000:]
    _check_finished(out, size=1, epochs=None)


@pytest.mark.timeout(90)
def test_a_remote_worker_that_dies_before_joining_fails_the_job(simhosts, tmp_path) -> None:  # noqa: F811
    """A worker on host b exits with status 4 during its imports, before it ever joined: its
    agent's report reaches the launcher (it used to be dropped, and the job waited forever)."""
    hosts = simhosts(2)
    (tmp_path / "job.py").write_text(
        "import os, sys\nif os.environ['PHALANX_RANK'] == '1':\n    sys.exit(4)\n"
        "import phalanx as px\npx.init()\npx.barrier()\n")
    res = launch(hosts, 1, str(tmp_path / "job.py"), cwd=tmp_path)
    assert res.returncode == 4, res.stderr[-3000:]
    assert re.search(r"job failed: rank 1 \(worker w1, pid \d+\) exited with code 4",
                     res.stderr), res.stderr[-3000:]


@pytest.mark.timeout(120)
def test_replacements_respawn_on_the_remaining_host(simhosts, tmp_path) -> None:  # noqa: F811
    """-H a:2,b:2 --min-np 2 --max-restarts 2, host b crashes mid-training: b is blacklisted,
    both replacements start on host a, and the job ends with 4 workers there, bitwise-equal
    parameters and every sample exactly once per epoch; nothing of the job is left on b."""
    hosts = simhosts(2)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "job.py").write_text(JOB)
    proc = launch(hosts, 2, "--min-np", "2", "--max-restarts", "2", "--heartbeat-timeout",
                  "1.5", str(tmp_path / "job.py"), str(out), "0", "0.05", wait=False,
                  cwd=tmp_path)
    try:
        _wait_for_steps(out, 24, timeout=90)
        hosts[1].crash()
        _wait_for_replacements(out, ["w2", "w3"], timeout=60)
        (out / "stop").touch()
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    finals = _check_finished(out, size=4, epochs=None)
    a, b = hosts[0], hosts[1]
    workers = sorted(f["worker"] for f in finals)
    assert [w.split(".")[0] for w in workers] == ["w0", "w1", "w2", "w3"], workers
    assert "." in workers[2] and "." in workers[3], workers  # rank slots 2, 3: replacements
    assert all(f["host"] == a.name for f in finals), [(f["worker"], f["host"]) for f in finals]
    assert f"host {b.addr} blacklisted for 60s" in stderr, stderr[-3000:]
    for w in workers[2:]:
        assert f"replacement {w} for rank slot {w[1]} goes to host {a.addr}" in stderr
    last = stderr.strip().splitlines()[-1]
    assert "4 worker(s) finished" in last and "2 replacement(s) started" in last, last
    left = [p for p in b.pids() if "python" in _cmdline(p)]
    assert not left, f"processes of the job left on the lost host: {left}"


@pytest.mark.timeout(150)
def test_a_returned_host_takes_a_replacement_after_its_cooldown(simhosts, tmp_path) -> None:  # noqa: F811
    """Host b crashes: its replacements start on host a. b comes back; once its 2 s cooldown is
    over, the next replacement needed (one on host a is killed) goes to b, whose agent the
    launcher starts again; the job ends with 4 workers, one on b, nothing lost."""
    hosts = simhosts(2)
    a, b = hosts[0], hosts[1]
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "job.py").write_text(JOB)
    proc = launch(hosts, 2, "--min-np", "2", "--max-restarts", "3", "--heartbeat-timeout",
                  "1.5", "--host-cooldown", "2", str(tmp_path / "job.py"), str(out), "0",
                  "0.05", wait=False, cwd=tmp_path)
    try:
        _wait_for_steps(out, 24, timeout=90)
        b.crash()
        _wait_for_replacements(out, ["w2"], timeout=60)
        b.restart()
        time.sleep(2.5)  # past the cooldown
        victim = [p for p in _pids_of("w2.") if "child.py" in _cmdline(p)]
        assert len(victim) == 1, victim
        os.kill(victim[0], 9)
        _wait_for_replacements(out, ["w2.1"], timeout=60)  # w2.1's own replacement
        (out / "stop").touch()
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    finals = _check_finished(out, size=4, epochs=None)
    where = {f["worker"]: f["host"] for f in finals}
    assert sorted(where.values()) == [a.name] * 3 + [b.name], where
    assert f"host {b.addr} is usable again" in stderr, stderr[-3000:]
    assert f"host {b.addr} is past its cooldown; starting its agent again" in stderr


def _wait_for_replacements(out: Path, workers: list[str], timeout: float) -> None:
    """Until a replacement of each worker (id 'w2' -> 'w2.N', 'w2.1' -> 'w2.M') has stepped."""
    deadline = time.monotonic() + timeout
    for w in workers:
        slot = w.split(".")[0]
        while not any(p.read_text() for p in out.glob(f"steps.{slot}.*.jsonl")
                      if p.name != f"steps.{w}.jsonl"):
            assert time.monotonic() < deadline, f"no replacement of {w} stepped in {timeout}s"
            time.sleep(0.1)


def _pids_of(worker_prefix: str) -> list[int]:
    """Processes (root PID namespace) whose PHALANX_WORKER_ID starts with the prefix."""
    out = []
    for p in os.listdir("/proc"):
        try:
            environ = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if any(e.startswith(b"PHALANX_WORKER_ID=" + worker_prefix.encode()) for e in environ):
            out.append(int(p))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.timeout(120)
def test_the_secret_is_in_no_argv_and_no_log(simhosts, tmp_path) -> None:  # noqa: F811
    """`ps` shows argv to every user: the launcher hands the secret to each agent on stdin."""
    hosts = simhosts(2)
    (tmp_path / "s.py").write_text("import time, phalanx as px\npx.init()\ntime.sleep(4)\n")
    join = tmp_path / "join.json"
    proc = launch(hosts, 1, "--join-file", str(join), str(tmp_path / "s.py"), wait=False,
                  cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not join.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        secret = json.loads(join.read_text())["secret"]
        time.sleep(2.5)  # agents and workers are up on both hosts
        seen = [p for p in os.listdir("/proc") if p.isdigit() and secret in _cmdline(int(p))]
        assert len([p for p in os.listdir("/proc") if p.isdigit() and "agent" in _cmdline(int(p))
                    and "--secret-stdin" in _cmdline(int(p))]) >= 2
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert not seen, f"the secret is in the argv of pids {seen}"
    assert secret not in stdout + stderr
