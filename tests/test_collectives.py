"""Every collective, op and dtype against a numpy reference, for 1-4 ranks, on Gloo and shm.

Ranks are threads over real Gloo process groups and the real shared-memory engine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phalanx.comm import collectives as C
from phalanx.errors import CollectiveMismatch, ConfigError
from threadranks import run_ranks

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]
SIZES = [0, 1, 7, 1000, 70_001]


def make(rank: int, dtype: torch.dtype, numel: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank * 17 + numel)
    if dtype == torch.bool:
        return torch.rand(numel, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(numel, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g).to(dtype)
    low = 0 if dtype == torch.uint8 else -3
    return torch.randint(low, 4, (numel,), generator=g, dtype=dtype)


def np_of(t: torch.Tensor) -> np.ndarray:
    """numpy view for exact comparison (numpy has no bfloat16; float32 holds it exactly)."""
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def reference(inputs: list[torch.Tensor], op: str) -> np.ndarray:
    dtype = inputs[0].dtype
    if dtype in (torch.float16, torch.bfloat16):
        arrs = [t.double().numpy() for t in inputs]
    else:
        arrs = [t.numpy() for t in inputs]
    stack = np.stack(arrs)
    if dtype == torch.bool:
        return {"sum": np.logical_or, "max": np.logical_or, "avg": np.logical_or,
                "prod": np.logical_and, "min": np.logical_and}[op].reduce(stack, axis=0)
    if op == "sum":
        return np.add.reduce(stack, axis=0, dtype=stack.dtype)
    if op == "avg":
        return stack.mean(axis=0)
    if op == "prod":
        return np.multiply.reduce(stack, axis=0, dtype=stack.dtype)
    return stack.min(axis=0) if op == "min" else stack.max(axis=0)


def valid_ops(dtype: torch.dtype) -> list[str]:
    ops = ["sum", "prod"]
    if dtype.is_floating_point or dtype.is_complex:
        ops.append("avg")
    if not dtype.is_complex:
        ops += ["min", "max"]
    return ops


def check_close(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype, what: str) -> None:
    if dtype in (torch.float16, torch.bfloat16):
        np.testing.assert_allclose(got.double().numpy(), want, rtol=3e-2, atol=3e-2, err_msg=what)
    elif dtype.is_floating_point or dtype.is_complex:
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5, err_msg=what)
    else:
        np.testing.assert_array_equal(got.numpy(), want, err_msg=what)


def every_op(g, n: int) -> tuple[list[str], list[torch.Tensor]]:
    """Allreduce every dtype x op x size; (failures against numpy, the results)."""
    r = g.place.rank
    failures, results = [], []
    for dtype in DTYPES:
        for op in valid_ops(dtype):
            for numel in SIZES if dtype == torch.float32 else SIZES[:4]:
                t = make(r, dtype, numel)
                C.allreduce_(g, t, op, None)
                results.append(t)
                want = reference([make(k, dtype, numel) for k in range(n)], op)
                try:
                    check_close(t, want, dtype, f"{op} {dtype} numel={numel}")
                except AssertionError as e:
                    failures.append(str(e)[:300])
    return failures, results


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algo", ["gloo", "shm"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_allreduce_every_op_and_dtype(n: int, algo: str) -> None:
    results = run_ranks(n, lambda g: every_op(g, n)[0], algo=algo, shm_max_bytes=64 << 10)
    for r, res in enumerate(results):
        assert not isinstance(res, BaseException), f"rank {r}: {res!r}"
        assert res == [], f"rank {r}: {res[:3]}"


LAYOUTS = {"2x2": ["a", "a", "b", "b"], "2x3": ["a"] * 3 + ["b"] * 3,
           "3x2": ["a", "a", "b", "b", "c", "c"]}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hierarchical_every_op_and_dtype(layout: str) -> None:
    """Shared memory inside each named host, a cross-host Gloo group per local rank: numpy's
    answer for every op and dtype (several capacity rounds at 70001 floats), the same bytes on
    every rank, and broadcast from every root."""
    hosts = LAYOUTS[layout]
    n = len(hosts)

    def body(g):
        assert g.hier is not None and g.shm is None, "expected the hierarchical path"
        g.hier.piece_bytes = 4096   # many pieces in flight at once across hosts
        failures, results = every_op(g, n)
        for root in range(n):
            b = make(g.place.rank, torch.float64, 13)
            C.broadcast_(g, b, root, None)
            if not torch.equal(b, make(root, torch.float64, 13)):
                failures.append(f"broadcast from root {root}: {b}")
        return failures, results
    out = run_ranks(n, body, algo="hier", hosts=hosts, shm_max_bytes=64 << 10)
    for r, res in enumerate(out):
        assert not isinstance(res, BaseException), f"rank {r}: {res!r}"
        assert res[0] == [], f"rank {r}: {res[0][:3]}"
    for r in range(1, n):
        for a, b in zip(out[0][1], out[r][1]):
            assert torch.equal(a.view(torch.uint8) if a.numel() else a,
                               b.view(torch.uint8) if b.numel() else b), f"rank {r} differs from 0"


@pytest.mark.timeout(60)
def test_auto_takes_the_hierarchical_path_from_hier_min_bytes() -> None:
    """'auto' builds the hierarchical levels for 2 x 2, but sends tensors below hier_min_bytes
    flat (fewer stages); at or above it, and always under 'hier', hierarchically."""
    def body(g):
        calls = []
        inner = g.hier.allreduce_
        g.hier.allreduce_ = lambda t, op: (calls.append(t.numel()), inner(t, op))
        for numel in (255, 256, 1000):         # 1020, 1024, 4000 bytes
            t = torch.ones(numel) * (g.place.rank + 1)
            C.allreduce_(g, t, "sum", None)
            assert torch.equal(t, torch.full((numel,), 10.0))
        return calls
    for res in run_ranks(4, body, algo="auto", hosts=["a", "a", "b", "b"], hier_min_bytes=1024):
        assert res == [256, 1000], res


@pytest.mark.timeout(60)
@pytest.mark.parametrize("algo", ["auto", "hier"])
def test_uneven_hosts_use_flat_gloo(algo: str) -> None:
    """Hosts with different rank counts cannot split chunks evenly: flat Gloo, same answers."""
    hosts = ["a", "a", "b"]

    def body(g):
        assert g.hier is None and g.shm is None
        t = torch.arange(10.0) * (g.place.rank + 1)
        C.allreduce_(g, t, "sum", None)
        return t
    for res in run_ranks(3, body, algo=algo, hosts=hosts):
        assert not isinstance(res, BaseException), res
        np.testing.assert_array_equal(res.numpy(), np.arange(10.0) * 6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_transport_collectives(n: int) -> None:
    def body(g):
        r = g.place.rank
        out = {}
        for dtype in DTYPES:
            mine = make(r, dtype, 3 + r).reshape(-1, 1)  # uneven first dimension
            got = C.allgather(g, mine, None)
            want = np.concatenate([np_of(make(k, dtype, 3 + k).reshape(-1, 1)) for k in range(n)])
            np.testing.assert_array_equal(np_of(got), want)
            b = make(r, dtype, 11)
            C.broadcast_(g, b, n - 1, None)
            np.testing.assert_array_equal(np_of(b), np_of(make(n - 1, dtype, 11)))
        # alltoall, equal and uneven splits: rank r sends (j + 1) rows to rank j
        x = torch.arange(2 * n, dtype=torch.int64) + 100 * r
        got, recv = C.alltoall(g, x, None, None)
        want = np.concatenate([np.arange(2 * n)[2 * r: 2 * r + 2] + 100 * k for k in range(n)])
        np.testing.assert_array_equal(got.numpy(), want)
        splits = [j + 1 for j in range(n)]
        x = torch.full((sum(splits), 2), float(r))
        got, recv = C.alltoall(g, x, splits, None)
        assert recv == [r + 1] * n
        np.testing.assert_array_equal(got[:, 0].numpy(), np.repeat(np.arange(n), r + 1).astype(np.float32))
        # reducescatter: the sum, split along dim 0 like torch.tensor_split
        x = torch.arange(10, dtype=torch.float64) * (r + 1)
        got = C.reducescatter(g, x, "sum", None)
        full = np.arange(10.0) * sum(k + 1 for k in range(n))
        np.testing.assert_allclose(got.numpy(), np.array_split(full, n)[r])
        out["objects"] = C.allgather_object(g, {"rank": r, "tag": "x" * r}, b"k" * 32)
        out["bcast"] = C.broadcast_object(g, ("from", r), 0, b"k" * 32)
        C.barrier(g)
        return out
    results = run_ranks(n, body, algo="gloo")
    for r, res in enumerate(results):
        assert not isinstance(res, BaseException), f"rank {r}: {res!r}"
        assert res["objects"] == [{"rank": k, "tag": "x" * k} for k in range(n)]
        assert res["bcast"] == ("from", 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("algo", ["gloo", "shm", "hier"])
@pytest.mark.parametrize("what", ["shape", "dtype", "op", "name"])
def test_mismatch_fails_on_every_rank(algo: str, what: str) -> None:
    def body(g):
        r = g.place.rank
        shape = (4, 3) if (what != "shape" or r == 0) else (4, 5)
        dtype = torch.float32 if (what != "dtype" or r == 0) else torch.float64
        op = "sum" if (what != "op" or r == 0) else "max"
        name = "grad.w" if (what != "name" or r == 0) else "grad.b"
        C.allreduce_(g, torch.ones(shape, dtype=dtype), op, name)
    n, hosts = (4, ["a", "a", "b", "b"]) if algo == "hier" else (3, None)
    results = run_ranks(n, body, algo=algo, coll_timeout=10, hosts=hosts)
    others = str(list(range(1, n)))
    for r, res in enumerate(results):
        assert isinstance(res, CollectiveMismatch), f"rank {r} got {res!r}"
        msg = str(res)
        assert "allreduce" in msg and "[0]" in msg and others in msg, msg


@pytest.mark.timeout(30)
def test_mismatched_collective_kind_and_bad_arguments() -> None:
    def body(g):
        if g.place.rank == 0:
            C.allgather(g, torch.ones(2), None)
        else:
            C.broadcast_(g, torch.ones(2), 0, None)
    for res in run_ranks(2, body, algo="gloo", coll_timeout=10):
        assert isinstance(res, CollectiveMismatch) and "allgather" in str(res) and "broadcast" in str(res)

    def bad(g):
        errors = []
        for call in (lambda: C.allreduce_(g, torch.ones(2, dtype=torch.int32), "avg", None),
                     lambda: C.allreduce_(g, torch.ones(2), "mean", None),
                     lambda: C.allreduce_(g, torch.ones(2, dtype=torch.complex64), "max", None),
                     lambda: C.broadcast_(g, torch.ones(2), 5, None),
                     lambda: C.alltoall(g, torch.ones(3), None, None),
                     lambda: C.alltoall(g, torch.ones(4), [1, 1], None)):
            try:
                call()
            except ConfigError as e:
                errors.append(str(e))
        return errors
    for res in run_ranks(2, bad, algo="gloo"):
        assert len(res) == 6, res
        assert "op='avg'" in res[0] and "int32" in res[0]
        assert "'mean'" in res[1] and "sum" in res[1]
        assert "root=5" in res[3]
