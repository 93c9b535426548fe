"""Helpers around data-parallel training: start every rank from the same model and optimizer
state, average metrics across ranks, and pick this rank's share of a dataset."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import ConfigError
from . import _comm


def _flat_broadcast(tensors: list[torch.Tensor], root: int) -> None:
    """Broadcast tensors in place, fused into one buffer per (dtype, device) to save latency."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for ts in groups.values():
        if len(ts) == 1 and ts[0].is_contiguous():
            _comm.broadcast_(ts[0], root=root)
            continue
        flat = torch.cat([t.reshape(-1) for t in ts])
        _comm.broadcast_(flat, root=root)
        off = 0
        for t in ts:
            t.copy_(flat[off:off + t.numel()].view_as(t))
            off += t.numel()


def broadcast_parameters(params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
                         | torch.nn.Module, root: int = 0) -> None:
    """Overwrite, in place, every rank's tensors with `root`'s.

    `params` is a `model.state_dict()`, `model.named_parameters()` or the module itself. Every
    rank must pass the same names in the same order (the same model)."""
    if isinstance(params, torch.nn.Module):
        params = params.state_dict()
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    tensors: list[torch.Tensor] = []
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"broadcast_parameters: entry {name!r} is a {type(t).__name__}, not "
                              "a tensor; pass model.state_dict() or model.named_parameters()")
        tensors.append(t)
    with torch.no_grad():
        _flat_broadcast([t.data if isinstance(t, torch.nn.Parameter) else t for t in tensors], root)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root: int = 0) -> None:
    """Make every rank's optimizer state and hyper-parameters equal to `root`'s.

    The state's structure travels as one pickled object with tensors replaced by placeholders;
    the tensors themselves go by (fused) in-place broadcast, so large states stay cheap."""
    sd = optimizer.state_dict()
    tensors: list[torch.Tensor] = []

    def strip(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
            return ("__phalanx_tensor__", len(tensors) - 1, tuple(obj.shape), obj.dtype)
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(strip(v) for v in obj)
        return obj

    skeleton = _comm.broadcast_object(strip(sd), root=root)
    if _comm.rank() == root:
        received = tensors
    else:
        received = []

        def collect(obj: Any) -> None:
            if isinstance(obj, tuple) and len(obj) == 4 and obj[0] == "__phalanx_tensor__":
                received.append(torch.empty(obj[2], dtype=obj[3]))
            elif isinstance(obj, dict):
                for v in obj.values():
                    collect(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    collect(v)

        collect(skeleton)
    _flat_broadcast(received, root)
    if _comm.rank() == root:
        return

    def fill(obj: Any) -> Any:
        if isinstance(obj, tuple) and len(obj) == 4 and obj[0] == "__phalanx_tensor__":
            return received[obj[1]]
        if isinstance(obj, dict):
            return {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(fill(v) for v in obj)
        return obj

    optimizer.load_state_dict(fill(skeleton))


def prefer_foreach(optimizer: torch.optim.Optimizer) -> int:
    """Let `optimizer` step with torch's multi-tensor (`_foreach_*`) kernels on CPU, where the
    user left the choice open (`foreach=None`, not fused, not differentiable). torch already
    picks them for CUDA but not for CPU, where they cut the per-parameter Python loop (measured
    2.5-3x faster SGD and AdamW steps on a model of 514 small tensors). Optimizers without a
    foreach option keep their per-parameter loop. Returns how many groups were switched."""
    switched = 0
    for group in optimizer.param_groups:
        if ("foreach" in group and group["foreach"] is None and not group.get("fused")
                and not group.get("differentiable") and all(
                    isinstance(p, torch.Tensor) and p.device.type == "cpu"
                    for p in group["params"])):
            group["foreach"] = True
            switched += 1
    return switched


def metric_average(value: float | torch.Tensor, name: str | None = None) -> float:
    """The mean of a scalar metric over all ranks (every rank must call it)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).clone()
    return float(_comm.allreduce(t, op="avg", name=name)[0])


def shard_indices(n: int, rank: int, size: int, *, drop_last: bool = True) -> range:
    """Rank `rank`'s strided share of `n` items (`rank, rank+size, ...`).

    With `drop_last` every rank gets exactly `n // size` items, so ranks take the same number of
    steps (a rank with more steps would wait forever for its peers in a reduction)."""
    if size < 1:
        raise ConfigError(f"size={size!r} must be >= 1 (the number of workers)")
    if not 0 <= rank < size:
        raise ConfigError(f"rank={rank!r} must be in [0, {size}); pass px.rank() and px.size()")
    if n < 0:
        raise ConfigError(f"n={n!r} must be >= 0 (the number of items)")
    stop = (n // size) * size if drop_last else n
    return range(rank, stop, size)
