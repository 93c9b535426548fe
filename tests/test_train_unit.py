"""Unit tests of phalanx.train without processes: the comm seam is replaced by an in-process fake
whose ranks are threads (real tensors, real autograd hooks, synchronous collectives)."""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from phalanx.errors import ConfigError, PhalanxError
from phalanx.train import (
    DistributedOptimizer,
    _comm,
    broadcast_optimizer_state,
    broadcast_parameters,
    metric_average,
    shard_indices,
)
from phalanx.train.buckets import build_buckets
from phalanx.train.compression import OneBitCompression, TopKCompression, pack_bits, unpack_bits

pytestmark = pytest.mark.timeout(60)


class _Done:
    def __init__(self, value: Any) -> None:
        self.value = value

    def wait(self) -> Any:
        return self.value


class ThreadWorld:
    """`size` ranks as threads; every collective is a rendezvous of all of them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.local = threading.local()
        self.barrier = threading.Barrier(size, timeout=20)
        self.slots: list[Any] = [None] * size
        self.log: dict[int, list[str]] = {r: [] for r in range(size)}

    def rank(self) -> int:
        return getattr(self.local, "rank", 0)

    def _exchange(self, kind: str, value: Any) -> list[Any]:
        r = self.rank()
        self.log[r].append(kind)
        self.slots[r] = (kind, value)
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        kinds = {k for k, _ in got}
        if len(kinds) != 1:
            raise RuntimeError(f"mismatched collectives across ranks: {kinds}")
        return [v for _, v in got]

    def allreduce_async_(self, t: torch.Tensor, op: str, name: str | None = None,
                         group: Any = None) -> _Done:
        vals = self._exchange(f"allreduce:{name}:{tuple(t.shape)}", t.clone())
        out = torch.stack(vals)
        red = {"avg": lambda x: x.sum(0) / self.size, "sum": lambda x: x.sum(0),
               "min": lambda x: x.min(0).values, "max": lambda x: x.max(0).values,
               "prod": lambda x: x.prod(0)}[op](out)
        t.copy_(red)
        return _Done(t)

    def allreduce(self, t: torch.Tensor, op: str, name: str | None = None) -> torch.Tensor:
        return self.allreduce_async_(t.clone(), op, name).wait()

    def allgather_async(self, t: torch.Tensor, group: Any = None) -> _Done:
        return _Done(torch.cat(self._exchange(f"allgather:{t.dtype}", t.clone())))

    def broadcast_(self, t: torch.Tensor, root: int) -> torch.Tensor:
        t.copy_(self._exchange(f"broadcast:{tuple(t.shape)}", t.clone())[root])
        return t

    def broadcast_object(self, obj: Any, root: int) -> Any:
        return copy.deepcopy(self._exchange("bobj", obj)[root])

    def allgather_object(self, obj: Any, group: Any = None) -> list[Any]:
        return copy.deepcopy(self._exchange("agobj", obj))

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def main(r: int) -> None:
            self.local.rank = r
            try:
                results[r] = fn(r)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=main, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], ThreadWorld]:
    def make(size: int) -> ThreadWorld:
        w = ThreadWorld(size)
        for fn in ("rank", "allreduce_async_", "allreduce", "allgather_async", "broadcast_",
                   "broadcast_object", "allgather_object"):
            monkeypatch.setattr(_comm, fn, getattr(w, fn))
        monkeypatch.setattr(_comm, "allreduce_now_", w.allreduce_async_)
        monkeypatch.setattr(_comm, "size", lambda: w.size)
        monkeypatch.setattr(_comm, "generation", lambda: 1)
        return w
    return make


_INIT_LOCK = threading.Lock()   # thread ranks share torch's global RNG


def _model(seed: int = 0) -> torch.nn.Module:
    with _INIT_LOCK:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 3)).double()


def _data(steps: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(steps, batch, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (steps, batch), generator=g))


def _opt(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
           k: int) -> None:
    """One micro-batch split per backward pass: k passes of equal slices per step."""
    for xs, ys in zip(x, y):
        opt.zero_grad()
        for xm, ym in zip(xs.chunk(k), ys.chunk(k)):
            (torch.nn.functional.cross_entropy(model(xm), ym) / k).backward()
        opt.step()


# ---------------- buckets and compression ----------------

def test_buckets_reverse_order_dtype_split_and_cap() -> None:
    ps = [torch.nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in
          [(10, torch.float32), (300, torch.float32), (5, torch.float64), (10, torch.float32)]]
    named = [(f"p{i}", p) for i, p in enumerate(ps)]
    buckets = build_buckets(named, cap_bytes=1000)
    # p1 (1200 B) overflows p3's bucket and gets its own; p0 then overflows p1's
    assert [b.names for b in buckets] == [["p3"], ["p2"], ["p1"], ["p0"]]
    assert all(len({p.dtype for p in b.params}) == 1 for b in buckets)
    assert [b.index for b in buckets] == list(range(len(buckets)))
    big = build_buckets(named, cap_bytes=1 << 20)
    assert [b.names for b in big] == [["p3", "p1", "p0"], ["p2"]]


def test_pack_unpack_presence_and_sparse() -> None:
    a = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(3))
    c = torch.nn.Parameter(torch.zeros(4))
    a.grad = torch.ones(2, 2)
    c.grad = torch.sparse_coo_tensor([[1, 3]], [5.0, 6.0], (4,))
    (bucket,) = build_buckets([("a", a), ("b", b), ("c", c)], cap_bytes=1 << 20)
    grads, presence = bucket.pack()
    assert presence.tolist() == [1.0, 0.0, 1.0]       # packing order is reversed: c, b, a
    assert grads.tolist() == [0, 5, 0, 6, 0, 0, 0, 1, 1, 1, 1]
    grads.mul_(2)
    bucket.unpack(grads, presence)
    assert b.grad is None and not c.grad.is_sparse
    assert c.grad.tolist() == [0, 10, 0, 12] and a.grad.tolist() == [[2, 2], [2, 2]]


def test_bits_roundtrip() -> None:
    bits = torch.rand(37) > 0.5
    assert torch.equal(unpack_bits(pack_bits(bits), 37), bits)


@pytest.mark.parametrize("comp", ["1bit", "topk"])
def test_error_feedback_conserves_gradient_mass(world: Callable[[int], ThreadWorld],
                                                comp: str) -> None:
    """Over T steps, what was transmitted plus the final residual equals the sum of gradients."""
    world(1)
    p = torch.nn.Parameter(torch.zeros(50))
    q = torch.nn.Parameter(torch.zeros(7))
    (bucket,) = build_buckets([("p", p), ("q", q)], cap_bytes=1 << 20)
    c = OneBitCompression() if comp == "1bit" else TopKCompression(0.1)
    sent, total = torch.zeros(57), torch.zeros(57)
    torch.manual_seed(0)
    for _ in range(5):
        p.grad, q.grad = torch.randn(50), torch.randn(7) * 10
        grads, _ = bucket.pack()
        total += grads
        c.start(bucket, "avg").wait()
        sent += grads
        if comp == "topk":
            assert int((grads != 0).sum()) == math.ceil(0.1 * 57)
        else:   # one magnitude per parameter
            assert len(set(grads[:7].abs().tolist())) == 1
            assert len(set(grads[7:].abs().tolist())) == 1
    torch.testing.assert_close(sent + c.residuals[0], total, rtol=1e-5, atol=1e-5)


# ---------------- DistributedOptimizer over thread ranks ----------------

@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("n", [2, 3])
def test_equivalent_to_one_process_at_n_times_batch(world: Callable[[int], ThreadWorld],
                                                    kind: str, k: int, n: int) -> None:
    steps, b = 4, 4
    x, y = _data(steps, n * b * k)
    ref = _model()
    _train(ref, _opt(kind, ref), x, y, k)
    w = world(n)

    def rank_fn(r: int) -> list[torch.Tensor]:
        m = _model()
        opt = DistributedOptimizer(_opt(kind, m), model=m, backward_passes_per_step=k,
                                   bucket_cap_mb=0.001)
        # rank r's micro-batch j of each step is slice j*n + r of the global batch
        xs = x.view(steps, k * n, b, 6)[:, r::n].reshape(steps, k * b, 6)
        ys = y.view(steps, k * n, b)[:, r::n].reshape(steps, k * b)
        _train(m, opt, xs, ys, k)
        return [p.detach() for p in m.parameters()]

    outs = w.run(rank_fn)
    for r in range(1, n):
        assert all(torch.equal(a, c) for a, c in zip(outs[0], outs[r]))
    for a, c in zip(outs[0], ref.parameters()):
        torch.testing.assert_close(a, c.detach(), rtol=1e-5, atol=1e-7)


def test_buckets_launch_during_backward(world: Callable[[int], ThreadWorld]) -> None:
    world(1)
    m = _model()
    opt = DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), model=m,
                               bucket_cap_mb=0.001)
    assert len(opt.buckets) > 2
    assert opt.buckets[0].names[0] == "4.bias"         # reverse registration order
    x, y = _data(1, 8)
    torch.nn.functional.cross_entropy(m(x[0]), y[0]).backward()
    assert opt._next_launch == len(opt.buckets)        # every bucket launched inside backward
    opt.step()


def test_unused_and_frozen_params_do_not_hang(world: Callable[[int], ThreadWorld]) -> None:
    w = world(2)

    def rank_fn(r: int) -> dict[str, Any]:
        with _INIT_LOCK:
            torch.manual_seed(0)
            a, b, never = (torch.nn.Linear(3, 3) for _ in range(3))
            frozen = torch.nn.Linear(3, 3).requires_grad_(False)
        model = torch.nn.ModuleDict({"a": a, "b": b, "never": never, "frozen": frozen})
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model=model,
                                   bucket_cap_mb=0.0001)
        assert all(p is not frozen.weight for bk in opt.buckets for p in bk.params)
        x = torch.ones(2, 3)
        out = a(x) if r == 0 else b(frozen(x))          # rank 0 uses a, rank 1 uses b
        out.sum().backward()
        opt.step()
        return {"a": a.weight.grad.clone(), "b": b.weight.grad.clone(),
                "never": never.weight.grad}

    g0, g1 = w.run(rank_fn)
    assert g0["never"] is None and g1["never"] is None
    assert torch.equal(g0["a"], g1["a"]) and torch.equal(g0["b"], g1["b"])
    torch.testing.assert_close(g0["a"], torch.ones(3, 3))   # (2 + 0) / 2 ranks


def test_synchronize_then_clip_then_step(world: Callable[[int], ThreadWorld]) -> None:
    world(1)
    m = _model()
    opt = DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), model=m)
    x, y = _data(1, 8)
    torch.nn.functional.cross_entropy(m(x[0]), y[0]).backward()
    opt.synchronize()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)
    with opt.skip_synchronize():
        opt.step()
    opt.zero_grad()


def test_misuse_raises_clear_errors(world: Callable[[int], ThreadWorld]) -> None:
    world(1)
    m = _model()
    opt = DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), model=m)
    x, y = _data(1, 8)
    loss = lambda: torch.nn.functional.cross_entropy(m(x[0]), y[0])
    loss().backward()
    with pytest.raises(PhalanxError, match="zero_grad\\(\\) called while"):
        opt.zero_grad()
    with pytest.raises(PhalanxError, match="backward_passes_per_step=1"):
        loss().backward()
    opt.step()
    with pytest.raises(PhalanxError, match="step\\(\\) called twice"):
        opt.step()
    opt.zero_grad()
    loss().backward()
    with pytest.raises(PhalanxError, match="synchronize\\(\\) was not called"), \
            opt.skip_synchronize():
        opt.step()
    opt.synchronize()
    with pytest.raises(PhalanxError, match="after synchronize"):
        loss().backward()
    opt.step()


def test_bad_arguments_are_config_errors() -> None:
    m = _model()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    for kwargs, match in [({"compression": "zip"}, "compression='zip'"),
                          ({"op": "mean"}, "op='mean'"),
                          ({"compression": "1bit", "op": "max"}, "supports op"),
                          ({"topk_ratio": 0.0}, "topk_ratio"),
                          ({"backward_passes_per_step": 0}, "backward_passes_per_step=0")]:
        with pytest.raises(ConfigError, match=match):
            DistributedOptimizer(sgd, **kwargs)
    with pytest.raises(ConfigError, match="not a torch.optim.Optimizer"):
        DistributedOptimizer(object())  # type: ignore[arg-type]


def test_delegation_scheduler_and_state_dict(world: Callable[[int], ThreadWorld]) -> None:
    world(1)
    m = _model()
    opt = DistributedOptimizer(torch.optim.AdamW(m.parameters(), lr=0.01), model=m)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data(1, 8)
    torch.nn.functional.cross_entropy(m(x[0]), y[0]).backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    sd = opt.state_dict()
    assert len(sd["state"]) == len(list(m.parameters()))
    opt.load_state_dict(sd)
    opt.remove_hooks()


def test_broadcast_helpers_and_metric_average(world: Callable[[int], ThreadWorld]) -> None:
    w = world(3)

    def rank_fn(r: int) -> tuple[Any, ...]:
        m = _model(seed=r)
        opt = torch.optim.AdamW(m.parameters(), lr=0.01 * (r + 1))
        if r == 0:                                  # only root has optimizer state
            x, y = _data(1, 8)
            torch.nn.functional.cross_entropy(m(x[0]), y[0]).backward()
            opt.step()
        broadcast_parameters(m.state_dict(), root=0)
        broadcast_optimizer_state(opt, root=0)
        avg = metric_average(float(r), name="r")
        return ([p.detach().clone() for p in m.parameters()], opt.state_dict(), avg)

    outs = w.run(rank_fn)
    for params, sd, avg in outs:
        assert avg == pytest.approx(1.0)
        assert all(torch.equal(a, b) for a, b in zip(params, outs[0][0]))
        assert sd["param_groups"][0]["lr"] == 0.01
        assert torch.equal(sd["state"][0]["exp_avg"], outs[0][1]["state"][0]["exp_avg"])


def test_shard_indices() -> None:
    shards = [list(shard_indices(10, r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    every = [i for r in range(3) for i in shard_indices(10, r, 3, drop_last=False)]
    assert sorted(every) == list(range(10))
    with pytest.raises(ConfigError, match="rank=3"):
        shard_indices(10, 3, 3)


@pytest.mark.parametrize("views", [False, True])
def test_inline_reduction_failing_inside_backward(
        world: Callable[[int], ThreadWorld], monkeypatch: pytest.MonkeyPatch, views: bool) -> None:
    """comm_thread=False: a reduction that fails in a gradient hook stops backward; whichever
    path holds the gradients they are incomplete, so step() refuses until a new backward,
    and then trains as usual."""
    w = world(1)
    m = _model()
    opt = DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), model=m,
                               bucket_cap_mb=0.001, gradient_as_bucket_view=views,
                               comm_thread=False)
    x, y = _data(2, 8)

    def lost(t: torch.Tensor, op: str, name: str | None = None, group: Any = None) -> Any:
        raise PhalanxError("peer lost")

    monkeypatch.setattr(_comm, "allreduce_now_", lost)
    with pytest.raises(PhalanxError, match="peer lost"):
        torch.nn.functional.cross_entropy(m(x[0]), y[0]).backward()
    with pytest.raises(PhalanxError, match="inside backward.*redo zero_grad"):
        opt.step()
    monkeypatch.setattr(_comm, "allreduce_now_", w.allreduce_async_)
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for model, o in ((m, opt), (ref, ref_opt)):
        o.zero_grad()
        torch.nn.functional.cross_entropy(model(x[1]), y[1]).backward()
        o.step()
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("views", [False, True])
def test_failed_reduction_keeps_or_drops_local_grads(
        world: Callable[[int], ThreadWorld], monkeypatch: pytest.MonkeyPatch, views: bool) -> None:
    """Copy path: a failed reduction leaves p.grad as it was and step() retries it. Bucket
    views: the gradients were being reduced in place, so they are dropped and step() refuses,
    naming the fix, until a new backward."""
    w = world(1)
    m = _model()
    opt = DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), model=m,
                               bucket_cap_mb=0.001, gradient_as_bucket_view=views)
    x, y = _data(1, 8)

    class Lost:
        def wait(self) -> None:
            raise PhalanxError("peer lost")

    monkeypatch.setattr(_comm, "allreduce_async_", lambda t, op, name=None, group=None: Lost())
    monkeypatch.setattr(_comm, "allreduce_now_", lambda t, op, name=None, group=None: Lost())
    torch.nn.functional.cross_entropy(m(x[0]), y[0]).backward()
    before = [p.grad.clone() for p in m.parameters()]
    with pytest.raises(PhalanxError, match="peer lost"):
        opt.step()
    monkeypatch.setattr(_comm, "allreduce_async_", w.allreduce_async_)
    monkeypatch.setattr(_comm, "allreduce_now_", w.allreduce_async_)
    if not views:
        assert all(torch.equal(a, p.grad) for a, p in zip(before, m.parameters()))
        opt.step()                                 # retried with the same local gradients
        return
    assert all(p.grad is None for p in m.parameters())
    with pytest.raises(PhalanxError, match="redo zero_grad.*gradient_as_bucket_view=False"):
        opt.step()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(m(x[0]), y[0]).backward()
    opt.step()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, m.parameters()))


def test_gradients_are_bucket_views_and_match_the_copy_path(
        world: Callable[[int], ThreadWorld]) -> None:
    """One rank, several buckets: views and copies give the same
    bits for SGD and AdamW, with and without accumulation and fp16; grads live in the buckets."""
    world(1)
    for kind in ("sgd", "adamw"):
        for k in (1, 2):
            for comp in ("none", "fp16"):
                finals = []
                for views in (True, False):
                    m = _model()
                    opt = DistributedOptimizer(_opt(kind, m), model=m, bucket_cap_mb=0.0005,
                                               backward_passes_per_step=k, compression=comp,
                                               gradient_as_bucket_view=views)
                    x, y = _data(3 * k, 8)
                    for s in range(3):
                        opt.zero_grad()
                        for i in range(k):
                            loss = torch.nn.functional.cross_entropy(m(x[s * k + i]), y[s * k + i])
                            loss.backward()
                        opt.step()
                    finals.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]))
                    if views:
                        assert len(opt.buckets) > 1
                        for b in opt.buckets:
                            lo = b.buffer.data_ptr()
                            hi = lo + b.numel * b.buffer.element_size()
                            assert all(lo <= p.grad.data_ptr() < hi for p in b.params)
                assert torch.equal(finals[0], finals[1]), (kind, k, comp)


def test_ranks_with_different_models_get_a_mismatch_naming_the_parameters(
        world: Callable[[int], ThreadWorld]) -> None:
    from phalanx.errors import CollectiveMismatch
    w = world(2)

    def rank_fn(r: int) -> str:
        with _INIT_LOCK:
            layers = [torch.nn.Linear(4, 3 if r == 0 else 5), torch.nn.Linear(3 if r == 0 else 5, 1)]
            if r == 1:
                layers.append(torch.nn.Linear(1, 1))
            model = torch.nn.Sequential(*layers)
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
        try:  # raised at the step's first reduction: during backward, with overlap
            model(torch.ones(2, 4)).sum().backward()
            opt.step()
        except CollectiveMismatch as e:
            return str(e)
        return "no error"

    msgs = w.run(rank_fn)
    assert msgs[0] == msgs[1], msgs
    assert "'0.weight': shape (3, 4) float32 on rank(s) [0]; shape (5, 4) float32 on rank(s) [1]" \
        in msgs[0], msgs[0]
    assert "'2.weight': missing on rank(s) [0]" in msgs[0], msgs[0]


def test_cpu_optimizer_steps_with_foreach_kernels(world: Callable[[int], ThreadWorld]) -> None:
    """Where the user left `foreach` open, the wrapped CPU optimizer takes torch's multi-tensor
    kernels; an explicit choice, or foreach=False on DistributedOptimizer, is left alone. The
    result matches plain torch's per-parameter loop."""
    world(1)
    x, y = _data(3, 8)
    for kind in ("sgd", "adamw"):
        m, ref = _model(), _model()
        opt = DistributedOptimizer(_opt(kind, m), model=m)
        assert opt.param_groups[0]["foreach"] is True
        plain = _opt(kind, ref)
        plain.param_groups[0]["foreach"] = False
        for s in range(3):
            for model, o in ((m, opt), (ref, plain)):
                o.zero_grad()
                torch.nn.functional.cross_entropy(model(x[s]), y[s]).backward()
                o.step()
        for a, b in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    explicit = torch.optim.SGD(_model().parameters(), lr=0.1, foreach=False)
    assert DistributedOptimizer(explicit).param_groups[0]["foreach"] is False
    left = DistributedOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1), foreach=False)
    assert left.param_groups[0]["foreach"] is None
