"""What torch's DDP machinery talks to inside `px.DistributedDataParallel`: a process group and a
communication hook, both running phalanx's collectives.

`PhalanxProcessGroup` is a `torch.distributed.ProcessGroup` implemented in Python over the
current generation's phalanx group, for the few collectives DDP issues itself (checking that
every rank holds the same parameters, broadcasting buffers, agreeing on the rebuilt bucket order,
the unused-parameter map). Going through phalanx gives them its shared-memory path, its
signature checks and its failure handling: a lost peer raises `WorkerLost` (torch passes the
Python exception through backward unchanged), never a bare Gloo error or a 30-minute hang.

`GradHook` is the communication hook (`DistributedDataParallel.register_comm_hook`) that
reduces each of DDP's gradient buckets with phalanx's allreduce, optionally compressed (fp16 and
bf16 casts as torch's `ddp_comm_hooks` do; 1-bit and top-k with error feedback, phalanx's own).
With no core to spare it reduces inline on backward's thread, else on phalanx's comm thread,
handing DDP a future that an end-of-backward callback completes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from . import _comm
from .buckets import Bucket
from .compression import Compressor, make_compressor

_OPS = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.AVG: "avg", dist.ReduceOp.MIN: "min",
        dist.ReduceOp.MAX: "max", dist.ReduceOp.PRODUCT: "prod"}


class _Done(dist.Work):
    """The work handle of a collective that already ran (phalanx's calls here are blocking)."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self._result = result
        self._future: torch.futures.Future[Any] = torch.futures.Future()
        self._future.set_result(result)

    def wait(self, timeout: Any = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def get_future(self) -> torch.futures.Future[Any]:
        return self._future

    def result(self) -> Any:
        return self._result


def _op_name(opts: Any) -> str:
    op = getattr(opts, "reduceOp", dist.ReduceOp.SUM)
    for known, name in _OPS.items():
        if op == known:
            return name
    raise NotImplementedError(f"px.DistributedDataParallel's process group: reduce op {op} is "
                              f"not supported; use one of {sorted(_OPS.values())}")


class PhalanxProcessGroup(dist.ProcessGroup):
    """This generation's phalanx group as a torch `ProcessGroup`, for DDP's own collectives.

    Made anew for every generation (rank and size are fixed at construction); its collectives
    run on whatever group is current, so an out-of-date one fails with `WorkerLost`."""

    def __init__(self, rank: int, size: int, generation: int) -> None:
        super().__init__(rank, size)
        self.generation = generation

    def getBackendName(self) -> str:
        return "phalanx"

    def name(self) -> str:
        return "phalanx"

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        op = _op_name(opts)
        for t in tensors:
            _comm.allreduce_now_(t, op, name="ddp.allreduce")
        return _Done(tensors)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        root = int(getattr(opts, "rootRank", 0))
        for t in tensors:
            _comm.broadcast_(t, root=root)
        return _Done(tensors)

    def allgather(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor],
                  opts: Any = None) -> dist.Work:
        for outs, t in zip(output_lists, inputs):
            rows = _comm.allgather_async(t.reshape(1, -1)).wait()
            for out, row in zip(outs, rows):
                out.copy_(row.view_as(out))
        return _Done(output_lists)

    def barrier(self, opts: Any = None) -> dist.Work:
        _comm.allreduce_now_(torch.zeros(1), "sum", name="ddp.barrier")
        return _Done([])


class GradHook:
    """Reduces DDP's gradient buckets (averaging) with phalanx's collectives.

    `compression` is one of `train.COMPRESSIONS`; `comm_thread` as in DistributedOptimizer
    (None: inline when this worker has no core beyond its torch threads)."""

    def __init__(self, compression: str = "none", topk_ratio: float = 0.01,
                 comm_thread: bool | None = None) -> None:
        self.compression = compression
        self.comm_thread = comm_thread
        self._compressor: Compressor | None = (
            make_compressor(compression, topk_ratio) if compression in ("1bit", "topk") else None)
        self._wire = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(compression)
        self._shims: dict[int, Bucket] = {}
        self._pending: list[_Pending] = []

    def reset(self) -> None:
        """Forget the reductions of a step that never finished (a new generation starts)."""
        self._pending = []

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        name = f"ddp.bucket{bucket.index()}"
        if self._compressor is not None:
            return _finished(self._lossy(bucket, buf))
        wire = buf if self._wire is None or not buf.is_floating_point() else buf.to(self._wire)
        if self._inline(buf):
            _comm.allreduce_now_(wire, "avg", name=name)
            return _finished(_back(buf, wire))
        return self._later(_Pending(_comm.allreduce_async_(wire, "avg", name=name), buf, wire))

    def _inline(self, buf: torch.Tensor) -> bool:
        """Reduce on backward's thread as each bucket is ready (else on the comm thread)."""
        if self.comm_thread is not None:
            return not self.comm_thread
        if buf.device.type != "cpu":
            return False
        return _comm.cores_per_worker() < torch.get_num_threads() + 1

    def _later(self, item: _Pending) -> torch.futures.Future[torch.Tensor]:
        """A future DDP waits on at the end of backward, completed just before by a callback
        queued on the autograd engine with this step's first bucket (DDP queues its own
        finalizer after its last bucket, so ours runs first)."""
        if not self._pending:
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self.settle)
            except RuntimeError:        # not inside backward: wait here
                item.finish()
                return item.future
        self._pending.append(item)
        return item.future

    def settle(self) -> None:
        """Wait for this backward's reductions in issue order and complete their futures; on a
        failure (a lost peer) fail every one of them, then raise it."""
        pending, self._pending = self._pending, []
        for i, item in enumerate(pending):
            try:
                item.finish()
            except BaseException as e:
                for later in pending[i:]:
                    later.future.set_exception(e)
                raise


    def _lossy(self, bucket: dist.GradBucket, buf: torch.Tensor) -> torch.Tensor:
        """1-bit or top-k through phalanx's compressor (with its error feedback), on a
        phalanx `Bucket` laid over DDP's: gradients then a presence flag per parameter."""
        assert self._compressor is not None
        params = bucket.parameters()
        shim = self._shims.get(bucket.index())
        if shim is None or shim.numel != buf.numel() or len(shim.params) != len(params):
            shim = _shim(bucket.index(), params, buf)
            self._shims[bucket.index()] = shim
            getattr(self._compressor, "residuals", {}).pop(bucket.index(), None)
        flat = shim.flat(buf.device)
        flat[:shim.numel].copy_(buf)
        flat[shim.numel:].fill_(1)
        self._compressor.start(shim, "avg").wait()
        return buf.copy_(flat[:shim.numel])


