"""`phalanx.ray.run` on a real local Ray instance: workers are actors, the coordinator is the
driver (this pytest process).

Collectives inside the function equal numpy. A worker whose process is SIGKILLed mid-training
is a lost worker, and so is one that is SIGSTOPped (the coordinator declares it lost and the
driver fences it with ray.kill): survivors continue with parameters that match a
single-process reference, and a replacement actor joins when max_restarts allows, healing to
bitwise-equal parameters. An exception in the function fails the call naming the rank, even
with restarts left; too few workers fail it with a clear error; and nothing is left behind:
no actor, no shared memory, no coordinator thread.

The worker functions below are shipped to the actors by value (cloudpickle), since this test
module is not importable there.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

import phalanx.ray as pxray
from phalanx.errors import ConfigError
from phalanx.launch.shmfiles import SHM_DIR
from phalanx.ray import records
from phalanx.ray.spec import RunSpec
from phalanx.ray.worker import Outcome, Where

SRC = Path(__file__).resolve().parent.parent / "src"
STEPS = 200
KILL_AT = 30
STOP_AT = 60
LR = 0.05


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    """One local Ray instance for the module (starting one costs ~10 s on a small machine)."""
    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)
    # Ray's workers inherit this environment: with phalanx on their path they start from
    # Ray's pool of idle workers (~1 s) instead of one fresh process per actor (~5 s here).
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [saved])])
    try:
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        yield
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture
def progress(caplog):
    """The driver's progress lines (logger phalanx.ray)."""
    caplog.set_level(logging.INFO, logger="phalanx.ray")
    return caplog


def shm_segments() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith("phalanx-")}


@pytest.fixture
def segments_before() -> tuple[set[str], set[int]]:
    """The phalanx segments and threads of this process before the test (other tests in this
    process, in-process groups say, are not this test's to account for)."""
    return shm_segments(), {t.ident for t in threading.enumerate()}


def assert_nothing_left(before: tuple[set[str], set[int]]) -> None:
    """No phalanx actor alive, no new phalanx shared memory, no new phalanx thread here."""
    segments_before, threads_before = before
    deadline = time.monotonic() + 5
    while True:
        actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("phalanx-")]
        segs = sorted(shm_segments() - segments_before)
        threads = [t.name for t in threading.enumerate() if t.name.startswith("phalanx-")
                   and t.is_alive() and t.ident not in threads_before]
        if not (actors or segs or threads) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not actors, f"actors left alive: {actors}"
    assert not segs, f"shared-memory segments left: {segs}"
    assert not threads, f"driver threads left: {threads}"


