"""Fusion buckets: how gradients are grouped into a few large flat buffers for reduction.

Buckets are built once from the parameters in reverse registration order (the order backward
usually produces gradients, as in DDP), split by dtype and capped in bytes. The layout depends only
on the parameters' order, shapes and dtypes, so every rank builds the same buckets and issues the
same collectives in the same order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("phalanx.train")


@dataclass(kw_only=True, slots=True)
class Bucket:
    """A group of same-dtype parameters reduced together as one flat buffer."""

    index: int
    """Position in the fixed launch order (every rank launches bucket 0, then 1, ...)."""

    params: list[torch.Tensor]
    """The parameters packed into this bucket, in packing order."""

    names: list[str]
    """Their names, for error messages and per-parameter views."""

    offsets: list[int]
    """Start of each parameter's slice in the flat buffer."""

    numel: int
    """Total number of gradient elements (the presence flags are not counted)."""

    dtype: torch.dtype
    """The dtype of every parameter (and of the flat buffer)."""

    buffer: torch.Tensor | None = field(default=None)
    """Flat buffer of `numel + len(params)` elements: gradients, then one presence flag per
    parameter (1 where this rank produced a gradient). Allocated on first use."""

    views: list[torch.Tensor] = field(default_factory=list)
    """Each parameter's slice of `buffer`, shaped like the parameter (made with the buffer)."""

    home: Any = field(default=None)
    """The `SharedBuffers` the CPU buffer lives in (None: private memory)."""

    def flat(self, device: torch.device, home: Any = None) -> torch.Tensor:
        """The bucket's flat buffer, allocated once, and again when `home` (the current
        group's `comm.shmbuf.SharedBuffers`, for a buffer peers reduce in place) changes."""
        home = home if device.type == "cpu" else None
        if (self.buffer is None or self.buffer.device != device
                or (home is not None and home is not self.home)):
            n = self.numel + len(self.params)
            self.buffer = _shared(home, n, self.dtype, self.index) if home is not None else None
            if self.buffer is None:
                self.buffer = torch.empty(n, dtype=self.dtype, device=device)
            self.home = home
            self.views = [self.buffer[o:o + p.numel()].view_as(p)
                          for o, p in zip(self.offsets, self.params)]
        return self.buffer

    def holds(self, j: int) -> bool:
        """Whether parameter j's gradient already is its view into the buffer."""
        return _is_view(self.params[j].grad, self.views[j])

    def adopt(self, home: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-copy packing (DDP's `gradient_as_bucket_view`): make every gradient a view into
        the buffer, copying in (one fused copy) only those that live elsewhere: a fresh
        gradient after `zero_grad(set_to_none=True)`, one the user replaced, or one left in
        the buffer of an earlier `home`. Zeros where there is no gradient. Returns views
        (gradients, presence flags), as `pack` does."""
        buf = self.flat(self.params[0].device, home)
        grads, presence = buf[:self.numel], buf[self.numel:]
        present: list[float] = []
        zeros: list[torch.Tensor] = []
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        for j, p in enumerate(self.params):
            g, v = p.grad, self.views[j]
            if g is None:
                zeros.append(v)
                present.append(0.0)
                continue
            present.append(1.0)
            if g.is_sparse:                  # reduced dense; p.grad stays sparse until hand_back
                dsts.append(v)
                srcs.append(g.to_dense())
                continue
            if _is_view(g, v):
                continue                     # accumulated in place: already in the bucket
            dsts.append(v)
            srcs.append(g)
            p.grad = v
        if zeros:
            torch._foreach_zero_(zeros)
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        presence.copy_(torch.tensor(present, dtype=self.dtype))
        return grads, presence

    def hand_back(self, presence: torch.Tensor) -> None:
        """After an in-place reduction of adopted gradients: a parameter without a local
        gradient gets its view if any rank produced one (None stays None otherwise), and a
        sparse one its dense view, which is what `unpack` leaves, without copying anything."""
        present = (presence > 0).tolist()
        for p, v, has in zip(self.params, self.views, present):
            if (p.grad is None and has) or (p.grad is not None and p.grad.is_sparse):
                p.grad = v

    def drop(self) -> None:
        """Forget gradients that are views into the buffer (after a failed in-place reduction
        left them partly reduced)."""
        for j, p in enumerate(self.params):
            if self.views and self.holds(j):
                p.grad = None

    def pack(self, home: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy each parameter's gradient (zeros where it has none; sparse made dense) into the
        buffer with one fused copy; returns views (gradients, presence flags)."""
        device = self.params[0].device
        buf = self.flat(device, home)
        grads, presence = buf[:self.numel], buf[self.numel:]
        srcs: list[torch.Tensor] = []
        present: list[float] = []
        for p in self.params:
            g = p.grad
            if g is None:
                srcs.append(torch.zeros(p.numel(), dtype=self.dtype, device=device))
                present.append(0.0)
                continue
            if g.is_sparse:
                g = g.to_dense()
            srcs.append(g.reshape(-1))
            present.append(1.0)
        torch.cat(srcs, out=grads)
        presence.copy_(torch.tensor(present, dtype=self.dtype))
        return grads, presence

    def unpack(self, grads: torch.Tensor, presence: torch.Tensor) -> None:
        """Write reduced gradients back into `p.grad` (one fused copy); a parameter no rank
        produced a gradient for keeps `grad=None`, as it would in one process."""
        present = (presence > 0).tolist()
        views = grads.split([p.numel() for p in self.params])
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        for p, src, has in zip(self.params, views, present):
            src = src.view_as(p)
            if p.grad is not None and not p.grad.is_sparse:
                dsts.append(p.grad)
                srcs.append(src)
            elif has:
                p.grad = src.clone()
        if dsts:
            torch._foreach_copy_(dsts, srcs)


def _shared(home: Any, n: int, dtype: torch.dtype, index: int) -> torch.Tensor | None:
    """A buffer in `home`'s shared memory, or None (with a warning) where it does not fit."""
    try:
        return home.empty(n, dtype)  # type: ignore[no-any-return]
    except OSError as e:
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        log.warning("DistributedOptimizer: bucket %d (%d bytes) does not fit in shared memory "
                    "(%s): it reduces through the copy path instead; give /dev/shm more room "
                    "(e.g. docker run --shm-size=2g) to reduce in place", index, nbytes, e)
        return None


def _is_view(g: torch.Tensor | None, v: torch.Tensor) -> bool:
    """Whether gradient `g` is the bucket view `v` (same storage, same shape)."""
    return (g is not None and not g.is_sparse and g.data_ptr() == v.data_ptr()
            and g.shape == v.shape)


def build_buckets(named_params: list[tuple[str, torch.Tensor]],
                  cap_bytes: int) -> list[Bucket]:
    """Group parameters into buckets of at most `cap_bytes` (a single larger parameter gets its
    own bucket), walking `named_params` in reverse and keeping one open bucket per dtype."""
    buckets: list[Bucket] = []
    open_: dict[torch.dtype, Bucket] = {}
    for name, p in reversed(named_params):
        nbytes = p.numel() * p.element_size()
        b = open_.get(p.dtype)
        if b is not None and b.params and (b.numel * p.element_size() + nbytes > cap_bytes):
            b = None
        if b is None:
            b = Bucket(index=len(buckets), params=[], names=[], offsets=[], numel=0,
                       dtype=p.dtype)
            buckets.append(b)
            open_[p.dtype] = b
        b.params.append(p)
        b.names.append(name)
        b.offsets.append(b.numel)
        b.numel += p.numel()
    return buckets


def layout_mismatch(layouts: list[list[tuple[str, tuple[int, ...], str]]]) -> str:
    """Message naming the parameters whose presence, shape or dtype differs between ranks
    (`layouts[r]` lists rank r's (name, shape, dtype) in bucket order)."""
    names = sorted({n for layout in layouts for n, _, _ in layout})
    per_rank = [{n: (shape, dtype) for n, shape, dtype in layout} for layout in layouts]
    problems: list[str] = []
    for name in names:
        seen: dict[object, list[int]] = {}
        for r, params in enumerate(per_rank):
            seen.setdefault(params.get(name), []).append(r)
        if len(seen) == 1:
            continue
        parts = [f"missing on rank(s) {ranks}" if desc is None else
                 f"shape {desc[0]} {desc[1].replace('torch.', '')} on rank(s) {ranks}"  # type: ignore[index]
                 for desc, ranks in seen.items()]
        problems.append(f"{name!r}: " + "; ".join(parts))
    if not problems:
        problems.append("the same parameters in a different order")
    shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
    return ("DistributedOptimizer: ranks hold different parameters, so their gradient buckets "
            "do not line up: " + ", ".join(shown) + ". Every rank must wrap the same model "
            "(same parameters, shapes and dtypes, registered in the same order)")
