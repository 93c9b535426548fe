"""Checkpoints that cannot run code, fail loudly and belong to one job (issue 20, items 3, 7, 13).

Safe loading (weights_only, a trusted directory, 0700/0600), strict resume at start unless
--fresh, failed saves on a real full disk (a small tmpfs in a private mount namespace) that are
reported and rotated around, the directory lock between jobs, and `state.step` ownership.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import phalanx as px
from conftest import REPO, run_cmd, run_job
from phalanx.elastic import Checkpointer, CheckpointError, State
from phalanx.errors import PhalanxError

JOB = """
import json, os, sys, time
import torch
import phalanx as px

ckdir, steps, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hold = sys.argv[4] if len(sys.argv) > 4 else ""
torch.set_num_threads(1)
px.init()
torch.manual_seed(0)
model = torch.nn.Linear(width, width)
opt = px.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model=model)
state = px.elastic.State(model=model, optimizer=opt,
                         checkpointer=px.elastic.Checkpointer(ckdir, every_steps=1, keep=3))


@px.elastic.run
def train(state):
    if px.rank() == 0:
        print("first step", state.step, flush=True)
        if hold:  # hold the directory until the test says go
            with open(hold + ".ready", "w") as f:
                json.dump({"job": os.environ["PHALANX_JOB_ID"], "pid": os.getpid()}, f)
            deadline = time.monotonic() + 30
            while not os.path.exists(hold) and time.monotonic() < deadline:
                time.sleep(0.05)
    while state.step < steps:
        opt.zero_grad()
        model(torch.ones(2, width)).sum().backward()
        opt.step()


train(state)
state.checkpointer.wait()
print("done", state.step, flush=True)
"""


class Custom:
    """A user type that safe loading does not know."""

    def __init__(self, x: int) -> None:
        self.x = x


class Payload:
    """Unpickling this runs os.mkdir: what a planted checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def make_state(width: int = 4, **fields: object) -> State:
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return State(model=model, optimizer=opt, **fields)


def one_step(state: State) -> None:
    state.optimizer.zero_grad()
    state.model(torch.ones(2, state.model.in_features)).sum().backward()
    state.optimizer.step()


