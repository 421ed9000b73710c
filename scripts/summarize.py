"""Tables of runs: per group of seeds (n, mean, std, 95% CI of the final and best val loss), paired
differences against a baseline, and one row per run (losses, speed, memory, status).

A group is the runs whose configs differ only in train.seed (scripts/results.py group_runs). Only
finished runs enter a group's statistics; stopped, failed, running and unfinished runs are listed
with their status and left out unless --include-unfinished (then the last val loss they logged
counts). Unreadable runs (a file that cannot be read, or holds wrong types or absurd values: one
warning line names the file and key) and edited ones (config.json changed after the run) are
listed and always left out. The CI is mean +- t(0.975, n-1) std / sqrt(n) over the group's seeds.

Paired differences (--baseline NAME: a group name, or an optimizer with exactly one group) pair
runs by seed, since a seed fixes the init and the data order: per shared seed, candidate minus
baseline; the mean difference, its 95% CI and a sign count (in how many seeds the candidate was
lower). A negative difference is a lower (better) loss than the baseline.

    python -m scripts.summarize results/cpu-ranks                         # every table, Markdown
    python -m scripts.summarize results/cpu-ranks --baseline adamw --min-seeds 3
    python -m scripts.summarize results/cpu-ranks --format csv --table groups --out groups.csv
    python -m scripts.summarize results/cpu-ranks --format latex --table paired --baseline adamw

Marks after a group's (or run's) name, each explained under its table (CSV: the `notes` column):
[edge] its lr was chosen at an edge of the lrs its tuning tried (the sweep's tuning.json);
[seeds] fewer than 3 seeds, or pairs in the paired table: intervals from so few say little;
[speed] its seeds' median step times differ by more than a factor 1.25; [load] timed under load
(median load average above the CPU count, or the process had a CPU less than half its step time).

Run columns: tokens_per_s over the whole run (summary.json: first steps and any torch.compile
included), steady_tokens_per_s and ms_per_step at the median step (warm-up and compile left out),
first_step_ms (step 1: optimizer state creation and, with train.compile, the compile), load_avg
(the median 1-minute load average over its steps). Every number comes from the runs' summary.json,
metrics.jsonl and env.json, and the sweep's tuning.json.
"""

import argparse
import csv
import io
import math
import os
import statistics
import sys

if not __package__:  # python scripts/NAME.py: this checkout's modules first, not another install's
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.results import (UNUSABLE, Group, Run, find_runs_or_report, read_tunings, run_load, select_groups,
                             tuning_of)
from scripts.stats import estimate, paired_difference

RUN_COLUMNS = ["run", "group", "optimizer", "rank", "lr", "seed", "status", "steps", "final_val_loss", "best_val_loss",
               "final_val_ppl", "tokens_per_s", "steady_tokens_per_s", "ms_per_step", "first_step_ms", "peak_mem_mib",
               "opt_state_mib_hidden", "opt_state_mib_other", "comm_bytes_per_step", "load_avg", "notes"]
GROUP_COLUMNS = ["group", "optimizer", "rank", "lr", "n", "seeds", "final_val_loss_mean", "final_val_loss_std",
                 "final_val_loss_ci_low", "final_val_loss_ci_high", "best_val_loss_mean", "best_val_loss_std",
                 "best_val_loss_ci_low", "best_val_loss_ci_high", "steps", "status", "tokens_per_s", "peak_mem_mib",
                 "opt_state_mib_hidden", "step_time_ratio", "lr_at_edge", "notes"]
PAIRED_COLUMNS = ["group", "baseline", "metric", "n_pairs", "seeds", "diff_mean", "diff_std", "diff_ci_low",
                  "diff_ci_high", "lower", "higher", "ties", "notes", "baseline_notes"]
TABLES = {"groups": GROUP_COLUMNS, "paired": PAIRED_COLUMNS, "runs": RUN_COLUMNS}
METRICS = ("final_val_loss", "best_val_loss")


class SummaryError(ValueError):
    """A bad option value (a baseline no group matches, ...); one line."""


