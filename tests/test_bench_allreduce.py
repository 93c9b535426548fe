"""`phalanx bench allreduce` on one host and across simulated hosts, and its cost model.

Speed is never asserted here (BENCHMARKS.md records it); these check that every path runs, the
result carries what the table and the model need, and the model's algebra.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from phalanx.bench import costmodel as cm
from simhosts import simhosts  # noqa: F401 - the fixture

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}
MB64 = 64 << 20


def test_cost_model_against_hand_computed_values() -> None:
    link = cm.Link(alpha=1e-3, rate=250e6)          # 2 Gbit/s, 1 ms per message
    # 2 hosts x 2 ranks, 64 MiB: a flat ring crosses each host link with 1.5x the data,
    # the hierarchical algorithm with 1x, in 6 and 2 latency steps.
    assert cm.flat_ring(MB64, 2, 2, link) == pytest.approx(6e-3 + 1.5 * MB64 / 250e6)
    assert cm.hierarchical(MB64, 2, 2, link, local=0.05) == pytest.approx(
        2e-3 + MB64 / 250e6 + 0.05)
    assert cm.link_limit(MB64, 2, link) == pytest.approx(MB64 / 250e6)
    # 3 hosts x 4: flat 2*11/12, hierarchical 2*2/3 of the data per link
    assert cm.flat_ring(MB64, 3, 4, link) == pytest.approx(22e-3 + 22 / 12 * MB64 / 250e6)
    assert cm.hierarchical(MB64, 3, 4, link) == pytest.approx(4e-3 + 4 / 3 * MB64 / 250e6)
    assert cm.busbw(MB64, 1.0, 4) == pytest.approx(MB64 * 1.5)
    # fitting alpha to a flat-ring time gives the alpha back
    t = cm.flat_ring(4096, 2, 2, link)
    assert cm.fit_alpha(4096, t, 2, 2, 250e6) == pytest.approx(1e-3)
    assert cm.hierarchical(MB64, 1, 4, link, local=0.01) == 0.01   # one host: memory only


def _bench(*args: str, timeout: float = 240) -> dict:
    out = subprocess.run([sys.executable, "-m", "phalanx.launch.cli", "bench", "allreduce",
                          *args, "--min-time", "0.05", "--json", "/dev/stdout"],
                         env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    start = out.stdout.index("{\n")                # the JSON after the table
    return json.loads(out.stdout[start:out.stdout.rindex("}") + 1]), out.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_allreduce_one_host() -> None:
    result, text = _bench("-np", "2", "--sizes", "4K,64K")
    assert result["phalanx_path"] == "shm" and result["paths"] == ["phalanx", "gloo", "tcp"]
    assert [r["bytes"] for r in result["rows"]] == [4096, 65536]
    for r in result["rows"]:
        assert all(r[f"{p}_us"] > 0 and r[f"{p}_busbw"] > 0 for p in result["paths"])
    assert "columns:" in text and "phalanx/gloo" in text


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_allreduce_across_shaped_hosts(simhosts) -> None:  # noqa: F811
    hosts = simhosts(2, rate="2gbit")
    spec = ",".join(f"{h.addr}:2" for h in hosts)
    result, text = _bench("-H", spec, "--ssh-config", str(hosts.ssh_config), "--link-gbit", "2",
                          "--sizes", "4K,1M")
    assert result["phalanx_path"] == "hier" and result["hosts"] == 2 and result["np"] == 4
    assert result["paths"] == ["phalanx", "flat", "local", "gloo", "tcp"]
    assert result["link"]["gbit"] == 2
    for r in result["rows"]:
        assert r["limit_us"] == pytest.approx(r["bytes"] / 250e6 * 1e6)
        assert r["model_hier_us"] > 0 and r["model_flat_us"] > 0
        assert all(r[f"{p}_us"] > 0 for p in result["paths"])
    assert "hier/flat" in text and "of limit" in text and "model:" in text
