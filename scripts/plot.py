"""Loss curves and rank/memory panels of runs or sweeps, as PNG files, one colour per group of seeds.

    python -m scripts.plot results/demo --out results/demo
    python -m scripts.plot results/cpu-ranks --out results/cpu-ranks --min-seeds 3 --band ci

A group is the runs whose configs differ only in train.seed (scripts/results.py). Writes into --out:
    loss.png    val loss vs step, vs tokens and vs wall-clock; smoothed train loss vs step: per group
                the mean over its finished seeds, with a shaded band over the seeds (min-max, or the
                95% CI of the mean with --band ci) for groups with 2+ seeds only (the legend says
                "no band" for the others, and with one seed everywhere no title speaks of a band);
                runs that did not finish are drawn thin and dotted, left out of the mean, and listed
                under the figure. Each panel's y axis spans the values it draws; where the first
                evaluations would squash the rest, it is cut and the panel's title says where. The
                time panel says "times unreliable: load average X on N CPUs" when runs were timed
                under load, and "load not recorded" for runs made before metrics.jsonl had it
    ranks.png   final val loss vs rank per optimizer (mean with a 95% CI error bar where a point has
                2+ seeds; the title names the points without one), peak memory and hidden-matrix
                optimizer state vs rank from zero (the title says when the values lie within 5% of
                each other) (only when a run has a rank); where several groups share an optimizer
                and rank (a learning-rate grid), the one with the lowest mean final val loss stands
                for them, and the title says what was selected; a single seed is never picked out of
                a group
"""

import argparse
import math
import os
import statistics
import sys

if not __package__:  # python scripts/NAME.py: this checkout's modules first, not another install's
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from scripts.results import Group, Run, find_runs_or_report, grouping_entries, load_summary, select_groups
from scripts.stats import estimate


