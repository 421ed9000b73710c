"""A table of runs: final and best val loss (and perplexity), speed and memory.

Speed columns: tokens_per_s over the whole run (summary.json: first steps and any torch.compile
included), steady_tokens_per_s and ms_per_step at the median step (warm-up and compile left out),
first_step_ms (step 1: optimizer state creation and, with train.compile, the compile).

    python -m scripts.summarize results/demo                 # Markdown to stdout
    python -m scripts.summarize results/demo --csv out.csv   # also CSV
    python -m scripts.summarize results/demo --md out.md     # Markdown to a file

Every number comes from the run's summary.json and metrics.jsonl.
"""

import argparse
import csv
import math
import os
import statistics
import sys


from scripts.results import Run, find_runs_or_report

COLUMNS = ["run", "optimizer", "rank", "steps", "final_val_loss", "best_val_loss", "final_val_ppl", "tokens_per_s",
           "steady_tokens_per_s", "ms_per_step", "first_step_ms", "peak_mem_mib", "opt_state_mib_hidden", "opt_state_mib_other", "comm_bytes_per_step"]


def summarize_run(run: Run) -> dict:
    s = run.summary or {}
    timed = [m for m in run.metrics if "step_ms" in m and m.get("step")]
    step_ms = [m["step_ms"] for m in timed]
    median_ms = statistics.median(step_ms) if step_ms else None  # the median ignores warm-up outliers
    tokens_per_step = timed[-1]["tokens"] / timed[-1]["step"] if timed and "tokens" in timed[-1] else None
    vals = [m["val_loss"] for m in run.metrics if "val_loss" in m]
    comm = [m["comm_bytes"] for m in run.metrics if "comm_bytes" in m]
    final = s.get("final_val_loss", vals[-1] if vals else None)
    mib = lambda key: s[key] / 2**20 if s.get(key) is not None else None  # noqa: E731
    return {
        "run": run.name,
        "optimizer": run.optimizer,
        "rank": run.rank,
        "steps": s.get("steps", max((m["step"] for m in run.metrics), default=0)),
        "final_val_loss": final,
        "best_val_loss": s.get("best_val_loss", min(vals) if vals else None),
        "final_val_ppl": math.exp(final) if final is not None else None,
        "tokens_per_s": s.get("tokens_per_s"),  # whole run, first steps (and any compile) included
        # tokens/s at the median step time: the steady speed, without warm-up or compile
        "steady_tokens_per_s": tokens_per_step / (median_ms / 1000) if tokens_per_step and median_ms else None,
        "ms_per_step": median_ms,
        "first_step_ms": step_ms[0] if step_ms and timed[0]["step"] == 1 else None,  # with compile: the compile time
        "peak_mem_mib": mib("peak_mem_bytes"),
        "opt_state_mib_hidden": mib("opt_state_bytes_hidden"),
        "opt_state_mib_other": mib("opt_state_bytes_other"),
        "comm_bytes_per_step": statistics.median(comm) if comm else None,
    }


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="run folders or folders of runs")
    p.add_argument("--csv", help="also write the table as CSV here")
    p.add_argument("--md", help="write the Markdown table here instead of stdout")
    args = p.parse_args(argv)
    runs = find_runs_or_report(args.paths)
    if runs is None:
        return 2
    rows = [summarize_run(r) for r in runs]
    rows.sort(key=lambda r: (r["optimizer"], r["rank"] or 0, r["run"]))
    table = markdown_table(rows)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    else:
        sys.stdout.write(table)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