def summarize_run(run: Run, group: str | None = None) -> dict:
    s = run.summary or {}
    timed = run.timed_steps()
    step_ms = [m["step_ms"] for m in timed]
    median_ms = run.median_step_ms  # the median ignores warm-up outliers
    load = run_load(run)
    tokens_per_step = timed[-1]["tokens"] / timed[-1]["step"] if timed and "tokens" in timed[-1] else None
    comm = [m["comm_bytes"] for m in run.metrics if "comm_bytes" in m]
    final = run.final_val_loss
    mib = lambda key: s[key] / 2**20 if s.get(key) is not None else None  # noqa: E731
    return {
        "run": run.name,
        "group": group,
        "optimizer": run.optimizer,
        "rank": run.rank,
        "lr": run.lr,
        "seed": run.seed,
        "status": run.status,
        "steps": run.steps_done,
        "final_val_loss": final,
        "best_val_loss": run.best_val_loss,
        "final_val_ppl": perplexity(final),
        "tokens_per_s": s.get("tokens_per_s"),  # whole run, first steps (and any compile) included
        # tokens/s at the median step time: the steady speed, without warm-up or compile
        "steady_tokens_per_s": tokens_per_step / (median_ms / 1000) if tokens_per_step and median_ms else None,
        "ms_per_step": median_ms,
        "first_step_ms": step_ms[0] if step_ms and timed[0]["step"] == 1 else None,  # with compile: the compile time
        "peak_mem_mib": mib("peak_mem_bytes"),
        "opt_state_mib_hidden": mib("opt_state_bytes_hidden"),
        "opt_state_mib_other": mib("opt_state_bytes_other"),
        "comm_bytes_per_step": statistics.median(comm) if comm else None,
        "load_avg": load.load_avg,  # median 1-minute load average over its steps (None: not recorded)
        "notes": "load" if load.unreliable else "",
    }


def perplexity(loss) -> float | None:
    """exp(loss); inf where that overflows a float (a loss above ~709, a diverging run)."""
    if loss is None:
        return None
    return math.exp(loss) if loss < 709 else math.inf


def write_output(path: str, text: str) -> str | None:
    """Writes --out; returns a one-line problem (a folder, a missing folder, no permission) or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"--out {path} is a folder; give a file path (e.g. {os.path.join(path, 'summary.md')})"
    if not os.path.isdir(folder):
        return f"--out {path}: the folder {folder} does not exist"
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        return f"--out {path}: cannot write: {e.strerror or e}"
    return None


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def status_text(group: Group, include_unfinished: bool) -> str:
    """'3 finished', or '2 finished, 1 stopped (left out)' (unreadable and edited runs: always)."""
    counts: dict[str, int] = {}
    for run in group.runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    parts = [f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: kv[0] != "finished")]
    left_out = any(s != "finished" and (s in UNUSABLE or not include_unfinished) for s in counts)
    return ", ".join(parts) + (" (left out)" if left_out else "")


# ---------------------------------------------------------------------------------------------
# Marks: what a row's numbers cannot show by themselves. Markdown and LaTeX put each as a short name
# in brackets after the group (or run) and explain the ones used under the table; CSV lists them,
# space-separated, in `notes`.

FEW_SEEDS = 3  # fewer seeds (or pairs) than this: intervals and sign counts say little
SPEED_FACTOR = 1.25  # a group whose seeds' median step times differ by more: its speed is not one speed
MARKS = {
    "edge": "lr chosen at an edge of the lrs its tuning tried (tuning.json: chosen_at_edge): a better lr may "
            "lie past it, so the group may be under-tuned",
    "seeds": f"fewer than {FEW_SEEDS} seeds (pairs, in the paired table): intervals from n < {FEW_SEEDS} say little "
             "(at n = 2 the 95% CI is mean +- 9 standard deviations, and 2/2 lower happens 1 time in 4 by chance)",
    "speed": f"its runs' median step times differ by more than a factor {SPEED_FACTOR:g} (slowest / fastest seed): "
             "they ran under unlike conditions, so its speed columns are not one speed",
    "load": "timed under load (the median 1-minute load average exceeded the CPU count, or the process had a CPU "
            "less than half of its step time): its times say more about the machine than about the optimizer",
}


def step_time_ratio(runs: list[Run]) -> float | None:
    """Slowest / fastest median step time over `runs` (None with fewer than two timed runs)."""
    medians = [r.median_step_ms for r in runs if r.median_step_ms]
    return max(medians) / min(medians) if len(medians) > 1 else None


def group_marks(group: Group, n: int, tuning: dict | None, include_unfinished: bool) -> list[str]:
    """The marks of a group's row (MARKS): chosen at a tuning edge, fewer than FEW_SEEDS seeds,
    seeds timed more than SPEED_FACTOR apart, runs timed under load."""
    runs = group.included(include_unfinished)
    ratio = step_time_ratio(runs)
    marks = ["edge"] if tuning and tuning.get("chosen_at_edge") else []
    marks += ["seeds"] if n < FEW_SEEDS else []
    marks += ["speed"] if ratio is not None and ratio > SPEED_FACTOR else []
    marks += ["load"] if any(run_load(r).unreliable for r in runs) else []
    return marks


def summarize_group(group: Group, include_unfinished: bool = False, tuning: dict | None = None) -> dict:
    """A group's row; `tuning` is the tuning.json record whose chosen lr the group is (or None)."""
    runs = group.included(include_unfinished)
    row = {"group": group.name, "optimizer": group.optimizer, "rank": group.rank, "lr": group.lr}
    seeds = group.per_seed("final_val_loss", include_unfinished)
    row["n"] = len(seeds)
    row["seeds"] = " ".join(str(s) for s in seeds)
    for metric in METRICS:
        values = list(group.per_seed(metric, include_unfinished).values())
        est = estimate(values) if values else None
        row[f"{metric}_mean"] = est.mean if est else None
        row[f"{metric}_std"] = est.std if est else None
        row[f"{metric}_ci_low"] = est.ci_low if est else None
        row[f"{metric}_ci_high"] = est.ci_high if est else None
    done = sorted({r.steps_done for r in group.runs})
    row["steps"] = str(done[0]) if len(done) == 1 else f"{done[0]}-{done[-1]}"
    row["status"] = status_text(group, include_unfinished)
    summaries = [r.summary or {} for r in runs]
    row["tokens_per_s"] = _mean([s.get("tokens_per_s") for s in summaries])
    peak = _mean([s.get("peak_mem_bytes") for s in summaries])
    row["peak_mem_mib"] = peak / 2**20 if peak is not None else None
    state = _mean([s.get("opt_state_bytes_hidden") for s in summaries])
    row["opt_state_mib_hidden"] = state / 2**20 if state is not None else None
    row["step_time_ratio"] = step_time_ratio(runs)
    row["lr_at_edge"] = bool(tuning.get("chosen_at_edge")) if tuning else None  # None: its lr was not tuned
    row["notes"] = " ".join(group_marks(group, row["n"], tuning, include_unfinished))
    return row


