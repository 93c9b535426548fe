"""`phalanx run --etcd`: a real job keeping its membership in a real 3-member etcd.

What the job leaves in etcd is read back with phalanx's own client and compared with what the
launcher reported; etcd members are SIGKILLed under a running job (one member: nothing visible;
two: quorum lost, training goes on, a worker lost in that window is handled when quorum
returns). The training job is `tests/elastic_job.py` (digits, exactly-once loader, @run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import etcdfix
import pytest
from conftest import REPO, run_cmd

from phalanx.coord.etcd import EtcdClient

own_etcd_cluster = etcdfix.own_etcd_cluster
JOB = str(REPO / "tests" / "elastic_job.py")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep +
            os.environ.get("PYTHONPATH", "")}


def _cmd(cluster, *args: str) -> list[str]:
    return [sys.executable, "-m", "phalanx.launch.cli", "run", "--etcd",
            ",".join(cluster.endpoints), *args]


def _records(cluster) -> dict[str, dict[str, bytes]]:
    """Job id -> key -> value, for every job under /phalanx/jobs/."""
    client = EtcdClient(cluster.endpoints, prefix="/phalanx/jobs/")
    jobs: dict[str, dict[str, bytes]] = {}
    for key, value, _ in client.get_prefix(""):
        job, _, name = key.decode().partition("/")
        jobs.setdefault(job, {})[name] = value
    client.close()
    return jobs


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _worker_pid(launcher: int, worker: str) -> int:
    """The pid of the launcher's child started as `worker` (read from /proc)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            environ = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"PHALANX_WORKER_ID={worker}".encode() in environ:
            return int(d.name)
    raise AssertionError(f"no child of {launcher} runs worker {worker}")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_job_records_membership_in_etcd_and_survives_a_member_kill(own_etcd_cluster,
                                                                  tmp_path) -> None:
    cluster = own_etcd_cluster
    join = tmp_path / "join"
    proc = subprocess.Popen(_cmd(cluster, "-np", "3", "--min-np", "2", "--join-file", str(join),
                                 "--chaos", "kill:rank=1,step=25", JOB, str(tmp_path), "3", "0.03"),
                            env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    attach = None
    try:
        _wait(join.exists, 60, "the join file")
        secret = json.loads(join.read_text())["secret"]
        _wait(lambda: _records(cluster), 30, "the job's record in etcd")
        (job,) = _records(cluster)
        attach = subprocess.Popen([sys.executable, "-m", "phalanx.launch.cli", "attach",
                                   "--etcd", ",".join(cluster.endpoints), job], env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait(lambda: _lines(tmp_path / "samples.w0.jsonl") >= 5, 60, "training to start")
        cluster.kill(cluster.leader())  # the raft leader: nothing the job does may notice
        _out, err = proc.communicate(timeout=120)
        followed, attach_err = attach.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        if attach is not None and attach.poll() is None:
            attach.kill()
            attach.communicate()
    assert proc.returncode == 0, err[-3000:]
    # `phalanx attach` followed it from outside: the re-formation, then the launcher's summary
    assert attach.returncode == 0, followed + attach_err
    assert "generation 2 formed with 2 worker(s)" in followed, followed
    assert followed.strip().splitlines()[-1] == err.strip().splitlines()[-1], (followed, err)
    listing = run_cmd([sys.executable, "-m", "phalanx.launch.cli", "attach", "--etcd",
                       ",".join(cluster.endpoints)], tmp_path, 30, _env())
    assert listing.stdout.startswith(f"{job}: ended, generation 2 with 2 worker(s)"), listing
    assert "etcd unavailable" not in err
    (rec,) = _records(cluster).values()
    assert "leader" not in rec  # the coordinator resigned at the end
    gen = json.loads(rec["generation"])
    assert gen["generation"] == 2 and len(gen["workers"]) == 2 and gen["kept"] == [0, 2]
    steps = [json.loads(x)["step"] for x in (tmp_path / "samples.w0.jsonl").read_text().splitlines()]
    assert int(rec["step"]) == max(steps)
    assert json.loads(rec["outcome"])["rc"] == 0
    assert json.loads(rec["job"])["np"] == 3
    assert not any(secret.encode() in v for v in rec.values()), "the job secret is in etcd"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quorum_loss_pauses_membership_changes_never_training(own_etcd_cluster, tmp_path) -> None:
    cluster = own_etcd_cluster
    w0 = tmp_path / "samples.w0.jsonl"
    proc = subprocess.Popen(_cmd(cluster, "-np", "3", "--min-np", "2", JOB, str(tmp_path), "12",
                                 "0.04"),
                            env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait(lambda: _lines(w0) >= 10, 90, "training to start")
        cluster.stop_quorum()
        before = _lines(w0)
        time.sleep(1.5)
        assert _lines(w0) > before, "training paused while etcd had no quorum"
        os.kill(_worker_pid(proc.pid, "w1"), signal.SIGKILL)
        time.sleep(0.5)
        stalled = _lines(w0)
        time.sleep(2.0)
        assert _lines(w0) == stalled, "a generation formed while etcd had no quorum"
        cluster.restart_all()
        _wait(lambda: _lines(w0) > stalled, 30, "training to resume once quorum returned")
        _out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "etcd unavailable" in err and "membership changes resume" in err
    (rec,) = _records(cluster).values()
    gen = json.loads(rec["generation"])
    assert gen["generation"] == 2 and gen["kept"] == [0, 2]
    assert json.loads(rec["outcome"])["rc"] == 0


@pytest.mark.timeout(60)
def test_unreachable_etcd_fails_at_start_naming_the_endpoints(tmp_path) -> None:
    res = run_cmd([sys.executable, "-m", "phalanx.launch.cli", "run", "--etcd",
                   "127.0.0.1:9,127.0.0.1:1", "-np", "2", JOB, str(tmp_path)], tmp_path, 50,
                  _env())
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "127.0.0.1:9" in last and "127.0.0.1:1" in last and "start etcd there" in last, last
    assert not list(tmp_path.glob("samples.*")), "workers started without etcd"


@pytest.mark.timeout(60)
def test_etcd_tls_options_are_checked_before_anything_starts(tmp_path) -> None:
    res = run_cmd([sys.executable, "-m", "phalanx.launch.cli", "run", "--etcd", "127.0.0.1:9",
                   "--etcd-cacert", str(tmp_path / "nope.pem"), "-np", "2", JOB, str(tmp_path)],
                  tmp_path, 50, _env())
    assert res.returncode == 2
    assert "--etcd-cacert" in res.stderr and "nope.pem" in res.stderr