def ema_smooth(values: list[float], alpha: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else alpha * avg + (1 - alpha) * v
        out.append(avg)
    return out


def group_colors(n: int) -> list:
    """One colour per group: the default cycle up to 10, tab20 up to 20, then tab20 again (the line
    styles tell repeats apart)."""
    return [f"C{i}" for i in range(n)] if n <= 10 else [plt.get_cmap("tab20").colors[i % 20] for i in range(n)]


def run_curve(run: Run, y: str, x: str) -> dict:
    """step -> (x, y) of one run's series; the train loss EMA-smoothed along the run."""
    rows = [m for m in run.metrics if m.get(y) is not None and x in m and "step" in m]
    ys = [m[y] for m in rows]
    if y == "train_loss":
        ys = ema_smooth(ys)
    return {m["step"]: (m[x], v) for m, v in zip(rows, ys)}


def mean_curve(runs: list[Run], y: str, x: str, band: str):
    """(xs, mean, low, high) over the steps every run logged; x is the runs' mean x at a step (their
    wall-clock times differ). low/high: min-max over the runs, or the mean's 95% CI (band 'ci');
    None for a single run."""
    curves = [run_curve(r, y, x) for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    xs, mean, low, high = [], [], [], []
    for step in steps:
        values = [c[step][1] for c in curves]
        est = estimate(values)
        xs.append(sum(c[step][0] for c in curves) / len(curves))
        mean.append(est.mean)
        if band == "ci":
            low.append(est.ci_low)
            high.append(est.ci_high)
        else:
            low.append(min(values))
            high.append(max(values))
    single = len(runs) < 2
    return xs, mean, None if single else low, None if single else high


def left_out_note(groups: list[Group], include_unfinished: bool, drawn: str = "dotted, ") -> str | None:
    """The runs not in any mean, for a line under the figure (unreadable and edited runs are left
    out even with include_unfinished)."""
    out = [f"{r.name} ({r.status} at step {r.steps_done}/{(r.config.get('train') or {}).get('steps')})"
           for g in groups for r in g.runs if r not in g.included(include_unfinished)]
    if not out:
        return None
    shown = out if len(out) <= 6 else out[:6] + [f"and {len(out) - 6} more"]
    why = "unreadable or edited" if include_unfinished else "did not finish"
    return f"{drawn}left out of the means ({why}): " + ", ".join(shown)


def _legend(fig, handles, labels, note: str | None):
    """The legend in a column right of the panels (readable with 20+ groups), the note below."""
    cols = 1 if len(labels) <= 24 else 2
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, ncol=cols, frameon=False)
    if note:
        fig.text(0.01, -0.01, note, fontsize=8, va="top", wrap=True)


# ---------------------------------------------------------------------------------------------
# What the panels say: each decision is a function of the data drawn, so a plot never claims more
# than its runs show (tests check these, not pixels)


def panel_limits(values: list[float]) -> tuple[float, float, str | None]:
    """A panel's y limits from the values it draws, and a note when some lie outside. The first
    evaluations (~ln(vocab) before training) can dwarf everything after them and squash the curves
    where the groups differ; values above median + 3 x (median - min) are then left above the axis
    and the note says so. Otherwise every value drawn is inside, with 5% margins."""
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    if not values:
        return 0.0, 1.0, None
    low, high = values[0], values[-1]
    median = statistics.median(values)
    cap, note = median + 3 * (median - low), None
    if low < cap < high:
        note = f"y axis cut at {cap:.3g}: values up to {high:.3g} lie above it"
        high = cap
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    return low - pad, high + pad, note


def band_wording(seed_counts: list[int], band: str) -> tuple[str, bool]:
    """loss.png's title for groups with these numbers of seeds, and whether the legend should say
    which groups have no band. A band needs two seeds: none is drawn for a single-seed group, and
    no title speaks of a band or a CI when no group has one."""
    what = "min-max over seeds" if band == "minmax" else "95% CI of the mean over seeds"
    if not seed_counts or max(seed_counts) < 2:
        return "one seed per group: its run, no band", False
    if min(seed_counts) >= 2:
        return f"mean over seeds per group; band: {what}", False
    return f"mean over seeds per group; band: {what}, only for groups with 2+ seeds (legend: no band for n=1)", True


def memory_limits(values: list[float]) -> tuple[float, float, str | None]:
    """A memory panel's y limits: from zero, so a bar's height is its size and a 2% difference looks
    like one; the note gives the spread when the values are too close to tell apart (< 5%)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return 0.0, 1.0, None
    top, bottom = max(values), min(values)
    spread = (top - bottom) / top if top > 0 else 0.0
    note = f"values within {spread:.1%} of each other" if len(values) > 1 and spread < 0.05 else None
    return 0.0, top * 1.1 or 1.0, note


def interval_wording(seed_counts: dict[str, int]) -> str:
    """ranks.png's loss title for points with these numbers of seeds ({point label: n}): a 95% CI
    only where a point has 2+ seeds, and the points without one named."""
    counts = sorted(set(seed_counts.values()))
    if not counts:
        return "final val loss"
    n_text = f"n={counts[0]}" if len(counts) == 1 else f"n={counts[0]}-{counts[-1]}"
    if counts[-1] < 2:
        return f"final val loss, one seed per point ({n_text}): no interval"
    if counts[0] >= 2:
        return f"final val loss, mean and 95% CI over seeds ({n_text})"
    single = sorted(label for label, n in seed_counts.items() if n < 2)
    named = ", ".join(single) if len(single) <= 4 else f"{len(single)} points"
    return f"final val loss, mean over seeds ({n_text}); 95% CI where n >= 2, none for {named}"


def plot_losses(groups: list[Group], path: str, band: str = "minmax", include_unfinished: bool = False) -> str:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = [
        (axes[0, 0], "val_loss", "step", "validation loss vs step"),
        (axes[0, 1], "val_loss", "tokens", "validation loss vs tokens"),
        (axes[1, 0], "val_loss", "elapsed_s", "validation loss vs training time (s)"),
        (axes[1, 1], "train_loss", "step", "training loss (EMA 0.9) vs step"),
    ]
    colors = group_colors(len(groups))
    handles, labels, seed_counts = [], [], []
    drawn = {ax: [] for ax, *_ in panels}  # every y value each panel draws: its limits come from these
    for i, group in enumerate(groups):
        color, style = colors[i], "-" if i < 20 else "--"
        used = group.included(include_unfinished)
        n = len(used)
        for ax, y, x, _ in panels:
            if used:
                xs, mean, low, high = mean_curve(used, y, x, band)
                line, = ax.plot(xs, mean, color=color, linestyle=style, linewidth=1.6,
                                marker="o" if y == "val_loss" and len(xs) < 30 else None, markersize=3)
                drawn[ax] += mean
                if low is not None:
                    ax.fill_between(xs, low, high, color=color, alpha=0.18, linewidth=0)
                    drawn[ax] += low + high
                if ax is axes[0, 0]:
                    handles.append(line)
                    labels.append(f"{group.label} (n={n})")
                    seed_counts.append(n)
            for run in group.runs:
                if run in used:
                    continue
                curve = run_curve(run, y, x)
                if curve:
                    pts = [curve[s] for s in sorted(curve)]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linestyle=":", linewidth=0.9)
                    ax.plot([pts[-1][0]], [pts[-1][1]], "x", color=color, markersize=5)
                    drawn[ax] += [p[1] for p in pts]
    title, name_single = band_wording(seed_counts, band)
    if name_single:
        labels = [f"{label[:-1]}, no band)" if label.endswith("(n=1)") else label for label in labels]
    timing = load_summary([r for g in groups for r in g.runs])  # the time panel's warning, if any
    for ax, _, x, panel_title in panels:
        low, high, cut = panel_limits(drawn[ax])
        ax.set_ylim(low, high)
        notes = [cut] + ([timing] if x == "elapsed_s" else [])
        ax.set_title("\n".join([panel_title] + [note for note in notes if note]), fontsize=10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _legend(fig, handles, labels, left_out_note(groups, include_unfinished))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def differing_keys(groups: list[Group]) -> list[str]:
    """Config keys (last part) whose values differ between the groups: what a choice among them chose."""
    flat = [grouping_entries(g.first.config) for g in groups]
    keys = set().union(*flat)
    return sorted({k.rsplit(".", 1)[-1] for k in keys if len({repr(f.get(k)) for f in flat}) > 1})


def select_points(groups: list[Group], include_unfinished: bool) -> tuple[dict, set]:
    """{(optimizer, rank): group} and the config keys a choice was made over (empty when every point
    had one group). Of several groups at one point, those with the most seeds compete (a tuned lr
    rerun with N seeds, not a single-seed tuning run that was lucky) and the lowest mean final val
    loss wins."""
    by_point: dict[tuple, list[Group]] = {}
    for g in groups:
        if g.per_seed("final_val_loss", include_unfinished):
            by_point.setdefault((g.optimizer, g.rank), []).append(g)
    chosen, chosen_over = {}, set()
    for point, candidates in by_point.items():
        values = [list(g.per_seed("final_val_loss", include_unfinished).values()) for g in candidates]
        most = max(len(v) for v in values)
        means = [estimate(v).mean if len(v) == most else float("inf") for v in values]
        chosen[point] = candidates[means.index(min(means))]
        if len(candidates) > 1:
            chosen_over.update(differing_keys(candidates))
    return chosen, chosen_over


def point_values(group: Group, key: str, include_unfinished: bool) -> list[float]:
    """A rank panel's values at a point: the final val loss per seed, or a memory field per run (MiB)."""
    if key == "final_val_loss":
        return list(group.per_seed(key, include_unfinished).values())
    return [r.summary[key] / 2**20 for r in group.included(include_unfinished)
            if r.summary and r.summary.get(key) is not None]


def draw_series(ax, key: str, stats: list[tuple], color: str, label: str) -> None:
    """One optimizer's points on a rank panel: `stats` holds (rank, Estimate, values) per point. A
    rank series is a line with bars (the loss: 95% CI; memory: min-max over runs) only at the points
    with 2+ values; an optimizer without a rank is a dashed line, with a shaded CI for the loss."""
    ranked = [st for st in stats if st[0] is not None]
    if ranked:
        ax.plot([st[0] for st in ranked], [st[1].mean for st in ranked], "o-", color=color, label=label)
        barred = [st for st in ranked if len(st[2]) > 1]
        if barred:
            if key == "final_val_loss":
                err = [[st[1].mean - st[1].ci_low for st in barred], [st[1].ci_high - st[1].mean for st in barred]]
            else:
                err = [[st[1].mean - min(st[2]) for st in barred], [max(st[2]) - st[1].mean for st in barred]]
            ax.errorbar([st[0] for st in barred], [st[1].mean for st in barred], yerr=err, fmt="none",
                        ecolor=color, capsize=4)
    for _, est, _ in (st for st in stats if st[0] is None):
        ax.axhline(est.mean, color=color, linestyle="--", label=label)
        if key == "final_val_loss" and est.ci_low is not None:
            ax.axhspan(est.ci_low, est.ci_high, color=color, alpha=0.12, linewidth=0)


def plot_ranks(groups: list[Group], path: str, include_unfinished: bool = False) -> str | None:
    """Final val loss, peak memory and optimizer-state memory vs rank, one series per optimizer;
    optimizers without a rank (AdamW, Muon, ...) are horizontal lines (with a shaded CI band where
    they have 2+ seeds)."""
    if not any(g.rank is not None for g in groups):
        return None
    chosen, chosen_over = select_points(groups, include_unfinished)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    fields = ["final_val_loss", "peak_mem_bytes", "opt_state_bytes_hidden"]
    optimizers = sorted({opt for opt, _ in chosen})
    seed_counts = {}  # point label -> seeds in its loss: which points have an interval
    drawn = {key: [] for key in fields}  # the memory values drawn: the panels' limits and notes
    for i, opt in enumerate(optimizers):
        points = sorted(((rank, g) for (o, rank), g in chosen.items() if o == opt), key=lambda p: (p[0] is None, p[0] or 0))
        for ax, key in zip(axes, fields):
            stats = []
            for rank, g in points:
                values = point_values(g, key, include_unfinished)
                if values:
                    stats.append((rank, estimate(values), values))
                    drawn[key] += values
                    if key == "final_val_loss":
                        seed_counts[opt if rank is None else f"{opt} r={rank}"] = len(values)
            draw_series(ax, key, stats, f"C{i % 10}", opt)
    loss_title = interval_wording(seed_counts)
    if chosen_over:
        what = "lr" if chosen_over == {"lr"} else "config (" + ", ".join(sorted(chosen_over)) + ")"
        loss_title += f"\nbest {what} per point: lowest mean of those with the most seeds"
    several = any(len(point_values(g, "peak_mem_bytes", include_unfinished)) > 1 for g in chosen.values())
    titles = [loss_title, "peak memory (MiB)" + (", mean and min-max over runs" if several else ""),
              "hidden-matrix optimizer state (MiB)"]
    for ax, key in zip(axes[1:], fields[1:]):  # memory from zero: heights are sizes
        low, high, note = memory_limits(drawn[key])
        ax.set_ylim(low, high)
        if note:
            titles[fields.index(key)] += f"\n{note}"
    ranks = sorted({rank for _, rank in chosen if rank is not None})
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rank")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    note = left_out_note(list(chosen.values()), include_unfinished, drawn="")
    if note:
        fig.text(0.01, -0.01, note, fontsize=8, va="top", wrap=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders or folders of runs (a sweep)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--band", choices=("minmax", "ci"), default="minmax",
                   help="loss.png's band over seeds: min-max (default) or the 95%% CI of the mean")
    p.add_argument("--min-seeds", type=int, default=0, metavar="N",
                   help="only groups with at least N finished seeds, e.g. 2 leaves out single-seed tuning runs "
                        "(default: every group)")
    p.add_argument("--include-unfinished", action="store_true",
                   help="count runs that did not finish in the means, with what they logged")
    args = p.parse_args(argv)
    if args.min_seeds < 0:
        print(f"error: --min-seeds must be >= 0, got {args.min_seeds}", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: --out {args.out} is a file; give a folder for loss.png and ranks.png", file=sys.stderr)
        return 2
    runs = find_runs_or_report(args.paths)
    if runs is None:
        return 2
    groups = select_groups(runs, args.min_seeds, args.include_unfinished)
    if not groups:
        print(f"error: no group has {args.min_seeds} or more finished seeds (--min-seeds {args.min_seeds})",
              file=sys.stderr)
        return 2
    try:
        os.makedirs(args.out, exist_ok=True)
        written = [plot_losses(groups, os.path.join(args.out, "loss.png"), args.band, args.include_unfinished),
                   plot_ranks(groups, os.path.join(args.out, "ranks.png"), args.include_unfinished)]
    except OSError as e:  # a folder on the way that is a file, a PNG path that is a folder, no permission
        print(f"error: --out {args.out}: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        plt.close("all")
        return 2
    for path in filter(None, written):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