def find_baseline(groups: list[Group], name: str) -> Group:
    """--baseline: a group's name, or an optimizer that has exactly one group."""
    exact = [g for g in groups if g.name == name]
    if exact:
        return exact[0]
    by_optimizer = [g for g in groups if g.optimizer == name]
    if len(by_optimizer) == 1:
        return by_optimizer[0]
    if by_optimizer:
        raise SummaryError(f"--baseline {name!r} matches {len(by_optimizer)} groups "
                           f"({', '.join(g.name for g in by_optimizer)}); name one of them "
                           "(or drop the others, e.g. --min-seeds)")
    raise SummaryError(f"--baseline {name!r} is neither a group nor an optimizer with one group; "
                       f"groups: {', '.join(g.name for g in groups)}")


def paired_rows(groups: list[Group], baseline: Group, metric: str, include_unfinished: bool = False,
                tunings: dict | None = None) -> list[dict]:
    """One row per group against the baseline; `notes` marks a candidate chosen at a tuning edge
    ("edge") and fewer than FEW_SEEDS pairs ("seeds"), `baseline_notes` a baseline at an edge."""
    base = baseline.per_seed(metric, include_unfinished)
    at_edge = lambda g: bool((tuning_of(g, tunings or {}) or {}).get("chosen_at_edge"))  # noqa: E731
    rows = []
    for group in groups:
        if group is baseline:
            continue
        paired = paired_difference(group.per_seed(metric, include_unfinished), base)
        n_pairs = paired.diff.n if paired else 0
        notes = (["edge"] if at_edge(group) else []) + (["seeds"] if n_pairs < FEW_SEEDS else [])
        row = {"group": group.name, "baseline": baseline.name, "metric": metric, "notes": " ".join(notes),
               "baseline_notes": "edge" if at_edge(baseline) else ""}
        if paired is None:
            row.update(n_pairs=0, seeds="")
        else:
            d = paired.diff
            row.update(n_pairs=d.n, seeds=" ".join(str(s) for s in paired.seeds), diff_mean=d.mean, diff_std=d.std,
                       diff_ci_low=d.ci_low, diff_ci_high=d.ci_high, lower=paired.lower, higher=paired.higher,
                       ties=paired.ties)
        rows.append({c: row.get(c) for c in PAIRED_COLUMNS})
    return rows


