"""Lost hosts: the blacklist's cooldown (growing at each loss) and where a replacement goes.
Pure policies, tested without processes; the clock is an argument."""

from __future__ import annotations

import pytest

from phalanx.errors import ConfigError
from phalanx.launch.blacklist import HostBlacklist, HostView, place_replacement
from phalanx.launch.supervisor import RunConfig


def test_a_lost_host_is_kept_out_for_its_cooldown_then_usable_again() -> None:
    bl = HostBlacklist(60)
    assert bl.usable("b", 0.0) and bl.why("b") == "" and bl.losses("b") == 0
    assert bl.mark_lost("b", 100.0, "its agent was killed by SIGKILL") == 60
    assert not bl.usable("b", 100.0) and not bl.usable("b", 159.9)
    assert bl.usable("a", 100.0)  # only the lost host
    why = bl.why("b", 130.0)
    assert "lost 1 time(s)" in why and "SIGKILL" in why and "usable again in 30.0s" in why
    assert bl.cooled(159.9) == []
    assert bl.usable("b", 160.0) and bl.cooled(160.0) == ["b"]
    assert bl.cooled(200.0) == []  # reported once per loss
    assert bl.why("b", 200.0).endswith(", over")


def test_the_cooldown_doubles_at_each_loss_up_to_the_cap() -> None:
    bl = HostBlacklist(10, max_cooldown_s=35)
    assert [bl.mark_lost("b", 0.0, "x") for _ in range(4)] == [10, 20, 35, 35]
    assert bl.losses("b") == 4
    flat = HostBlacklist(10, growth=1.0)
    assert [flat.mark_lost("b", 0.0, "x") for _ in range(3)] == [10, 10, 10]
    zero = HostBlacklist(0)
    zero.mark_lost("b", 5.0, "x")
    assert zero.usable("b", 5.0)


@pytest.mark.parametrize("kw", [{"cooldown_s": -1}, {"cooldown_s": 1, "growth": 0.5},
                                {"cooldown_s": 10, "max_cooldown_s": 5}])
def test_bad_blacklist_settings_are_refused(kw) -> None:
    with pytest.raises(ValueError, match="host cooldown must be >= 0"):
        HostBlacklist(**kw)


def test_run_config_refuses_a_negative_cooldown() -> None:
    with pytest.raises(ConfigError, match="host_cooldown must be >= 0 seconds, got -1"):
        RunConfig(np=1, script="x.py", host_cooldown=-1)


def _views(a: tuple[int, bool], b: tuple[int, bool], slots: int = 2) -> list[HostView]:
    return [HostView(name="a", slots=slots, load=a[0], agent=a[1]),
            HostView(name="b", slots=slots, load=b[0], agent=b[1])]


def test_a_replacement_goes_home_while_its_host_lives() -> None:
    p = place_replacement("b", _views((2, True), (1, True)), HostBlacklist(60), 0.0)
    assert (p.host, p.restart) == ("b", False) and "its own host" in p.reason


def test_a_blacklisted_host_is_never_chosen_and_the_survivor_takes_the_replacements() -> None:
    bl = HostBlacklist(60)
    bl.mark_lost("b", 0.0, "its agent was killed by SIGKILL")
    for load in (2, 3):  # above its slots: every other host is lost
        p = place_replacement("b", _views((load, True), (0, False)), bl, 1.0)
        assert (p.host, p.restart) == ("a", False)
        assert "host b is blacklisted" in p.reason and "fewest workers" in p.reason
    # Even if its agent were still running, a blacklisted host takes nothing.
    p = place_replacement("b", _views((4, True), (0, True)), bl, 1.0)
    assert p.host == "a"


def test_a_host_with_a_free_slot_comes_before_overloading_one() -> None:
    hosts = [HostView(name="a", slots=2, load=2, agent=True),
             HostView(name="b", slots=2, load=0, agent=False),
             HostView(name="c", slots=2, load=1, agent=True)]
    bl = HostBlacklist(60)
    bl.mark_lost("b", 0.0, "cut")
    p = place_replacement("b", hosts, bl, 1.0)
    assert (p.host, p.restart) == ("c", False) and "free slot" in p.reason


def test_a_host_past_its_cooldown_gets_its_agent_started_again() -> None:
    bl = HostBlacklist(60)
    bl.mark_lost("b", 0.0, "its agent was killed by SIGKILL")
    assert place_replacement("b", _views((3, True), (0, False)), bl, 59.0).host == "a"
    p = place_replacement("b", _views((3, True), (0, False)), bl, 60.0)
    assert (p.host, p.restart) == ("b", True) and "past its cooldown" in p.reason
    # A replacement from a third, blacklisted host goes there too, rather than overload a.
    bl.mark_lost("c", 50.0, "cut")
    hosts = [*_views((3, True), (0, False)), HostView(name="c", slots=2, load=0, agent=False)]
    p = place_replacement("c", hosts, bl, 60.0)
    assert (p.host, p.restart) == ("b", True)


def test_no_usable_host_says_why() -> None:
    bl = HostBlacklist(60)
    bl.mark_lost("a", 0.0, "its agent exited with code 255")
    bl.mark_lost("b", 0.0, "its agent was killed by SIGKILL")
    p = place_replacement("b", _views((0, False), (0, False)), bl, 1.0)
    assert p.host is None and "no usable host" in p.reason and "code 255" in p.reason
