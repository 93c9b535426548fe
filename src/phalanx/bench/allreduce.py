"""`phalanx bench allreduce`: phalanx's allreduce against raw Gloo and the transport's limit.

On one host (`-np N`) the same worker processes time, per size, phalanx's default path
(shared memory), a raw torch.distributed Gloo allreduce, and a raw TCP ring moving the bytes a
ring allreduce must move (the transport limit, with no arithmetic).

Across hosts (`-H a:2,b:2` or `--hostfile`, agents started over SSH as `phalanx run` does) they
time phalanx's hierarchical path (shared memory inside each host, one cross-host Gloo group per
local rank), phalanx's flat Gloo path, raw Gloo, the raw TCP ring, and the shared-memory part of
the hierarchical path alone. With `--link-gbit` (each host link's rate) the table adds the link
limit (the bytes each host must send, 2(H-1)/H * size, at that rate) and the alpha-beta model's
prediction for both algorithms (`phalanx.bench.costmodel`; alpha fitted to raw Gloo's smallest
size, the shared-memory part measured).

busbw is the nccl-tests bus bandwidth, algbw * 2(n-1)/n over all n ranks, in GB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import BinaryIO

from ..launch.supervisor import RunConfig, Supervisor
from . import costmodel as cm
from . import plots

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allreduce_worker.py")
DEFAULT_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M,256M"
HOST_SIZES = "4K,64K,1M,4M,16M,64M"
RESULT = "phalanx-bench-result: "
"""Prefix of the one stdout line that carries rank 0's results to the launcher (which may
share no file system with rank 0's host)."""


def parse_size(text: str) -> int:
    """'64M' -> 67108864 bytes; a bad value raises ValueError naming it."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().rstrip("B")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise ValueError(f"size {text!r} is not like 4K, 64M or 1048576") from None


class ResultTee:
    """The launcher's stdout: passes worker output through, keeps rank 0's result line."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.result: dict | None = None

    def write(self, data: bytes) -> int:
        for line in data.splitlines(keepends=True):
            _, mark, rest = line.partition(RESULT.encode())
            if mark:
                self.result = json.loads(rest)
            else:
                self._stream.write(line)
        return len(data)

    def flush(self) -> None:
        self._stream.flush()


def _label(size: int) -> str:
    return f"{size >> 20}M" if size >= 1 << 20 else f"{size >> 10}K"


def add_derived(result: dict, link_gbit: float | None) -> None:
    """Fill in busbw per path and, with a link rate, the link limit and the model."""
    n, hosts = result["np"], result["hosts"]
    per_host = n // hosts
    link = None
    if link_gbit and hosts > 1 and result["rows"]:
        rate = link_gbit * 1e9 / 8
        first = result["rows"][0]
        alpha = cm.fit_alpha(first["bytes"], first["gloo_us"] / 1e6, hosts, per_host, rate)
        link = cm.Link(alpha=alpha, rate=rate)
        result["link"] = {"gbit": link_gbit, "alpha_us": alpha * 1e6}
    for row in result["rows"]:
        size = row["bytes"]
        for path in result["paths"]:
            row[f"{path}_busbw"] = cm.busbw(size, row[f"{path}_us"] / 1e6, n) / 1e9
        if link is not None:
            local = row.get("local_us", 0.0) / 1e6
            row["limit_us"] = cm.link_limit(size, hosts, link) * 1e6
            row["limit_busbw"] = cm.busbw(size, row["limit_us"] / 1e6, n) / 1e9
            row["model_hier_us"] = cm.hierarchical(size, hosts, per_host, link, local) * 1e6
            row["model_flat_us"] = cm.flat_ring(size, hosts, per_host, link) * 1e6


def format_table(result: dict) -> str:
    """The human table: one row per size; what each column means is printed under it."""
    n, hosts, paths = result["np"], result["hosts"], result["paths"]
    names = {"phalanx": "hier" if result["phalanx_path"] == "hier" else "phalanx"}
    cols = [(f"{names.get(p, p)} us", f"{p}_us", 10) for p in paths]
    cols += [(f"{names.get(p, p)} bw", f"{p}_busbw", 8) for p in paths if p != "local"]
    if "link" in result:
        cols += [("limit bw", "limit_busbw", 8), ("model hier", "model_hier_us", 10),
                 ("model flat", "model_flat_us", 10)]
    head = f"{'size':>6} " + " ".join(f"{c[0]:>{c[2]}}" for c in cols)
    ratio = "flat" if "flat" in paths else "gloo"
    head += f" {names['phalanx'] + '/' + ratio:>12}"
    if "link" in result:
        head += f" {'of limit':>8}"
    title = (f"allreduce, {n} ranks on {hosts} host(s), float32; phalanx path: "
             f"{result['phalanx_path']}")
    lines = [title, head, "-" * len(head)]
    for r in result["rows"]:
        line = f"{_label(int(r['bytes'])):>6} " + " ".join(
            f"{r[c[1]]:>{c[2]}.{1 if c[1].endswith('_us') else 3}f}" for c in cols)
        line += f" {r['phalanx_busbw'] / r[f'{ratio}_busbw']:>11.2f}x"
        if "link" in result:
            line += f" {r['phalanx_busbw'] / r['limit_busbw']:>7.0%}"
        lines.append(line)
    lines.append(_legend(result))
    return "\n".join(lines)


