"""Tests of phalanx.comm.shm.ShmAllreduce: correctness against numpy, errors, failure detection."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

_SRC = str(Path(__file__).resolve().parents[1] / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from phalanx.comm.shm import ShmAllreduce  # noqa: E402
from phalanx.comm.shmbuf import SharedBuffers  # noqa: E402
from phalanx.errors import CollectiveMismatch, ConfigError, WorkerLost  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]
SIZES = [0, 1, 7, 1001, 4500]          # 4500 > capacity for every dtype: several rounds
CAP, BLOCK = 4096, 2048                # small, so rounds and blocks are exercised
TOL = {torch.float16: (2e-2, 3e-2), torch.bfloat16: (5e-2, 2e-1), torch.float32: (1e-5, 1e-5),
       torch.float64: (1e-12, 1e-12), torch.complex64: (1e-5, 1e-5),
       torch.complex128: (1e-12, 1e-12)}


@pytest.fixture
def shm_path():
    path = f"/dev/shm/phalanx-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    yield path
    if os.path.exists(path):
        os.unlink(path)
    assert not os.path.exists(path)


# ------------------------------------------------------------------------ process helpers
# Plain subprocesses, not multiprocessing: a spawn context leaves its resource-tracker process
# behind.  A child reads the peers' pids from stdin, may print "READY", then prints one
# "RESULT <json>" line: ["ok", value] or [exception name, [message, time.time(), traceback]].
_CHILD = """
import json, sys, time, traceback
import test_shm
fn = getattr(test_shm, sys.argv[1])
rank, size, path = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pids = json.loads(sys.stdin.readline())
try:
    res = ["ok", fn(rank, size, path, pids)]
except Exception as e:
    res = [type(e).__name__, [str(e), time.time(), traceback.format_exc()]]
