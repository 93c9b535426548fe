"""Collective algorithms on torch tensors over a `Group` (CPU via Gloo or shared memory, CUDA via NCCL).

Tensors here are already contiguous torch tensors; `phalanx.api` converts numpy arrays and
picks the current group. Transport-only collectives (allgather, broadcast, alltoall) move raw
bytes, so every dtype works; reductions widen or fall back where Gloo lacks a kernel. Every path
gives the same results and errors: a tensor that requires grad is reduced as data, min/max
propagate NaN as numpy's np.minimum/np.maximum do, and a mismatch reads the same everywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import CollectiveMismatch, ConfigError
from . import ops
from .glooreduce import gloo_allreduce_
from .group import Group


def _data(t: torch.Tensor) -> torch.Tensor:
    """The tensor's data without autograd (same storage): collectives move data, as Gloo does."""
    return t.detach() if t.requires_grad else t


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (for transport that ignores dtype)."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _staged(g: Group, t: torch.Tensor) -> bool:
    """A CUDA tensor that must take the CPU path (see `Group.nccl_ok`)."""
    return t.is_cuda and not g.nccl_ok


def _hierarchical(g: Group, t: torch.Tensor) -> bool:
    """Take the hierarchical path: it exists, and it was forced or `t` is large enough."""
    return g.hier is not None and (g.config.allreduce_algo == "hier" or
                                   t.numel() * t.element_size() >= g.config.hier_min_bytes)


def allreduce_(g: Group, t: torch.Tensor, op: str, name: str | None) -> torch.Tensor:
    """Reduce `t` in place across ranks (its data: autograd does not see the reduction)."""
    ops.check_op(op, t.dtype)
    if _staged(g, t):
        host = _data(t).cpu()
        allreduce_(g, host, op, name)
        _data(t).copy_(host)
        return t
    sig = ops.signature("allreduce", op=op, dtype=t.dtype, shape=t.shape, name=name)
    if g.shm is not None and not t.is_cuda:
        # The engine always compares its own words (kind, op, dtype, numel); ours only when
        # checks are on, as on the Gloo path.
        g.shm.allreduce_(t, op, sig if g.config.check_collectives else ())
        return t
    data = _data(t)
    if t.is_cuda:
        g.agree(sig)
        nccl = g.nccl()
        g.wait(nccl.allreduce([data], ops.GLOO_REDUCE[op]))
        if op == "avg":
            data.div_(g.place.size)
        return t
    g.agree(sig)
    if _hierarchical(g, data):
        g.hier.allreduce_(data, op)
    else:
        gloo_allreduce_(g.wait, g.pg, g.place.size, data, op)
    return t


def allgather(g: Group, t: torch.Tensor, name: str | None) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0; first dims may differ."""
    t = _data(t)
    if _staged(g, t):
        return allgather(g, t.cpu(), name).to(t.device)
    if t.dim() == 0:
        t = t.reshape(1)
    sigs = g.agree(ops.signature("allgather", dtype=t.dtype, shape=t.shape, name=name))
    rows = [s[-1] for s in sigs]  # dim 0 of each rank rides on the signature exchange
    rest = tuple(t.shape[1:])
    top = max(rows)
    if all(r == top for r in rows):
        out = torch.empty((top * g.place.size,) + rest, dtype=t.dtype, device=t.device)
        pg = g.nccl() if t.is_cuda else g.pg
        if out.numel():
            g.wait(pg._allgather_base(_bytes(out), _bytes(t)))
        return out
    padded = torch.zeros((top,) + rest, dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = torch.empty((top * g.place.size,) + rest, dtype=t.dtype, device=t.device)
    pg = g.nccl() if t.is_cuda else g.pg
    g.wait(pg._allgather_base(_bytes(out), _bytes(padded)))
    return torch.cat([out[r * top: r * top + n] for r, n in enumerate(rows)])


def broadcast_(g: Group, t: torch.Tensor, root: int, name: str | None) -> torch.Tensor:
    """Copy root's tensor into `t` on every rank."""
    _check_root(g, root)
    if _staged(g, t):
        host = _data(t).cpu()
        broadcast_(g, host, root, name)
        _data(t).copy_(host)
        return t
    sig = ops.signature("broadcast", dtype=t.dtype, shape=t.shape, root=root, name=name)
    if g.shm is not None and not t.is_cuda:
        g.shm.broadcast_(t, root, sig if g.config.check_collectives else ())
        return t
    g.agree(sig)
    if t.numel() and not t.is_cuda and _hierarchical(g, t):
        g.hier.broadcast_(_data(t), root, g.place.local_ranks()[root])
    elif t.numel():
        pg = g.nccl() if t.is_cuda else g.pg
        g.wait(pg.broadcast(_bytes(_data(t)), root))
    return t


