"""Sparse gradients: `hvd.sparse_allreduce_async` and DistributedOptimizer's sparse path.

As in Horovod, a sparse (COO) tensor is "allreduced" by allgathering every rank's indices and
values: the result is an uncoalesced sparse tensor holding every rank's entries (values divided
by the number of ranks for Average), which sums to the allreduce of the dense tensors.
`sparse_allreduce_async` returns a function (not an int handle) that waits and returns the
result, as Horovod's does.

`DistributedOptimizer(sparse_as_dense=False)` (the default) reduces the gradients that
arrive sparse (``nn.Embedding(sparse=True)``) this way, at `synchronize()`, in parameter order
and with phalanx's collectives directly (like the fused dense buckets: every rank must step the
same parameters). A rank whose sparse parameter got no gradient in a step contributes nothing
(empty indices) once it has seen that parameter sparse; Horovod needs every rank to produce the
gradient. `sparse_as_dense=True` reduces them densely and hands them back sparse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .basics import Average, require_init
from .process_sets import ProcessSet, check, global_process_set


def sparse_allreduce_async(tensor: torch.Tensor, name: str, op: int,
                           process_set: ProcessSet = global_process_set
                           ) -> Callable[[], torch.Tensor]:
    """Start allgathering the indices and values of sparse `tensor` (Horovod's sparse
    allreduce); calling the returned function waits and gives the sparse result."""
    require_init("sparse_allreduce_async")
    from .gather_ops import allgather_async
    from .handles import synchronize
    if not isinstance(tensor, torch.Tensor) or not tensor.is_sparse:
        raise ValueError(f"sparse_allreduce_async: tensor must be a sparse torch.Tensor, got "
                         f"{type(tensor).__name__ if not isinstance(tensor, torch.Tensor) else 'a dense tensor'}; "
                         "use hvd.allreduce_async for dense tensors")
    n = check(process_set, "sparse_allreduce_async").size()
    t = tensor
    hi = allgather_async(t._indices().transpose(0, 1).contiguous(), name=f"{name}.indices",
                         process_set=process_set)
    hv = allgather_async(t._values(), name=f"{name}.values", process_set=process_set)

    def wait() -> torch.Tensor:
        values = synchronize(hv)
        indices = synchronize(hi)
        return _assemble(t, indices, values, n, op)

    return wait


def _assemble(like: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n: int,
              op: int) -> torch.Tensor:
    if op == Average:
        values = values / n
    return torch.sparse_coo_tensor(indices.transpose(0, 1), values, like.size(),
                                   dtype=like.dtype, device=like.device)


def reduce_sparse(grads: list[tuple[torch.Tensor, torch.Tensor | None, int]], op: int,
                  comm: Any) -> list[torch.Tensor]:
    """The optimizer's sparse path: for each (parameter, local sparse gradient or None, its
    sparse_dim), allgather indices and values over `comm` (phalanx collectives, in list order)
    and return the aggregated sparse gradients."""
    pending = []
    for p, g, sparse_dim in grads:
        if g is None:
            g = torch.sparse_coo_tensor(
                torch.zeros((sparse_dim, 0), dtype=torch.int64, device=p.device),
                torch.zeros((0, *p.shape[sparse_dim:]), dtype=p.dtype, device=p.device),
                p.shape)
        g = g.coalesce()
        pending.append((g, comm.allgather_async(g.indices().transpose(0, 1).contiguous()),
                        comm.allgather_async(g.values().contiguous())))
    n = comm.size()
    return [_assemble(g, hi.wait(), hv.wait(), n, op) for g, hi, hv in pending]