def _legend(result: dict) -> str:
    text = ["columns: us = median microseconds per allreduce; bw = busbw, GB/s (algbw * 2(n-1)/n)",
            ("  phalanx/hier: px.allreduce_ on the path phalanx picks (across hosts: the "
             "hierarchical one at every size; 'auto' takes it from PHALANX_HIER_MIN_BYTES, 4 MiB)"),
            "  flat: phalanx's flat Gloo path",
            "  local: the hierarchical path's shared-memory part alone",
            "  gloo: raw torch.distributed Gloo; tcp: raw TCP ring moving a flat ring's bytes"]
    if "link" in result:
        lk = result["link"]
        text.append(f"  limit: each host's 2(H-1)/H * size bytes at {lk['gbit']:g} Gbit/s; "
                    f"model: alpha-beta (alpha {lk['alpha_us']:.0f} us fitted to raw Gloo's "
                    "smallest size, beta = 1/link rate, shared-memory part measured)")
    return "\n".join(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phalanx bench allreduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-np", "--np", type=int, default=None,
                   help="ranks (default 2, or every slot of -H)")
    p.add_argument("-H", "--hosts", default=None, metavar="HOST:SLOTS,...",
                   help="run across these hosts (agents over SSH, as phalanx run -H)")
    p.add_argument("--hostfile", default=None, help="hosts from a 'HOST slots=N' file")
    p.add_argument("--ssh-config", default=None, help="ssh_config file for reaching the hosts")
    p.add_argument("--link-gbit", type=float, default=None,
                   help="each host link's rate in Gbit/s: adds the link limit and the model")
    p.add_argument("--sizes", default=None,
                   help=f"comma list (default {DEFAULT_SIZES}; across hosts {HOST_SIZES})")
    p.add_argument("--min-time", type=float, default=0.5,
                   help="seconds to spend timing each size and path (default 0.5)")
    p.add_argument("--algo", default="auto", choices=["auto", "shm", "hier", "gloo"],
                   help="phalanx's allreduce path (default auto)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw bus bandwidth vs size per path "
                   "(needs matplotlib)")
    return p


def _hosts(a: argparse.Namespace, p: argparse.ArgumentParser) -> tuple[list, str]:
    if not (a.hosts or a.hostfile):
        return [], "127.0.0.1"
    from ..launch.hosts import is_local, parse_hostfile, parse_hosts, place, route_address
    try:
        if a.hosts:
            entries = parse_hosts(a.hosts)
        else:
            with open(a.hostfile) as f:
                entries = parse_hostfile(f.read(), a.hostfile)
        a.np = a.np or sum(k for _, k in entries)
        hosts = place(entries, a.np)
        remote = [h.name for h in hosts if not is_local(h.name)]
        return hosts, route_address(remote[0]) if remote else "127.0.0.1"
    except (OSError, ValueError) as e:
        p.error(str(e))
        raise


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    hosts, bind = _hosts(a, p)
    a.np = a.np or 2
    if a.np < 2:
        p.error(f"-np must be at least 2 for a bandwidth benchmark, got {a.np}")
    if a.link_gbit is not None and not a.link_gbit > 0:
        p.error(f"--link-gbit must be a positive rate in Gbit/s, got {a.link_gbit}")
    try:
        sizes = [parse_size(s) for s in (a.sizes or (HOST_SIZES if hosts else DEFAULT_SIZES))
                 .split(",") if s]
    except ValueError as e:
        p.error(str(e))
    plots.check_plot_arg(p, a.plot)
    names = {h.name for h in hosts}
    uniform = len(names) > 1 and len({h.slots for h in hosts}) == 1 and hosts[0].slots > 1
    paths = (["phalanx", "flat"] + (["local"] if uniform and a.algo in ("auto", "hier") else [])
             + ["gloo", "tcp"]) if len(names) > 1 else ["phalanx", "gloo", "tcp"]
    cfg = RunConfig(np=a.np, script=WORKER, args=[
        "--sizes", ",".join(map(str, sizes)), "--paths", ",".join(paths),
        "--min-time", str(a.min_time)],
        # Across hosts, time the hierarchical path at every size ('auto' would send the small
        # sizes flat, below PHALANX_HIER_MIN_BYTES), so the table shows where it pays.
        extra_env={"PHALANX_ALLREDUCE": "hier" if uniform and a.algo == "auto" else a.algo,
                   "PHALANX_SHM_MAX_BYTES": str(64 << 20)},
        timeout=120, hosts=hosts, ssh_config=a.ssh_config, bind=bind)
    out = ResultTee(sys.stdout.buffer)
    rc = Supervisor(cfg, out=out).run()  # type: ignore[arg-type]
    if rc != 0 or out.result is None:
        sys.stderr.write(f"phalanx bench allreduce: the benchmark job failed (exit {rc})\n")
        return rc or 1
    result = out.result
    add_derived(result, a.link_gbit)
    print(format_table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.json}")
    if a.plot:
        print(f"wrote {plots.allreduce(result, a.plot)}")
    return 0
