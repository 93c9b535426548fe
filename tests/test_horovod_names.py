"""phalanx.horovod.torch matches operations by name, as Horovod's negotiation does, across real
worker processes: named operations submitted and synchronized in different orders on
different ranks, a mix of kinds, unnamed operations matched by order, the duplicate-name
check, a deadlock that fails with StallError (never hangs), mismatched signatures, a peer
lost during negotiation, and 100 init/shutdown cycles that leak nothing. Each rank checks
its results against numpy and writes its failures."""

from __future__ import annotations

import json

import pytest
from conftest import CHECKS

HEAD = r'''
import json, os, sys, threading, time
import numpy as np, torch
import phalanx as px
import phalanx.horovod.torch as hvd
from phalanx.horovod.torch.negotiate import MismatchError, StallError
''' + CHECKS + r'''

def done():
    with open(f"{sys.argv[1]}/rank{r}.json", "w") as f:
        json.dump({"failures": fails, "checks": checks[0]}, f)

hvd.init()
n, r = hvd.size(), hvd.rank()

def val(k, rank=None, shape=(3,)):
    """Rank `rank`'s data for operation k."""
    rank = r if rank is None else rank
    return np.random.default_rng(1000 * rank + k).integers(-9, 10, size=shape).astype(np.float64)

def total(k, shape=(3,)):
    return sum(val(k, s, shape) for s in range(n))

def ar(k, name):
    return hvd.allreduce_async(torch.from_numpy(val(k)), name=name, op=hvd.Sum)

def same(label, got, want):
    check(label, np.array_equal(np.asarray(got), want), f"{np.asarray(got).tolist()} != {want.tolist()}")
'''

ORDERS = r'''
perm = lambda xs, seed: [xs[i] for i in np.random.default_rng(seed).permutation(len(xs))]

# 1. named allreduces: rank r submits them rotated by r, synchronizes in a per-rank shuffle
names = [f"t{i}" for i in range(6)]
mine = names[r:] + names[:r]
hs = {nm: ar(int(nm[1:]), nm) for nm in mine}
for nm in perm(names, 50 + r):
    same(f"rotated {nm}", hvd.synchronize(hs[nm]), total(int(nm[1:])))

# ranks leave a synchronize() at different rounds: rank 0 needs 'a' first, the others 'b'
if r == 0:
    ha = ar(10, "a")
    same("early a", hvd.synchronize(ha), total(10))
    hb = ar(11, "b")
    same("late b", hvd.synchronize(hb), total(11))
else:
    ha, hb = ar(10, "a"), ar(11, "b")
    same("late b", hvd.synchronize(hb), total(11))
    same("early a", hvd.synchronize(ha), total(10))

# 2. a mix of kinds, submitted in rotated orders, synchronized in a shuffle
rows = [np.full((s + 1, 2), s, dtype=np.float32) for s in range(n)]
root = n - 1
subs = {
    "allreduce": lambda: ar(20, "m"),
    "allgather": lambda: hvd.allgather_async(torch.from_numpy(rows[r]), name="m"),
    "broadcast": lambda: hvd.broadcast_async(torch.from_numpy(val(21)), root, name="m"),
    "grouped": lambda: hvd.grouped_allreduce_async(
        [torch.from_numpy(val(22)), torch.from_numpy(val(23, shape=(2, 2)))], op=hvd.Sum,
        name="gm"),
    "alltoall": lambda: hvd.alltoall_async(torch.arange(2 * n) + 100 * r, name="m"),
}
want = {
    "allreduce": lambda out: same("mix allreduce", out, total(20)),
    "allgather": lambda out: same("mix allgather", out, np.concatenate(rows)),
    "broadcast": lambda out: same("mix broadcast", out, val(21, root)),
    "grouped": lambda out: (same("mix grouped 0", out[0], total(22)),
                            same("mix grouped 1", out[1], total(23, (2, 2)))),
    "alltoall": lambda out: same("mix alltoall", out[0],
                                 np.array([100 * s + 2 * r + i for s in range(n) for i in (0, 1)])),
}
kinds = list(subs)
hs = {k: subs[k]() for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]}
# a synchronous call in the middle runs first what every rank queued
same("sync in between", hvd.allreduce(torch.from_numpy(val(24)), op=hvd.Sum), total(24))
for k in perm(kinds, 60 + r):
    want[k](hvd.synchronize(hs[k]))

# 3. unnamed operations match by submission order, whatever the synchronize() order
hs = [ar(30 + i, None) for i in range(4)]
hg = hvd.allgather_async(torch.tensor([r, r]))
for i in perm(list(range(4)), 70 + r):
    same(f"unnamed {i}", hvd.synchronize(hs[i]), total(30 + i))
check("unnamed allgather", hvd.synchronize(hg).tolist() == [s for s in range(n) for _ in (0, 1)])

# poll negotiates an operation still queued
hp = ar(40, "p")
if r == 0:
    time.sleep(0.2)
polls = 0
while not hvd.poll(hp):
    polls += 1
    time.sleep(0.001)
same("poll", hvd.synchronize(hp), total(40))

# two threads per rank, each submitting and synchronizing its own named operations
got = {}
def work(tag, base):
    for i in range(4):
        got[f"{tag}{i}"] = hvd.synchronize(ar(base + i, f"{tag}{i}"))
threads = [threading.Thread(target=work, args=(tag, base)) for tag, base in (("u", 80), ("v", 90))]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=30)
check("threads finished", not any(t.is_alive() for t in threads))
for tag, base in (("u", 80), ("v", 90)):
    for i in range(4):
        same(f"thread {tag}{i}", got.get(f"{tag}{i}", np.zeros(3)), total(base + i))

# barrier and join go through the queue too: a named op queued before them runs first
hq = ar(41, "before-barrier")
hvd.barrier()
check("barrier ran queued op", hvd.poll(hq))
same("before barrier", hvd.synchronize(hq), total(41))
check("join", hvd.join() in range(n))
'''

