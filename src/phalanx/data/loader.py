"""ShardedLoader: this rank's batches of an exactly-once elastic epoch.

Each step is planned for the whole world by an `EpochCursor` from the rank and world size read at
that step, so the loader reshards on its own when the world changes. A step stays pending until
the next batch is asked for (it completed) or the elastic loop reports it failed
(`on_step_failed`), which puts the lost ranks' samples back on the queue.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from . import _collective
from .dataset import Split, SplitDataset, is_torch
from .partition import PartitionedDataset
from .sharding import EpochCursor

Dataset = SplitDataset | PartitionedDataset


class ShardedLoader:
    """Iterate this rank's batches; one pass over the loader is one epoch of the whole world.

    Batches are tuples of torch tensors, or of numpy arrays when the dataset holds numpy arrays
    (override with `as_torch`). Without `set_epoch`, each new pass starts the next epoch once the
    previous one is finished; an unfinished epoch (e.g. after `load_state_dict`) is resumed.
    Once `set_epoch` is used, a pass serves what is left of the epoch it set (maybe nothing).
    When fewer samples than ranks remain at the end of an epoch, some ranks get an empty batch so
    that every rank takes the same number of steps (collectives stay matched).

    Any rank may draw any sample, so a FileDataset is best wrapped in
    `PartitionedDataset(ds, rank=0, world_size=1)` (every split cached once per worker) when it
    fits in memory; a bare FileDataset re-reads the splits each batch touches.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0,
                 drop_last: bool = False, shuffle: bool = True, *,
                 as_torch: bool | None = None) -> None:
        if not hasattr(dataset, "take") or not hasattr(dataset, "__len__"):
            raise ConfigError(f"dataset={type(dataset).__name__} has no take()/len(); pass an "
                              "ArrayDataset, FileDataset or PartitionedDataset")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer (per rank)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.cursor = EpochCursor(num_samples=len(dataset), seed=seed, shuffle=shuffle)
        self._pending: list[np.ndarray] | None = None
        self._started = False  # has the cursor's current epoch handed out anything yet
        self._auto_epoch = True  # advance epochs on our own until set_epoch is called
        self.as_torch = as_torch
        self._resume = False  # after a recovery: finish the current epoch, never skip it

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch `epoch`; resuming the current epoch keeps its position."""
        self._auto_epoch = False
        if epoch != self.cursor.epoch:
            self._pending = None
            self.cursor.new_epoch(epoch)
            self._started = False

    @property
    def epoch(self) -> int:
        return self.cursor.epoch

    def _exhausted(self, world: int) -> bool:
        if self.drop_last:
            return self.cursor.remaining < world * self.batch_size
        return self.cursor.done

    def __iter__(self) -> Iterator[Split]:
        self.on_step_done()
        resume, self._resume = self._resume, False
        if self._auto_epoch and self._started and not resume and self._exhausted(
                _collective.size()):
            self.cursor.new_epoch()
            self._started = False
        while True:
            self.on_step_done()
            world = _collective.size()
            if self._exhausted(world):
                return
            plan = self.cursor.plan_step(world, self.batch_size, drop_last=self.drop_last)
            self._pending = plan
            self._started = True
            yield self._batch(plan[_collective.rank()])

    def __len__(self) -> int:
        """Steps in a whole epoch at the current world size."""
        per_step = _collective.size() * self.batch_size
        n = self.cursor.num_samples
        return n // per_step if self.drop_last else math.ceil(n / per_step)

    def _batch(self, indices: np.ndarray) -> Split:
        batch = self.dataset.take(indices)
        want_torch = self.as_torch
        if want_torch is None:
            want_torch = bool(batch) and is_torch(batch[0])
        if want_torch:
            import torch
            return tuple(a if is_torch(a) else torch.as_tensor(a) for a in batch)
        return tuple(a.numpy() if is_torch(a) else a for a in batch)

    # Hooks for the elastic loop.

    @property
    def pending_step(self) -> list[np.ndarray] | None:
        """Per-rank indices of the step handed out last and not yet closed."""
        return self._pending

    def on_step_done(self) -> None:
        """The pending step completed on every rank (called implicitly by the next batch)."""
        if self._pending is not None:
            plan, self._pending = self._pending, None
            self.cursor.complete_step(plan, range(len(plan)))

    def on_step_failed(self, completed_ranks: Sequence[int]) -> None:
        """The pending step failed: keep the samples of `completed_ranks` (old rank numbers; the
        survivors that redo the step with their own gradients) and requeue the others'."""
        if self._pending is not None:
            plan, self._pending = self._pending, None
            self.cursor.complete_step(plan, completed_ranks)

    def on_recovery(self) -> None:
        """The elastic loop re-formed: requeue the step in flight, and let the next pass serve
        what is left of the current epoch (maybe nothing) instead of starting a new one, since
        the training function restarts inside the epoch it was in."""
        self.on_step_failed([])
        self._resume = True

    def state_dict(self) -> dict[str, Any]:
        """Position in the epoch as plain values, the pending step included."""
        return {"cursor": self.cursor.state_dict(), "started": self._started,
                "auto_epoch": self._auto_epoch,
                "pending": None if self._pending is None
                else [p.tolist() for p in self._pending]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (e.g. broadcast from the most advanced rank)."""
        if "cursor" not in state:
            raise ConfigError("loader state lacks 'cursor'; pass ShardedLoader.state_dict()")
        self.cursor.load_state_dict(state["cursor"])
        self._started = bool(state.get("started", True))
        self._auto_epoch = bool(state.get("auto_epoch", True))
        pending = state.get("pending")
        self._pending = (None if pending is None
                         else [np.asarray(p, dtype=np.int64) for p in pending])