def plant(directory: Path, step: int, obj: object) -> None:
    """A checkpoint with a valid sidecar: checksums catch accidents, not attackers."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    path = directory / f"ckpt-{step:09d}.pt"
    path.write_bytes(data)
    meta = {"step": step, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (directory / f"ckpt-{step:09d}.pt.json").write_text(json.dumps(meta))


def damage(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(64)
        f.write(b"\xff" * 8)


def output(res: subprocess.CompletedProcess[str]) -> str:
    return res.stdout + res.stderr


# ------------------------------------------------------------------ item 3: no code from files
@pytest.mark.timeout(30)
def test_snapshots_load_safely_and_a_planted_pickle_never_runs(tmp_path) -> None:
    ck = Checkpointer(str(tmp_path / "ck"), every_steps=1, background=False)
    a = make_state(rng=px.elastic.RNGState(), sched=None, epoch=3, hist=[0.5, "x"])
    a.sched = torch.optim.lr_scheduler.StepLR(a.optimizer, step_size=2)
    for _ in range(2):
        one_step(a)
    ck.save(a)  # model, momentum, scheduler, torch/numpy/random streams, plain values
    b = make_state(rng=px.elastic.RNGState(), sched=None, epoch=0, hist=None)
    b.sched = torch.optim.lr_scheduler.StepLR(b.optimizer, step_size=2)
    assert ck.load_latest(b) == 2 and b.step == 2 and b.epoch == 3 and b.hist == [0.5, "x"]
    assert torch.equal(a.model.weight, b.model.weight)

    marker = tmp_path / "ran"
    plant(tmp_path / "ck", 9, {"step": 9, "fields": {"epoch": Payload(str(marker))}})
    with pytest.raises(CheckpointError, match=r"(?s)safe loading.*mkdir.*trusted_pickle"):
        ck.load_latest(make_state(epoch=0))
    assert not marker.exists(), "a planted checkpoint ran code"

    plant(tmp_path / "ck", 9, {"step": 9, "fields": {"epoch": Custom(7)}, "loaders": []})
    with pytest.raises(CheckpointError, match=r"(?s)Custom.*add_safe_globals"):
        ck.load_latest(make_state(epoch=0))
    ck.close()
    with pytest.warns(RuntimeWarning, match="runs any code"):
        trusting = Checkpointer(str(tmp_path / "ck"), trusted_pickle=True)
    c = make_state(epoch=0)
    assert trusting.load_latest(c) == 9 and c.epoch.x == 7  # the explicit opt-in
    trusting.close()


@pytest.mark.timeout(30)
def test_directory_must_be_the_users_own_and_files_are_private(tmp_path) -> None:
    d = tmp_path / "new" / "ck"
    ck = Checkpointer(str(d), every_steps=1, background=False)
    s = make_state()
    one_step(s)
    ck.save(s)
    ck.close()
    assert oct(d.stat().st_mode & 0o777) == oct(0o700)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in d.iterdir()}
    assert modes == {"ckpt-000000001.pt": oct(0o600), "ckpt-000000001.pt.json": oct(0o600),
                     "phalanx.lock": oct(0o600)}, modes

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone may plant a file
    with pytest.raises(CheckpointError, match=r"writable by others \(mode 1777\).*chmod go-w"):
        Checkpointer(str(shared))
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(CheckpointError, match=r"owned by uid 65534, not by this job's user"):
        Checkpointer(str(theirs))


# ------------------------------------------------------------------ item 7: never silent
@pytest.mark.timeout(120)
def test_every_checkpoint_damaged_fails_at_start_unless_fresh(tmp_path) -> None:
    ckdir = tmp_path / "ck"
    ck = Checkpointer(str(ckdir), every_steps=1, background=False)
    s = make_state(width=8)
    for _ in range(2):
        one_step(s)
        ck.save(s)
    ck.close()
    for step in ck.list():
        damage(ck.path(step))

    res = run_job(tmp_path, JOB, 2, script_args=(str(ckdir), "4", "8"), timeout=60)
    text = output(res)
    assert res.returncode != 0, text
    assert "none can be loaded" in text and "--fresh" in text, text
    assert "ckpt-000000002.pt (SHA-256 mismatch" in text and "ckpt-000000001.pt" in text, text
    assert ck.list() == [2, 1], "the damaged checkpoints were overwritten"

    res = run_job(tmp_path, JOB, 2, "--fresh", script_args=(str(ckdir), "4", "8"), timeout=60)
    text = output(res)
    assert res.returncode == 0, text
    assert "first step 0" in text and "removed 2 checkpoint(s) of an earlier run" in text, text
    assert ck.list() == [4, 3, 2] and all(ck.verify(n) for n in ck.list())


def _in_small_tmpfs(tmp_path: Path, np: int, width: int, steps: int,
                    *flags: str) -> subprocess.CompletedProcess[str]:
    """Run JOB with its checkpoint directory on a real 1 MiB tmpfs (a private mount namespace
    that ends with the job), then list what the directory holds."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a small tmpfs in a private namespace")
    mnt = tmp_path / "small"
    mnt.mkdir(mode=0o700)
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(JOB))
    launch = [sys.executable, "-m", "phalanx.launch.cli", "run", "-np", str(np), *flags,
              str(script), str(mnt), str(steps), str(width)]
    sh = ('mount -t tmpfs -o size=1m,mode=0700 none "$1" && shift && "$@"; rc=$?; '
          'echo "LEFT: $(ls -A "$MNT" | tr "\\n" " ")"; exit $rc')
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MNT": str(mnt)}
    res = run_cmd(["unshare", "-m", "sh", "-c", sh, "sh", str(mnt), *launch], tmp_path, 90, env)
    if "mount:" in res.stderr and "LEFT" not in res.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    return res


