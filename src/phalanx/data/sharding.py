"""Pure sharding math: epoch orders, split assignment, and the exactly-once elastic epoch cursor.

Nothing here touches a process group: rank and world size are always arguments, so every decision
is a deterministic function of its inputs and every rank that calls it with the same inputs gets
the same answer (the property the elastic loop relies on to keep ranks in lockstep).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _check_rank(rank: int, world_size: int) -> None:
    _check_int("world_size", world_size, minimum=1)
    _check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ConfigError(f"rank={rank} is out of range for world_size={world_size}; "
                          f"ranks are 0..{world_size - 1}")


def epoch_order(num_samples: int, seed: int, epoch: int, *, shuffle: bool = True) -> np.ndarray:
    """The order in which an epoch visits samples: a permutation seeded from (seed, epoch)."""
    n = _check_int("num_samples", num_samples, minimum=0)
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    _check_int("seed", seed, minimum=0)
    _check_int("epoch", epoch, minimum=0)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n).astype(np.int64)


def assign_splits(num_splits: int, rank: int, world_size: int) -> list[int]:
    """The contiguous, balanced block of input splits that `rank` owns (sizes differ by <= 1)."""
    n = _check_int("num_splits", num_splits, minimum=0)
    _check_rank(rank, world_size)
    return list(range(rank * n // world_size, (rank + 1) * n // world_size))


def assignment_table(num_splits: int, world_size: int) -> list[list[int]]:
    """`assign_splits` for every rank: entry r is rank r's splits."""
    return [assign_splits(num_splits, r, world_size) for r in range(world_size)]


def reassign_lost(table: Sequence[Sequence[int]], lost_ranks: Sequence[int]) -> list[list[int]]:
    """The assignment after `lost_ranks` leave: survivors keep their splits (their caches stay
    warm) and take the lost ranks' splits, each going to the least-loaded survivor.

    Entry i of the result belongs to the i-th survivor in old-rank order, which is the new rank
    that survivor gets when the group is re-formed densely.
    """
    world = len(table)
    lost = {int(r) for r in lost_ranks}
    bad = sorted(r for r in lost if not 0 <= r < world)
    if bad:
        raise ConfigError(f"lost_ranks={sorted(lost)} names ranks {bad} outside the old world of "
                          f"{world} ranks (0..{world - 1})")
    survivors = [r for r in range(world) if r not in lost]
    if not survivors:
        raise ConfigError(f"lost_ranks={sorted(lost)} leaves no survivor to take the splits; "
                          "restart the job from its durable checkpoint")
    new = [list(table[r]) for r in survivors]
    orphans = sorted(s for r in sorted(lost) for s in table[r])
    for split in orphans:
        # Ties go to the lowest new rank so that every rank computes the same answer.
        target = min(range(len(new)), key=lambda i: (len(new[i]), i))
        new[target].append(split)
    return new