ERRORS = r'''
# 4. duplicate in-flight name
hd = ar(50, "dup")
msg = raises("duplicate name", ValueError, lambda: ar(51, "dup"))
check("duplicate message", "'dup'" in msg and "in flight" in msg, msg)
same("dup result", hvd.synchronize(hd), total(50))
hd2 = ar(52, "dup")   # free again once synchronized
same("dup reused", hvd.synchronize(hd2), total(52))

# 6. mismatched shape and dtype under one name: MismatchError on every rank, naming both
hgood = ar(60, "good")
shape = (3,) if r == 0 else (4,)
hbad = hvd.allreduce_async(torch.zeros(shape), name="bad")
msg = raises("shape mismatch", MismatchError, lambda: hvd.synchronize(hbad))
check("shape message", "allreduce 'bad'" in msg and "shape" in msg and "rank 0: (3,)" in msg
      and ("rank 1: (4,)" in msg or "ranks 1," in msg), msg)
check("mismatch is RuntimeError", isinstance(MismatchError("x"), RuntimeError))
same("good beside bad", hvd.synchronize(hgood), total(60))
dt = torch.float32 if r == 0 else torch.float64
msg = raises("dtype mismatch", MismatchError, lambda: hvd.allreduce(torch.ones(2, dtype=dt),
                                                                    name="bad2"))
check("dtype message", "allreduce 'bad2'" in msg and "dtype" in msg and "float32" in msg
      and "float64" in msg, msg)
msg = raises("root mismatch", MismatchError, lambda: hvd.broadcast(torch.ones(2), r, name="br"))
check("root message", "root_rank" in msg, msg)

# 5. a deadlock: rank 0 waits for 'a', the others for 'b'; StallError within the stall time
os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"] = "0.3"
os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = "1.5"
t0 = time.monotonic()
h = ar(70, "a" if r == 0 else "b")
msg = raises("stall", StallError, lambda: hvd.synchronize(h))
took = time.monotonic() - t0
check("stall time", 1.4 < took < 8, f"{took:.2f}s")
check("stall message", "ops missing on rank 1: allreduce 'a'" in msg
      and "ops missing on rank 0: allreduce 'b'" in msg and "rank 0 waits for allreduce 'a'" in msg,
      msg)
check("stall is RuntimeError", isinstance(StallError("x"), RuntimeError))
# the kind differs under one name: a stall whose message says so
t0 = time.monotonic()
h = (ar(71, "k") if r == 0 else hvd.broadcast_async(torch.zeros(3), 0, name="k"))
msg = raises("kind stall", StallError, lambda: hvd.synchronize(h))
took = time.monotonic() - t0
check("second stall takes its own time", 1.4 < took < 8, f"{took:.2f}s")
check("kind message", "under that name" in msg, msg)
os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = "0"
h = ar(72, "z" if r == 0 else "y")
raises("stall 0 refused", px.ConfigError, lambda: hvd.synchronize(h))
del os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"], os.environ["HOROVOD_STALL_CHECK_TIME_SECONDS"]
# the group and the queue are clean afterwards
same("after stall", hvd.allreduce(torch.from_numpy(val(73)), op=hvd.Sum, name="a"), total(73))
'''

