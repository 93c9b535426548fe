"""DistributedOptimizer: data-parallel gradient averaging with fusion, overlap and compression.

Wraps any `torch.optim.Optimizer`. A post-accumulate-grad hook on every trainable parameter marks
its gradient ready during backward; fusion buckets (`buckets.py`) launch their reduction
strictly in bucket order as soon as every gradient in them is ready, so communication overlaps
the rest of backward: on the comm thread, or inline in the hook when the worker has no core to
spare (`comm_thread`). On one host, CPU buckets live in shared memory the peers reduce in place. `step()` launches whatever is left (zeros for parameters without a
gradient, so unused parameters never hang), waits and calls the wrapped optimizer. By default
gradients are views into the buckets (DDP's `gradient_as_bucket_view`): the reduction happens in
place in `p.grad`, and nothing is unpacked afterwards. Because each rank launches every bucket exactly once per step in
the same order, ranks never issue mismatched collectives, whatever subset of parameters each used.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CollectiveMismatch, ConfigError, PhalanxError
from . import _comm
from .buckets import Bucket, build_buckets, layout_mismatch
from .compression import Compressor, Pending, make_compressor
from .helpers import prefer_foreach
from .options import check_options
from .wrapped import WrappedOptimizer

if TYPE_CHECKING:
    from ..subgroups import Subgroup


class DistributedOptimizer(WrappedOptimizer):
    """Average gradients across workers before each step of a wrapped torch optimizer.

    Usage::

        opt = DistributedOptimizer(torch.optim.AdamW(model.parameters()), model=model)
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

    To clip gradients, call `synchronize()` first, then step inside `skip_synchronize()`.

    Gradients are fused into buckets of `bucket_cap_mb`. With `overlap=True` (default) a
    bucket is reduced as soon as backward has produced all its gradients; `overlap=False`
    reduces everything after backward.

    `comm_thread` says where reductions run. True: on the runtime's comm thread, so backward
    goes on meanwhile, which needs a core (or a GPU) to spare. False: on the calling thread,
    inside backward's gradient hooks as each bucket becomes ready. With one core per worker the
    comm thread can only take turns with backward on that core, and measured slower than
    reducing inline (BENCHMARKS.md). None (default): inline for CPU training when this worker
    has no core beyond its torch threads (`torch.get_num_threads()`), else the comm thread.
    On one host, CPU buckets live in shared memory that the peers reduce in place.

    With `gradient_as_bucket_view=True` (default) each `p.grad` becomes a view into its bucket
    at the first reduction and stays one: the reduced gradient is written in place, so there is
    no unpacking copy. A fresh gradient (after `zero_grad(set_to_none=True)`) is copied in once
    when its bucket is launched. If a reduction fails (a worker is lost), the gradients of the
    launched buckets are partly reduced: they are dropped (`p.grad = None`) and the step must be
    redone from forward/backward, which the elastic loop does. `False` keeps separate gradient
    tensors (a copy in and a copy out per step) so that `step()` can retry the same gradients.

    With `foreach=True` (default) a wrapped CPU optimizer that left `foreach` unset steps with
    torch's multi-tensor kernels (`train.helpers.prefer_foreach`), as it already does on CUDA.

    `group=` (a `px.new_group` subgroup) reduces among its ranks only: each subgroup trains
    its own replica (call it on the members only).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, model: torch.nn.Module | None = None,
                 named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
                 op: str = "avg", compression: str = "none", topk_ratio: float = 0.01,
                 bucket_cap_mb: float = 25, backward_passes_per_step: int = 1,
                 overlap: bool = True, gradient_as_bucket_view: bool = True,
                 foreach: bool = True, group: Subgroup | None = None,
                 comm_thread: bool | None = None) -> None:
        if isinstance(optimizer, DistributedOptimizer):
            raise ConfigError("optimizer is already a DistributedOptimizer; wrap the plain torch "
                              "optimizer only once")
        check_options(optimizer, op=op, compression=compression, topk_ratio=topk_ratio,
                      bucket_cap_mb=bucket_cap_mb,
                      backward_passes_per_step=backward_passes_per_step,
                      comm_thread=comm_thread, model=model, named_parameters=named_parameters)
        super().__init__(optimizer)
        self.op, self.compression, self.topk_ratio = op, compression, topk_ratio
        self.bucket_cap_mb = bucket_cap_mb
        self.backward_passes_per_step = backward_passes_per_step
        self.overlap = overlap
        self.comm_thread = comm_thread
        self.gradient_as_bucket_view = bool(gradient_as_bucket_view)
        self._lost: str | None = None   # why this step's gradients are gone (see synchronize)
        self.group = group
        self._compressor: Compressor = make_compressor(compression, topk_ratio)
        self._compressor.group = group
        if foreach:
            prefer_foreach(optimizer)
        if model is not None:
            named_parameters = model.named_parameters()
        self._names: dict[torch.Tensor, str] = {}
        for name, p in named_parameters or ():
            self._names.setdefault(p, name)
        self._hooks: list[Any] = []
        self._buckets: list[Bucket] = []
        self._where: dict[torch.Tensor, tuple[int, int]] = {}
        self._counts: dict[torch.Tensor, int] = {}
        self._missing: list[int] = []
        self._next_launch = 0
        self._pending: list[tuple[Bucket, Pending]] = []
        self._synced = False
        self._touched = False
        self._last_was_step = False
        self._in_skip = False
        self._checked_generation = -1
        self._home: Any = None          # this generation's shared buffers (see Bucket.flat)
        self._t_mark: float | None = None   # end of the last step: where this one's compute began
        self._comm_mark = 0.0
        self._build()

    def __getstate__(self) -> dict[str, Any]:
        raise PhalanxError("DistributedOptimizer cannot be pickled; save optimizer.state_dict()")

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self._opt!r}, compression={self.compression!r})"

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> Any:
        return self._opt.register_step_pre_hook(hook)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer and rebuild the buckets (between steps only)."""
        self._require_idle("add_param_group()")
        self._opt.add_param_group(param_group)
        self._build()

    # ---- public training API ----
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients; refused while reductions of this step's gradients are in flight."""
        if self._next_launch > 0 and not self._synced:
            raise PhalanxError(
                f"zero_grad() called while {self._next_launch} gradient reduction(s) of this step "
                "are in flight (backward() ran, step() did not); call step() or synchronize() "
                "before zero_grad(), or zero_grad() before backward()")
        self._reset_step()
        self._lost = None
        if self._t_mark is None:
            self._t_mark = time.perf_counter()
        self._opt.zero_grad(set_to_none=set_to_none)

    def synchronize(self) -> None:
        """Launch every bucket not yet launched, wait for all, and write the reduced gradients
        into `p.grad`. Idempotent until the next backward; pair with `skip_synchronize()`."""
        if self._synced:
            return
        if self._lost:
            raise PhalanxError(self._lost)
        try:
            for b in self._buckets[self._next_launch:]:
                self._launch(b)
            for _, handle in self._pending:
                handle.wait()
        except BaseException as e:
            self._failed(self._buckets[:self._next_launch], e)
            raise
        pending, self._pending = self._pending, []
        for bucket, _ in pending:
            assert bucket.buffer is not None
            if self.gradient_as_bucket_view:
                bucket.hand_back(bucket.buffer[bucket.numel:])
            else:
                bucket.unpack(bucket.buffer[:bucket.numel], bucket.buffer[bucket.numel:])
        self._synced = True

    def _failed(self, launched: list[Bucket], error: BaseException) -> None:
        """After a failed reduction (e.g. WorkerLost). With separate gradient tensors p.grad is
        untouched (nothing is unpacked before every bucket is done), so after the group
        re-forms step() can reduce the same local gradients again. With bucket views the
        launched buckets were being reduced in place: their gradients are dropped, and
        step() refuses until a new backward."""
        self._reset_step()
        self._t_mark = None   # the interrupted step's time is the recovery's, not compute
        if not (self.gradient_as_bucket_view and launched):
            self._touched = True
            return
        for b in launched:
            b.drop()
        self._lost = (f"DistributedOptimizer: this step's gradient reduction failed "
                      f"({type(error).__name__}) while reducing in place "
                      "(gradient_as_bucket_view=True), so its gradients were partly reduced "
                      "and have been dropped; redo zero_grad(), forward and backward before "
                      "step() (the elastic loop does), or pass gradient_as_bucket_view=False "
                      "to retry a failed step on the same gradients")

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Inside this context `step()` does not reduce: use after a manual `synchronize()`."""
        self._in_skip = True
        try:
            yield
        finally:
            self._in_skip = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Reduce this step's gradients (unless inside `skip_synchronize()`) and step."""
        if closure is not None:
            raise ConfigError("step(closure=...) is not supported by DistributedOptimizer (the "
                              "closure's backward would bypass gradient reduction); use an "
                              "optimizer without a closure, e.g. SGD or AdamW")
        if self._lost and not self._touched:
            raise PhalanxError(self._lost)
        if self._last_was_step and not self._touched:
            raise PhalanxError("step() called twice without a backward() in between; call "
                               "zero_grad() and backward() before each step()")
        t_enter = time.perf_counter()
        if self._in_skip:
            if not self._synced:
                raise PhalanxError("step() inside skip_synchronize() but synchronize() was not "
                                   "called since backward(); call opt.synchronize() first")
        else:
            self.synchronize()
        t_synced = time.perf_counter()
        result = self._opt.step()
        t_stepped = time.perf_counter()
        self._reset_step()
        self._last_was_step = True
        self._stepped()
        self._record(t_enter, t_synced, t_stepped, time.perf_counter())
        return result

    def _record(self, t_enter: float, t_synced: float, t_stepped: float, t_end: float) -> None:
        """Step phases for px.metrics(), --metrics and the timeline (observe.Recorder)."""
        rec, start = _comm.recorder(), self._t_mark
        self._t_mark = t_end
        if rec is None:
            return
        busy, self._comm_mark = rec.comm_busy_s - self._comm_mark, rec.comm_busy_s
        if start is None:
            return   # the first step after a recovery: its compute began before the re-form
        rec.step({"forward_backward_s": t_enter - start, "sync_s": t_synced - t_enter,
                  "optimizer_s": t_stepped - t_synced, "boundary_s": t_end - t_stepped}, busy)
        if rec.tracing:
            rec.span("step", "forward+backward", start, t_enter)
            rec.span("step", "wait for reductions", t_enter, t_synced)
            rec.span("step", "optimizer step", t_synced, t_stepped)
            rec.span("step", "step boundary", t_stepped, t_end)

    def remove_hooks(self) -> None:
        """Detach the gradient hooks from the parameters (the optimizer stops reducing)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @property
    def buckets(self) -> list[Bucket]:
        """The fusion buckets in launch order (read-only use: inspection and tests)."""
        return self._buckets

    # ---- internals ----
    def _build(self) -> None:
        self.remove_hooks()
        seen: set[torch.Tensor] = set()
        opt_params: list[torch.Tensor] = []
        for group in self._opt.param_groups:
            for p in group["params"]:
                if p.requires_grad and p not in seen:
                    seen.add(p)
                    opt_params.append(p)
        # Registration order: the model's when given (what backward reverses), else the optimizer's.
        ordered = [p for p in self._names if p in seen]
        ordered += [p for p in opt_params if p not in self._names]
        named = [(self._names.get(p, f"param{i}"), p) for i, p in enumerate(ordered)]
        self._buckets = build_buckets(named, int(self.bucket_cap_mb * (1 << 20)))
        self._where = {p: (b.index, j) for b in self._buckets for j, p in enumerate(b.params)}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in ordered]
        self._reset_step()

    def _reset_step(self) -> None:
        self._counts = {}
        self._missing = [len(b.params) for b in self._buckets]
        self._next_launch = 0
        self._pending = []
        self._synced = False
        self._touched = False

    def _require_idle(self, what: str) -> None:
        if self._touched or self._pending:
            raise PhalanxError(f"{what} called between backward() and step(); call it before "
                               "backward() or after step()")

    def _on_grad(self, p: torch.Tensor) -> None:
        # Runs once per parameter per backward: keep it lean (it is Python on the autograd path).
        if self._synced:
            raise PhalanxError("backward() ran after synchronize() and before step(); call "
                               "step() (inside skip_synchronize()) or zero_grad() first")
        self._touched = True
        self._lost = None
        if self._t_mark is None:
            self._t_mark = time.perf_counter()
        counts = self._counts
        count = counts.get(p, 0) + 1
        counts[p] = count
        k = self.backward_passes_per_step
        if count != k:
            if count > k:
                raise PhalanxError(
                    f"backward() produced a gradient for {self._where_name(p)} {count} times "
                    f"since the last step() but backward_passes_per_step={k}; call step() every "
                    f"{k} backward passes or raise backward_passes_per_step")
            return
        bi = self._where[p][0]
        missing = self._missing
        missing[bi] -= 1
        if missing[bi] == 0 and bi == self._next_launch and self.overlap:
            buckets = self._buckets
            try:
                while self._next_launch < len(buckets) and missing[self._next_launch] == 0:
                    self._launch(buckets[self._next_launch])
            except BaseException as e:
                self._interrupted(e)
                raise

    def _interrupted(self, error: BaseException) -> None:
        """A reduction started from a gradient hook failed, so backward did not finish: the
        local gradients are incomplete whichever path holds them."""
        self._failed(self._buckets[:self._next_launch], error)
        self._touched = False
        self._lost = (f"DistributedOptimizer: a gradient reduction failed inside backward() "
                      f"({type(error).__name__}: {error}), so backward did not finish and this "
                      "step's gradients are incomplete; redo zero_grad(), forward and backward "
                      "before step() (the elastic loop does)")

    def _where_name(self, p: torch.Tensor) -> str:
        bi, j = self._where[p]
        return repr(self._buckets[bi].names[j])

    def _check_layout(self) -> None:
        """Once per generation, before its first reduction: every rank must reduce the same
        parameters, or the buckets would not line up; name the parameters that differ."""
        gen = _comm.generation()
        if gen == self._checked_generation:
            return
        layout = [(n, tuple(p.shape), str(p.dtype)) for b in self._buckets
                  for n, p in zip(b.names, b.params)]
        digests = _comm.allgather_object(hashlib.sha256(repr(layout).encode()).hexdigest(),
                                         group=self.group)
        self._checked_generation = gen
        # None comes from a rank that joined (the Horovod facade's hvd.join) and stands in
        if len({d for d in digests if d is not None}) > 1:
            raise CollectiveMismatch(layout_mismatch(_comm.allgather_object(layout,
                                                                            group=self.group)))

    def _launch(self, bucket: Bucket) -> None:
        if bucket.index == 0:
            # A peer declared lost, or this worker cut off: contribute nothing to this step.
            _comm.check_live()
            self._starting()
            if _comm.generation() != self._checked_generation:   # once per generation
                self._home = _comm.shared_buffers(self.group)
                self._compressor.inline = self._inline(bucket)
            self._check_layout()
        if self.gradient_as_bucket_view:
            bucket.adopt(self._home)
        else:
            bucket.pack(self._home)
        # launched from here on, even if starting fails (an inline reduction may be half done)
        self._next_launch = bucket.index + 1
        self._pending.append((bucket, self._compressor.start(bucket, self.op)))

    def _inline(self, bucket: Bucket) -> bool:
        """Reduce on the calling thread? (see `comm_thread`)"""
        if self.comm_thread is not None:
            return not self.comm_thread
        if bucket.params[0].device.type != "cpu":
            return False
        return _comm.cores_per_worker() < torch.get_num_threads() + 1
