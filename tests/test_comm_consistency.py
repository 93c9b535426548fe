"""Every path (shared memory and Gloo, 1-4 ranks) gives the same results and the same errors.

Covers: objects that cannot be pickled (every rank raises, the group survives), tensors that
require grad, NaN in min/max, exact Python-int reductions, one mismatch text, WorkerLost with
global ranks and the generation, one op/dtype vocabulary, and comm's layering.
Ranks are threads over real Gloo process groups and the real shared-memory engine.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from phalanx import api
from phalanx.comm import collectives as C
from phalanx.config import Config
from phalanx.errors import CollectiveMismatch, ConfigError, WorkerLost
from threadranks import run_ranks

KEY = b"k" * 32
ALGOS = ["gloo", "shm"]
SRC = Path(__file__).resolve().parents[1] / "src" / "phalanx"


def ok(results: list) -> list:
    for r, res in enumerate(results):
        assert not isinstance(res, BaseException), f"rank {r}: {res!r}"
    return results


class Refuses:
    """An object whose pickling raises something other than TypeError."""

    def __reduce__(self):
        raise RuntimeError("refuses to be pickled")


# ------------------------------------------------------------------------------ objects
@pytest.mark.timeout(60)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_unpicklable_object_fails_every_rank_fast_and_group_survives(algo: str, n: int) -> None:
    root = n - 1
    bad = {0, n - 1}                                  # ranks whose allgather object fails

    def body(g):
        r = g.place.rank
        out: dict = {"errors": []}
        t0 = time.monotonic()
        calls = [lambda: C.broadcast_object(g, threading.Lock() if r == root else "x", root, KEY),
                 lambda: C.allgather_object(g, (Refuses() if r == 0 else threading.Lock())
                                            if r in bad else r, KEY)]
        for call in calls:
            try:
                g.run("object", call)
                out["errors"].append(None)
            except ConfigError as e:
                out["errors"].append((str(e), type(e.__cause__).__name__))
        out["seconds"] = time.monotonic() - t0
        out["after"] = g.run("object", lambda: C.broadcast_object(g, {"from": r}, root, KEY))
        out["gathered"] = g.run("object", lambda: C.allgather_object(g, r, KEY))
        out["broken"] = g.broken
        return out

    results = ok(run_ranks(n, body, algo=algo, coll_timeout=15))
    for r, res in enumerate(results):
        (bmsg, bcause), (amsg, acause) = res["errors"]
        assert bmsg == results[0]["errors"][0][0], "every rank gets the same text"
        assert bmsg.startswith(f"broadcast_object: the object of rank(s) [{root}] cannot be "
                               f"pickled (rank {root}: TypeError: cannot pickle "
                               "'_thread.lock'"), bmsg
        assert bcause == ("TypeError" if r == root else "NoneType")
        assert amsg == results[0]["errors"][1][0]
        assert f"allgather_object: the object of rank(s) {sorted(bad)} cannot be pickled" in amsg
        assert "rank 0: RuntimeError: refuses to be pickled" in amsg, amsg
        if n > 1:
            assert f"rank {n - 1}: TypeError: cannot pickle '_thread.lock'" in amsg, amsg
        assert acause == ({0: "RuntimeError"}.get(r, "TypeError") if r in bad else "NoneType")
        assert res["seconds"] < 5, "a peer waited for data that never came"
        assert res["after"] == {"from": root} and res["gathered"] == list(range(n))
        assert res["broken"] is None


# ------------------------------------------------------------------------ requires_grad
@pytest.mark.timeout(60)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("n", [2, 3])
def test_tensors_that_require_grad_are_reduced_as_data(algo: str, n: int) -> None:
    def body(g):
        r = g.place.rank
        out = {}
        for op in ("sum", "avg", "max"):
            t = torch.full((5,), float(r + 1), requires_grad=True)
            C.allreduce_(g, t, op, None)
            out[op] = (t.detach().tolist(), t.requires_grad, t.is_leaf)
        b = torch.full((3,), float(r), requires_grad=True)
        C.broadcast_(g, b, n - 1, None)
        out["broadcast"] = b.detach().tolist()
        out["allgather"] = C.allgather(g, torch.full((2,), float(r), requires_grad=True),
                                       None).tolist()
        out["reducescatter"] = C.reducescatter(
            g, torch.arange(2.0 * n, requires_grad=True), "sum", None).tolist()
        return out

    total = sum(range(1, n + 1))
    for r, res in enumerate(ok(run_ranks(n, body, algo=algo))):
        assert res["sum"] == ([float(total)] * 5, True, True)
        assert res["avg"] == ([total / n] * 5, True, True)
        assert res["max"] == ([float(n)] * 5, True, True)
        assert res["broadcast"] == [float(n - 1)] * 3
        assert res["allgather"] == [float(k) for k in range(n) for _ in range(2)]
        assert res["reducescatter"] == [float(n * v) for v in (2 * r, 2 * r + 1)]


# -------------------------------------------------------------------------------- NaN
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def nan_input(rank: int, n: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """Values with NaN on one rank for some elements, on none for others, and infinities."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(numel, generator=g, dtype=torch.float64) * 100
    j = torch.arange(numel)
    x[j % (n + 2) == rank] = float("nan")
    x[j % 7 == (rank + 3) % 7] = float("inf") if rank % 2 else -float("inf")
    x[x == 0] = 1.0                                   # signed zeros may tie either way
    return x.to(dtype)


