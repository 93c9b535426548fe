"""Alpha-beta cost model of allreduce across hosts: flat ring vs hierarchical.

A message of b bytes over one link costs alpha + b * beta (alpha: per-message latency, beta:
seconds per byte, 1 / link rate). With H hosts of L ranks (n = H * L) and S bytes per rank:

* flat ring over all n ranks: 2(n-1) steps, each moving S/n bytes over every ring edge; edges
  that leave a host share its one link, but a ring packed host by host has one outgoing
  cross-host edge per host, so the host link carries 2(n-1)/n * S bytes:
      t_flat = 2(n-1) * alpha + 2(n-1)/n * S * beta
* hierarchical: a shared-memory reduce-scatter and allgather inside each host (t_local, measured
  separately), and L cross-host rings of H ranks each on S/L bytes, running at once on the same
  host link, so it carries L * 2(H-1)/H * S/L = 2(H-1)/H * S bytes:
      t_hier = 2(H-1) * alpha + 2(H-1)/H * S * beta + t_local

The link limit is the bandwidth term of the hierarchical algorithm alone: the bytes each host
must send for any allreduce (2(H-1)/H * S) at the link rate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Link:
    """One host's link: per-message latency (s) and rate (bytes/s)."""

    alpha: float
    rate: float

    @property
    def beta(self) -> float:
        return 1.0 / self.rate


def flat_ring(size: int, hosts: int, per_host: int, link: Link) -> float:
    """Predicted seconds for a flat ring allreduce of `size` bytes per rank."""
    n = hosts * per_host
    if n < 2:
        return 0.0
    return 2 * (n - 1) * link.alpha + 2 * (n - 1) / n * size * link.beta


def hierarchical(size: int, hosts: int, per_host: int, link: Link, local: float = 0.0) -> float:
    """Predicted seconds for the hierarchical allreduce (`local`: the shared-memory part)."""
    if hosts < 2:
        return local
    return 2 * (hosts - 1) * link.alpha + 2 * (hosts - 1) / hosts * size * link.beta + local


def link_limit(size: int, hosts: int, link: Link) -> float:
    """Seconds the bytes each host must send take at the link rate (no latency, no compute)."""
    return 2 * (hosts - 1) / hosts * size * link.beta if hosts > 1 else 0.0


def busbw(size: int, seconds: float, n: int) -> float:
    """nccl-tests bus bandwidth in bytes/s: algbw * 2(n-1)/n."""
    return size / seconds * 2 * (n - 1) / n if seconds > 0 else float("inf")


def fit_alpha(small_size: int, seconds: float, hosts: int, per_host: int, rate: float) -> float:
    """Latency that makes the flat-ring model match one measurement of a small message."""
    n = hosts * per_host
    steps = 2 * (n - 1)
    if steps == 0:
        return 0.0
    return max(0.0, (seconds - 2 * (n - 1) / n * small_size / rate) / steps)
