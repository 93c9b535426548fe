"""Exactly-once batches of a map-style dataset for a torch `DataLoader`, across lost workers.

`ElasticBatchSampler` is the `batch_sampler=` of a DataLoader: each batch it yields is this
rank's share of one global step. The global batch size is fixed, and so is the number of steps
in an epoch: when workers are lost, the survivors split each later global batch among
themselves (per-rank batches grow), the lost workers' samples go back on a queue, and the rest
of the epoch's steps grow just enough to take them. So an epoch has the same number of steps
with or without faults (a trainer's step counts, schedules and validation points hold), and
every sample is trained exactly once.

Loaders read ahead (Lightning's trainer fetches the next batch before running this one, a
DataLoader with workers several), so a step's plan is made when its batch is drawn and stays
pending until the trainer commits it (`on_step_done`, at the optimizer step). Plans are a pure
function of the shared state, so every rank holds the same pending plans; a recovery maps them
onto the new ranks (`on_lost`), putting the lost ranks' shares back on the queue.

`LiveShardSampler` is the simple counterpart for evaluation: each pass shards the dataset by the
rank and world size of the moment it starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch.utils.data

from ..errors import ConfigError
from . import _collective
from .sharding import _check_int, epoch_order


class ElasticBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's share of each global batch of `global_batch_size` samples.

    Use it as ``DataLoader(ds, batch_sampler=ElasticBatchSampler(len(ds), 64))``. One pass is
    one epoch; `set_epoch(e)` (which Lightning calls) picks the epoch, else each new pass starts
    the next epoch once the current one is fully planned. A step is pending from the moment its
    batch is drawn until `on_step_done()` (a `px.elastic.State` field, or the phalanx Lightning
    strategy, calls it at the optimizer step).
    """

    def __init__(self, num_samples: int, global_batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False) -> None:
        self.num_samples = _check_int("num_samples", num_samples, minimum=1)
        self.global_batch_size = _check_int("global_batch_size", global_batch_size, minimum=1)
        self.seed = _check_int("seed", seed, minimum=0)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.epoch = 0
        self.position = 0          # fresh samples of this epoch's order taken into plans
        self.requeue: list[int] = []  # samples of lost ranks, served before fresh ones
        self.planned = 0           # steps of this epoch planned so far
        self.pending: list[list[list[int]]] = []  # drawn, not committed: per-rank index lists
        self.handed = 0            # pending plans this rank's iterator has served (local)
        self._order: tuple[int, np.ndarray] | None = None

    # ---- what a DataLoader calls ----
    def __len__(self) -> int:
        """Steps in an epoch: the same at every world size and after losses."""
        whole, rest = divmod(self.num_samples, self.global_batch_size)
        return whole if self.drop_last or not rest else whole + 1

    def set_epoch(self, epoch: int) -> None:
        """Make `epoch` the current epoch (no-op when it already is: a resumed epoch keeps its
        place). Samples of a step lost at the very end of the previous epoch are carried over."""
        epoch = _check_int("epoch", epoch, minimum=0)
        if epoch != self.epoch:
            self._start_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        self.handed = 0
        if not self.pending and self.planned >= len(self):
            self._start_epoch(self.epoch + 1)
        while True:
            if self.handed < len(self.pending):
                plan = self.pending[self.handed]
            elif self.planned < len(self):
                plan = self._plan(_collective.size())
                self.pending.append(plan)
            else:
                return
            self.handed += 1
            rank = _collective.rank()
            yield plan[rank] if rank < len(plan) else []

    # ---- what the training loop calls ----
    def on_step_done(self) -> None:
        """The oldest pending step was applied on every rank: its samples are consumed."""
        if self.pending:
            self.pending.pop(0)
            self.handed = max(0, self.handed - 1)

    def on_lost(self, kept: Sequence[int], world_size: int | None = None) -> None:
        """The group re-formed keeping old ranks `kept` (new rank i was old rank kept[i]):
        pending plans now name the new ranks, and the lost ranks' shares are queued again."""
        size = len(kept) if world_size is None else world_size
        keep = set(kept)
        for i, plan in enumerate(self.pending):
            self.requeue.extend(x for r, part in enumerate(plan) if r not in keep for x in part)
            self.pending[i] = [plan[r] if r < len(plan) else [] for r in kept] + \
                [[] for _ in range(size - len(kept))]

    def skip_committed(self, steps: int) -> None:
        """Healing brought this rank `steps` steps forward (a peer had applied them): the
        pending plans it loaded start after them, so fewer of them are already served here."""
        self.handed = max(0, self.handed - steps)

    @property
    def unserved(self) -> int:
        """Samples of the current epoch still to be planned (lost samples included)."""
        return self.num_samples - self.position + len(self.requeue)

    # ---- healing ----
    def state_dict(self) -> dict[str, Any]:
        """Shared state (what every rank agrees on); `handed` is this rank's own."""
        return {"num_samples": self.num_samples, "epoch": self.epoch, "position": self.position,
                "requeue": list(self.requeue), "planned": self.planned,
                "pending": [[list(p) for p in plan] for plan in self.pending], "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("num_samples", -1)) != self.num_samples:
            raise ConfigError(f"batch sampler state is for num_samples="
                              f"{state.get('num_samples')}, this sampler covers "
                              f"{self.num_samples}; restore it on the same dataset")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.requeue = [int(i) for i in state["requeue"]]
        self.planned, self.seed = int(state["planned"]), int(state["seed"])
        self.pending = [[[int(i) for i in p] for p in plan] for plan in state["pending"]]

    # ---- planning ----
    def _start_epoch(self, epoch: int) -> None:
        carried = [x for plan in self.pending for p in plan for x in p] + self.requeue
        if carried and self.planned:
            # a step lost at the very end of an epoch: its samples open the next one
            self.requeue = carried
        else:
            self.requeue = []
        self.epoch, self.position, self.planned, self.pending = epoch, 0, 0, []

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_order(self.num_samples, self.seed, self.epoch,
                                                   shuffle=self.shuffle))
        return self._order[1]

    def _plan(self, world: int) -> list[list[int]]:
        """The next global step, split among `world` ranks (a pure function of the state)."""
        steps_left = len(self) - self.planned
        dropped = self.num_samples - len(self) * self.global_batch_size if self.drop_last else 0
        due = self.unserved - dropped  # samples this epoch must still train
        take = min(self.global_batch_size, due)
        if due > self.global_batch_size * steps_left:  # lost samples to catch up on
            take = math.ceil(due / steps_left)
        from_queue = self.requeue[:take]
        fresh = self._epoch_order()[self.position:self.position + take - len(from_queue)]
        flat = np.concatenate([np.asarray(from_queue, dtype=np.int64), fresh.astype(np.int64)])
        del self.requeue[:len(from_queue)]
        self.position += len(fresh)
        self.planned += 1
        return [part.tolist() for part in np.array_split(flat, world)]


class LiveShardSampler(torch.utils.data.Sampler[int]):
    """Evaluation order: each pass serves samples rank, rank + size, ... of the dataset, by the
    rank and world size at the start of the pass (so a pass after a loss covers everything).
    As torch's DistributedSampler, the last samples wrap around so that every rank serves the
    same number (a collective per batch stays matched)."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = _check_int("num_samples", num_samples, minimum=0)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / max(1, _collective.size()))

    def __iter__(self) -> Iterator[int]:
        size, rank = _collective.size(), _collective.rank()
        total = len(self) * size
        return (i % self.num_samples for i in range(rank, total, size)) \
            if self.num_samples else iter(())
