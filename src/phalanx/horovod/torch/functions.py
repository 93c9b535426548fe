"""Horovod's helpers: broadcast_parameters, broadcast_optimizer_state and the object
collectives, on phalanx's fused implementations.

`broadcast_optimizer_state` does what Horovod's does first: a rank whose optimizer has no
state yet gives every trainable parameter a zero gradient (sparse for SparseAdam, and for
sparse embeddings of `model` under SGD) and steps the wrapped torch optimizer locally to create
it (which moves parameters under weight decay, identically on ranks that hold the same
parameters); parameters that do not require a gradient keep ``grad=None``. Then it sends root's
whole state (its structure included) where Horovod broadcasts tensor by tensor.

Difference from Horovod: objects travel with the standard `pickle` (HMAC-checked), not
cloudpickle, so lambdas and locally defined classes cannot be sent.

Like the collectives, these are queued and matched across ranks by name (see `handles`);
the unnamed ones match by order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import handles
from .basics import require_init
from .process_sets import ProcessSet, check, global_process_set


def _px() -> Any:
    import phalanx as px
    return px


def broadcast_parameters(params: Any, root_rank: int) -> None:
    """Overwrite every rank's tensors, in place, with root's.

    `params`: a `state_dict()` (sent in sorted key order, as Horovod does), or a list or
    iterable of `named_parameters()` pairs or of bare tensors (`model.parameters()`)."""
    require_init("broadcast_parameters")
    if isinstance(params, Mapping):
        items = sorted(params.items(), key=lambda kv: str(kv[0]))
    elif isinstance(params, Iterable) and not isinstance(params, (str, bytes, torch.Tensor)):
        items = [p if isinstance(p, tuple) else (f"param.{i}", p) for i, p in enumerate(params)]
    else:
        raise ValueError(f"broadcast_parameters: params of type {type(params).__name__} is not "
                         "supported; pass model.state_dict() or model.named_parameters()")
    for i, item in enumerate(items):
        if len(item) != 2 or not isinstance(item[1], torch.Tensor):
            raise ValueError(f"broadcast_parameters: entry {i} ({item!r:.80}) is not a tensor "
                             "or a (name, tensor) pair")
    handles.run("broadcast_parameters", None,
                lambda: handles.Done(_px().broadcast_parameters(items, root=root_rank)),
                (("root_rank", root_rank),))


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int,
                              model: torch.nn.Module | None = None) -> None:
    """Make every rank's optimizer state and hyper-parameters (lr, ...) equal to root's."""
    require_init("broadcast_optimizer_state")
    if not hasattr(optimizer, "state_dict") or not hasattr(optimizer, "load_state_dict"):
        raise ValueError(f"broadcast_optimizer_state: optimizer={type(optimizer).__name__} has "
                         "no state_dict()/load_state_dict(); pass a torch optimizer")
    inner = getattr(optimizer, "optimizer", optimizer)
    if isinstance(inner, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state (as in Horovod: its state is "
                         "deeply nested); save and load its state_dict() instead")
    _create_state(inner, model)
    handles.run("broadcast_optimizer_state", None,
                lambda: handles.Done(_px().broadcast_optimizer_state(optimizer, root=root_rank)),
                (("root_rank", root_rank),))


def _create_state(opt: torch.optim.Optimizer, model: torch.nn.Module | None) -> None:
    """Horovod's initialisation of an optimizer without state: zero gradients, one local step
    of the wrapped (not the distributed) optimizer."""
    if len(opt.state_dict()["state"]) != 0:
        return
    sparse: set[int] = set()
    if model is not None:
        sparse = {id(p) for m in model.modules()
                  if isinstance(m, torch.nn.Embedding) and m.sparse for p in m.parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
                if isinstance(opt, torch.optim.SparseAdam) or (
                        isinstance(opt, torch.optim.SGD) and id(p) in sparse):
                    p.grad = p.grad.to_sparse()
    opt.step()


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> Any:
    """Root's picklable object on every rank."""
    require_init("broadcast_object")
    comm = check(process_set, "broadcast_object")
    return handles.run("broadcast_object", name,
                       lambda: handles.Done(comm.broadcast_object(obj, root=root_rank)),
                       (("root_rank", root_rank),), comm)


def allgather_object(obj: Any, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> list[Any]:
    """Every rank's picklable object, as a list in rank order."""
    require_init("allgather_object")
    comm = check(process_set, "allgather_object")
    return list(handles.run("allgather_object", name,
                            lambda: handles.Done(comm.allgather_object(obj)), (), comm))
