"""`phalanx.ray.run` on a real two-node Ray cluster of simulated hosts (tests/simhosts.py).

Ray's head and the driver run on host 0 (the head has 1 CPU); the second node (2 CPUs) joins
only after `run()` was called, as an autoscaler's node does, and the job needs both nodes'
CPUs: its workers on the late node must reach the coordinator, so it cannot listen on
loopback. Then the second node is cut off (link down, no connection closed): the survivor on
the head continues after the heartbeat timeout, the loss is reported as a node loss naming
the node's address, and `run()` returns without waiting on the unreachable node.

The cluster uses Ray's token authentication (RAY_AUTH_MODE=token, one token file for every
node), as the README's multi-node recipe does. One cluster serves the module: Ray is slow to
start on a small machine. The tests run in order (the second needs the node the first added;
it adds it if the first did not run).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from simhosts import SimHosts

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hosts")]

OBJECT_STORE = str(100 * 1024 * 1024)
STEPS = 60
CUT_AT = 10

DRIVER = r'''
import json, os, socket, sys, time
import numpy as np
import ray
import phalanx.ray as pxray

HEAD, OTHER, MARK, CUT_AT, STEPS = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), \
    int(sys.argv[6])


def collectives():
    import phalanx as px
    px.init()
    r, n = px.rank(), px.size()
    x = np.arange(5, dtype=np.float64) * (r + 1)
    return {"rank": r, "size": n, "host": socket.gethostname(),
            "coord": os.environ["PHALANX_COORD_ADDR"],
            "sum": px.allreduce(x, op="sum").tolist(),
            "hosts": px.allgather_object(socket.gethostname())}


def steps():
    """Elastic steps of allreduce; the workers on OTHER park at step CUT_AT (after writing
    MARK) until their node is cut off, so the cut lands mid-job."""
    import phalanx as px
    px.init()
    host = socket.gethostname()
    state = px.elastic.State(total=0.0)

    @px.elastic.run
    def loop(state):
        while state.step < STEPS:
            if host == OTHER and state.step == CUT_AT:
                open(f"{MARK}.{os.getpid()}", "w").close()
                time.sleep(120)
            state.total += float(px.allreduce(np.ones(1), op="sum")[0])
            state.end_step()

    loop(state)
    return {"host": host, "rank": px.rank(), "size": px.size(), "step": state.step,
            "recoveries": len(state.recoveries), "done": time.time()}


ray.init(address=f"{HEAD}:6379", logging_level="WARNING")
fn = {"collectives": collectives, "steps": steps}[sys.argv[1]]
open(MARK + ".called", "w").close()
t0 = time.time()
try:
    out = pxray.run(fn, num_workers=3, min_workers=1 if fn is steps else None,
                    heartbeat_timeout=3.0, placement_timeout=150.0)
except pxray.JobFailed as e:
    print("RESULT " + json.dumps({"error": str(e)}), flush=True)
else:
    print("RESULT " + json.dumps({"out": out, "called": t0, "returned": time.time()}),
          flush=True)
'''


@dataclass
class RayHosts:
    """Two simulated hosts, Ray's head (1 CPU) on host 0, and the environment of every Ray
    process (token authentication with one token file)."""

    hosts: SimHosts
    tmp: Path
    env: dict[str, str]
    joined: bool = False
    """The second node joined the cluster."""

    def ray_start(self, i: int, *args: str) -> None:
        h = self.hosts[i]
        cmd = ["ray", "start", "--node-ip-address", h.addr, "--temp-dir", str(self.tmp / f"r{i}"),
               "--object-store-memory", OBJECT_STORE, "--disable-usage-stats", *args]
        p = h.run(cmd, env=self.env, timeout=120)
        assert p.returncode == 0, f"ray start on {h.name} failed:\n{p.stdout}\n{p.stderr}"

    def join_second_node(self) -> None:
        self.ray_start(1, "--address", f"{self.hosts[0].addr}:6379", "--num-cpus", "2")
        self.joined = True


@pytest.fixture(scope="module")
def ray_hosts() -> Iterator[RayHosts]:
    reason = SimHosts.unsupported()
    if reason:
        if os.environ.get("SIMHOSTS_REQUIRE") == "1":
            pytest.fail(f"SIMHOSTS_REQUIRE=1 but {reason}")
        pytest.skip(reason)
    # Ray's unix sockets live under --temp-dir: keep the path short (108-byte limit).
    tmp = Path(tempfile.mkdtemp(prefix="pxray", dir="/tmp"))
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        with SimHosts(2, prefix="pxray") as hosts:
            rh = RayHosts(hosts=hosts, tmp=tmp, env=env)
            try:
                rh.ray_start(0, "--head", "--port", "6379", "--num-cpus", "1",
                             "--include-dashboard", "false")
                yield rh
            finally:
                for h in hosts:  # closing the hosts kills whatever this leaves
                    if h.alive:
                        h.run(["ray", "stop", "--force"], env=env, timeout=60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def start_driver(rh: RayHosts, fn: str, mark: Path) -> subprocess.Popen:
    script = rh.tmp / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    h0, h1 = rh.hosts[0], rh.hosts[1]
    return h0.popen([sys.executable, str(script), fn, h0.addr, h1.name, str(mark), str(CUT_AT),
                     str(STEPS)], env=rh.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)


@contextlib.contextmanager
def driver(rh: RayHosts, fn: str, mark: Path) -> Iterator[subprocess.Popen]:
    """`start_driver`, killed on the way out if the test left it running."""
    p = start_driver(rh, fn, mark)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def finish(p: subprocess.Popen, timeout: float) -> tuple[dict, str]:
    """The driver's RESULT and its stderr (the phalanx.ray progress lines)."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"the driver did not finish within {timeout}s\n{out}\n{err}")
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"driver exited {p.returncode} without a result\n{out}\n{err}"
    return json.loads(lines[-1][len("RESULT "):]), err