class _Pending:
    """One bucket's reduction in flight on the comm thread, which DDP waits for at the end of
    backward."""

    def __init__(self, handle: _comm.Handle, buf: torch.Tensor, wire: torch.Tensor) -> None:
        self.handle, self.buf, self.wire = handle, buf, wire
        self.future: torch.futures.Future[torch.Tensor] = torch.futures.Future()

    def finish(self) -> None:
        """Wait for the reduction and complete the future."""
        self.handle.wait()
        self.future.set_result(_back(self.buf, self.wire))


def _shim(index: int, params: list[torch.Tensor], buf: torch.Tensor) -> Bucket:
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.numel()
    return Bucket(index=index, params=list(params), names=[f"param{i}" for i in range(len(params))],
                  offsets=offsets, numel=buf.numel(), dtype=buf.dtype)


def _back(buf: torch.Tensor, wire: torch.Tensor) -> torch.Tensor:
    if wire is not buf:
        buf.copy_(wire)
    return buf


def _finished(t: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(t)
    return fut


def run_hook(state: GradHook, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The function registered with torch's DDP (`register_comm_hook(state, run_hook)`)."""
    return state(bucket)


# DDP checks the hook's annotations against the real objects (ours are strings here).
run_hook.__annotations__ = {"state": GradHook, "bucket": dist.GradBucket,
                            "return": torch.futures.Future[torch.Tensor]}