@pytest.mark.timeout(180)
def test_full_disk_fails_the_job_after_three_failed_saves_or_warns(tmp_path) -> None:
    # A 600x600 model (1.4 MB) never fits on the 1 MiB disk: every save fails.
    res = _in_small_tmpfs(tmp_path, 2, 600, 8)
    text = output(res)
    assert res.returncode != 0, text
    assert text.count("was not saved in") == 3 and "No space left on device" in text, text
    assert "3 checkpoint saves in a row failed" in text and "--checkpoint-errors warn" in text
    assert "checkpoints: 3 save(s) failed" in text, text  # the launcher's summary says so
    assert "LEFT: phalanx.lock \n" in res.stdout, res.stdout  # no temporary files pile up
    shutil.rmtree(tmp_path / "small")

    res = _in_small_tmpfs(tmp_path, 1, 600, 5, "--checkpoint-errors", "warn")
    text = output(res)
    assert res.returncode == 0, text
    assert "done 5" in text and text.count("was not saved in") == 5, text
    assert "checkpoints: 5 save(s) failed" in text and "newest durable checkpoint: none" in text
    assert "LEFT: phalanx.lock \n" in res.stdout, res.stdout


@pytest.mark.timeout(120)
def test_old_checkpoints_make_room_before_the_disk_fills(tmp_path) -> None:
    # 270 KB checkpoints, keep=3: a fourth would not fit next to three on 1 MiB.
    res = _in_small_tmpfs(tmp_path, 1, 260, 7)
    text = output(res)
    assert res.returncode == 0 and "done 7" in text, text
    assert "was not saved" not in text and "free space is short" in text, text
    left = res.stdout.split("LEFT: ")[-1].split()
    assert "ckpt-000000007.pt" in left and not [n for n in left if ".tmp" in n], left


# ------------------------------------------------------------------ item 7: one job per dir
@pytest.mark.timeout(120)
def test_a_second_job_on_the_same_directory_fails_naming_the_first(tmp_path) -> None:
    ckdir, hold = tmp_path / "ck", tmp_path / "go"
    script = tmp_path / "first.py"
    script.write_text(textwrap.dedent(JOB))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    first = subprocess.Popen([sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "1",
                              str(script), str(ckdir), "3", "4", str(hold)], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        ready = Path(f"{hold}.ready")
        while not ready.exists() or not ready.read_text():
            assert first.poll() is None and time.monotonic() < deadline, "first job never held"
            time.sleep(0.05)
        holder = json.loads(ready.read_text())
        second = run_job(tmp_path, JOB, 1, script_args=(str(ckdir), "3", "4"), timeout=60)
        text = output(second)
        assert second.returncode != 0, text
        assert (f"in use by job {holder['job']} on host {os.uname().nodename}, pid "
                f"{holder['pid']}") in text, text
        hold.touch()
        out, _ = first.communicate(timeout=60)
        assert first.returncode == 0 and "done 3" in out, out
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
            first.communicate()


HOLDER = """
import sys
from phalanx.elastic.checkpoint_dir import DirLock
assert DirLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(30)
def test_the_lock_lets_the_same_job_in_and_names_another(tmp_path, monkeypatch) -> None:
    from phalanx.elastic.checkpoint_dir import DirLock
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PHALANX_JOB_ID": "jobA"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        monkeypatch.setenv("PHALANX_JOB_ID", "jobA")  # a respawned rank 0 of the same job
        assert DirLock(str(tmp_path)).acquire() is False
        monkeypatch.setenv("PHALANX_JOB_ID", "jobB")
        with pytest.raises(CheckpointError, match=rf"in use by job jobA on host .*pid "
                                                  rf"{holder.pid}.*its own directory"):
            DirLock(str(tmp_path)).acquire()
    finally:
        holder.communicate(input="", timeout=10)
    lock = DirLock(str(tmp_path))  # released when its holder exits
    assert lock.acquire() is True
    lock.release()


# ------------------------------------------------------------------ item 13: step and names
@pytest.mark.timeout(30)
def test_state_step_is_owned_by_the_state_and_elastic_lists_its_names() -> None:
    s = make_state()
    with pytest.raises(PhalanxError, match=r"state.step is owned by the State.*twice"):
        s.step += 1
    with pytest.raises(PhalanxError, match="owned by the State"):
        s.step = 10
    one_step(s)
    assert s.step == 1
    with pytest.raises(PhalanxError, match=r"'step' is reserved"):
        State(step=0)
    names = set(dir(px.elastic))
    assert {"Checkpointer", "CheckpointError", "State", "RNGState", "run", "ProgressLost",
            "register_handler"} <= names, sorted(names)
