"""`px.DistributedDataParallel`: torch DDP's interface and machinery, phalanx's fault tolerance.

    model = px.DistributedDataParallel(model)            # any of torch DDP's arguments
    opt = torch.optim.AdamW(model.parameters())          # any plain torch optimizer
    opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

Inside, a real `torch.nn.parallel.DistributedDataParallel` does the work: its C++ `Reducer`
buckets the gradients and overlaps their reduction with backward, with no Python hook per
parameter. Its process group (`ddp_comm.PhalanxProcessGroup`) and its communication hook
(`ddp_comm.GradHook`) run phalanx's collectives: shared memory inside a host, hierarchical
across hosts, optional compression, `WorkerLost` when a peer is lost.

phalanx re-forms its group when workers are lost or join; torch's DDP is bound to one group.
So the wrapper holds one inner DDP per generation: at the first training forward of a new
generation it drops the old one (and its autograd hooks) and builds the next over the new
group, without the initial broadcast (the elastic `State` has already healed every rank). The
object the user holds, its `module`, its parameters and the optimizer over them stay the same.
The first inner DDP is built at the first training forward, not in the constructor, so that
no collective runs before `@px.elastic.run` has healed the ranks (a replacement worker builds
its model while its peers are re-forming); in generation 1 it broadcasts rank 0's parameters
and buffers, as DDP's constructor does.

`state_dict()` keys carry the `module.` prefix exactly as torch DDP's do (the wrapped module is
registered as `module`, and the inner DDP is not a submodule), so checkpoints move between
this wrapper and torch's DDP unchanged; `model.module.state_dict()` has the bare keys.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError
from . import _comm
from .compression import COMPRESSIONS
from .ddp_comm import GradHook, PhalanxProcessGroup, run_hook

_TorchDDP = torch.nn.parallel.DistributedDataParallel
_UNSUPPORTED = {
    "process_group": "phalanx owns the process group and re-forms it when workers are lost; "
                     "leave it out (for a subset of ranks use px.DistributedOptimizer(..., "
                     "group=px.new_group(ranks)))",
    "device_mesh": "phalanx owns the process group; leave device_mesh out",
}


def _torch_hooks() -> dict[Callable[..., Any], str]:
    """torch's stock DDP communication hooks, and the compression each one amounts to."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as d
    return {d.allreduce_hook: "none", d.fp16_compress_hook: "fp16",
            d.bf16_compress_hook: "bf16"}


def ddp_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """torch DDP's constructor arguments after `module`, by name; an unknown one raises
    TypeError as torch would, and the ones phalanx owns raise ConfigError."""
    params = list(inspect.signature(_TorchDDP.__init__).parameters.values())[2:]
    sig = inspect.Signature(params)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        valid = ", ".join(p.name for p in params)
        raise TypeError(f"px.DistributedDataParallel: {e}; it takes torch "
                        f"DistributedDataParallel's arguments ({valid}) and compression=, "
                        "topk_ratio=, comm_thread=") from None
    for name, why in _UNSUPPORTED.items():
        if bound.arguments.get(name) is not None:
            raise ConfigError(f"px.DistributedDataParallel({name}=...): {why}")
    return dict(bound.arguments)