print("RESULT " + json.dumps(res), flush=True)
"""


def _readline(proc: subprocess.Popen, deadline: float) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise TimeoutError(f"child {proc.pid} printed nothing before the deadline")
        chunk = os.read(proc.stdout.fileno(), 1)
        if not chunk:
            raise EOFError(f"child {proc.pid} exited (rc={proc.poll()}) without a result")
        buf += chunk
    return buf.decode().strip()


def _spawn(fn, size: int, path: str, *, deadline: float = 45.0, on_start=None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [_SRC, str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])}
    procs: list[subprocess.Popen] = []
    results: dict = {}
    end = time.monotonic() + deadline
    try:
        for r in range(size):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _CHILD, fn.__name__, str(r), str(size), path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env))
        pids = json.dumps([p.pid for p in procs]).encode() + b"\n"
        for p in procs:
            p.stdin.write(pids)
        if on_start is not None:
            on_start(procs, end, results)
        for r, p in enumerate(procs):
            while r not in results:
                line = _readline(p, end)
                if line.startswith("RESULT "):
                    results[r] = tuple(json.loads(line[len("RESULT "):]))
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    p.wait(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5.0)
            p.stdin.close()
            p.stdout.close()
    return results


def _inputs(dtype: torch.dtype, n: int, size: int, seed: int, op: str) -> list[torch.Tensor]:
    res = []
    for r in range(size):
        g = torch.Generator().manual_seed(seed * 97 + r)
        if dtype == torch.bool:
            t = torch.randint(0, 2, (n,), generator=g).bool()
        elif dtype.is_complex:
            t = torch.randn(n, dtype=dtype, generator=g)
        elif dtype.is_floating_point:
            t = torch.randn(n, generator=g)
            t = (1 + 0.1 * t if op == "prod" else t).to(dtype)
        else:
            info = torch.iinfo(dtype)
            t = torch.randint(max(info.min, -(1 << 40)), min(info.max, 1 << 40), (n,),
                              generator=g, dtype=torch.int64).to(dtype)
        res.append(t)
    return res


def _reference(inputs: list[torch.Tensor], op: str) -> np.ndarray:
    dt = inputs[0].dtype
    wide = torch.complex128 if dt.is_complex else torch.float64
    if dt.is_floating_point or dt.is_complex:
        a = np.stack([t.to(wide).numpy() for t in inputs])
    else:
        a = np.stack([t.numpy() for t in inputs])
    if dt == torch.bool:
        return (np.logical_or if op in ("sum", "max") else np.logical_and).reduce(a, axis=0)
    if op in ("sum", "avg"):
        s = np.sum(a, axis=0, dtype=a.dtype)    # integer sums wrap, like torch
        return s / len(inputs) if op == "avg" else s
    if op == "prod":
        return np.prod(a, axis=0, dtype=a.dtype)
    return np.min(a, axis=0) if op == "min" else np.max(a, axis=0)


def _ops(dtype: torch.dtype) -> list[str]:
    ops = ["sum", "prod"]
    if not dtype.is_complex:
        ops += ["min", "max"]
    if dtype.is_floating_point or dtype.is_complex:
        ops.append("avg")
    return ops


def _correctness_worker(rank: int, size: int, path: str, pids: list[int]) -> list[str]:
    torch.set_num_threads(1)
    eng = ShmAllreduce(path, rank, size, capacity_bytes=CAP, timeout=30.0,
                       peer_pids=pids, block_bytes=BLOCK)
    bad: list[str] = []
    try:
        seed = 0
        for dtype in DTYPES:
            for op in _ops(dtype):
                for n in SIZES:
                    seed += 1
                    inputs = _inputs(dtype, n, size, seed, op)
                    t = inputs[rank].clone()
                    eng.allreduce_(t, op, (seed, n))
                    ref = _reference(inputs, op)
                    wide = torch.complex128 if dtype.is_complex else torch.float64
                    got = t.to(wide).numpy() if dtype in TOL else t.numpy()
                    ok = (np.allclose(got, ref, *TOL[dtype]) if dtype in TOL
                          else np.array_equal(got, ref))
                    if not ok:
                        bad.append(f"allreduce {dtype} {op} n={n}")
            for n in SIZES:                      # broadcast from varying roots
                seed += 1
                root = seed % size
                inputs = _inputs(dtype, n, size, seed, "sum")
                t = inputs[rank].clone()
                eng.broadcast_(t, root, (seed,))
                if not torch.equal(t, inputs[root]):
                    bad.append(f"broadcast {dtype} n={n} root={root}")
            eng.barrier()
        # a 2-D tensor, default signature, capacity == exact multiple
        t = torch.full((4, CAP // 16), float(rank + 1))
        eng.allreduce_(t, "sum")
        if not torch.equal(t, torch.full_like(t, size * (size + 1) / 2)):
            bad.append("2-D allreduce")
    finally:
        eng.close()
    return bad


@pytest.mark.timeout(90)
@pytest.mark.parametrize("size", [2, 3, 4])
def test_allreduce_and_broadcast_match_numpy(shm_path, size):
    res = _spawn(_correctness_worker, size, shm_path, deadline=80.0)
    for rank in range(size):
        kind, payload = res[rank]
        assert kind == "ok", f"rank {rank}: {kind} {payload}"
        assert payload == [], f"rank {rank} mismatches: {payload}"


def _shared_worker(rank: int, size: int, path: str, pids: list[int]) -> list[str]:
    """Tensors in SharedBuffers are reduced in place (bitwise what the slot path gives); one
    private tensor on any rank sends everyone through the slots; names go once all mapped."""
    torch.set_num_threads(1)
    eng = ShmAllreduce(path, rank, size, capacity_bytes=CAP, timeout=30.0,
                       peer_pids=pids, block_bytes=BLOCK)
    eng.buffers = SharedBuffers(path, rank, secret="test")
    bad: list[str] = []
    try:
        seed = 1000
        for dtype in (torch.float32, torch.float64, torch.int32, torch.bfloat16, torch.bool):
            for op in _ops(dtype):
                for n in (1, 7, 1001, 4500):
                    seed += 1
                    inputs = _inputs(dtype, n, size, seed, op)
                    shared = eng.buffers.empty(n + 3, dtype)[3:]     # at an offset
                    shared.copy_(inputs[rank])
                    private = inputs[rank].clone()
                    eng.allreduce_(shared, op, (seed, n))
                    eng.allreduce_(private, op, (seed, n))
                    if not torch.equal(shared, private):
                        bad.append(f"in place != slots: {dtype} {op} n={n}")
                    mixed = shared.clone() if rank == size - 1 else shared
                    mixed.copy_(inputs[rank])
                    eng.allreduce_(mixed, op, (seed, n))
                    if not torch.equal(mixed, private):
                        bad.append(f"mixed shared/private: {dtype} {op} n={n}")
        unused = eng.buffers.empty(10, torch.float32)
        eng.barrier()
        left = sorted(p for p in os.listdir("/dev/shm") if p.startswith(os.path.basename(path)
                                                                         + f".b{rank}."))
        if len(left) != 1:
            bad.append(f"names left after the ops: {left} (want only the unused buffer's)")
        eng.buffers.close()
        unused.fill_(1.0)               # the memory outlives the name and the close
        eng.barrier()
        if any(p.startswith(os.path.basename(path) + ".b") for p in os.listdir("/dev/shm")):
            bad.append("names left after close")
    finally:
        eng.close()
    return bad


@pytest.mark.timeout(90)
@pytest.mark.parametrize("size", [2, 3])
def test_shared_buffers_reduce_in_place(shm_path, size):
    res = _spawn(_shared_worker, size, shm_path, deadline=80.0)
    for rank in range(size):
        kind, payload = res[rank]
        assert kind == "ok", f"rank {rank}: {kind} {payload}"
        assert payload == [], f"rank {rank}: {payload}"


def _mismatch_worker(rank: int, size: int, path: str, pids: list[int]) -> list[str]:
    explaining = [False]

    def explain(sigs, ranks):
        return f"explained: ranks {ranks} sent {sigs}" if explaining[0] else None
    eng = ShmAllreduce(path, rank, size, capacity_bytes=CAP, timeout=20.0,
                       peer_pids=pids, explain=explain)
    msgs = []
    try:
        cases = [(torch.ones(10 + (rank == size - 1)), "sum"),      # numel differs on last
                 (torch.ones(10), "max" if rank == 1 else "sum"),   # op differs on rank 1
                 (torch.ones(5000), "sum"),                          # size differs from n=0
                 (torch.ones(10), "sum")]                            # signature differs
        if rank == 0:
            cases[2] = (torch.ones(0), "sum")
        for i, (t, op) in enumerate(cases):
            explaining[0] = i == 3
            try:
                eng.allreduce_(t, op, (7, rank if i == 3 else t.numel()))
                msgs.append("no error")
            except CollectiveMismatch as e:
                msgs.append(str(e))
        t = torch.ones(100)                       # the group stays usable after a mismatch
        eng.allreduce_(t, "sum")
        eng.barrier()
        msgs.append("ok" if torch.equal(t, torch.full_like(t, size)) else "bad sum")
    finally:
        eng.close()
    return msgs


@pytest.mark.timeout(60)
def test_mismatch_raises_on_every_rank(shm_path):
    size = 3
    res = _spawn(_mismatch_worker, size, shm_path)
    for rank in range(size):
        kind, msgs = res[rank]
        assert kind == "ok", f"rank {rank}: {kind} {msgs}"
        assert "numel=11" in msgs[0] and "local rank 2 called" in msgs[0], msgs[0]
        assert "local rank(s) [0, 1] called allreduce(op='sum', dtype=float32, numel=10" in msgs[0]
        assert "op='max'" in msgs[1] and "local rank 1 called" in msgs[1], msgs[1]
        assert "signature=(7, 10)" in msgs[1]
        assert "numel=0" in msgs[2] and "numel=5000" in msgs[2], msgs[2]
        assert msgs[3] == "explained: ranks [0, 1, 2] sent [(7, 0), (7, 1), (7, 2)]", msgs[3]
        assert msgs[4] == "ok"


def _victim_worker(rank: int, size: int, path: str, pids: list[int]) -> float:
    if rank == size - 1:                          # never joins; the parent SIGKILLs it
        print("READY", flush=True)
        time.sleep(60)
        return 0.0
    eng = ShmAllreduce(path, rank, size, capacity_bytes=CAP, timeout=30.0, peer_pids=pids)
    try:
        print("READY", flush=True)
        eng.allreduce_(torch.ones(1000), "sum")
    except WorkerLost as e:
        assert e.lost_ranks == [size - 1] and f"pid {pids[-1]}" in str(e), str(e)
        with pytest.raises(WorkerLost):           # the engine stays failed
            eng.barrier()
        return time.time()
    finally:
        eng.close()
    raise AssertionError("allreduce_ returned although a peer never joined")


@pytest.mark.timeout(60)
def test_sigkilled_peer_raises_worker_lost(shm_path):
    size = 3
    killed: list[float] = []

    def kill_last(procs, end, results):
        for p in procs:
            assert _readline(p, end) == "READY"
        time.sleep(0.3)                           # let the survivors block in the allreduce
        killed.append(time.time())
        os.kill(procs[-1].pid, signal.SIGKILL)
        results[size - 1] = ("killed", None)

    res = _spawn(_victim_worker, size, shm_path, on_start=kill_last)
    for rank in range(size - 1):
        kind, t_raise = res[rank]
        assert kind == "ok", f"rank {rank}: {kind} {t_raise}"
        assert t_raise - killed[0] < 1.5          # ~1 s, with slack for a loaded machine


# ------------------------------------------------------------------------ in-process tests
@pytest.mark.timeout(30)
def test_timeout_names_missing_rank(shm_path):
    with ShmAllreduce(shm_path, 0, 3, capacity_bytes=CAP, timeout=0.3) as eng:
        t0 = time.monotonic()
        with pytest.raises(WorkerLost, match=r"local rank\(s\) \[1, 2\] did not arrive within "
                                             r"0.3s") as ei:
            eng.allreduce_(torch.ones(10), "sum")
        assert 0.3 <= time.monotonic() - t0 < 2.0
        assert ei.value.lost_ranks == [1, 2]
        with pytest.raises(WorkerLost, match="earlier failure"):
            eng.barrier()
        eng.unlink()
        eng.unlink()
    eng.close()


@pytest.mark.timeout(30)
def test_errors_name_the_given_ranks_and_generation(shm_path):
    # local ranks 0, 1, 2 are ranks 4, 9, 11 of generation 5
    with ShmAllreduce(shm_path, 0, 3, capacity_bytes=CAP, timeout=0.2, ranks=[4, 9, 11],
                      generation=5) as eng:
        with pytest.raises(WorkerLost, match=r"rank\(s\) \[9, 11\] \(local rank\(s\) \[1, 2\]\) "
                                             r"did not arrive within 0.2s .*\(rank 4 \(local "
                                             r"rank 0\) waited") as ei:
            eng.barrier()
        assert (ei.value.lost_ranks, ei.value.generation) == ([9, 11], 5)
        with pytest.raises(WorkerLost, match="earlier failure") as ei:
            eng.allreduce_(torch.ones(3), "sum")
        assert (ei.value.lost_ranks, ei.value.generation) == ([9, 11], 5)
        eng.unlink()
    with ShmAllreduce(shm_path, 0, 2, capacity_bytes=CAP, timeout=20.0, generation=6,
                      abort_check=lambda: "fenced") as eng:
        with pytest.raises(WorkerLost, match="fenced") as ei:
            eng.allreduce_(torch.ones(3), "sum")
        assert ei.value.generation == 6
        eng.unlink()
    with pytest.raises(ConfigError, match=r"ranks=\[1\] must give one rank per local rank"):
        ShmAllreduce(shm_path, 0, 2, capacity_bytes=CAP, timeout=1.0, ranks=[1])


@pytest.mark.timeout(30)
def test_single_rank_keeps_data_of_tensors_that_require_grad_and_nan(shm_path):
    with ShmAllreduce(shm_path, 0, 1, capacity_bytes=CAP, timeout=1.0) as eng:
        t = torch.tensor([1.0, float("nan"), -2.0], requires_grad=True)
        eng.allreduce_(t, "max")
        eng.broadcast_(t, 0)
        assert t.requires_grad and t.is_leaf and t.grad is None
        np.testing.assert_array_equal(t.detach().numpy(), [1.0, np.nan, -2.0])
        eng.unlink()


@pytest.mark.timeout(30)
def test_abort_check_and_dead_pid(shm_path):
    with ShmAllreduce(shm_path, 0, 2, capacity_bytes=CAP, timeout=20.0,
                      abort_check=lambda: "group fenced by coordinator") as eng:
        with pytest.raises(WorkerLost, match="group fenced by coordinator"):
            eng.barrier()
    os.unlink(shm_path)
    zombie = subprocess.Popen(["sleep", "30"])
    try:
        zombie.kill()
        time.sleep(0.1)                           # not reaped yet: a zombie, still kill-able
        with ShmAllreduce(shm_path, 0, 2, capacity_bytes=CAP, timeout=20.0,
                          peer_pids=[os.getpid(), zombie.pid]) as eng:
            t0 = time.monotonic()
            with pytest.raises(WorkerLost, match=rf"local rank 1 \(pid {zombie.pid}\)"):
                eng.allreduce_(torch.ones(3), "sum")
            assert time.monotonic() - t0 < 1.0
    finally:
        zombie.kill()
        zombie.wait(timeout=5)


@pytest.mark.timeout(30)
def test_argument_validation(shm_path):
    with pytest.raises(ConfigError, match="local_rank"):
        ShmAllreduce(shm_path, 2, 2, capacity_bytes=CAP, timeout=1.0)
    with pytest.raises(ConfigError, match="capacity_bytes"):
        ShmAllreduce(shm_path, 0, 2, capacity_bytes=0, timeout=1.0)
    with pytest.raises(ConfigError, match="peer_pids"):
        ShmAllreduce(shm_path, 0, 2, capacity_bytes=CAP, timeout=1.0, peer_pids=[1])
    with ShmAllreduce(shm_path, 0, 1, capacity_bytes=CAP, timeout=1.0) as eng:
        assert os.path.getsize(shm_path) == eng.total_bytes
        with pytest.raises(ConfigError, match="op="):
            eng.allreduce_(torch.ones(3), "mean")
        with pytest.raises(ConfigError, match="avg"):
            eng.allreduce_(torch.ones(3, dtype=torch.int32), "avg")
        with pytest.raises(ConfigError, match="complex"):
            eng.allreduce_(torch.ones(3, dtype=torch.complex64), "max")
        with pytest.raises(ConfigError, match="contiguous"):
            eng.allreduce_(torch.ones(4, 4).t(), "sum")
        with pytest.raises(ConfigError, match="root"):
            eng.broadcast_(torch.ones(3), 1)
        t = torch.arange(3000.0)                  # a single rank: identity, in rounds
        eng.allreduce_(t, "avg")
        assert torch.equal(t, torch.arange(3000.0))
    # reopening a used segment is refused: its flags are not fresh
    with pytest.raises(ConfigError, match="stale"):
        ShmAllreduce(shm_path, 0, 1, capacity_bytes=CAP, timeout=1.0)


_FULL_SHM = r"""
import logging, os, sys, torch
from phalanx.comm.shmbuf import SharedBuffers
from phalanx.train.buckets import build_buckets
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
home = SharedBuffers(sys.argv[1] + "/seg", 0, secret="test")
small = home.empty(1000, torch.float32)          # fits
try:
    home.empty(1 << 20, torch.float32)            # 4 MiB on a 1 MiB tmpfs
    print("NO ERROR")
