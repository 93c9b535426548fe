"""phalanx.spark on a real Spark standalone cluster (a master and Worker JVMs started with
pyspark's own `spark-class`) whose executors register one by one, as on a cluster that has just
started: `run` waits (up to `slot_timeout`, saying so) for the task slots it needs, and fails
with an error naming `slot_timeout` when they do not come.

The cluster is this module's: its master, its workers, their executors and Python daemons are
stopped, and checked gone, when the module ends (a late worker when its test ends).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

pyspark = pytest.importorskip("pyspark")

import phalanx.spark as pxs
from phalanx.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("engines")]
REPO = Path(__file__).resolve().parent.parent
SPARK_CLASS = Path(pyspark.__file__).parent / "bin" / "spark-class"
LATE = 6.0
"""Seconds after `run` is called that the second worker starts: longer than the 3 s for which
the slot count used to hold before `run` gave up."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the Spark master exited:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the Spark master did not listen in time:\n{log.read_text()[-3000:]}")


class Daemon:
    """One Spark daemon JVM (`spark-class CLASS ARGS`) in its own session: stopping it stops
    the executors (and their Python daemons) it started."""

    def __init__(self, root: Path, name: str, cls: str, *args: str) -> None:
        self.log = root / f"{name}.log"
        env = {**os.environ, "SPARK_LOG_DIR": str(root), "SPARK_WORKER_DIR": str(root / name)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([str(SPARK_CLASS), cls, *args], stdout=out,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def stop(self) -> None:
        """SIGTERM (a Worker kills its executors), then SIGKILL whatever is left in the group:
        a Worker shutting down may still launch an executor the master asked for."""
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass


def _worker(root: Path, name: str, url: str) -> Daemon:
    return Daemon(root, name, "org.apache.spark.deploy.worker.Worker", url, "--host",
                  "127.0.0.1", "--cores", "1", "--memory", "1g", "--webui-port", "0",
                  "--work-dir", str(root / name))


def _cluster_processes(root: Path, daemons: list[Daemon]) -> list[str]:
    """Processes of this cluster still alive: in a daemon's process group (its JVM, the
    executors it started), or working under the cluster's directory (executors and their
    Python daemons, which make their own process group)."""
    groups, left = {d.proc.pid for d in daemons}, []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        pgid = int(stat.rpartition(")")[2].split()[2])
        if pgid in groups or cwd.startswith(str(root)):
            left.append(f"{pid}: {cmd[:160]}")
    return left


def _stop_and_check(daemons: list[Daemon], root: Path) -> None:
    for d in reversed(daemons):
        d.stop()
    deadline = time.monotonic() + 20
    while (left := _cluster_processes(root, daemons)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"the Spark cluster left processes behind: {left}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """A master and one Worker with one core: one task slot until a test starts another."""
    root = tmp_path_factory.mktemp("standalone")
    port = _free_port()
    url = f"spark://127.0.0.1:{port}"
    daemons = [Daemon(root, "master", "org.apache.spark.deploy.master.Master", "--host",
                      "127.0.0.1", "--port", str(port), "--webui-port", "0")]
    try:
        _wait_port(port, daemons[0].proc, daemons[0].log, time.monotonic() + 60)
        daemons.append(_worker(root, "worker1", url))
        yield root, url
    finally:
        _stop_and_check(daemons, root)


@pytest.fixture(scope="module")
def spark(cluster):
    from pyspark.sql import SparkSession
    _, url = cluster
    session = (SparkSession.builder.master(url).appName("phalanx-test-spark-standalone")
               .config("spark.ui.enabled", "false")
               .config("spark.driver.host", "127.0.0.1")
               .config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.driver.memory", "512m")
               .config("spark.executor.memory", "512m")
               .config("spark.pyspark.python", sys.executable)
               .config("spark.executorEnv.PYTHONPATH",
                       os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]))
               .config("spark.executorEnv.OMP_NUM_THREADS", "1")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()


@pytest.fixture
def late_worker(cluster) -> Iterator[Callable[[float], None]]:
    """`late_worker(delay)` starts a second one-core Worker `delay` seconds from now; it is
    stopped (with its executor) when the test ends."""
    root, url = cluster
    started: list[Daemon] = []
    timers: list[threading.Timer] = []

    def start(delay: float) -> None:
        t = threading.Timer(delay, lambda: started.append(_worker(root, "worker2", url)))
        timers.append(t)
        t.start()
    yield start
    for t in timers:
        t.cancel()
        t.join()
    _stop_and_check(started, root / "worker2")


def _wait_slots(spark, n: int, within: float) -> None:
    deadline = time.monotonic() + within
    while pxs.task_slots(spark) < n:
        assert time.monotonic() < deadline, f"the cluster never had {n} task slot(s)"
        time.sleep(0.2)


def collectives(scale: float) -> dict:
    import phalanx as px
    px.init()
    r = px.rank()
    return {"rank": r, "size": px.size(), "host": socket.gethostname(),
            "sum": px.allreduce(np.arange(4, dtype=np.float64) * (r + 1) * scale, op="sum"),
            "gathered": px.allgather(np.full(2, r, dtype=np.int64))}


@pytest.mark.timeout(90)
def test_too_short_a_slot_timeout_names_the_argument(spark, caplog) -> None:
    caplog.set_level(logging.INFO, logger="phalanx.spark")
    _wait_slots(spark, 1, within=60)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        pxs.run(collectives, num_workers=3, args=(1.0,), spark=spark, slot_timeout=1.5)
    waited = time.monotonic() - t0
    assert 1.5 <= waited < 10, waited
    msg = str(info.value)
    assert re.search(r"num_workers=3 needs 3 Spark task slots .* the cluster has 1 .*after "
                     r"waiting slot_timeout=1\.5s\. Pass slot_timeout=\.\.\. .* or add "
                     r"executors", msg), msg
    assert any(r.getMessage().startswith("waiting for 3 task slots, have 1")
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    with pytest.raises(ConfigError, match=r"slot_timeout=-1 must be a number of seconds >= 0"):
        pxs.run(collectives, num_workers=1, spark=spark, slot_timeout=-1)


@pytest.mark.timeout(150)
def test_run_waits_for_a_worker_that_registers_late(spark, late_worker, caplog) -> None:
    """One slot when `run` is called; the second worker's JVM starts LATE seconds later."""
    caplog.set_level(logging.INFO, logger="phalanx.spark")
    _wait_slots(spark, 1, within=60)
    assert pxs.task_slots(spark) == 1
    late_worker(LATE)
    t0 = time.monotonic()
    out = pxs.run(collectives, num_workers=2, args=(0.5,), spark=spark, slot_timeout=90)
    assert time.monotonic() - t0 > LATE
    assert [o["rank"] for o in out] == [0, 1] and {o["size"] for o in out} == {2}
    for o in out:
        np.testing.assert_array_equal(o["sum"], np.arange(4) * 0.5 * (1 + 2))
        np.testing.assert_array_equal(o["gathered"], [0, 0, 1, 1])
    lines = [r.getMessage() for r in caplog.records if r.name == "phalanx.spark"]
    assert lines[0].startswith("waiting for 2 task slots, have 1"), lines
    assert any(m.startswith("have 2 task slots after") for m in lines), lines
    tracker = spark.sparkContext.statusTracker()
    assert tracker.getActiveJobsIds() == [] and tracker.getActiveStageIds() == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("master", "conf", "most"), [
    ("local-cluster[2,1,1024]", {}, 2), ("local-cluster[3, 2, 512]", {"spark.task.cpus": "2"}, 3),
    ("spark://h:7077", {}, None), ("yarn", {}, None), ("k8s://https://h:443", {}, None)])
def test_only_local_masters_have_a_final_slot_count(master: str, conf: dict,
                                                    most: int | None) -> None:
    """Where more executors may register, `run` waits; a local-cluster never grows."""
    from phalanx.spark.cluster import most_slots

    class Conf:
        def get(self, key: str, default: str | None = None) -> str | None:
            return conf.get(key, default)

    class Context:
        def __init__(self) -> None:
            self.master = master

        def getConf(self) -> Conf:
            return Conf()
    assert most_slots(Context()) == most  # type: ignore[arg-type]
