"""`hvd.join()`: training with uneven batches. A rank out of data calls `join()` and, until
every rank has joined, takes part in the others' allreduces with zeros, as Horovod's joined
ranks do: an Average still divides by the full size, a Max or Min sees the zeros.

What a joined rank can stand in for (negotiate.STAND_IN_KINDS): `allreduce` and
`grouped_allreduce` in every form, and the gradient reductions of `hvd.DistributedOptimizer`
(with no compression, fp16 or bf16; each of its steps announces its bucket layout, see
`announce`, so a joined rank can mirror it). Any other operation submitted while a rank
has joined fails on the ranks that submitted it with `negotiate.JoinedError`, as Horovod
refuses them ("... is not supported with Join").

A joined rank waits inside a collective as any rank does at a barrier, so the ranks still
working must reach their next step or collective within the job's collective timeout
(`Config.timeout`, 30 s by default), or the coordinator takes them for stuck.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import handles
from . import negotiate as N
from . import reduce as R
from .basics import OP_NAMES, require_init

_OPS = {name: op for op, name in OP_NAMES.items()}


def join(device: int = -1) -> int:
    """Wait until every rank has called join(), standing in for the allreduces of the ranks
    still working; return the rank that joined last (judged by each rank's wall clock at its
    call, so across hosts as accurate as their clocks agree). `device` is accepted for
    Horovod's signature and unused (zeros are made on each operation's device)."""
    require_init("join")
    arrived = time.time()

    def last() -> handles.Waitable:
        import phalanx as px
        stamps = px.allgather_object(arrived)
        return handles.Done(max(range(len(stamps)), key=lambda r: (stamps[r], r)))

    return int(handles.join(last, stand_in))


def stand_in(key: N.Key, sig: tuple[Any, ...]) -> None:
    """Take part, with zeros, in operation `key` that the ranks still working run."""
    kind, name = key
    f = dict(sig)
    px_name = None if name.startswith("noname.") else name   # what the submitters passed
    if kind == "allreduce":
        buf = _zeros(f["dtype"], f["device"], f["shape"])
        R.start_allreduce_(buf, _OPS[f["op"]], f["prescale_factor"], f["postscale_factor"],
                           px_name).wait()
    elif kind == "grouped_allreduce":
        bufs = [_zeros(dtype, dev, shape) for dtype, dev, shape in f["tensors"]]
        R.start_grouped_(bufs, _OPS[f["op"]], f["prescale_factor"], f["postscale_factor"],
                         px_name).wait()
    elif kind == "optimizer":
        optimizer_step(f)
    else:  # negotiate.decide fails these instead of scheduling them
        raise RuntimeError(f"a joined rank cannot stand in for {N.show(key)}")


def optimizer_step(f: dict[str, Any]) -> None:
    """Mirror one DistributedOptimizer reduction (announced by its `_announce`): the layout check
    of a new generation (contributing no layout), then one zero bucket per bucket."""
    import phalanx as px
    if f["layout check"]:
        px.allgather_object(None)
    cast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(f["compression"])
    pending = []
    for i, (numel, dtype, dev) in enumerate(f["buckets"]):
        buf = _zeros(dtype, dev, (numel,))
        if cast is not None and buf.is_floating_point() and buf.dtype != cast:
            buf = buf.to(cast)
        pending.append(px.allreduce_async_(buf, op=f["op"], name=f"grad.bucket{i}"))
    for h in pending:
        h.wait()


def _zeros(dtype: str, device: str, shape: tuple[int, ...]) -> torch.Tensor:
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else device
    return torch.zeros(shape, dtype=getattr(torch, dtype), device=dev)