def reducescatter(g: Group, t: torch.Tensor, op: str, name: str | None) -> torch.Tensor:
    """Reduce across ranks, then keep this rank's slice of dim 0 (first ranks get one extra row
    when dim 0 does not divide evenly, as torch.tensor_split does)."""
    if t.dim() == 0:
        raise ConfigError("reducescatter needs a tensor with at least one dimension, got a scalar")
    full = allreduce_(g, _data(t).clone(), op, name)
    return full.tensor_split(g.place.size)[g.place.rank].clone()


def alltoall(g: Group, t: torch.Tensor, splits: Sequence[int] | None,
             name: str | None) -> tuple[torch.Tensor, list[int]]:
    """Send `splits[j]` rows of dim 0 to rank j; return what was received and from whom."""
    n = g.place.size
    t = _data(t)
    if _staged(g, t):
        out, recv = alltoall(g, t.cpu(), splits, name)
        return out.to(t.device), recv
    if t.dim() == 0:
        raise ConfigError("alltoall needs a tensor with at least one dimension, got a scalar")
    if splits is None:
        if t.shape[0] % n:
            raise ConfigError(f"alltoall: dim 0 ({t.shape[0]}) does not divide by size {n}; "
                              "pass splits=[rows for rank 0, rows for rank 1, ...]")
        send = [t.shape[0] // n] * n
    else:
        send = [int(s) for s in splits]
        if len(send) != n or any(s < 0 for s in send) or sum(send) != t.shape[0]:
            raise ConfigError(f"alltoall: splits={list(splits)} must be {n} non-negative counts "
                              f"summing to dim 0 ({t.shape[0]})")
    g.agree(ops.signature("alltoall", dtype=t.dtype, shape=t.shape, name=name))
    matrix = torch.empty(n * n, dtype=torch.int64)
    g.wait(g.pg._allgather_base(matrix, torch.tensor(send, dtype=torch.int64)))
    recv = matrix.view(n, n)[:, g.place.rank].tolist()
    rest = tuple(t.shape[1:])
    row_bytes = t[:1].numel() * t.element_size() if t.shape[0] else (
        int(torch.tensor(rest).prod().item() if rest else 1) * t.element_size())
    out = torch.empty((sum(recv),) + rest, dtype=t.dtype, device=t.device)
    if row_bytes and (sum(recv) or sum(send)):
        pg = g.nccl() if t.is_cuda else g.pg
        g.wait(pg.alltoall_base(_bytes(out).view(-1, row_bytes) if out.numel() else
                         torch.empty(0, row_bytes, dtype=torch.uint8),
                         _bytes(t).view(-1, row_bytes) if t.numel() else
                         torch.empty(0, row_bytes, dtype=torch.uint8),
                         recv, send))
    return out, recv


def barrier(g: Group) -> None:
    """Wait until every rank arrives."""
    g.agree(ops.signature("barrier"))


def _check_root(g: Group, root: int) -> None:
    if not 0 <= root < g.place.size:
        raise ConfigError(f"root={root} is not a rank of this job (size {g.place.size}); "
                          f"use 0..{g.place.size - 1}")


def _seal(obj: Any, key: bytes) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return hmac.new(key, data, hashlib.sha256).digest() + data


def _try_seal(obj: Any, key: bytes) -> tuple[bytes, Exception | None]:
    """(sealed pickle, None), or (the error's text, the error) if `obj` cannot be pickled.

    Objects are pickled before anything is sent, so a failure is announced to the peers in
    place of the data (a negative length) instead of leaving them waiting for it.
    """
    try:
        return _seal(obj, key), None
    except Exception as e:  # pickling runs arbitrary __reduce__ code: any error is possible
        return f"{type(e).__name__}: {e}"[:2000].encode(errors="replace"), e


def _unpicklable(what: str, failed: list[tuple[int, str]]) -> ConfigError:
    ranks = [r for r, _ in failed]
    detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
    return ConfigError(f"{what}: the object of rank(s) {ranks} cannot be pickled ({detail}); "
                       "pass picklable objects (no locks, sockets, open files or generators), "
                       "or send their state instead. The group is still usable")


def _open(blob: bytes, key: bytes, rank: int) -> Any:
    tag, data = blob[:32], blob[32:]
    if not hmac.compare_digest(tag, hmac.new(key, data, hashlib.sha256).digest()):
        raise CollectiveMismatch(f"object from rank {rank} failed its HMAC check; refusing to "
                                 "unpickle it (a rank of another job, or corrupted data)")
    return pickle.loads(data)


def broadcast_object(g: Group, obj: Any, root: int, key: bytes) -> Any:
    """Root's picklable object on every rank (HMAC-checked before unpickling).

    If root cannot pickle it, every rank raises ConfigError naming root and the error.
    """
    _check_root(g, root)
    is_root = g.place.rank == root
    blob, error = _try_seal(obj, key) if is_root else (b"", None)
    g.agree(ops.signature("broadcast_object", root=root))
    length = torch.tensor([-len(blob) if error else len(blob)], dtype=torch.int64)
    g.wait(g.pg.broadcast(length, root))
    n = int(length.item())
    buf = (torch.frombuffer(bytearray(blob), dtype=torch.uint8) if is_root
           else torch.empty(abs(n), dtype=torch.uint8))
    g.wait(g.pg.broadcast(buf, root))
    if n < 0:
        reason = buf.numpy().tobytes().decode(errors="replace")
        raise _unpicklable("broadcast_object", [(root, reason)]) from error
    return obj if is_root else _open(buf.numpy().tobytes(), key, root)


def allgather_object(g: Group, obj: Any, key: bytes) -> list[Any]:
    """Every rank's picklable object, in rank order (HMAC-checked before unpickling).

    If any rank cannot pickle its object, every rank raises ConfigError naming those ranks.
    """
    blob, error = _try_seal(obj, key)
    g.agree(ops.signature("allgather_object"))
    sizes = torch.empty(g.place.size, dtype=torch.int64)
    g.wait(g.pg._allgather_base(sizes, torch.tensor([-len(blob) if error else len(blob)],
                                                    dtype=torch.int64)))
    lengths = [abs(n) for n in sizes.tolist()]
    top = max(lengths)
    mine = torch.zeros(top, dtype=torch.uint8)
    mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    out = torch.empty(top * g.place.size, dtype=torch.uint8)
    g.wait(g.pg._allgather_base(out, mine))
    raw = out.numpy().tobytes()
    parts = [raw[r * top: r * top + n] for r, n in enumerate(lengths)]
    failed = [(r, parts[r].decode(errors="replace")) for r, n in enumerate(sizes.tolist())
              if n < 0]
    if failed:
        raise _unpicklable("allgather_object", failed) from error
    return [obj if r == g.place.rank else _open(parts[r], key, r) for r in range(g.place.size)]