def wait_for(path: Path, pattern: str, timeout: float, p: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not list(path.parent.glob(path.name + pattern)):
        if p.poll() is not None or time.monotonic() > deadline:
            out, err = p.communicate()
            pytest.fail(f"no {path.name}{pattern} within {timeout}s\n{out}\n{err}")
        time.sleep(0.1)


@pytest.mark.timeout(240)
def test_workers_on_a_node_that_joins_after_run_reach_the_coordinator(ray_hosts) -> None:
    mark = ray_hosts.tmp / "m1"
    with driver(ray_hosts, "collectives", mark) as p:
        wait_for(mark, ".called", 60, p)
        # Join once run() is placing the workers: the group cannot be placed without this
        # node (the head has 1 CPU), and run() began while the head was alone.
        time.sleep(2)
        ray_hosts.join_second_node()
        res, err = finish(p, 150)
    assert "out" in res, f"{res}\n{err}"
    out = res["out"]
    h0, h1 = ray_hosts.hosts[0].name, ray_hosts.hosts[1].name
    assert [o["rank"] for o in out] == [0, 1, 2], err
    parts = [np.arange(5, dtype=np.float64) * (r + 1) for r in range(3)]
    for o in out:
        assert o["size"] == 3
        np.testing.assert_array_equal(o["sum"], np.sum(parts, axis=0))
    assert sorted(o["host"] for o in out) == sorted([h0, h1, h1]), out
    # Workers on the late node reach the coordinator: it listens on the head's address.
    assert {o["coord"].rsplit(":", 1)[0] for o in out} == {ray_hosts.hosts[0].addr}, out
    assert "generation 1: 3 worker(s)" in err, err


@pytest.mark.timeout(240)
def test_a_cut_off_node_is_reported_lost_and_not_waited_for(ray_hosts) -> None:
    if not ray_hosts.joined:
        ray_hosts.join_second_node()
    mark = ray_hosts.tmp / "m2"
    with driver(ray_hosts, "steps", mark) as p:
        wait_for(mark, ".[0-9]*", 120, p)
        time.sleep(0.5)  # both workers there park at the same step
        ray_hosts.hosts[1].cut()
        res, err = finish(p, 120)
    assert "out" in res, f"{res}\n{err}"
    out = res["out"]
    h0, h1 = ray_hosts.hosts[0], ray_hosts.hosts[1]
    # The survivor on the head continued alone, after the heartbeat timeout, to the last step.
    assert [(o["host"], o["rank"], o["size"], o["step"], o["recoveries"]) for o in out] == [
        (h0.name, 0, 1, STEPS, 1)], err
    lines = [ln.removeprefix("[phalanx] ") for ln in err.splitlines()]
    lost = f"its node {h1.addr} ({h1.name}) was lost: unreachable: its raylet at {h1.addr}:"
    assert sum(lost in ln and ln.endswith("continuing without it") for ln in lines) == 2, err
    assert any(ln.startswith(f"node {h1.addr} ({h1.name}) lost: unreachable") for ln in lines), err
    assert "fenced: the driver killed its actor" not in err, err
    assert any(ln.startswith(f"cleanup does not wait on node {h1.addr} ({h1.name}): unreachable")
               for ln in lines), err
    # Cleanup waited on the unreachable node for 10 s before; a generous bound, well under it.
    lag = res["returned"] - out[0]["done"]
    assert lag < 8, f"run() returned {lag:.1f}s after the job ended\n{err}"
