"""Figures and a table from runs' spectral diagnostics (RUN/spectrum.jsonl, logging.spectrum_every).

    python -m scripts.spectrum results/spectrum-study --out results/spectrum-study [--step N]

For each run that logged a spectrum (several compare side by side):
- energy.png: the share of the momentum's energy in its top k singular values, per layer type
  (attention q/k/v/out, MLP in/out), mean over that type's matrices at --step (default: the last
  logged step of each run), in the style of the paper's Figure 6a. AdamW's and Muon's momentum, and
  MoFaSGD's shadow full momentum (logging.spectrum_shadow).
- tangent.png: MoFaSGD's tangent energy (the share of ||G||^2 its tangent projection keeps), one
  heatmap per run: matrix x logged step. Runs in sketch modes have no shares of ||G||^2 (None in
  their lines): no heatmap, "-" in the table.
- drift.png: MoFaSGD's subspace overlap (U, V) and shadow error over steps, mean over matrices.
- spectrum.md: per run and layer type at --step: tangent, left, right, two-sided and truncation
  energy, overlap, shadow error and the top-k shares (means over the type's matrices).
For each run of MoFaSGD's rank_policy energy (RUN/ranks.jsonl):
- allocation.png: the rank allocation, one heatmap per run: matrix x re-allocation step, each cell
  its rank; spectrum.md adds per layer type the mean rank and kept share at the last line.
"""

import argparse
import json
import math
import os
import statistics
import sys

if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# parameter-name fragment -> layer type (GPT-2 fuses q, k and v in c_attn; the speedrun model does not)
LAYER_TYPES = (("attn.c_q", "attn q"), ("attn.c_k", "attn k"), ("attn.c_v", "attn v"), ("attn.c_attn", "attn qkv"),
               ("attn.c_proj", "attn out"), ("mlp.c_fc", "mlp in"), ("mlp.c_proj", "mlp out"))
NUMERIC_KS = ("8", "16", "32", "64")
TABLE_KEYS = ("tangent_energy", "left_energy", "right_energy", "twosided_energy", "truncation_energy", "overlap_u",
              "overlap_v", "shadow_error")


def layer_type(name: str) -> str:
    return next((kind for fragment, kind in LAYER_TYPES if fragment in name), "other")


def read_log(run_dir: str, log: str = "spectrum.jsonl") -> list[dict]:
    """The run's spectrum.jsonl (or ranks.jsonl, rank_policy energy) lines, in step order;
    unreadable lines and lines without their table ("matrices", "ranks") skipped."""
    table = {"spectrum.jsonl": "matrices", "ranks.jsonl": "ranks"}[log]
    lines = []
    with open(os.path.join(run_dir, log)) as f:
        for text in f:
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get(table), dict):
                lines.append(record)
    return sorted(lines, key=lambda r: r["step"])


def find_spectrum_runs(paths: list[str], log: str = "spectrum.jsonl") -> dict[str, list[dict]]:
    """{run name: its lines of `log` (spectrum.jsonl or ranks.jsonl)} for every run folder given or
    one level below a folder given."""
    runs = {}
    for path in paths:
        candidates = [path] + ([os.path.join(path, e) for e in sorted(os.listdir(path))] if os.path.isdir(path) else [])
        for folder in candidates:
            if os.path.isfile(os.path.join(folder, log)):
                lines = read_log(folder, log)
                if lines:
                    runs[os.path.basename(os.path.normpath(folder))] = lines
    return runs


def energy_shares(matrix: dict) -> dict | None:
    """The full momentum's top-k shares a matrix logged: AdamW's/Muon's momentum, or MoFaSGD's shadow."""
    return matrix.get("momentum_energy_top") or matrix.get("shadow_energy_top")


def mean(values) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def line_at(lines: list[dict], step: int | None) -> dict:
    """The line logged at `step` (None: the last), or the last one before it."""
    if step is None:
        return lines[-1]
    before = [r for r in lines if r["step"] <= step]
    return before[-1] if before else lines[0]