CYCLES = r'''
# 7. init/shutdown cycles: each shutdown drops a queued op; threads, fds, /dev/shm do not grow
def snapshot():
    return {"threads": threading.active_count(), "fds": len(os.listdir("/proc/self/fd")),
            "shm": len(os.listdir("/dev/shm"))}

def cycle(i, prev=None):
    hvd.shutdown()
    check(f"shut {i}", not hvd.is_initialized())
    hvd.init()
    check(f"dropped {i}", prev is None or hvd.synchronize(prev) is None)
    y = hvd.allreduce(torch.full((2,), float(r + i)), op=hvd.Sum, name=f"c{i % 3}")
    want = float(sum(s + i for s in range(n)))
    check(f"cycle {i}", y.tolist() == [want, want], f"{y.tolist()}")
    return hvd.allreduce_async(torch.ones(1), name="left behind")

left = cycle(-1)
before = snapshot()
for i in range(100):
    left = cycle(i, left)
after = snapshot()
for k in before:
    check(f"no growth of {k}", after[k] <= before[k] + 2, f"{before[k]} -> {after[k]}")
'''

LOST = r'''
# a peer lost during negotiation: HorovodInternalError (WorkerLost) at once, queue dropped
hvd.barrier()
if r == 1:
    done()
    time.sleep(0.3)
    os.kill(os.getpid(), 9)   # a fault (an exit status the script chose is a bug since issue 24)
hy = ar(1, "y")
hx = ar(2, "x")
t0 = time.monotonic()
raises("lost peer", hvd.HorovodInternalError, lambda: hvd.synchronize(hx))
check("lost peer fails fast", time.monotonic() - t0 < 20, f"{time.monotonic() - t0:.1f}s")
raises("queued op dropped", hvd.HorovodInternalError, lambda: hvd.synchronize(hy))
done()
'''


def _results(tmp_path, n: int) -> None:
    for r in range(n):
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["failures"] == [], f"rank {r}: " + "\n".join(out["failures"])
        assert out["checks"] >= 20, out


@pytest.mark.timeout(100)
def test_names_2_ranks(job, tmp_path) -> None:
    """Orders, kinds, unnamed ops, poll, errors (duplicate, mismatch, stall), 100 init/shutdown
    cycles, then rank 1 dies during a negotiation: one job, as each start costs seconds."""
    script = HEAD + ORDERS + ERRORS + CYCLES + LOST
    res = job(script, 2, "--min-np", "1", script_args=(str(tmp_path),), timeout=90)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _results(tmp_path, 2)
    assert "hvd: stalled for" in res.stdout + res.stderr, "no stall warning was logged"


@pytest.mark.timeout(100)
def test_names_4_ranks(job, tmp_path) -> None:
    """Orders, kinds, unnamed ops and poll with 4 ranks."""
    res = job(HEAD + ORDERS + "done()\n", 4, script_args=(str(tmp_path),), timeout=90)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _results(tmp_path, 4)