class DistributedDataParallel(torch.nn.Module):
    """torch's `DistributedDataParallel`, over phalanx's collectives, surviving lost workers.

    Takes every argument of torch's DDP (`bucket_cap_mb`, `find_unused_parameters`,
    `gradient_as_bucket_view`, `static_graph`, `broadcast_buffers`, `device_ids`, ...) except
    `process_group` / `device_mesh` (phalanx owns the group), plus:

    - `compression`: "none" (exact, default), "fp16" or "bf16" (cast for the wire, as torch's
      `fp16_compress_hook`), "1bit" or "topk" (with error feedback; `topk_ratio`).
    - `comm_thread`: reduce on phalanx's comm thread (True) or inline in backward (False);
      None picks by the cores this worker has, as `DistributedOptimizer` does.

    Use it as DDP: `model(x)`, `loss.backward()`, a plain optimizer's `step()`,
    `with model.no_sync(): ...` to accumulate, `model.module` for the wrapped module.
    """

    def __init__(self, module: torch.nn.Module, *args: Any, compression: str = "none",
                 topk_ratio: float = 0.01, comm_thread: bool | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        _check(module, compression, topk_ratio, comm_thread)
        ddp_kwargs = ddp_arguments(args, kwargs)
        ddp_kwargs.pop("process_group", None)
        ddp_kwargs.pop("device_mesh", None)
        self._init_sync = bool(ddp_kwargs.pop("init_sync", True))
        self._ddp_kwargs = ddp_kwargs
        self.module = module
        self._topk_ratio, self._comm_thread = topk_ratio, comm_thread
        self._hook: GradHook = GradHook(compression, topk_ratio, comm_thread)
        self._user_hook: tuple[Any, Callable[..., Any]] | None = None
        self._sync = True
        self._binds = 0
        self._generation = -1
        self._start_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        object.__setattr__(self, "_inner", None)   # not a submodule: keys stay "module.*"

    # ---- what users call, as on torch's DDP ----
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Run the module. A training forward (grad enabled) first binds the inner DDP to the
        current generation; no_grad forwards before that run the bare module (no collective)."""
        if torch.is_grad_enabled():
            inner = self._bind()
        else:
            inner = self._inner if self._generation == _comm.generation() else None
        if inner is None:
            return self.module(*inputs, **kwargs)
        inner.require_backward_grad_sync = self._sync
        return inner(*inputs, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside do not reduce; gradients accumulate locally and are reduced
        by the first synchronized backward after it (forward must be inside, as with DDP)."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def register_comm_hook(self, state: Any, hook: Callable[..., Any]) -> None:
        """As DDP's. torch's `allreduce_hook`, `fp16_compress_hook` and `bf16_compress_hook`
        become phalanx's exact, fp16 and bf16 reductions (whatever `state`); any other hook is
        registered as given on every generation's DDP, and must reduce with phalanx's
        collectives (e.g. `px.allreduce_(bucket.buffer(), op="avg")`, returning a completed
        future) to survive a re-formation."""
        compression = _torch_hooks().get(hook)
        if compression is not None:
            self._hook, self._user_hook = GradHook(compression, self._topk_ratio,
                                                   self._comm_thread), None
        else:
            self._user_hook = (state, hook)
        self._generation = -1     # rebuilt at the next training forward with the new hook

    def register_step_start_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """`hook(model)` runs at each training forward, before any collective of it: an
        elastic `State` leaves there for a membership change (as with DistributedOptimizer)."""
        handle = RemovableHandle(self._start_hooks)
        self._start_hooks[handle.id] = hook
        return handle

    def join(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError("px.DistributedDataParallel does not support join() (uneven inputs): "
                          "feed every rank the same number of batches, e.g. with "
                          "phalanx.data.ShardedLoader, which also keeps them exactly-once")

    @property
    def process_group(self) -> PhalanxProcessGroup | None:
        """The current generation's process group (None before the first training forward)."""
        inner = self._inner
        return inner.process_group if inner is not None else None  # type: ignore[no-any-return]

    @property
    def ddp(self) -> _TorchDDP | None:
        """The torch DDP bound to the current generation (None before the first training
        forward; a new one after each re-formation): for inspection, not to keep."""
        return self._inner  # type: ignore[no-any-return]

    def train(self, mode: bool = True) -> DistributedDataParallel:
        super().train(mode)
        if self._inner is not None:
            self._inner.train(mode)
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_inner"], state["_generation"] = None, -1
        state["_start_hooks"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return f"px.DistributedDataParallel({self.module!r})"

    # ---- binding to a generation ----
    def _bind(self) -> _TorchDDP:
        _comm.check_live()                  # a peer declared lost: contribute nothing
        for hook in list(self._start_hooks.values()):
            hook(self)
        generation = _comm.generation()
        if self._inner is None or self._generation != generation:
            self._rebind(generation)
        return self._inner  # type: ignore[no-any-return]

    def _rebind(self, generation: int) -> None:
        """Drop the inner DDP of an older generation and build this one's."""
        old = self._inner
        object.__setattr__(self, "_inner", None)
        if old is not None:
            old.reducer._remove_autograd_hooks()
        self._hook.reset()
        pg = PhalanxProcessGroup(_comm.rank(), _comm.size(), generation)
        # DDP's initial broadcast only when the job starts; later the State heals the ranks.
        init_sync = self._init_sync and self._binds == 0 and generation == 1
        with warnings.catch_warnings():
            if self._binds:
                warnings.simplefilter("ignore")    # torch's argument warnings: once is enough
            inner = _TorchDDP(self.module, process_group=pg, init_sync=init_sync,
                              **self._ddp_kwargs)
        if self._user_hook is not None:
            inner.register_comm_hook(*self._user_hook)
        else:
            inner.register_comm_hook(self._hook, run_hook)
        inner.train(self.training)
        object.__setattr__(self, "_inner", inner)
        self._generation = generation
        self._binds += 1


def _check(module: Any, compression: str, topk_ratio: float, comm_thread: Any) -> None:
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"px.DistributedDataParallel(module={type(module).__name__}): pass "
                          "the torch.nn.Module to train")
    if isinstance(module, (DistributedDataParallel, _TorchDDP)):
        raise ConfigError("px.DistributedDataParallel: the module is already wrapped in a "
                          f"{type(module).__name__}; wrap the bare module (its .module) once")
    if compression not in COMPRESSIONS:
        raise ConfigError(f"px.DistributedDataParallel(compression={compression!r}) is not one "
                          f"of {COMPRESSIONS}; use 'none' for exact averaging or 'fp16'")
    if not 0 < topk_ratio <= 1:
        raise ConfigError(f"topk_ratio={topk_ratio!r} must be in (0, 1]; e.g. 0.01 keeps 1%")
    if comm_thread not in (None, True, False):
        raise ConfigError(f"comm_thread={comm_thread!r} must be True, False or None (pick by "
                          "the cores this worker has)")
