"""State handlers: every kind of field is saved and loaded back **in place** (no processes)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from phalanx.elastic import RNGState, State, handlers, register_handler
from phalanx.elastic.handlers import Handler, handler_for
from phalanx.errors import PhalanxError


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "_registry", [])


class Counter:
    """A user object with the Stateful protocol."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.n = sd["n"]


class Opaque:
    """A user type without state_dict: it registers its own handler."""

    def __init__(self, value: str) -> None:
        self.value = value


class OpaqueHandler(Handler):
    def save(self, *, copy_: bool = True) -> str:
        return self.value.value

    def load(self, snapshot: str) -> Opaque:
        self.value.value = snapshot
        return self.value


def _state() -> tuple[State, dict[str, object]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2)
    objs = {"model": model, "optimizer": opt, "sched": sched, "scaler": scaler,
            "counter": Counter(), "rng": RNGState(), "opaque": Opaque("a")}
    register_handler(Opaque, OpaqueHandler)
    return State(**objs, epoch=0, history=[1, 2]), objs


def _train_a_bit(st: State, objs: dict, steps: int) -> None:
    model, opt, scaler = objs["model"], objs["optimizer"], objs["scaler"]
    for _ in range(steps):
        opt.zero_grad()
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        objs["sched"].step()
    objs["counter"].n += steps
    objs["opaque"].value += "b"
    st.epoch += 1
    st.history.append(steps)


def test_load_restores_every_field_into_the_live_objects() -> None:
    st, objs = _state()
    _train_a_bit(st, objs, 4)
    saved = st.state_dict()
    snapshot = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                for k, v in objs["model"].state_dict().items()}
    lr_saved = objs["optimizer"].param_groups[0]["lr"]
    draws = (torch.rand(2), np.random.rand(), random.random())
    _train_a_bit(st, objs, 5)
    st.load_state_dict(saved)
    # The live objects are the ones the user holds, and they hold the saved state.
    for name in ("model", "optimizer", "sched", "scaler", "counter", "rng", "opaque"):
        assert getattr(st, name) is objs[name], name
    for k, v in objs["model"].state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert objs["optimizer"].param_groups[0]["lr"] == lr_saved
    assert objs["counter"].n == 4 and objs["opaque"].value == "ab"
    assert st.epoch == 1 and st.history == [1, 2, 4]
    assert objs["scaler"].get_scale() == saved["fields"]["scaler"]["scale"]
    again = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


def test_scheduler_still_drives_the_live_optimizer_after_a_load() -> None:
    """The bug this replaces: a healed scheduler was a deep copy attached to a copy of the
    optimizer, so sched.step() stopped changing the learning rate the optimizer used."""
    st, objs = _state()
    saved = st.state_dict()
    st.load_state_dict(saved)
    for _ in range(6):
        objs["optimizer"].step()
        objs["sched"].step()
    assert objs["optimizer"].param_groups[0]["lr"] == pytest.approx(0.02 * 0.5 ** 2)
    assert objs["sched"].optimizer is objs["optimizer"]


def test_rng_rewinds_to_the_last_step_boundary() -> None:
    rng = RNGState()
    torch.manual_seed(3)
    rng.mark()
    first = torch.rand(3)
    rng.rewind()
    assert torch.equal(torch.rand(3), first)


def test_handler_lookup_order_and_bad_registration() -> None:
    assert type(handler_for(torch.nn.Linear(1, 1))).__name__ == "StatefulHandler"
    assert type(handler_for(5)) is Handler
    register_handler(Counter, OpaqueHandler)
    assert type(handler_for(Counter())) is OpaqueHandler  # newest registration wins
    with pytest.raises(TypeError, match="cls must be a type"):
        register_handler("Counter", OpaqueHandler)  # type: ignore[arg-type]
    with pytest.raises(PhalanxError, match="reserved"):
        State(step=3)
