"""`phalanx bench ... --plot FILE.png`: one picture per benchmark, from its result dict.

allreduce: bus bandwidth vs message size per path (and the link limit across hosts); train:
samples/s of one process, DDP and phalanx per model, with scaling efficiency; recovery: the
job's step vs time with each injected fault marked; iterative: seconds per iteration per
system. matplotlib is an optional extra (`pip install 'phalanx[plot]'`), imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _pyplot() -> Any:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib: pip install 'phalanx[plot]' (or "
                          "pip install matplotlib)") from e
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def check_path(path: str | None) -> str | None:
    """Refuse a --plot path that cannot be written, before a long benchmark runs."""
    if path is None:
        return None
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise ConfigError(f"--plot {path!r}: give a .png file name, e.g. --plot result.png")
    if not p.resolve().parent.is_dir():
        raise ConfigError(f"--plot {path!r}: directory {str(p.resolve().parent)!r} does not "
                          "exist; create it first")
    _pyplot()
    return path


def check_plot_arg(parser: Any, path: str | None) -> None:
    """`check_path` for an argparse parser: a bad --plot ends with the parser's usage error."""
    try:
        check_path(path)
    except ConfigError as e:
        parser.error(str(e))


def allreduce(result: dict[str, Any], path: str | Path) -> Path:
    """Bus bandwidth (GB/s) vs size, one line per path; the link limit when known."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    rows = result["rows"]
    sizes = [r["bytes"] for r in rows]
    label = {"phalanx": "phalanx (hierarchical)" if result.get("phalanx_path") == "hier"
             else "phalanx", "flat": "phalanx flat", "gloo": "torch Gloo", "tcp": "raw TCP ring"}
    for p in result["paths"]:
        if p == "local":
            continue
        ax.plot(sizes, [r[f"{p}_busbw"] for r in rows], marker="o", label=label.get(p, p))
    if rows and "limit_busbw" in rows[0]:
        ax.plot(sizes, [r["limit_busbw"] for r in rows], ls="--", c="gray", label="link limit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"allreduce, {result['np']} ranks on {result['hosts']} host(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def train(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Samples/s per model for one process, DDP and phalanx (and the copy path, the Horovod
    facade, real Horovod and independent processes when they were measured), efficiency over
    the bars; with step phases, a second panel of where a step's time goes in each phalanx
    mode."""
    plt = _pyplot()
    modes = [(k, n) for k, n in (("single", "1 process"), ("ddp", "torch DDP"),
                                 ("phalanx_copy", "phalanx, copy path"), ("phalanx", "phalanx"),
                                 ("horovod", "Horovod facade"), ("horovod_real", "real Horovod"),
                                 ("independent", "independent (no comm)"))
             if rows and f"{k}_samples_per_s" in rows[0]]
    phased = [(r["model"], m, ph) for r in rows for m, ph in r.get("phases_ms", {}).items()]
    fig, axes = plt.subplots(1, 2 if phased else 1, figsize=(12 if phased else 7, 4.2),
                             squeeze=False)
    ax = axes[0, 0]
    width = 0.8 / len(modes)
    for i, (key, name) in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(rows))]
        bars = ax.bar(xs, [r[f"{key}_samples_per_s"] for r in rows], width, label=name)
        if key != "single":
            for b, r in zip(bars, rows):
                ax.annotate(f"eff {r[f'{key}_scaling_efficiency']:.2f}",
                            (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows])
    ax.set_ylabel("samples/s")
    np_ = rows[0]["np"] if rows else "?"
    ax.set_title(f"throughput, {np_} workers (eff = samples/s / (N x 1 process))", fontsize=10)
    ax.legend(fontsize=8)
    if phased:
        _phases(axes[0, 1], phased)
    return _save(fig, path)


def _phases(ax: Any, phased: list[tuple[str, str, dict[str, float]]]) -> None:
    """Stacked bars: forward+backward, wait for reductions, optimizer, boundary (ms/step)."""
    parts = (("forward_backward", "forward+backward"), ("sync", "wait for reductions"),
             ("optimizer", "optimizer step"), ("boundary", "step boundary"))
    labels = [f"{model}\n{mode}" for model, mode, _ in phased]
    bottom = [0.0] * len(phased)
    for key, name in parts:
        vals = [ph.get(key, 0.0) for _, _, ph in phased]
        ax.bar(range(len(phased)), vals, 0.6, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(phased)), labels, fontsize=8)
    ax.set_ylabel("ms per step (rank 0)")
    ax.set_title("where a step's time goes", fontsize=10)
    ax.legend(fontsize=8)


def recovery(res: dict[str, Any], path: str | Path) -> Path:
    """Step vs time of each job, with every injected fault as a vertical line."""
    plt = _pyplot()
    jobs = [j for j in ("phalanx", "torchrun") if isinstance(res.get(j), dict)
            and res[j].get("timeline")]
    fig, axes = plt.subplots(len(jobs) or 1, 1, figsize=(8, 3.2 * max(len(jobs), 1)),
                             squeeze=False)
    colors = {"SIGKILL": "tab:red", "SIGSTOP": "tab:orange"}
    for ax, job in zip(axes[:, 0], jobs):
        tl = res[job]["timeline"]
        ax.plot(tl["t"], tl["step"], ".", ms=2, label=f"{job}: steps completed")
        for f in tl["faults"]:
            ax.axvline(f["t"], c=colors.get(f["kind"], "tab:purple"), ls="--", lw=0.8)
        ax.set_ylabel("step")
        ax.set_title(f"{job}: faults marked (red SIGKILL, orange SIGSTOP)")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the job's first step")
    return _save(fig, path)


def iterative(report: dict[str, Any], path: str | Path) -> Path:
    """Seconds per iteration of each system on the same data (lower is better)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(report["results"])
    ax.barh(names, [report["results"][n]["s_per_iter"] for n in names])
    ax.set_xlabel("seconds per iteration (lower is better)")
    c = report["config"]
    ax.set_title(f"iterative logistic regression, {c['rows']:,} rows x {c['features']} features, "
                 f"{c['np']} workers")
    return _save(fig, path)


def step_timeline(records: dict[str, list[dict[str, Any]]], faults: list[dict[str, Any]],
                  *, step_key: str = "s") -> dict[str, Any]:
    """Each completed step over time (from every worker's step log; a rollback shows as the
    step going down) and the faults, in seconds since the first step: what `recovery()` draws."""
    points = sorted((r["t"], r[step_key]) for rs in records.values() for r in rs)
    if not points:
        return {"t": [], "step": [], "faults": []}
    t0 = points[0][0]
    return {"t": [round(t - t0, 4) for t, _ in points], "step": [s for _, s in points],
            "faults": [{"t": round(f["t"] - t0, 4), "kind": f["kind"]} for f in faults]}