# ---------------------------------------------------------------------------------------------
# Rendering: CSV holds every column as a plain number; Markdown and LaTeX show a CI as [low, high]
# and a sign count as "k/n lower"


LOSS_KEYS = {"final_val_loss", "best_val_loss", "final_val_loss_mean", "best_val_loss_mean", "final_val_loss_std",
             "best_val_loss_std"}


def _fmt(value, key: str = "") -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if key.startswith("diff_") and key != "diff_std":  # a signed difference
            return f"{value:+.4f}"
        if key in LOSS_KEYS or key == "diff_std" or key.endswith(("_ci_low", "_ci_high")):
            return f"{value:.4f}"
        if key == "lr":
            return f"{value:g}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def display_columns(table: str) -> list[tuple[str, callable]]:
    """(header, row -> text) for the Markdown and LaTeX tables."""
    ci = lambda prefix: lambda r: "-" if r.get(f"{prefix}_ci_low") is None else \
        f"[{_fmt(r[prefix + '_ci_low'], prefix + '_ci_low')}, {_fmt(r[prefix + '_ci_high'], prefix + '_ci_high')}]"  # noqa: E731
    plain = lambda key: lambda r: _fmt(r.get(key), key)  # noqa: E731
    # a name with its marks: "mfsgd-rank8-lr0.02 [edge] [seeds]"
    marked = lambda key, notes="notes": lambda r: _fmt(r.get(key), key) + "".join(  # noqa: E731
        f" [{m}]" for m in (r.get(notes) or "").split())
    if table == "groups":
        return [("group", marked("group")), ("n", plain("n")), ("seeds", plain("seeds")),
                ("final val loss", plain("final_val_loss_mean")), ("std", plain("final_val_loss_std")),
                ("95% CI", ci("final_val_loss")), ("best val loss", plain("best_val_loss_mean")),
                ("95% CI (best)", ci("best_val_loss")), ("steps", plain("steps")), ("status", plain("status")),
                ("tokens/s", plain("tokens_per_s")), ("peak MiB", plain("peak_mem_mib")),
                ("hidden state MiB", plain("opt_state_mib_hidden"))]
    if table == "paired":
        signs = lambda r: "-" if not r.get("n_pairs") else f"{r['lower']}/{r['n_pairs']} lower"  # noqa: E731
        return [("group", marked("group")), ("baseline", marked("baseline", "baseline_notes")),
                ("pairs", plain("n_pairs")),
                ("mean difference", plain("diff_mean")), ("std", plain("diff_std")), ("95% CI", ci("diff")),
                ("seeds lower", signs)]
    return [(c, marked(c) if c == "run" else plain(c)) for c in RUN_COLUMNS if c != "notes"]


def markdown_table(rows: list[dict], table: str = "runs") -> str:
    columns = display_columns(table)
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(show(r) for _, show in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def latex_table(rows: list[dict], table: str = "runs") -> str:
    """A booktabs tabular (\\usepackage{booktabs})."""
    columns = display_columns(table)
    lines = [r"\begin{tabular}{l" + "r" * (len(columns) - 1) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h, _ in columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(show(r)) for _, show in columns) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict], table: str) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=TABLES[table], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


TITLES = {
    "groups": "Groups: runs that differ only in their seed",
    "paired": "Paired differences, by seed (candidate minus baseline; negative: lower loss than the baseline)",
    "runs": "Runs",
}
GROUP_NOTE = ("n: seeds whose finished runs enter the statistics; std: sample standard deviation over seeds; "
              "95% CI: mean +- t(0.975, n-1) std / sqrt(n), none for n = 1.")


def mark_legend(rows: list[dict], table: str) -> list[str]:
    """The lines under a table: each mark its rows use, explained (MARKS), and, under the runs
    table, how many runs recorded no load average (made before metrics.jsonl had one)."""
    used = {m for r in rows for key in ("notes", "baseline_notes") for m in (r.get(key) or "").split()}
    lines = [f"[{mark}] {text}." for mark, text in MARKS.items() if mark in used]
    missing = sum(r.get("load_avg") is None for r in rows) if table == "runs" else 0
    if missing:
        lines.append(f"{missing} of {len(rows)} runs recorded no load average (made before metrics.jsonl had "
                     "load_avg_1m, or on a platform without one): whether their times were loaded is unknown.")
    return lines