def as_f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()                # exact for every float dtype here


@pytest.mark.timeout(90)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_min_max_propagate_nan_like_numpy(algo: str, n: int) -> None:
    numel = 3001                                      # several rounds of a 4 KB segment

    def body(g):
        r = g.place.rank
        bad = []
        for dtype in FLOATS:
            for op, ref in (("max", np.maximum), ("min", np.minimum)):
                want = ref.reduce([as_f64(nan_input(k, n, dtype, numel)) for k in range(n)])
                t = nan_input(r, n, dtype, numel)
                C.allreduce_(g, t, op, None)
                got = C.reducescatter(g, nan_input(r, n, dtype, numel), op, None)
                try:
                    np.testing.assert_array_equal(as_f64(t), want)
                    np.testing.assert_array_equal(as_f64(got), np.array_split(want, n)[r])
                except AssertionError as e:
                    bad.append(f"{op} {dtype}: {str(e)[:200]}")
        return bad

    for r, res in enumerate(ok(run_ranks(n, body, algo=algo, shm_max_bytes=4096))):
        assert res == [], f"rank {r}: {res}"


# ------------------------------------------------------------------------- Python ints
I64_MAX = (1 << 63) - 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_python_ints_reduce_exactly_or_raise(algo: str, n: int) -> None:
    cases = [("sum", lambda r: I64_MAX // n - r),              # fits, right at the edge
             ("sum", lambda r: -(1 << 63) // n),               # exactly -2**63 for n = 1, 2
             ("sum", lambda r: (1 << 62) + r),                 # overflows for n >= 2
             ("sum", lambda r: -(1 << 62) - 1 - r),            # underflows for n >= 2
             ("prod", lambda r: [3037000499, 3037000499, 1][r]),    # 9223372030926249001
             ("prod", lambda r: [1 << 31, -(1 << 32), 1][r]),  # exactly -2**63
             ("prod", lambda r: [1 << 31, 1 << 32, 1][r]),     # 2**63: overflows
             ("prod", lambda r: [1 << 62, 0, 1 << 62][r]),     # zero
             ("prod", lambda r: [I64_MAX, I64_MAX, I64_MAX][r]),
             ("max", lambda r: I64_MAX - r),
             ("min", lambda r: -(1 << 63) + r)]

    def body(g):
        out = []
        for op, value in cases:
            try:
                out.append(api._allreduce_int(g, value(g.place.rank), op, None))
            except ConfigError as e:
                out.append(str(e))
        return out

    for res in ok(run_ranks(n, body, algo=algo)):
        for (op, value), got in zip(cases, res):
            vals = [value(k) for k in range(n)]
            exact = sum(vals) if op == "sum" else max(vals) if op == "max" else (
                min(vals) if op == "min" else int(np.prod(vals, dtype=object)))
            if -(1 << 63) <= exact <= I64_MAX:
                assert got == exact, (op, vals, got)
            else:
                assert isinstance(got, str), (op, vals, got)
                assert got.startswith(f"allreduce(op={op!r}) of Python ints: the result ("), got
                assert "does not fit in int64" in got, got


def test_python_floats_are_reduced_in_double_precision() -> None:
    """As numpy would: 0.1 + 0.2 is 0.30000000000000004, not float32's 0.30000001192092896."""
    t, kind = api._to_tensor(0.1, "x", "allreduce")
    assert kind == "float" and t.dtype == torch.float64
    assert api._to_tensor(1j, "x", "allreduce")[0].dtype == torch.complex128
    res = ok(run_ranks(2, lambda g: float(C.allreduce_(g, api._to_tensor(
        [0.1, 0.2][g.place.rank], "x", "allreduce")[0], "sum", None).item()), algo="gloo"))
    assert res == [0.1 + 0.2] * 2


def test_python_ints_outside_int64_are_refused_before_any_communication() -> None:
    for call in (lambda: api.allreduce(1 << 63), lambda: api.allreduce(-(1 << 63) - 1),
                 lambda: api.allreduce_async(10 ** 30), lambda: api.broadcast(1 << 64)):
        with pytest.raises(ConfigError, match=r"x=-?\d+ does not fit in int64"):
            call()


# ---------------------------------------------------------------------- mismatch text
def mismatch_body(what: str):
    def body(g):
        r = g.place.rank
        shape = (4, 3) if (what != "shape" or r == 0) else (4, 5)
        dtype = torch.float32 if (what != "dtype" or r == 0) else torch.float64
        op = "sum" if (what != "op" or r == 0) else "max"
        name = "grad.w" if (what != "name" or r == 0) else "grad.b"
        try:
            if what == "kind" and r > 0:
                C.allgather(g, torch.ones(shape), name)
            elif what == "barrier" and r > 0:
                C.barrier(g)
            else:
                C.allreduce_(g, torch.ones(shape, dtype=dtype), op, name)
            msg = "no error"
        except CollectiveMismatch as e:
            msg = str(e)
        t = torch.ones(3)                             # the group stays usable
        C.allreduce_(g, t, "sum", None)
        return msg, t.tolist()
    return body


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["shape", "dtype", "op", "name", "kind", "barrier"])
def test_mismatch_message_is_identical_on_shm_and_gloo(what: str) -> None:
    msgs = {}
    for algo in ALGOS:
        res = ok(run_ranks(3, mismatch_body(what), algo=algo, coll_timeout=10))
        assert all(t == [3.0] * 3 for _, t in res)
        assert len({m for m, _ in res}) == 1, f"{algo}: ranks disagree: {res}"
        msgs[algo] = res[0][0]
    assert msgs["shm"] == msgs["gloo"], msgs
    msg = msgs["gloo"]
    assert msg.startswith("collective mismatch in allreduce: rank(s) [0] called allreduce("
                          "op='sum', dtype=float32, shape=(4, 3), name#"), msg
    assert "; rank(s) [1, 2] called " in msg and "signature=" not in msg
    differs = {"shape": "shape", "dtype": "dtype", "op": "reduce op", "name": "name",
               "kind": "collective", "barrier": "collective"}[what]
    assert f"Differs in: {differs}" in msg, msg


# ------------------------------------------------------------------------- WorkerLost
@pytest.mark.timeout(60)
@pytest.mark.parametrize("algo", ALGOS)
def test_worker_lost_carries_global_ranks_and_generation(algo: str) -> None:
    def body(g):
        if g.place.rank == 2:                          # never joins the collective
            return None
        errors = []
        for _ in range(2):                            # the second finds the group broken
            try:
                g.run("allreduce", lambda: C.allreduce_(g, torch.ones(8), "sum", None))
            except WorkerLost as e:
                errors.append((e.generation, e.lost_ranks, str(e)))
        return errors

    res = run_ranks(3, body, algo=algo, generation=7, coll_timeout=1.0)
    for r in (0, 1):
        (gen1, lost1, msg1), (gen2, lost2, msg2) = ok(res)[r]
        assert gen1 == gen2 == 7
        if algo == "shm":
            assert lost1 == [2], msg1
            backstop = Config(timeout=1.0).backstop  # the data plane's own deadline
            assert f"rank 2 (local rank 2) did not arrive within {backstop}s" in msg1, msg1
        assert "broken" in msg2 or "earlier failure" in msg2, msg2


# --------------------------------------------------------------- vocabulary, layering
@pytest.mark.timeout(60)
def test_bad_arguments_raise_the_same_config_error_on_every_path() -> None:
    def body(g):
        errors = []
        for t, op in ((torch.ones(2), "mean"), (torch.ones(2, dtype=torch.int32), "avg"),
                      (torch.ones(2, dtype=torch.complex64), "max")):
            try:
                C.allreduce_(g, t, op, None)
            except ConfigError as e:
                errors.append(str(e))
        return errors
    got = {algo: ok(run_ranks(2, body, algo=algo)) for algo in ALGOS}
    assert got["shm"] == got["gloo"] and len(got["gloo"][0]) == 3, got
    from phalanx.comm import shm, shmsync
    for mod in (shm, shmsync):
        assert not {"_OPS", "_DTYPES", "_KINDS"} & set(vars(mod)), "one vocabulary: comm.ops"


def test_comm_imports_nothing_from_launch_and_launch_needs_no_torch() -> None:
    for path in (SRC / "comm").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                assert not mod.startswith(("..launch", "phalanx.launch")), f"{path.name}: {mod}"
    code = ("import sys; sys.modules['torch'] = None\n"
            "import phalanx.launch.shmfiles as f, phalanx.comm.shmnames as n\n"
            "assert f.segment_path is n.segment_path and f.SHM_DIR == n.SHM_DIR\n"
            "print(n.segment_path('job1', 3, secret='k'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"/dev/shm/phalanx-job1-g3-[0-9a-f]{16}", out.stdout.strip())
