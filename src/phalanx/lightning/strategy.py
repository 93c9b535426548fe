"""`PhalanxStrategy`: Lightning's `Trainer` on phalanx's collectives, surviving lost workers.

    trainer = L.Trainer(strategy=PhalanxStrategy(), max_epochs=3)
    trainer.fit(model, train_loader)           # launched by: phalanx run -np 4 python train.py

The model is wrapped in `px.DistributedDataParallel` (torch's DDP machinery over phalanx's
collectives); `self.log(..., sync_dist=True)`, `self.all_gather`, barriers and broadcasts use
phalanx's collectives. The training `DataLoader` gets an `ElasticBatchSampler` in place of
Lightning's `DistributedSampler`: a fixed global batch, split among whoever is alive.

When a worker is lost (in an elastic job: `phalanx run --min-np M`), the step in flight fails
inside `optimizer_step`. The strategy re-forms the group, heals every rank from the most advanced
one (`State.sync`), maps the pending batches onto the survivors (the lost ranks' samples are
queued again) and redoes the step with the survivors' batches, all inside `fit`: Lightning's
loops never see the fault, `trainer.global_step` counts the step once, and the epoch keeps its
number of steps. A rank the heal brought forward (a peer had already applied the step) does not
redo it.

Limits, each checked with a clear error or stated here: automatic optimization with one
optimizer and `accumulate_grad_batches=1` for recovery; workers joining a running `fit` are not
admitted (start the job with the workers it needs); a loss during validation is recovered but
that validation pass's metrics cover the survivors' shards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loops.optimization.automatic import Closure, ClosureResult
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

import phalanx as px
from phalanx import runtime
from phalanx.elastic.loop import elastic_enabled, reform
from phalanx.elastic.state import State, record_recovery
from phalanx.errors import ConfigError, MembershipChanged, WorkerLost

from .loaders import evaluation_loader, training_loader

log = logging.getLogger("phalanx.lightning")
_FAULTS = (WorkerLost, MembershipChanged)
_OPS = {"mean": "avg", "avg": "avg", "sum": "sum", "max": "max", "min": "min"}


class PhalanxStrategy(ParallelStrategy):
    """Data-parallel training on phalanx: `Trainer(strategy=PhalanxStrategy())`.

    `seed` orders the training samples (every rank alike); the remaining keyword arguments go
    to `px.DistributedDataParallel` (torch DDP's: `find_unused_parameters`,
    `bucket_cap_mb`, `static_graph`, ... and phalanx's `compression`).
    """

    strategy_name = "phalanx"

    def __init__(self, *, seed: int = 0, accelerator: Any = None, checkpoint_io: Any = None,
                 precision_plugin: Any = None, **ddp_kwargs: Any) -> None:
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin)
        self.seed = seed
        self._ddp_kwargs = ddp_kwargs
        self._state: State | None = None
        self._sampler: Any = None
        self.recoveries: list[dict[str, Any]] = []
        """One record per recovery: cause, seconds, old and new sizes, the heal's reason."""

    # ---- where this process is ----
    @property
    def is_distributed(self) -> bool:
        return True

    @property
    def root_device(self) -> torch.device:
        if self.accelerator is not None and type(self.accelerator).__name__ == "CUDAAccelerator":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @property
    def global_rank(self) -> int:
        return px.rank() if px.is_initialized() else 0

    @property
    def local_rank(self) -> int:
        return px.local_rank() if px.is_initialized() else 0

    @property
    def node_rank(self) -> int:
        return px.cross_rank() if px.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return px.size() if px.is_initialized() else 1

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    # ---- set-up ----
    def setup_environment(self) -> None:
        if not px.is_initialized():
            px.init()
        super().setup_environment()

    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self._check_recoverable(trainer)
            self.model = px.DistributedDataParallel(self.model, **self._ddp_kwargs)
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            self._state = State(model=self.model, optimizer=self.optimizers[0],
                                sampler=self._sampler)
            self._state.sync()  # every rank starts from rank 0's model, as DDP's broadcast
        else:
            px.broadcast_parameters(self.lightning_module, root=0)  # validate/test/predict

    def _check_recoverable(self, trainer: pl.Trainer) -> None:
        if not elastic_enabled():
            return
        lm = self.lightning_module
        if not lm.automatic_optimization:
            raise ConfigError("PhalanxStrategy recovers lost workers with automatic optimization "
                              "only; this LightningModule sets automatic_optimization=False. "
                              "Run it without --min-np/--max-restarts (a loss then fails the "
                              "job), or use automatic optimization")
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}): "
                "PhalanxStrategy recovers lost workers with accumulate_grad_batches=1 only; "
                "raise the batch size instead, or run without --min-np/--max-restarts")

    def process_dataloader(self, dataloader: object) -> object:
        """The training loader gets an ElasticBatchSampler; evaluation loaders a live shard."""
        if not isinstance(dataloader, DataLoader):
            return dataloader
        trainer = self.lightning_module.trainer
        if trainer.state.fn == TrainerFn.FITTING and trainer.training:
            dataloader, self._sampler = training_loader(dataloader, self.world_size, self.seed)
            if self._state is not None:
                self._state.sampler = self._sampler
            return dataloader
        return evaluation_loader(dataloader)

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        if isinstance(self.model, px.DistributedDataParallel):
            with self.model.no_sync():
                yield
        else:
            yield

    # ---- the step, and recovery ----
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        while True:
            try:
                out = super().optimizer_step(optimizer, closure, model, **kwargs)
            except _FAULTS as e:
                if not self._can_recover():
                    raise
                if self._recover(e):
                    if isinstance(closure, Closure):
                        closure._result = ClosureResult(closure_loss=None)
                    return None
            else:
                if self._sampler is not None:
                    self._sampler.on_step_done()
                return out

    def _can_recover(self) -> bool:
        return elastic_enabled() and self._state is not None

    def _recover(self, cause: BaseException) -> bool:
        """Re-form, heal; True when the heal brought this rank past the failed step."""
        state, sampler = self._state, self._sampler
        assert state is not None
        log.warning("rank %d: %s: %s; re-forming", self.global_rank, type(cause).__name__, cause)
        before = state.step

        def remap(_place: Any) -> None:
            if sampler is not None:
                sampler.on_lost(runtime.current().kept, px.size())

        info = reform(cause, lambda _origin: state.sync().reason, on_reformed=remap)
        record_recovery(state, step=state.step, **info)
        self.recoveries.append(info)
        ahead = state.step - before
        rank_zero_only.rank = self.global_rank  # ranks are renumbered: rank-0 logging follows
        if sampler is not None:
            sampler.skip_committed(ahead)
        if self.is_global_zero:
            log.warning("recovered in %.3fs: %d workers (was %d); %s", info["seconds"],
                        info["new_size"], info["old_size"], info["heal"])
        return ahead > 0

    def _retry(self, fn: Callable[[], Any]) -> Any:
        """Run a collective; after a loss, recover and run it again on the survivors."""
        while True:
            try:
                return fn()
            except _FAULTS as e:
                if not self._can_recover():
                    raise
                self._recover(e)

    # ---- collectives Lightning asks for ----
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        if not isinstance(tensor, torch.Tensor):
            return tensor
        op = _op_name(reduce_op)
        if op == "avg" and not (tensor.is_floating_point() or tensor.is_complex()):
            # Lightning's own rule for an integer mean: sum, then a float division
            return self._retry(lambda: px.allreduce(tensor, op="sum") / px.size())
        return self._retry(lambda: px.allreduce(tensor, op=op))

    def all_gather(self, tensor: torch.Tensor, group: Any = None,
                   sync_grads: bool = False) -> torch.Tensor:
        return self._retry(lambda: px.allgather(tensor.unsqueeze(0)))

    def barrier(self, name: str | None = None) -> None:
        if px.is_initialized():
            self._retry(px.barrier)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not px.is_initialized():
            return obj
        return self._retry(lambda: px.broadcast_object(obj, root=src))

    def teardown(self) -> None:
        if isinstance(self.model, px.DistributedDataParallel):
            self.model = self.lightning_module
        pl.strategies.Strategy.teardown(self)  # ParallelStrategy's wants a cluster environment


def _op_name(reduce_op: Any) -> str:
    name = reduce_op if isinstance(reduce_op, str) else str(getattr(reduce_op, "name", reduce_op))
    op = _OPS.get(name.lower().removeprefix("reduceop."))
    if op is None:
        raise ConfigError(f"PhalanxStrategy.reduce(reduce_op={reduce_op!r}): use 'mean', 'sum', "
                          "'max' or 'min' (or torch's ReduceOp of those)")
    return op
