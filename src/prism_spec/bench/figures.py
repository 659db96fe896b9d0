"""The bench's figures: per-step acceptance, tree sweeps (paper Fig. 8), data scaling (Fig. 4)
and batch sweeps (Fig. 7), drawn with matplotlib (no figures, with a warning, without it)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from . import metrics as M
from .runs import finished_runs, method_order, temperature_tag, temperatures


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no figures (pip install 'prism-spec[bench]')", stacklevel=3)
        return None


def plot_step_acceptance(runs: Sequence[dict], path: Path) -> Path | None:
    """Per-draft-step conditional acceptance rate per method, pooled over benchmarks (Fig. 1)."""
    ok = [r for r in finished_runs(runs) if r["kind"] != "vanilla"]
    series = {}
    for temp in temperatures(ok):
        for method in method_order(ok):
            rates = M.step_acceptance_rates(
                M.iter_turns(r for r in ok if r["method"] == method and float(r["temperature"]) == temp)
            )
            pts = [(s["step"], s["rate"]) for s in rates if s["rate"] is not None]
            if pts:
                series[(temp, method)] = pts
    if not series:
        return None
    plt = _plt()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    temps = sorted({t for t, _ in series})
    fig, axes = plt.subplots(1, len(temps), figsize=(5.5 * len(temps), 4), squeeze=False)
    for ax, temp in zip(axes[0], temps):
        for (t, method), pts in series.items():
            if t == temp:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_title(f"{temperature_tag(temp)}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("draft step j")
        ax.set_ylabel("P(accept step j | reached step j)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Per-step conditional acceptance rate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tree_sweep_points(summary: Sequence[dict], runs: Sequence[dict]) -> list[dict]:
    info = {r["method"]: r.get("info") or {} for r in runs}
    pts = []
    for s in summary:
        i = info.get(s["method"], {})
        if "tree_sweep_axes" not in i:
            continue
        pts.append({
            "method": s["method"], "temperature": s["temperature"], "axes": i["tree_sweep_axes"],
            "depth": i["tree_depth"], "top_k": i["tree_top_k"], "total_tokens": i["tree_total_tokens"],
            "acceptance_length": s["mean_acceptance_length"], "tokens_per_s": s["mean_tokens_per_s"],
            "speedup": s["mean_speedup"],
        })
    return pts


def plot_tree_sweep(points: Sequence[dict], path: Path, vanilla_tps: dict | None = None) -> Path | None:
    """AL and tokens/s against depth, top_k and total_tokens, each varied alone (Fig. 8)."""
    if not points:
        return None
    plt = _plt()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    axes_names = ["depth", "top_k", "total_tokens"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, axis in zip(axes, axes_names):
        twin = ax.twinx()
        for temp in sorted({p["temperature"] for p in points}):
            pts = sorted(
                (p for p in points if p["temperature"] == temp and (axis in p["axes"] or "base" in p["axes"])),
                key=lambda p: p[axis],
            )
            if not pts:
                continue
            xs = [p[axis] for p in pts]
            ax.plot(xs, [p["acceptance_length"] for p in pts], marker="o", label=f"AL {temperature_tag(temp)}")
            twin.plot(xs, [p["tokens_per_s"] for p in pts], marker="s", linestyle="--", color="tab:red",
                      label=f"tok/s {temperature_tag(temp)}")
            if vanilla_tps and vanilla_tps.get(temp):
                twin.axhline(vanilla_tps[temp], color="gray", linestyle=":", label=f"vanilla tok/s {temperature_tag(temp)}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(axis)
        ax.set_ylabel("acceptance length")
        twin.set_ylabel("tokens/s")
        ax.grid(alpha=0.3)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7)
    fig.suptitle("Tree shape sweep (each axis varied alone around the base shape)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scaling_points(summary: Sequence[dict], runs: Sequence[dict]) -> list[dict]:
    info = {r["method"]: (r.get("info") or {}, r["kind"]) for r in runs}
    pts = []
    for s in summary:
        i, kind = info.get(s["method"], ({}, None))
        if "data_fraction" in i:
            pts.append({"method": s["method"], "kind": kind, "temperature": s["temperature"],
                        "data_fraction": i["data_fraction"], "acceptance_length": s["mean_acceptance_length"],
                        "tokens_per_s": s["mean_tokens_per_s"]})
    return pts


def plot_scaling(points: Sequence[dict], path: Path) -> Path | None:
    """Mean AL over benchmarks against the drafter's training-data fraction, per method (Fig. 4)."""
    if not points:
        return None
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, temp in sorted({(p["kind"], p["temperature"]) for p in points}):
        pts = sorted((p for p in points if p["kind"] == kind and p["temperature"] == temp), key=lambda p: p["data_fraction"])
        ax.plot([p["data_fraction"] for p in pts], [p["acceptance_length"] for p in pts], marker="o",
                label=f"{kind} {temperature_tag(temp)}")
    ax.set_xlabel("training data (FRACTION of --drafter FRACTION=DIR)")
    ax.set_ylabel("acceptance length (mean over benchmarks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Data scaling")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_batch_sweep(runs: Sequence[dict], path: Path) -> Path | None:
    """Tokens/s against batch size per method (Fig. 7), from records with a ``batch_size``
    field, written by :func:`runner.run_batch_sweep`."""
    pts = [r for r in finished_runs(runs) if r.get("batch_size")]
    if not pts:
        return None
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in method_order(pts):
        by_bs: dict[int, list] = defaultdict(list)
        for r in pts:
            if r["method"] == method:
                by_bs[r["batch_size"]].extend(r["turns"])
        xs = sorted(by_bs)
        ax.plot(xs, [M.tokens_per_second(by_bs[x]) for x in xs], marker="o", label=method)
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- writing
