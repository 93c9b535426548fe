"""`phalanx bench control-plane --in-process N`: the coordinator's own cost at sizes this
machine cannot run for real (100,000 workers need 100,000 sockets and processes to drive them).

A `Membership` (the coordinator's state machine, no sockets) takes N joins and N rendezvous,
forms the first generation, answers every worker's assignment and a heartbeat, loses one
worker and re-forms among the rest. It reports the CPU time of each step and the size of every
message against the protocol's limits, so a limit that a job of N workers would hit shows up
here first. The network, the HMAC of each frame and the workers' side are not in these numbers:
the socket runs (`--workers`) measure those.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from ..config import HEARTBEAT_TIMEOUT
from ..coord.membership import Membership
from ..coord.protocol import MAX_HEADER, MAX_PAYLOAD, PREFIX_BYTES, TAG_BYTES
from ..coord.waits import Wait


def _frame_bytes(header: dict[str, Any], payload: bytes) -> tuple[int, int]:
    head = len(json.dumps(header, separators=(",", ":")).encode())
    return head, len(payload)


def _rendezvous_all(m: Membership, ids: list[str], after: int) -> None:
    for w in ids:
        answer = m.handle("rendezvous", {"worker": w, "after": after, "step": -1,
                                         "timeout": 600.0}, b"")
        if not isinstance(answer, Wait):
            raise RuntimeError(f"rendezvous of {w} answered before forming: {answer[0]}")


def _form(m: Membership, generation: int) -> float:
    """Seconds until generation `generation` forms (formation attempts as the server's loop
    makes them, once per pass)."""
    t0 = time.perf_counter()
    while m.world is None or m.world.generation < generation:
        m._last_form_try = 0.0  # in-process: no loop passes to space the attempts out
        m.form_if_due()
        if m.world is None or m.world.generation < generation:
            m.tick()
    return time.perf_counter() - t0


def costs(n: int, per_host: int) -> dict[str, Any]:
    """One in-process run for N workers (see the module docstring)."""
    m = Membership(target_np=n, min_np=max(1, n - per_host - 1), max_np=n,
                   heartbeat_timeout=HEARTBEAT_TIMEOUT, settle=1.0, fence=None, stopped_timeout=0.3,
                   probe_stopped=None, stop=threading.Event())
    m.quiet()
    ids = [f"h{i // per_host}-w{i % per_host}" for i in range(n)]
    t0 = time.perf_counter()
    for i, w in enumerate(ids):
        m.handle("join", {"worker": w, "host": f"sim{i // per_host}", "rank_hint": -1,
                          "pid": 10_000 + i}, b"")
    t_join = time.perf_counter() - t0
    t0 = time.perf_counter()
    _rendezvous_all(m, ids, 0)
    t_rdv = time.perf_counter() - t0
    t_form = _form(m, 1)
    t0 = time.perf_counter()
    replies = [m._placed(m.members[w], 0) for w in ids]
    t_assign = time.perf_counter() - t0
    sizes = [_frame_bytes(*r) for r in replies if r is not None]
    head_max = max(h for h, _ in sizes)
    payload = max(p for _, p in sizes)
    beat = m.handle("heartbeat", {"worker": ids[1], "generation": 1, "step": 0, "hold": 0.0},
                    b"")
    t0 = time.perf_counter()
    m.declare_lost(ids[0], "in-process bench")
    beat_after = m.handle("heartbeat", {"worker": ids[1], "generation": 1, "step": 0,
                                        "hold": 0.0}, b"")
    t_news = time.perf_counter() - t0
    t0 = time.perf_counter()
    _rendezvous_all(m, ids[1:], 1)
    t_reform = time.perf_counter() - t0 + _form(m, 2)
    per_frame = PREFIX_BYTES + TAG_BYTES
    return {
        "workers": n, "join_s": round(t_join, 4), "rendezvous_s": round(t_rdv, 4),
        "form_s": round(t_form, 4), "assign_all_s": round(t_assign, 4),
        "assignment_header_max_b": head_max, "roster_payload_b": payload,
        "formation_bytes_mb": round(sum(h + p + per_frame for h, p in sizes) / 1e6, 2),
        "status_reply_b": _frame_bytes(*beat)[0],  # type: ignore[misc]
        "status_after_loss_b": _frame_bytes(*beat_after)[0],  # type: ignore[misc]
        "loss_to_status_s": round(t_news, 5), "reform_s": round(t_reform, 4),
        "within_limits": head_max <= MAX_HEADER and payload <= MAX_PAYLOAD,
    }


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of the in-process costs."""
    out = ["| workers | joins (s) | rendezvous (s) | form (s) | all assignments (s) | "
           "assignment header (B) | roster payload (B) | bytes per formation (MB) | "
           "status reply (B) | loss -> status (s) | re-form (s) | within limits |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['workers']} | {r['join_s']:.3f} | {r['rendezvous_s']:.3f} | "
                   f"{r['form_s']:.3f} | {r['assign_all_s']:.3f} | "
                   f"{r['assignment_header_max_b']} | {r['roster_payload_b']} | "
                   f"{r['formation_bytes_mb']:.1f} | {r['status_reply_b']} | "
                   f"{r['loss_to_status_s']:.4f} | {r['reform_s']:.3f} | "
                   f"{'yes' if r['within_limits'] else 'NO'} |")
    return out