def by_type(line: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for name, matrix in line["matrices"].items():
        out.setdefault(layer_type(name), []).append(matrix)
    return out


def table(runs: dict, step: int | None) -> str:
    rows = ["| run | step | layer type | matrices | " + " | ".join(TABLE_KEYS) + " | top-8 | top-32 | top 1/4 |",
            "|---|---:|---|---:|" + "---:|" * (len(TABLE_KEYS) + 3)]
    for name, lines in runs.items():
        line = line_at(lines, step)
        for kind, matrices in sorted(by_type(line).items()):
            cells = [mean(m.get(key) for m in matrices) for key in TABLE_KEYS]
            shares = [energy_shares(m) or {} for m in matrices]
            cells += [mean(s.get(k) for s in shares) for k in ("8", "32", "1/4")]
            shown = ["-" if math.isnan(c) else f"{c:.3f}" for c in cells]
            rows.append(f"| {name} | {line['step']} | {kind} | {len(matrices)} | " + " | ".join(shown) + " |")
    return "\n".join(rows) + "\n"


def rank_table(rank_runs: dict) -> str:
    """Per energy run and layer type, at its last allocation: the mean rank (min-max) and the mean
    share of the momentum expansion's energy the ranks keep."""
    rows = ["| run | step | layer type | matrices | mean rank | min-max | kept share | factor numbers / budget |",
            "|---|---:|---|---:|---:|---|---:|---:|"]
    for name, lines in rank_runs.items():
        last = lines[-1]
        kinds = {}
        for matrix, r in last["ranks"].items():
            kinds.setdefault(layer_type(matrix), []).append((r, last.get("kept_share", {}).get(matrix)))
        for kind, entries in sorted(kinds.items()):
            ranks = [r for r, _ in entries]
            kept = mean(share for _, share in entries)
            rows.append(f"| {name} | {last['step']} | {kind} | {len(ranks)} | {statistics.mean(ranks):.1f} | "
                        f"{min(ranks)}-{max(ranks)} | {'-' if math.isnan(kept) else f'{kept:.3f}'} | "
                        f"{last.get('held', '-')} / {last.get('budget', '-')} |")
    return "\n".join(rows) + "\n"


def plot_allocation(rank_runs: dict, out: str) -> bool:
    """allocation.png: per run, the rank of each matrix (rows) at each re-allocation (columns)."""
    if not rank_runs:
        return False
    fig, axes = plt.subplots(1, len(rank_runs), figsize=(4.5 * len(rank_runs), 4), squeeze=False)
    for ax, (name, lines) in zip(axes[0], rank_runs.items()):
        top = max(r for line in lines for r in line["ranks"].values())  # each run's own scale: budgets differ
        names = list(lines[0]["ranks"])
        grid = [[line["ranks"].get(n, math.nan) for line in lines] for n in names]
        image = ax.imshow(grid, aspect="auto", vmin=0, vmax=top, cmap="magma", interpolation="nearest")
        if len(lines) * len(names) <= 400:  # the numbers themselves while they stay legible
            for i, row in enumerate(grid):
                for j, r in enumerate(row):
                    ax.text(j, i, str(r), ha="center", va="center", fontsize=5,
                            color="white" if r < 0.6 * top else "black")
        ax.set_title(f"{name}\nbudget {lines[-1].get('budget')} numbers", fontsize=8)
        label_heatmap(fig, ax, image, [line["step"] for line in lines], names, "rank")
    save(fig, out, "allocation.png")
    return True


def label_heatmap(fig, ax, image, steps: list, names: list, label: str) -> None:
    """A matrix x step heatmap's ticks (steps, parameter names) and colour bar."""
    every = max(1, -(-len(steps) // 9))  # at most 9 step labels, so they stay legible
    ax.set_xticks(range(0, len(steps), every), steps[::every], fontsize=6)
    ax.set_yticks(range(len(names)), [n.replace(".weight", "") for n in names], fontsize=5)
    ax.set_xlabel("step")
    fig.colorbar(image, ax=ax, label=label)


def save(fig, out: str, filename: str) -> None:
    fig.tight_layout()
    fig.savefig(os.path.join(out, filename), dpi=120)
    plt.close(fig)


def plot_energy(runs: dict, step: int | None, out: str) -> bool:
    kinds = sorted({layer_type(n) for lines in runs.values() for n in line_at(lines, step)["matrices"]})
    kinds = [k for k in kinds if any(energy_shares(m) for lines in runs.values()
                                     for n, m in line_at(lines, step)["matrices"].items() if layer_type(n) == k)]
    if not kinds:
        return False
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.2), squeeze=False, sharey=True)
    drawn = []
    for ax, kind in zip(axes[0], kinds):
        for name, lines in runs.items():
            line = line_at(lines, step)
            shares = [energy_shares(m) for n, m in line["matrices"].items() if layer_type(n) == kind and energy_shares(m)]
            if shares:
                ys = [mean(s.get(k) for s in shares) for k in NUMERIC_KS]
                drawn += [y for y in ys if math.isfinite(y)]
                ax.plot([int(k) for k in NUMERIC_KS], ys, marker="o", label=f"{name} (step {line['step']})")
        ax.set_title(kind)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("top k singular values")
    # the limits follow the data drawn; a zoom is said on the axis, not left to be misread
    low = min(drawn, default=0.0)
    bottom = max(0.0, low - 0.1 * (1.0 - low) - 0.01)
    axes[0][0].set_ylim(bottom, 1.0 + 0.05 * (1.0 - bottom))
    axes[0][0].set_ylabel("energy share" + (f" (axis from {bottom:.2f})" if bottom > 0 else ""))
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("momentum energy in the top k (AdamW/Muon momentum, MoFaSGD shadow); mean over each type's matrices",
                 fontsize=9)
    save(fig, out, "energy.png")
    return True


def plot_tangent(runs: dict, out: str) -> bool:
    # runs with the shares of ||G||^2 (sketch modes log them as None: no m x n gradient)
    panels = {name: lines for name, lines in runs.items()
              if any(m.get("tangent_energy") is not None for m in lines[-1]["matrices"].values())}
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        names = sorted({n for r in lines for n, m in r["matrices"].items() if m.get("tangent_energy") is not None})
        grid = [[r["matrices"].get(n, {}).get("tangent_energy") for r in lines] for n in names]
        grid = [[math.nan if v is None else v for v in row] for row in grid]
        image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        label_heatmap(fig, ax, image, [r["step"] for r in lines], names, "tangent energy (share of ||G||^2)")
    save(fig, out, "tangent.png")
    return True


def plot_drift(runs: dict, out: str) -> bool:
    series = {key: {name: ([r["step"] for r in lines], [mean(m.get(key) for m in r["matrices"].values()) for r in lines])
                    for name, lines in runs.items()} for key in ("overlap_u", "overlap_v", "shadow_error")}
    shown = {key: {n: xy for n, xy in runs_xy.items() if any(math.isfinite(v) for v in xy[1])}
             for key, runs_xy in series.items()}
    shown = {key: v for key, v in shown.items() if v}
    if not shown:
        return False
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.2), squeeze=False)
    for ax, (key, runs_xy) in zip(axes[0], shown.items()):
        for name, (x, y) in runs_xy.items():
            ax.plot(x, y, marker=".", label=name)
        ax.set_title(key + (" (1: the subspace kept)" if key.startswith("overlap") else " (||M - USV^T|| / ||M||)"),
                     fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(bottom=0)
    axes[0][-1].legend(fontsize=7)
    save(fig, out, "drift.png")
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="run folders, or folders holding run folders (a sweep's)")
    p.add_argument("--out", required=True, help="the folder for energy.png, tangent.png, drift.png and spectrum.md")
    p.add_argument("--step", type=int, help="the step the energy curves and the table show (default: each run's last)")
    args = p.parse_args(argv)
    missing = [path for path in args.paths if not os.path.exists(path)]
    if missing:
        print(f"error: no such results folder: {missing[0]}", file=sys.stderr)
        return 2
    runs = find_spectrum_runs(args.paths)
    rank_runs = find_spectrum_runs(args.paths, "ranks.jsonl")
    if not runs and not rank_runs:
        print(f"error: no run under {', '.join(args.paths)} logged a spectrum (logging.spectrum_every > 0 writes "
              "RUN/spectrum.jsonl) or a rank allocation (MoFaSGD rank_policy energy writes RUN/ranks.jsonl)",
              file=sys.stderr)
        return 2
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create --out {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.out):
        print(f"error: --out {args.out} is not a folder", file=sys.stderr)
        return 2
    written = [f for f, made in (("energy.png", runs and plot_energy(runs, args.step, args.out)),
                                 ("tangent.png", runs and plot_tangent(runs, args.out)),
                                 ("drift.png", runs and plot_drift(runs, args.out)),
                                 ("allocation.png", plot_allocation(rank_runs, args.out)))
               if made]
    from worker.fileio import write_text_atomic

    text = table(runs, args.step) if runs else ""
    if rank_runs:
        text += ("\n" if text else "") + "## Rank allocation (rank_policy energy)\n\n" + rank_table(rank_runs)
    write_text_atomic(os.path.join(args.out, "spectrum.md"), text)
    print(f"{len(set(runs) | set(rank_runs))} run(s): wrote {', '.join(written + ['spectrum.md'])} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
