"""`phalanx bench goodput --plot FILE.png`: ETTR vs N per strategy, one panel per failure rate,
and the steps from phalanx today to phalanx with issue 22's control plane at the largest N.
matplotlib is imported only here (through bench/plots.py's helpers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plots import _pyplot, _save

LABELS = {"phalanx": "phalanx (today; measured to 256, extrapolated)",
          "phalanx-target": "phalanx (issue 22 control plane)",
          "torchft": "torchft-style", "inprocess": "in-process restart (NVRx-style)",
          "ckpt-restart": "checkpoint-restart (torchrun-style)"}
STYLE = {"phalanx": ("C0", "o", "-"), "phalanx-target": ("C0", "o", "--"),
         "torchft": ("C1", "s", "-"), "inprocess": ("C2", "^", "-"),
         "ckpt-restart": ("C3", "v", "-")}
RATE_TITLES = {"llama3": "Llama 3 failure rate (4.7e-4 / GPU-day)",
               "ant": "Ant Group failure rate (2.7e-3 / GPU-day)"}


def goodput(result: dict[str, Any], path: str | Path) -> Path:
    """ETTR vs N (log) per strategy and failure rate, the 95% goal, and the waterfall."""
    plt = _pyplot()
    by_rate = result["ettr_by_rate"]
    cols = len(by_rate)
    fig = plt.figure(figsize=(5.6 * cols, 7.6))
    grid = fig.add_gridspec(2, cols, height_ratios=(3, 1.3))
    axes = [fig.add_subplot(grid[0, i]) for i in range(cols)]
    for ax, (rate, table) in zip(axes, by_rate.items()):
        for name, row in table.items():
            ns = sorted(int(n) for n in row)
            color, marker, ls = STYLE.get(name, ("k", ".", "-"))
            ax.plot(ns, [row[str(n)] for n in ns], marker=marker, ls=ls, color=color,
                    label=LABELS.get(name, name))
        ax.axhline(0.95, color="grey", lw=0.8, ls=":")
        ax.text(ns[-1], 0.94, "goal 95%", color="grey", fontsize=8, va="top", ha="right")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("accelerators (N)")
        ax.set_ylabel("ETTR (effective training time ratio)")
        ax.set_title(RATE_TITLES.get(rate, rate), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="center left")
    _waterfall(fig.add_subplot(grid[1, :]), result)
    return _save(fig, path)


def _waterfall(ax: Any, result: dict[str, Any]) -> None:
    rows = result["waterfall"]
    labels = [r["step"] for r in rows]
    ys = range(len(rows))
    vals = [r["ettr"] for r in rows]
    ax.barh(list(ys), vals, color=["C3" if v < 0.95 else "C2" for v in vals])
    for y, v in zip(ys, vals):
        ax.text(min(v, 0.82) + 0.01, y, f"{100 * v:.1f}%", va="center", fontsize=9)
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.95, color="grey", lw=0.8, ls=":")
    ax.set_xlim(0, 1)
    ax.set_xlabel("phalanx ETTR")
    ax.set_title(f"phalanx at N = {result['config']['largest_n']:,}, Llama 3 rate: "
                 "what to fix", fontsize=10)
