"""phalanx.horovod.torch in one process: the namespace, init/shutdown, argument errors, the
handle table, Horovod's scaling arithmetic, Compression, process sets and the elastic
objects. Multi-process behaviour is in test_horovod_collectives.py and test_horovod_train.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import phalanx as px
import phalanx.horovod.torch as hvd
from phalanx.horovod.torch import handles
from phalanx.horovod.torch import reduce as R


@pytest.fixture
def solo():
    """A one-worker job through the facade, left as it was found."""
    hvd.init()
    try:
        yield hvd
    finally:
        hvd.shutdown()
        px.shutdown()


def test_namespace_mirrors_horovod_torch() -> None:
    for name in hvd.__all__:
        assert getattr(hvd, name) is not None, name
    assert hvd.elastic.run and hvd.elastic.TorchState and hvd.elastic.ElasticSampler
    assert hvd.elastic.ObjectState
    assert hvd.Compression.none.compress(torch.ones(1))[1] is None
    from phalanx.horovod.torch import mpi_ops
    assert mpi_ops.allreduce is hvd.allreduce and mpi_ops.Average == hvd.Average == 0
    assert (hvd.Sum, hvd.Adasum, hvd.Min, hvd.Max, hvd.Product) == (1, 2, 3, 4, 5)
    assert hvd.HorovodInternalError is px.WorkerLost


def test_capabilities_answer_before_init() -> None:
    assert hvd.gloo_built() and hvd.gloo_enabled() and not hvd.mpi_built()
    assert not hvd.mpi_enabled() and not hvd.mpi_threads_supported()
    assert not hvd.ddl_built() and not hvd.ccl_built()
    assert hvd.cuda_built() == (torch.version.cuda is not None)
    assert hvd.gpu_available() == torch.cuda.is_available()
    code = hvd.nccl_built()
    assert isinstance(code, int) and (code == 0 or code >= 2000)
    if not torch.distributed.is_nccl_available():
        assert code == 0


def test_calls_before_init_raise_value_error() -> None:
    assert not hvd.is_initialized()
    for fn in (hvd.size, hvd.rank, hvd.local_rank, hvd.barrier):
        with pytest.raises(ValueError, match="before hvd.init"):
            fn()
    with pytest.raises(ValueError, match="before hvd.init"):
        hvd.allreduce(torch.ones(2))


def test_init_shutdown_cycles(solo) -> None:
    for _ in range(3):
        assert hvd.is_initialized() and hvd.size() == 1 and hvd.rank() == 0
        assert hvd.allreduce(torch.ones(2), op=hvd.Sum).tolist() == [1.0, 1.0]
        h = hvd.allreduce_async(torch.ones(1))
        hvd.shutdown()
        assert not hvd.is_initialized() and hvd.synchronize(h) is None
        with pytest.raises(ValueError):
            hvd.size()
        hvd.init()


def test_init_arguments(solo) -> None:
    hvd.init(comm=[0])
    hvd.init(process_sets="dynamic")
    with pytest.raises(NotImplementedError, match="subset"):
        hvd.init(comm=[0, 1])
    with pytest.raises(ValueError, match="duplicates hvd.global_process_set"):
        hvd.init(process_sets=[hvd.ProcessSet([0])])
    with pytest.raises(ValueError, match="no MPI"):
        hvd.init(comm="world")


def test_op_resolution_and_errors(solo) -> None:
    x = torch.arange(4.0)
    with pytest.raises(ValueError, match="not both"):
        hvd.allreduce(x, average=True, op=hvd.Average)
    with pytest.warns(DeprecationWarning):
        assert R.resolve_op(None, False, "t") == hvd.Sum
    assert R.resolve_op(None, None, "t") == hvd.Average
    with pytest.raises(ValueError, match="op=7"):
        hvd.allreduce(x, op=7)
    with pytest.raises(ValueError, match="prescale_factor"):
        hvd.allreduce(x, prescale_factor="2")
    with pytest.raises(ValueError, match="torch.Tensor"):
        hvd.allreduce([1.0, 2.0])
    with pytest.raises(ValueError, match="contiguous"):
        hvd.allreduce_async_(torch.zeros(3, 3).t())
    with pytest.raises(ValueError, match="root_rank=1"):
        hvd.broadcast(x, 1)
    # Horovod refuses it when enqueued with HorovodInternalError, a RuntimeError
    with pytest.raises(RuntimeError, match="only supports AVERAGE and SUM"):
        hvd.reducescatter(x, op=hvd.Min)


def test_single_rank_results(solo) -> None:
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(hvd.allreduce(x, op=hvd.Adasum, prescale_factor=2.0), x * 2)
    assert torch.equal(hvd.allgather(x), x) and torch.equal(hvd.broadcast(x, 0), x)
    out, splits = hvd.alltoall(x, splits=[2])
    assert torch.equal(out, x) and splits.tolist() == [2]
    assert hvd.join() == 0
    y = x.clone().requires_grad_()
    hvd.allreduce(y, op=hvd.Sum, postscale_factor=3.0).sum().backward()
    assert torch.equal(y.grad, torch.full_like(x, 3.0))


class _NeverDone:
    def done(self) -> bool:
        return False

    def wait(self) -> None:
        return None


def test_handle_table_refuses_duplicate_in_flight_names() -> None:
    h = handles.start("allreduce", "w", _NeverDone)
    try:
        with pytest.raises(ValueError, match="still in flight"):
            handles.start("allreduce", "w", _NeverDone)
        other = handles.start("allgather", "w", _NeverDone)   # another kind: allowed
        anon = [handles.start("allreduce", None, _NeverDone) for _ in range(2)]
        assert handles.poll(h) is False
        for k in (other, *anon):
            handles.synchronize(k)
    finally:
        handles.synchronize(h)
    assert handles.synchronize(h) is None
    with pytest.raises(ValueError, match="unknown handle"):
        handles.poll(h)


@pytest.mark.parametrize("dtype,expected", [
    (torch.float64, [x * (1 / 3) for x in (-7.0, -1.0, 2.0, 5.0)]),
    (torch.float32, np.array([-7, -1, 2, 5], np.float32) * np.float32(1 / 3)),
    (torch.float16, (np.array([-7, -1, 2, 5], np.float32) * np.float32(1 / 3)).astype(
        np.float16)),
    (torch.int32, [-2, 0, 0, 1]),          # float64 product truncated toward zero
    (torch.int64, [-2, 0, 0, 1]),
])
def test_scaling_follows_horovods_cpu_arithmetic(dtype, expected) -> None:
    t = torch.tensor([-7, -1, 2, 5], dtype=dtype)
    R.scale_(t, 1 / 3)
    assert np.array_equal(t.numpy(), np.asarray(expected, dtype=t.numpy().dtype))
    assert R.post_factor(hvd.Average, 2.0, 4) == 0.5 and R.post_factor(hvd.Sum, 2.0, 4) == 2.0
    with pytest.raises(ValueError, match="bool"):
        R.scale_(torch.ones(2, dtype=torch.bool), 2.0)


def test_compression_objects() -> None:
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    c, ctx = hvd.Compression.fp16.compress(x)
    assert c.dtype == torch.float16
    assert hvd.Compression.fp16.decompress(c, ctx).dtype == torch.float64
    i, ctx = hvd.Compression.fp16.compress(torch.arange(3))
    assert i.dtype == torch.int64 and hvd.Compression.fp16.decompress(i, ctx).dtype == torch.int64


def test_process_sets(solo) -> None:
    g = hvd.global_process_set
    assert (g.process_set_id, g.size(), g.rank(), g.included(), g.ranks) == (0, 1, 0, True, [0])
    ps = hvd.ProcessSet([1, 0])
    assert ps.ranks == [0, 1] and ps.size() is None and ps.rank() is None
    with pytest.raises(ValueError, match="dynamic"):
        hvd.add_process_set(ps)
    with pytest.raises(ValueError, match="not registered"):
        hvd.broadcast_object(1, process_set=ps)
    hvd.init(process_sets="dynamic")
    with pytest.raises(ValueError, match=r"distinct ranks of this job \(0..0\)"):
        hvd.add_process_set(ps)
    assert not hvd.remove_process_set(g) and not hvd.remove_process_set(ps)
    with pytest.raises(ValueError, match="list of ranks"):
        hvd.ProcessSet("all")


def test_distributed_optimizer_single_rank(solo) -> None:
    model = torch.nn.Linear(3, 2)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                   named_parameters=model.named_parameters(), op=hvd.Adasum)
    before = model.weight.detach().clone()
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    assert torch.allclose(model.weight, before - 0.5 * 4)
    opt.set_backward_passes_per_step(2)
    assert opt.backward_passes_per_step == 2 and opt.optimizer.param_groups is opt.param_groups
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        hvd.DistributedOptimizer(model)
    with pytest.raises(ValueError, match=r"must be \(name, parameter\) pairs"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                 named_parameters=list(model.parameters()))
    with pytest.raises(ValueError, match="groups"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), groups=-1)


def test_elastic_objects(solo) -> None:
    data = list(range(10))
    sampler = hvd.elastic.ElasticSampler(data, shuffle=False)
    assert list(sampler) == data and len(sampler) == 10
    sampler.record_batch(0, 3)
    sampler.load_state_dict(sampler.state_dict())
    assert list(sampler) == data[3:]
    sampler.set_epoch(1)
    assert sampler.processed_num == 0 and len(sampler) == 10
    model = torch.nn.Linear(2, 2)
    state = hvd.elastic.TorchState(model=model, sampler=sampler, epoch=3)
    state.commit()
    state.epoch = 5
    state.restore()
    assert state.epoch == 3 and state.sampler is sampler
    state.save()
    state.sync()
    state.check_host_updates()
    obj = hvd.elastic.ObjectState(None, None, batch=1)
    obj.commit()
    obj.batch = 4
    obj.restore()
    assert obj.batch == 1


def test_join_decisions_and_the_step_announcement() -> None:
    """Pure parts of hvd.join(): what runs while ranks have joined, and the optimizer step's
    announcement read back from the max of every rank's payload."""
    from phalanx.horovod.torch import announce
    from phalanx.horovod.torch.negotiate import JOIN, JoinedError, decide
    sig = (("dtype", "float32"), ("device", "cpu"), ("shape", (3,)), ("op", "Sum"))
    ar = ("allreduce", "x", sig)
    join = (*JOIN, ())
    plan = decide([[ar], [join], [ar]])                     # rank 1 joined: it stands in
    assert plan.run == [("allreduce", "x")] and plan.sigs[("allreduce", "x")] == sig
    plan = decide([[("broadcast", "b", ())], [join]])       # not an allreduce: refused
    assert isinstance(plan.errors[("broadcast", "b")], JoinedError)
    assert "rank 1 has joined" in str(plan.errors[("broadcast", "b")])
    assert decide([[ar, join], [join]]).run == [JOIN]        # all joined; x is not rank 1's
    assert decide([[ar], [join], [join]]).run == [("allreduce", "x")]
    bad = (("dtype", "float64"), *sig[1:])
    assert ("allreduce", "x") in decide([[ar], [("allreduce", "x", bad)], [join]]).errors

    buckets = ((1000, "float32", "cpu"), (7, "float16", "cpu"))
    step = announce.encode(buckets, "avg", "fp16", True)
    idle = announce.round_payload(123, 456)                  # a joined rank's own round
    top = torch.maximum(step, idle).tolist()
    assert announce.decode(top) == {"buckets": buckets, "op": "avg", "compression": "fp16",
                                    "layout check": True}
    assert announce.decode(torch.maximum(idle, announce.round_payload(7, 8)).tolist()) is None
    assert not announce.fits(buckets, "avg", "1bit")
    assert not announce.fits(buckets * 20, "avg", "none")
