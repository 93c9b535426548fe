"""Durable checkpoints: atomic save with checksum, corrupt-newest fallback, whole-job resume."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from phalanx.elastic import Checkpointer, State


def make_state() -> State:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return State(model=model, optimizer=opt, epoch=0)


def train_steps(state: State, n: int) -> None:
    for _ in range(n):
        state.optimizer.zero_grad()
        state.model(torch.ones(3, 4)).sum().backward()
        state.optimizer.step()  # the State's step boundary: state.step advances


@pytest.mark.timeout(30)
def test_save_and_load_roundtrip(tmp_path) -> None:
    ck = Checkpointer(str(tmp_path), every_steps=1, keep=2, background=True)
    a = make_state()
    train_steps(a, 3)
    a.epoch = 7
    ck.save(a)
    ck.wait()
    b = make_state()
    assert ck.load_latest(b) == 3
    assert b.step == 3 and b.epoch == 7
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    assert b.optimizer.state_dict()["state"][0]["momentum_buffer"].equal(
        a.optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # atomic: no partial files


@pytest.mark.timeout(30)
def test_corrupt_or_partial_newest_falls_back_with_warning(tmp_path) -> None:
    ck = Checkpointer(str(tmp_path), every_steps=1, keep=5, background=False)
    s = make_state()
    for _ in range(3):
        train_steps(s, 1)
        ck.save(s)
    assert ck.list() == [3, 2, 1]
    with open(ck.path(3), "r+b") as f:  # flip bytes in the newest
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    os.unlink(ck.path(2) + ".json")       # a partial write: data without its checksum sidecar
    fresh = make_state()
    with pytest.warns(RuntimeWarning, match="corrupt or partial"):
        assert ck.load_latest(fresh) == 1
    assert fresh.step == 1


@pytest.mark.timeout(30)
def test_keep_prunes_old_checkpoints(tmp_path) -> None:
    ck = Checkpointer(str(tmp_path), every_steps=1, keep=2, background=False)
    s = make_state()
    for _ in range(4):
        train_steps(s, 1)
        ck.save(s)
    assert ck.list() == [4, 3]
    with pytest.raises(ValueError, match="every_steps=0"):
        Checkpointer(str(tmp_path), every_steps=0)


@pytest.mark.timeout(120)
def test_restarting_the_whole_job_resumes_from_the_newest_checkpoint(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    base = [sys.executable, "-m", "phalanx.launch.cli", "run", "-np", "2",
            str(REPO / "examples" / "train_digits.py"), "--checkpoint-dir", str(tmp_path)]
    first = subprocess.run(base + ["--epochs", "3"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == 0, first.stderr
    saved = Checkpointer(str(tmp_path)).list()
    assert saved, "no checkpoint written"
    second = subprocess.run(base + ["--epochs", "5"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 0, second.stderr
    assert f"resumed from checkpoint at step {saved[0]}" in second.stdout + second.stderr
    epochs = [int(e) for e in re.findall(r"epoch\s+(\d+)\s+step", second.stdout)]
    assert epochs and epochs[0] > 1, second.stdout  # did not start again from epoch 1
