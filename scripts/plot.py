"""Loss curves and memory bars of one or more runs or sweeps, as PNG files.

    python -m scripts.plot results/demo --out results/demo
    python -m scripts.plot results/cpu-ranks/mfsgd-rank16 results/cpu-ranks/adamw --out figs

Writes into --out:
    loss.png    val loss vs step, vs tokens and vs wall-clock; smoothed train loss vs step
    ranks.png   final val loss vs rank per optimizer, peak and optimizer-state memory vs rank
                (only when at least one run has a rank)
"""

import argparse
import os
import sys


import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from scripts.results import Run, find_runs_or_report


def ema_smooth(values: list[float], alpha: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else alpha * avg + (1 - alpha) * v
        out.append(avg)
    return out


def plot_losses(runs: list[Run], path: str) -> str:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = [
        (axes[0, 0], "val_loss", "step", "validation loss vs step"),
        (axes[0, 1], "val_loss", "tokens", "validation loss vs tokens"),
        (axes[1, 0], "val_loss", "elapsed_s", "validation loss vs training time (s)"),
        (axes[1, 1], "train_loss", "step", "training loss (EMA 0.9) vs step"),
    ]
    labels = [run.label for run in runs]
    # one distinct colour per run: the default cycle repeats after 10, tab20 after 20
    palette = [f"C{i}" for i in range(10)] if len(runs) <= 10 else list(plt.get_cmap("tab20").colors)
    for i, run in enumerate(runs):
        color = palette[i % len(palette)]
        label = run.label if labels.count(run.label) == 1 else run.name  # tell same-optimizer runs apart
        for ax, y, x, _ in panels:
            xs, ys = run.series(y, x)
            if y == "train_loss":
                ys = ema_smooth(ys)
            ax.plot(xs, ys, color=color, label=label, marker="o" if y == "val_loss" and len(xs) < 30 else None,
                    markersize=3)
    for ax, _, x, title in panels:
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    # start the y axis near the interesting part: the first evaluation dwarfs the rest
    finals = [r.series("val_loss")[1][-1] for r in runs if r.series("val_loss")[1]]
    if finals:
        for ax, y, _, _ in panels:
            ax.set_ylim(min(finals) - 0.3, max(finals) + 2.0)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ranks(runs: list[Run], path: str) -> str | None:
    """Final val loss, peak memory and optimizer-state memory vs rank, one series per optimizer;
    optimizers without a rank (AdamW, Muon, ...) are drawn as horizontal reference lines. Where a
    sweep has several runs per optimizer and rank (a learning-rate grid), the one with the lowest
    final val loss stands for them in every panel."""
    if not any(r.rank is not None for r in runs):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    fields = [("final_val_loss", "final val loss"), ("peak_mem_bytes", "peak memory (MiB)"),
              ("opt_state_bytes_hidden", "hidden-matrix optimizer state (MiB)")]
    best: dict[tuple, Run] = {}
    for run in runs:
        if run.summary and run.summary.get("final_val_loss") is not None:
            key = (run.optimizer, run.rank)
            if key not in best or run.summary["final_val_loss"] < best[key].summary["final_val_loss"]:
                best[key] = run
    by_opt: dict[str, list[Run]] = {}
    for (opt, _), run in best.items():
        by_opt.setdefault(opt, []).append(run)
    for i, (opt, group) in enumerate(sorted(by_opt.items())):
        color = f"C{i % 10}"
        for ax, (key, title) in zip(axes, fields):
            scale = 1 if key == "final_val_loss" else 2**20
            ranked = sorted((r for r in group if r.rank is not None and r.summary.get(key) is not None), key=lambda r: r.rank)
            if ranked:
                ax.plot([r.rank for r in ranked], [r.summary[key] / scale for r in ranked], "o-", color=color, label=opt)
            else:
                vals = [r.summary[key] / scale for r in group if r.summary.get(key) is not None]
                if vals:
                    ax.axhline(vals[0], color=color, linestyle="--", label=opt)
    several = len(best) < sum(1 for r in runs if r.summary)
    for ax, (_, title) in zip(axes, fields):
        ax.set_title(title + (" (best lr per point)" if several else ""))
        ax.set_xlabel("rank")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="run folders or folders of runs (a sweep)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    args = p.parse_args(argv)
    runs = find_runs_or_report(args.paths)
    if runs is None:
        return 2
    os.makedirs(args.out, exist_ok=True)
    written = [plot_losses(runs, os.path.join(args.out, "loss.png")), plot_ranks(runs, os.path.join(args.out, "ranks.png"))]
    for path in filter(None, written):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