def render(tables: dict[str, list[dict]], fmt: str, include_unfinished: bool) -> str:
    """The chosen tables in one document (Markdown or LaTeX), or one table as CSV."""
    if fmt == "csv":
        (name, rows), = tables.items()
        return csv_table(rows, name)
    draw = markdown_table if fmt == "md" else latex_table
    note = GROUP_NOTE + (" Runs that did not finish count with the last val loss they logged."
                         if include_unfinished else " Runs that did not finish are listed but left out.")
    parts = []
    for name, rows in tables.items():
        if len(tables) > 1 or fmt == "md":
            title = TITLES[name]
            if name == "paired" and rows:
                title += f"; baseline {rows[0]['baseline']}, {rows[0]['metric'].replace('_', ' ')}"
            parts.append(f"## {title}\n\n" if fmt == "md" else f"% {title}\n")
        parts.append(draw(rows, name))
        legend = mark_legend(rows, name)
        if fmt == "md" and legend:
            parts.append("\n" + "".join(f"- {line}\n" for line in legend))
        elif legend:
            parts.append("".join(f"% {line}\n" for line in legend))
        if name == "groups":
            parts.append(f"\n{note}\n" if fmt == "md" else f"% {note}\n")
        parts.append("\n")
    return "".join(parts).rstrip("\n") + "\n"


def build_tables(runs: list[Run], which: list[str], baseline: str | None = None, metric: str = "final_val_loss",
                 include_unfinished: bool = False, min_seeds: int = 0) -> dict[str, list[dict]]:
    groups = select_groups(runs, min_seeds, include_unfinished)
    if not groups:
        raise SummaryError(f"no group has {min_seeds} or more seeds with a usable run (--min-seeds {min_seeds})")
    tunings = read_tunings(groups)  # each sweep folder's tuning.json: which lrs were chosen at an edge
    tables = {}
    for name in which:
        if name == "groups":
            tables[name] = [summarize_group(g, include_unfinished, tuning_of(g, tunings)) for g in groups]
        elif name == "paired":
            tables[name] = paired_rows(groups, find_baseline(groups, baseline), metric, include_unfinished, tunings)
        else:
            tables[name] = [summarize_run(r, g.name) for g in groups for r in g.runs]
    return tables


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders or folders of runs (a sweep's results folder)")
    p.add_argument("--format", choices=("md", "csv", "latex"), default="md", help="output format (default: md)")
    p.add_argument("--table", choices=("all", "groups", "paired", "runs"), default="all",
                   help="which table; all: groups, paired (with --baseline) and runs (md and latex only; "
                        "CSV holds one table)")
    p.add_argument("--baseline", help="a group name, or an optimizer with one group: the paired differences' baseline")
    p.add_argument("--metric", choices=METRICS, default="final_val_loss", help="the paired differences' loss")
    p.add_argument("--include-unfinished", action="store_true",
                   help="count stopped, failed and unfinished runs in the statistics, with the last val loss they logged")
    p.add_argument("--min-seeds", type=int, default=0, metavar="N",
                   help="only groups with at least N seeds in their statistics, e.g. 2 leaves out single-seed "
                        "learning-rate tuning runs (default: every group)")
    p.add_argument("--out", help="write here instead of stdout")
    args = p.parse_args(argv)
    try:
        if args.min_seeds < 0:
            raise SummaryError(f"--min-seeds must be >= 0, got {args.min_seeds}")
        if args.table == "paired" and not args.baseline:
            raise SummaryError("--table paired needs --baseline NAME (a group name or an optimizer)")
        if args.format == "csv" and args.table == "all":
            raise SummaryError("--format csv holds one table: add --table groups, paired or runs")
        which = ["groups"] + (["paired"] if args.baseline else []) + ["runs"] if args.table == "all" else [args.table]
        runs = find_runs_or_report(args.paths)
        if runs is None:
            return 2
        text = render(build_tables(runs, which, args.baseline, args.metric, args.include_unfinished, args.min_seeds),
                      args.format, args.include_unfinished)
    except SummaryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        problem = write_output(args.out, text)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