except OSError as e:
    print("ENOSPC", e.errno)
w = torch.nn.Parameter(torch.zeros(1 << 20))
(bucket,) = build_buckets([("w", w)], 1 << 30)
w.grad = torch.ones(1 << 20)
grads, _ = bucket.adopt(home)
print("FALLBACK", home.locate(bucket.buffer), bool(grads.sum() == (1 << 20)))
home.close()
print("LEFT", sorted(os.listdir(sys.argv[1])))
"""


@pytest.mark.timeout(60)
def test_full_shm_falls_back_to_private_buckets(tmp_path):
    """On a /dev/shm too small for a bucket (a real 1 MiB tmpfs in a private mount namespace),
    the buffer reserve fails with ENOSPC up front (no SIGBUS later), the bucket falls back to
    private memory with a warning naming the fix, and nothing is left behind."""
    import shutil
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a small tmpfs in a private namespace")
    mnt = tmp_path / "shm"
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": _SRC}
    res = subprocess.run(["unshare", "-m", "sh", "-c",
                          f"mount -t tmpfs -o size=1m none {mnt} && exec {sys.executable} "
                          f"-c \"$0\" {mnt}", _FULL_SHM], env=env, capture_output=True,
                         text=True, timeout=50)
    if "mount:" in res.stderr and res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    assert "ENOSPC 28" in res.stdout, res.stdout
    assert "does not fit in shared memory" in res.stdout and "--shm-size" in res.stdout
    assert "FALLBACK -1 True" in res.stdout, res.stdout
    assert "LEFT []" in res.stdout, res.stdout
