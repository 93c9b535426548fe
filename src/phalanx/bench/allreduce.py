"""`phalanx bench allreduce`: phalanx's default path vs raw Gloo vs raw TCP, in one run.

The same worker processes time, for each size, (a) `phalanx.allreduce_` (shared memory on one
host, Gloo across hosts), (b) a raw `torch.distributed` Gloo allreduce, and (c) a raw TCP ring
exchange moving the bytes a ring allreduce must move (the transport limit, with no reduction).
Bus bandwidth uses the nccl-tests formula: algbw * 2(n-1)/n.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

from ..launch.supervisor import RunConfig, Supervisor

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allreduce_worker.py")
DEFAULT_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M,256M"


def parse_size(text: str) -> int:
    """'64M' -> 67108864 bytes; a bad value raises ValueError naming it."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().rstrip("B")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise ValueError(f"size {text!r} is not like 4K, 64M or 1048576") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_table(rows: list[dict[str, float]], n: int) -> str:
    """The human table: one row per size, time per op (us) and busbw (GB/s) per path."""
    head = (f"allreduce, {n} ranks, float32 (busbw = algbw * 2(n-1)/n, GB/s)\n"
            f"{'size':>8} | {'phalanx us':>10} {'busbw':>7} | {'gloo us':>10} {'busbw':>7} | "
            f"{'tcp us':>10} {'busbw':>7} | {'px/gloo':>7} {'px/tcp':>6}")
    lines = [head, "-" * len(head.splitlines()[1])]
    for r in rows:
        size = int(r["bytes"])
        label = f"{size >> 20}M" if size >= 1 << 20 else f"{size >> 10}K"
        lines.append(
            f"{label:>8} | {r['phalanx_us']:>10.1f} {r['phalanx_busbw']:>7.2f} | "
            f"{r['gloo_us']:>10.1f} {r['gloo_busbw']:>7.2f} | {r['tcp_us']:>10.1f} "
            f"{r['tcp_busbw']:>7.2f} | {r['phalanx_busbw'] / r['gloo_busbw']:>6.2f}x "
            f"{r['phalanx_busbw'] / r['tcp_busbw']:>5.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="phalanx bench allreduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-np", "--np", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma list (default {DEFAULT_SIZES})")
    p.add_argument("--min-time", type=float, default=0.5,
                   help="seconds to spend timing each size and path (default 0.5)")
    p.add_argument("--algo", default="auto", choices=["auto", "shm", "gloo"],
                   help="phalanx's allreduce path (default auto)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = p.parse_args(argv)
    if a.np < 2:
        p.error(f"-np must be at least 2 for a bandwidth benchmark, got {a.np}")
    try:
        sizes = [parse_size(s) for s in a.sizes.split(",") if s]
    except ValueError as e:
        p.error(str(e))
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-") as tmp:
        out_file = os.path.join(tmp, "result.json")
        cfg = RunConfig(np=a.np, script=WORKER, args=[
            "--sizes", ",".join(map(str, sizes)), "--min-time", str(a.min_time),
            "--gloo-port", str(_free_port()), "--tcp-port", str(_free_port()), "--out", out_file],
            extra_env={"PHALANX_ALLREDUCE": a.algo, "PHALANX_SHM_MAX_BYTES": str(64 << 20)},
            timeout=120)
        rc = Supervisor(cfg).run()
        if rc != 0 or not os.path.exists(out_file):
            sys.stderr.write(f"phalanx bench allreduce: the benchmark job failed (exit {rc})\n")
            return rc or 1
        with open(out_file) as f:
            result = json.load(f)
    print(format_table(result["rows"], a.np))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.json}")
    return 0