# ---------------------------------------------------------------- functions the workers run
def collectives(scale: float) -> dict:
    import phalanx as px
    px.init()
    r, n = px.rank(), px.size()
    x = np.arange(6, dtype=np.float64) * (r + 1) * scale
    return {"rank": r, "size": n, "worker": os.environ["PHALANX_WORKER_ID"],
            "coord": os.environ["PHALANX_COORD_ADDR"],
            "sum": px.allreduce(x, op="sum"), "avg": px.allreduce(x, op="avg"),
            "max": px.allreduce(torch.tensor([float(r)]), op="max"),
            "gather": px.allgather(np.full(2, r, dtype=np.int64)),
            "bcast": px.broadcast(np.array([10.0 * r]), root=n - 1),
            "objects": px.allgather_object({"r": r})}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """One full batch, the same on every rank: the average of the ranks' gradients is the
    single-process gradient, so the job's math equals `reference()`."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.linspace(-1, 1, 8).unsqueeze(1) + 0.1 * torch.randn(64, 1, generator=g)
    return x, y


def model_and_sgd() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def reference(steps: int) -> list[torch.Tensor]:
    """Full-batch gradient descent in this process, without phalanx."""
    x, y = data()
    model, opt = model_and_sgd()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def train(steps: int, kill: tuple[str, ...] = (), stop: tuple[str, ...] = ()) -> dict:
    """Elastic full-batch training. The workers named in `kill` SIGKILL themselves at step
    KILL_AT, those in `stop` SIGSTOP themselves at step STOP_AT (to be fenced by the driver);
    replacements get other worker ids (w1.1), so they never do."""
    import phalanx as px
    torch.set_num_threads(1)
    px.init()
    me = os.environ["PHALANX_WORKER_ID"]
    x, y = data()
    model, sgd = model_and_sgd()
    opt = px.DistributedOptimizer(sgd, model=model)
    state = px.elastic.State(model=model, optimizer=opt)

    @px.elastic.run
    def loop(state: px.elastic.State) -> None:
        while state.step < steps:
            if me in kill and state.step == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)
            if me in stop and state.step == STOP_AT:
                os.kill(os.getpid(), signal.SIGSTOP)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    loop(state)
    return {"worker": me, "rank": px.rank(), "size": px.size(), "step": state.step,
            "params": [p.detach().clone() for p in model.parameters()],
            "recoveries": len(state.recoveries)}


def dies_unless_w0() -> None:
    """Every worker but w0 is killed before it joins; w0 waits for a first generation."""
    if os.environ["PHALANX_WORKER_ID"] != "w0":
        os.kill(os.getpid(), signal.SIGKILL)
    import phalanx as px
    px.init()


def raises_on_rank1() -> int:
    import phalanx as px
    px.init()
    for _ in range(3):
        px.allreduce(np.ones(4))
    if px.rank() == 1:
        raise ValueError("bad batch at step 3")
    px.barrier()
    return px.rank()


# ---------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_collectives_equal_numpy_and_results_come_in_rank_order(progress, segments_before) -> None:
    out = pxray.run(collectives, num_workers=2, args=(0.5,))
    assert [o["rank"] for o in out] == [0, 1]
    assert [o["worker"] for o in out] == ["w0", "w1"]
    parts = [np.arange(6, dtype=np.float64) * (r + 1) * 0.5 for r in range(2)]
    for o in out:
        assert o["size"] == 2
        np.testing.assert_array_equal(o["sum"], np.sum(parts, axis=0))
        np.testing.assert_array_equal(o["avg"], np.mean(parts, axis=0))
        assert o["max"].tolist() == [1.0]
        np.testing.assert_array_equal(o["gather"], np.repeat(np.arange(2), 2))
        np.testing.assert_array_equal(o["bcast"], [10.0])
        assert o["objects"] == [{"r": 0}, {"r": 1}]
        # Every worker placed on the driver's node: the coordinator stays on loopback.
        assert o["coord"].startswith("127.0.0.1:"), o["coord"]
    lines = [r.getMessage() for r in progress.records if r.name == "phalanx.ray"]
    assert sum(line.startswith("generation ") for line in lines) == 1, lines
    assert_nothing_left(segments_before)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_survivors_continue_after_workers_are_killed_or_fenced(progress, segments_before) -> None:
    """w1 is SIGKILLed at step 30; w2 is SIGSTOPped at step 60, so the coordinator declares
    it lost and the driver fences it (ray.kill); w0 carries on alone, without rollback."""
    # A long heartbeat timeout keeps a loaded machine from starving a live worker into a false
    # loss; deaths are seen at once anyway (closed sockets, the stopped-process probe).
    out = pxray.run(train, num_workers=3, min_workers=1, heartbeat_timeout=10.0,
                    kwargs={"steps": STEPS, "kill": ("w1",), "stop": ("w2",)})
    assert [(o["worker"], o["rank"], o["size"], o["step"]) for o in out] == [("w0", 0, 1, STEPS)]
    assert out[0]["recoveries"] == 2
    # A world of 3 averages three equal gradients, not exact in fp32: close, not bitwise.
    for p, q in zip(out[0]["params"], reference(STEPS)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    lines = [r.getMessage() for r in progress.records if r.name == "phalanx.ray"]
    assert any("rank 1 (worker w1" in ln and "continuing without it" in ln for ln in lines), lines
    assert any(ln.startswith("fencing worker w2") for ln in lines), lines
    assert any("rank 2 (worker w2" in ln and "fenced: the driver killed its actor" in ln
               for ln in lines), lines
    assert [ln.split(":")[0] for ln in lines if ln.startswith("generation ")] == [
        "generation 1", "generation 2", "generation 3"], lines
    assert_nothing_left(segments_before)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_replacement_joins_the_running_job_and_heals(progress, segments_before) -> None:
    # min_workers defaults to num_workers: the survivor waits for the replacement to re-form.
    out = pxray.run(train, num_workers=2, max_restarts=1, heartbeat_timeout=10.0,
                    kwargs={"steps": STEPS, "kill": ("w1",)})
    assert [o["worker"] for o in out] == ["w0", "w1.1"]
    assert [(o["rank"], o["size"], o["step"]) for o in out] == [(0, 2, STEPS), (1, 2, STEPS)]
    ref = reference(STEPS)
    for o in out:  # worlds of 1 or 2 equal ranks average exactly: bitwise the reference
        for p, q in zip(o["params"], ref):
            assert torch.equal(p, q), (o["worker"], p, q)
    lines = [r.getMessage() for r in progress.records if r.name == "phalanx.ray"]
    assert any("starting a replacement (1/1 restarts)" in ln for ln in lines), lines
    assert_nothing_left(segments_before)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_exception_in_fn_fails_the_call_with_rank_and_type(progress, segments_before) -> None:
    with pytest.raises(pxray.WorkerError) as info:
        pxray.run(raises_on_rank1, num_workers=2, min_workers=1, max_restarts=3)
    e = info.value
    assert e.rank == 1 and e.worker == "w1"
    assert e.exc_type == "ValueError" and e.exc_message == "bad batch at step 3"
    assert "rank 1" in str(e) and "ValueError: bad batch at step 3" in str(e)
    assert isinstance(e.__cause__, ValueError) and str(e.__cause__) == "bad batch at step 3"
    assert "raises_on_rank1" in e.remote_traceback
    assert e.where.startswith(f"{__file__}:"), e.where
    lines = [r.getMessage() for r in progress.records if r.name == "phalanx.ray"]
    assert not any("replacement" in ln for ln in lines), "a bug must not be retried"
    assert_nothing_left(segments_before)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_too_few_workers_fail_the_call_and_nothing_is_left_behind(segments_before) -> None:
    with pytest.raises(pxray.JobFailed) as info:
        pxray.run(dies_unless_w0, num_workers=3, min_workers=2)
    assert not isinstance(info.value, pxray.WorkerError)
    assert "fewer than min_workers=2" in str(info.value), str(info.value)
    assert "Ray actor died" in info.value.cause
    assert_nothing_left(segments_before)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kw,needle", [
    ({"num_workers": 0}, "num_workers=0"),
    ({"num_workers": True}, "num_workers=True"),
    ({"num_workers": 2, "min_workers": 3}, "min_workers=3 exceeds num_workers=2"),
    ({"num_workers": 2, "max_restarts": -1}, "max_restarts=-1"),
    ({"num_workers": 2, "resources_per_worker": {"GPU": -1}}, "resources_per_worker['GPU']=-1"),
    ({"num_workers": 2, "resources_per_worker": ["GPU"]}, "resources_per_worker=['GPU']"),
    ({"num_workers": 2, "args": 3}, "args=3"),
])
def test_bad_arguments_name_the_argument(kw, needle) -> None:
    with pytest.raises(ConfigError) as info:
        pxray.run(collectives, **kw)
    assert needle in str(info.value), str(info.value)


@pytest.mark.timeout(30)
def test_fn_must_be_callable() -> None:
    with pytest.raises(ConfigError, match=r"fn=42 is not callable"):
        pxray.run(42, num_workers=2)  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_ray_must_be_initialised_and_installed(monkeypatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ConfigError, match=r"ray.init\(\)"):
        pxray.run(collectives, num_workers=2)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install"):
        pxray.run(collectives, num_workers=2)


# ---------------------------------------------------------------- the driver's records, no actors
def _record(slot: int, restart: int = 0, *, fenced: bool = False) -> records.ActorRecord:
    a = records.ActorRecord(slot=slot, restart=restart, handle=None, where_ref=None,
                            fenced=fenced)
    a.where = Where(node_id="n1", ip="10.0.0.7", hostname="h", pid=100 + slot, gpu_ids=["1"])
    return a


def test_records_tell_faults_from_bugs() -> None:
    killed = records.died(_record(1), "The actor died unexpectedly before finishing this task."
                          "\nThe actor is dead because its worker process has died. Worker ...")
    assert killed.is_fault
    assert killed.why() == ("rank 1 (worker w1, pid 101): its Ray actor died (The actor is dead "
                            "because its worker process has died)")
    fenced = records.died(_record(2, 1, fenced=True), "The actor is dead because it was killed")
    assert fenced.is_fault and fenced.worker == "w2.1" and "fenced" in fenced.why()
    cut = records.died(_record(3, fenced=True), "The actor is dead because it was killed",
                       node_lost="unreachable: its raylet at 10.0.0.7:5 did not answer within 1s")
    assert cut.is_fault and "fenced" not in cut.why()
    assert cut.why().endswith("its node 10.0.0.7 (h) was lost: unreachable: its raylet at "
                              "10.0.0.7:5 did not answer within 1s"), cut.why()
    bug = records.returned(_record(0), Outcome(worker="w0", error={
        "type": "KeyError", "message": "'x'", "where": "a.py:3", "time": 1.0,
        "cascade": False, "traceback": "Traceback ...\nKeyError: 'x'\n"}))
    peer = records.returned(_record(2), Outcome(worker="w2", error={
        "type": "WorkerLost", "message": "rank 1 died", "where": "?", "time": 0.5,
        "cascade": True}))
    assert not bug.is_fault and peer.is_fault and "raised WorkerLost (rank 1 died)" in peer.why()
    err = records.failure([killed, peer, bug], {}, fallback="", why="", elastic=True)
    assert isinstance(err, pxray.WorkerError) and (err.rank, err.exc_type) == (0, "KeyError")
    assert "KeyError: 'x'" in str(err) and err.where == "a.py:3"
    lost = records.failure([peer, killed], {}, fallback="", why="", elastic=False)
    assert type(lost) is pxray.JobFailed and lost.cause == killed.why()
    assert "not elastic" in str(lost)


def test_records_order_results_and_write_the_environment() -> None:
    outs = [Outcome(worker=w, returned=ok, rank=r, generation=g)
            for w, ok, r, g in [("w1.1", True, 1, 3), ("w0", True, 0, 3), ("w2", False, -1, 0),
                                ("w10", True, 0, 1), ("w3", True, 1, 1)]]
    order = records.in_rank_order(outs, ["w0", "w1.1"], {"w10": 10, "w3": 3})
    assert [o.worker for o in order] == ["w0", "w1.1", "w10", "w3"]
    spec = RunSpec(num_workers=4, min_workers=2, resources_per_worker={"GPU": 1})
    wenv = records.worker_env(spec, _record(3, 1), address="10.0.0.1:5", secret="s",
                              job_id="j", bind=True, gpus={"10", "2", "1"})
    assert wenv["PHALANX_WORKER_ID"] == "w3.1" and wenv["PHALANX_RANK"] == "3"
    assert (wenv["PHALANX_ELASTIC"], wenv["PHALANX_GROWTH"]) == ("1", "0")
    assert wenv["PHALANX_BIND_ADDR"] == wenv["PHALANX_HOST"] == "10.0.0.7"
    assert wenv["CUDA_VISIBLE_DEVICES"] == "1,2,10"
    assert spec.actor_options() == {"num_cpus": 1.0, "num_gpus": 1.0}
