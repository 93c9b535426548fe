"""Pure sharding math: epoch orders, split assignment and the exactly-once elastic cursor."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.data.sharding import (
    EpochCursor,
    assign_splits,
    assignment_table,
    epoch_order,
    reassign_lost,
)
from phalanx.errors import ConfigError


def test_epoch_order_is_a_deterministic_permutation() -> None:
    a = epoch_order(100, seed=3, epoch=1)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_order(100, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(100, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_order(100, seed=4, epoch=1))
    assert np.array_equal(epoch_order(5, 0, 0, shuffle=False), np.arange(5))


@given(st.integers(0, 50), st.integers(1, 9))
def test_assign_splits_is_a_balanced_contiguous_partition(n: int, world: int) -> None:
    table = assignment_table(n, world)
    assert [s for part in table for s in part] == list(range(n))
    sizes = [len(p) for p in table]
    assert max(sizes) - min(sizes) <= 1
    assert table[world - 1] == assign_splits(n, world - 1, world)


@given(st.integers(0, 40), st.integers(2, 6), st.data())
def test_reassign_lost_keeps_survivor_splits_and_covers_all(n: int, world: int,
                                                             data: st.DataObject) -> None:
    table = assignment_table(n, world)
    lost = data.draw(st.sets(st.integers(0, world - 1), max_size=world - 1))
    new = reassign_lost(table, sorted(lost))
    survivors = [r for r in range(world) if r not in lost]
    assert len(new) == len(survivors)
    assert sorted(s for part in new for s in part) == list(range(n))
    for new_rank, old_rank in enumerate(survivors):
        assert new[new_rank][:len(table[old_rank])] == table[old_rank]


def test_reassign_lost_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="no survivor"):
        reassign_lost(assignment_table(4, 2), [0, 1])
    with pytest.raises(ConfigError, match="outside the old world"):
        reassign_lost(assignment_table(4, 2), [5])
    with pytest.raises(ConfigError, match="rank=2"):
        assign_splits(4, 2, 2)


# One step of an elastic run: the world size for the step and which of its ranks are lost.
steps = st.lists(st.tuples(st.integers(1, 5), st.sets(st.integers(0, 4))), max_size=30)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 60), batch=st.integers(1, 7), seed=st.integers(0, 2**31),
       schedule=steps, shuffle=st.booleans())
def test_every_index_consumed_exactly_once(n: int, batch: int, seed: int,
                                           schedule: list[tuple[int, set[int]]],
                                           shuffle: bool) -> None:
    cursor = EpochCursor(num_samples=n, seed=seed, shuffle=shuffle)
    consumed: list[int] = []
    schedule = list(schedule)
    for _ in range(10_000):
        if cursor.done:
            break
        world, lost = schedule.pop(0) if schedule else (1, set())
        plan = cursor.plan_step(world, batch)
        assert len(plan) == world
        assert all(len(p) <= batch for p in plan)
        completed = [r for r in range(world) if r not in lost]
        for r in completed:
            consumed += plan[r].tolist()
        before = cursor.remaining
        cursor.complete_step(plan, completed)
        assert cursor.remaining == before - sum(len(plan[r]) for r in completed)
    assert cursor.done
    assert sorted(consumed) == list(range(n))


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 60), batch=st.integers(1, 7), world=st.integers(1, 4))
def test_drop_last_plans_only_full_steps(n: int, batch: int, world: int) -> None:
    cursor = EpochCursor(num_samples=n, seed=1)
    seen: list[int] = []
    while True:
        plan = cursor.plan_step(world, batch, drop_last=True)
        if sum(len(p) for p in plan) == 0:
            break
        assert all(len(p) == batch for p in plan)
        seen += np.concatenate(plan).tolist()
        cursor.complete_step(plan, range(world))
    assert len(seen) == (n // (world * batch)) * world * batch
    assert len(set(seen)) == len(seen)
    assert cursor.remaining < world * batch


def test_requeued_indices_come_first_and_plans_are_deterministic() -> None:
    a, b = EpochCursor(num_samples=20, seed=7), EpochCursor(num_samples=20, seed=7)
    plan = a.plan_step(2, 3)
    assert all(np.array_equal(x, y) for x, y in zip(plan, b.plan_step(2, 3)))
    a.complete_step(plan, [0])  # rank 1 lost
    assert a.requeue == plan[1].tolist()
    nxt = a.plan_step(3, 2)
    assert nxt[0].tolist() + nxt[1].tolist()[:1] == plan[1].tolist()


def test_state_dict_round_trip_and_stale_plan() -> None:
    c = EpochCursor(num_samples=30, seed=2, epoch=4)
    plan = c.plan_step(2, 4)
    c.complete_step(plan, [1])
    d = EpochCursor(num_samples=30)
    d.load_state_dict(c.state_dict())
    assert d.state_dict() == c.state_dict()
    assert all(np.array_equal(x, y) for x, y in zip(c.plan_step(3, 2), d.plan_step(3, 2)))
    with pytest.raises(ConfigError, match="stale or foreign plan"):
        c.complete_step(plan, [0, 1])
    with pytest.raises(ConfigError, match="num_samples"):
        EpochCursor(num_samples=5).load_state_dict(c.state_dict())
    c.new_epoch()
    assert (c.epoch, c.position, c.requeue) == (5, 0, [])


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ConfigError, match="batch_size=0"):
        EpochCursor(num_samples=3).plan_step(1, 0)
    with pytest.raises(ConfigError, match="num_samples=-1"):
        EpochCursor(num_samples=-1)