@dataclass
class EpochCursor:
    """Where an epoch stands: fresh samples are taken from the epoch order at `position`, and
    samples of lost ranks wait on `requeue` to be handed out again before any fresh one.

    Every index of the epoch is consumed exactly once whatever the world sizes and losses, as long
    as every planned step is closed with `complete_step` (drop_last aside).
    """

    num_samples: int
    """Samples in the dataset (global)."""

    seed: int = 0
    """Seed of the epoch orders; with `epoch` it fixes the order."""

    epoch: int = 0
    """The current epoch."""

    shuffle: bool = True
    """Visit samples in a seeded random order (else in index order)."""

    position: int = 0
    """How many samples of the epoch order have been handed out as fresh samples."""

    requeue: list[int] = field(default_factory=list)
    """Indices whose step failed on the rank that held them; handed out first."""

    _order: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _order_key: tuple[int, int, int, bool] | None = field(
        default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int("num_samples", self.num_samples, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        _check_int("epoch", self.epoch, minimum=0)
        if not 0 <= self.position <= self.num_samples:
            raise ConfigError(f"position={self.position!r} must lie in 0..num_samples="
                              f"{self.num_samples}")
        self.requeue = [int(i) for i in self.requeue]

    @property
    def order(self) -> np.ndarray:
        """This epoch's order of samples (computed once per epoch)."""
        key = (self.num_samples, self.seed, self.epoch, self.shuffle)
        if self._order is None or self._order_key != key:
            self._order = epoch_order(self.num_samples, self.seed, self.epoch,
                                      shuffle=self.shuffle)
            self._order_key = key
        return self._order

    @property
    def remaining(self) -> int:
        """Samples of this epoch not yet handed out, requeued ones included."""
        return self.num_samples - self.position + len(self.requeue)

    @property
    def done(self) -> bool:
        """True once every sample of the epoch has been consumed."""
        return self.remaining == 0

    def plan_step(self, world_size: int, batch_size: int, *,
                  drop_last: bool = False) -> list[np.ndarray]:
        """Per-rank index arrays for the next global step (does not change the cursor).

        Rank r gets entries r*batch_size..(r+1)*batch_size of (requeue + fresh order). A last
        step with fewer than world_size*batch_size samples is split evenly (some ranks may get
        nothing when fewer samples than ranks remain); with drop_last it is empty instead.
        """
        world = _check_int("world_size", world_size, minimum=1)
        batch = _check_int("batch_size", batch_size, minimum=1)
        want = world * batch
        avail = self.remaining
        if drop_last and avail < want:
            return [np.empty(0, dtype=np.int64) for _ in range(world)]
        take = min(want, avail)
        flat = self._peek(take)
        if take == want:
            return [flat[r * batch:(r + 1) * batch] for r in range(world)]
        return [np.asarray(a, dtype=np.int64) for a in np.array_split(flat, world)]

    def _peek(self, count: int) -> np.ndarray:
        from_requeue = min(count, len(self.requeue))
        fresh = self.order[self.position:self.position + count - from_requeue]
        return np.concatenate([np.asarray(self.requeue[:from_requeue], dtype=np.int64), fresh])

    def complete_step(self, plan: Sequence[np.ndarray], completed_ranks: Sequence[int]) -> None:
        """Close a planned step: indices of `completed_ranks` are consumed, those of every other
        rank of the plan (lost ones) go back on the requeue list."""
        parts = [np.asarray(p, dtype=np.int64).ravel() for p in plan]
        flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        expected = self._peek(len(flat))
        if len(flat) > self.remaining or not np.array_equal(flat, expected):
            raise ConfigError(
                "plan does not match this cursor's next step (a stale or foreign plan): "
                f"got {len(flat)} indices starting {flat[:4].tolist()}, expected "
                f"{expected[:4].tolist()}...; pass the plan returned by the last plan_step and "
                "close each step exactly once")
        done = {int(r) for r in completed_ranks}
        bad = sorted(r for r in done if not 0 <= r < len(parts))
        if bad:
            raise ConfigError(f"completed_ranks={sorted(done)} has ranks {bad} outside the plan's "
                              f"world of {len(parts)} ranks")
        from_requeue = min(len(flat), len(self.requeue))
        del self.requeue[:from_requeue]
        self.position += len(flat) - from_requeue
        for r, part in enumerate(parts):
            if r not in done:
                self.requeue.extend(int(i) for i in part)

    def new_epoch(self, epoch: int | None = None) -> None:
        """Start epoch `epoch` (default: the next one) from its beginning."""
        self.epoch = self.epoch + 1 if epoch is None else _check_int("epoch", epoch, minimum=0)
        self.position = 0
        self.requeue = []

    def state_dict(self) -> dict[str, Any]:
        """The cursor as plain Python values (for checkpoints and broadcast to healing ranks)."""
        return {"num_samples": self.num_samples, "seed": self.seed, "epoch": self.epoch,
                "shuffle": self.shuffle, "position": self.position,
                "requeue": list(self.requeue)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        missing = {"num_samples", "seed", "epoch", "position", "requeue"} - set(state)
        if missing:
            raise ConfigError(f"cursor state is missing keys {sorted(missing)}; pass the dict "
                              "returned by EpochCursor.state_dict()")
        if int(state["num_samples"]) != self.num_samples:
            raise ConfigError(f"cursor state has num_samples={state['num_samples']} but this "
                              f"cursor covers {self.num_samples}; restore it on the same dataset")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.position = int(state["position"])
        self.requeue = [int(i) for i in state["requeue"]]
