"""Pure decision policies: who is lost, when a generation forms, and the rank order."""

from __future__ import annotations

from phalanx.coord.policy import MemberStatus, find_lost, order_world, should_form


def m(worker: str, host: str = "h", hint: int = -1, beat: float = 10.0, alive: bool = True,
      waiting: bool = False) -> MemberStatus:
    return MemberStatus(worker=worker, host=host, rank_hint=hint, last_heartbeat=beat,
                        alive=alive, waiting=waiting)


def test_find_lost_uses_the_timeout_and_says_why() -> None:
    d = find_lost([m("a", beat=9.5), m("b", beat=5.0), m("c", beat=1.0, alive=False)], now=10.0,
                  heartbeat_timeout=3.0)
    assert d.act and d.members == ["b"] and "3.00s" in d.reason
    assert not find_lost([m("a", beat=9.9)], now=10.0, heartbeat_timeout=3.0).act


def test_first_generation_waits_for_target_and_orders_by_hint() -> None:
    members = [m("x", hint=1, waiting=True), m("y", hint=0, waiting=True)]
    assert not should_form(members[:1], first=True, target_np=2, min_np=2, max_np=2,
                           waited=0, settle=1).act
    d = should_form(members, first=True, target_np=2, min_np=2, max_np=2, waited=0, settle=1)
    assert d.act and d.members == ["y", "x"]


def test_later_generation_forms_when_all_live_wait_or_after_settle() -> None:
    members = [m("a", waiting=True), m("b", waiting=True), m("c"), m("d", alive=False)]
    kw = dict(first=False, target_np=4, min_np=2, max_np=4, settle=1.0)
    assert not should_form(members, waited=0.1, **kw).act
    d = should_form(members, waited=1.5, **kw)
    assert d.act and d.members == ["a", "b"] and "settle" in d.reason
    members[2].waiting = True
    assert should_form(members, waited=0.0, **kw).act
    few = [m("a", waiting=True), m("b")]
    assert not should_form(few, waited=5.0, **kw).act  # below min_np


def test_order_keeps_survivors_first_then_newcomers_grouped_by_host() -> None:
    members = [m("new", host="h2", hint=1), m("s2", host="h1"), m("s0", host="h1"),
               m("s1", host="h2")]
    order = order_world(members, previous=["s0", "dead", "s1", "s2"])
    assert order == ["s0", "s2", "s1", "new"]


def test_a_stopped_process_is_lost_sooner_than_a_busy_one() -> None:
    members = [m("busy", beat=9.0), m("stopped", beat=9.0)]
    d = find_lost(members, now=10.0, heartbeat_timeout=3.0, stopped={"stopped"},
                  stopped_timeout=0.5)
    assert d.act and d.members == ["stopped"] and "process stopped" in d.reason
    assert find_lost(members, now=12.5, heartbeat_timeout=3.0).members == ["busy", "stopped"]


def test_newcomers_alone_never_form_a_generation_while_state_holders_live() -> None:
    """Survivors busy re-forming (say, a slow teardown after a host was cut off) are not
    left out for replacements that hold no state; they are once they are declared lost."""
    members = [m("s0"), m("s1"), m("new0", waiting=True), m("new1", waiting=True)]
    kw = {"first": False, "target_np": 4, "min_np": 2, "max_np": 4, "settle": 1.0,
          "current": ["s0", "s1"]}
    d = should_form(members, waited=30.0, **kw)
    assert not d.act and "hold the training state" in d.reason
    members[0].waiting = True  # one survivor came: the hung one is left out after settle
    d = should_form(members, waited=1.5, **kw)
    assert d.act and d.members == ["s0", "new0", "new1"]
    members[0].waiting, members[0].alive, members[1].alive = False, False, False
    assert should_form(members, waited=0.0, **kw).act  # every holder lost: nothing to wait for


def test_heal_source_is_the_most_advanced_rank_and_nobody_rolls_back() -> None:
    from phalanx.elastic.policy import choose_source
    plan = choose_source([7, 9, -1, 9])
    assert (plan.source, plan.behind, plan.step) == (1, [0, 2], 9)
    assert choose_source([5, 5]).behind == []


def test_before_the_first_step_every_rank_takes_one_initial_state() -> None:
    # Unseeded inits differ per rank; like broadcast_parameters at start, rank 0's wins.
    from phalanx.elastic.policy import choose_source
    plan = choose_source([0, 0, 0])
    assert (plan.source, plan.behind) == (0, [1, 2]) and "initial" in plan.reason
    assert choose_source([-1, 0]).behind == [0]
    assert choose_source([0]).behind == []
