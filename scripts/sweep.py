"""Run a grid of training runs (optimizers x ranks x learning rates x seeds x any config key).

    python -m scripts.sweep sweeps/cpu-ranks.yaml            # run them, one after another
    python -m scripts.sweep sweeps/paper-ranks.yaml --dry-run # print the run.py commands

A sweep file:
    name: cpu-ranks            # runs go to results/cpu-ranks/RUN
    launch: [--nproc, "1"]     # run.py arguments for every run (optional)
    preset: null               # a configs/presets name for every run (optional)
    config: {train: {steps: 300}}  # overrides for every run (optional)
    runs:
      - optimizer: adamw
      - optimizer: mfsgd
        config: {lr: 0.05}     # overrides for this entry (optional)
        grid: {rank: [8, 16], lr: [0.02, 0.05], train.seed: [0, 1]}

A grid key is an optimizer key (rank, lr, ...), a dotted key into a section (train.seed) or into
a nested optimizer key (group_params.rank). Each entry expands to the product of its grid.
Run names say the optimizer and each grid value: mfsgd-rank16-lr0.05.

Resumable: a finished run (summary.json present) is skipped; an unfinished one with a checkpoint
is resumed; one without a checkpoint is started again from scratch. Never mixed silently.
"""

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from scripts.results import load_run

SECTION_NAMES = ("model", "data", "train", "adam", "logging", "optimizer")


class SweepError(ValueError):
    pass


def set_dotted(overrides: dict, key: str, value) -> None:
    """Puts `value` at the dotted `key` (train.seed, group_params.rank, lr) of an override dict."""
    parts = key.split(".")
    node = overrides
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SweepError(f"grid key {key!r} conflicts with a non-mapping value at {part!r}")
    node[parts[-1]] = value


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).replace(" ", "")


def expand(sweep: dict) -> list[dict]:
    """The sweep's runs: [{name, optimizer, config, preset}], in file order."""
    if not isinstance(sweep.get("runs"), list) or not sweep["runs"]:
        raise SweepError("a sweep file needs a non-empty list 'runs'")
    common = sweep.get("config") or {}
    runs, names = [], set()
    for i, entry in enumerate(sweep["runs"]):
        if not isinstance(entry, dict) or "optimizer" not in entry:
            raise SweepError(f"runs[{i}] needs an 'optimizer' key")
        unknown = set(entry) - {"optimizer", "config", "grid", "name"}
        if unknown:
            raise SweepError(f"runs[{i}] has unknown key {sorted(unknown)[0]!r}; valid: optimizer, config, grid, name")
        grid = entry.get("grid") or {}
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"runs[{i}].grid.{key} must be a non-empty list")
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            overrides = copy.deepcopy(common)
            for key, value in (entry.get("config") or {}).items():
                set_dotted(overrides, key, copy.deepcopy(value))
            for key, value in zip(keys, combo):
                set_dotted(overrides, key, value)
            base = entry.get("name", entry["optimizer"])
            name = "-".join([base] + [f"{k.split('.')[-1]}{format_value(v)}" for k, v in zip(keys, combo)])
            if name in names:
                raise SweepError(f"two runs of the sweep would be named {name!r}; give an entry a 'name'")
            names.add(name)
            runs.append(dict(name=name, optimizer=entry["optimizer"], config=overrides, preset=sweep.get("preset")))
    return runs


def run_state(run_dir: str) -> str:
    """new, finished, resumable (has a checkpoint) or broken (started, nothing to resume from)."""
    if not os.path.exists(os.path.join(run_dir, "config.json")):
        return "new"
    run = load_run(run_dir)
    if run.finished:
        return "finished"
    ckpts = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpts) and any(f.endswith(".pt") for f in os.listdir(ckpts)):
        return "resumable"
    return "broken"


def run_command(sweep: dict, run: dict, results_dir: str, state: str, overwrite: bool) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, "run.py")] + [str(a) for a in sweep.get("launch") or []]
    cmd += ["--results-dir", results_dir]
    if state == "resumable" and not overwrite:
        return cmd + ["--resume", run["name"]]
    cmd += ["--optimizer", run["optimizer"], "--name", run["name"], "--config", json.dumps(run["config"])]
    if run["preset"]:
        cmd += ["--preset", run["preset"]]
    if state in ("broken", "finished") or overwrite:
        cmd.append("--overwrite")
    return cmd


def load_sweep(path: str) -> dict:
    if not os.path.isfile(path):
        raise SweepError(f"sweep file not found: {path}")
    with open(path) as f:
        sweep = yaml.safe_load(f) or {}
    if not isinstance(sweep, dict) or not sweep.get("name"):
        raise SweepError(f"{path} needs a 'name' (the folder under results/)")
    return sweep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run a sweep of training runs, one after another.")
    p.add_argument("sweep", help="a sweep YAML file (see sweeps/)")
    p.add_argument("--results-dir", default=os.path.join(ROOT, "results"), help="the sweep goes to RESULTS_DIR/NAME")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.add_argument("--overwrite", action="store_true", help="redo finished runs too")
    p.add_argument("--only", help="run only the runs whose name contains this text")
    args = p.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        runs = expand(sweep)
    except (SweepError, yaml.YAMLError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.only:
        runs = [r for r in runs if args.only in r["name"]]
    results_dir = os.path.join(args.results_dir, sweep["name"])
    started, failures = time.time(), []
    done_times = []
    for i, run in enumerate(runs, 1):
        run_dir = os.path.join(results_dir, run["name"])
        state = run_state(run_dir)
        cmd = run_command(sweep, run, results_dir, state, args.overwrite)
        if args.dry_run:
            print(" ".join(_quote(c) for c in cmd))
            continue
        if state == "finished" and not args.overwrite:
            print(f"[{i}/{len(runs)}] {run['name']}: finished, skipped", file=sys.stderr, flush=True)
            continue
        eta = ""
        if done_times:
            eta = f", ETA {sum(done_times) / len(done_times) * (len(runs) - i + 1) / 60:.1f} min"
        print(f"[{i}/{len(runs)}] {run['name']}: {state}{eta}", file=sys.stderr, flush=True)
        t0 = time.time()
        rc = subprocess.run(cmd).returncode
        done_times.append(time.time() - t0)
        if rc != 0:
            failures.append(run["name"])
            print(f"[{i}/{len(runs)}] {run['name']}: FAILED (exit {rc})", file=sys.stderr, flush=True)
    if not args.dry_run:
        print(f"sweep {sweep['name']}: {len(runs) - len(failures)}/{len(runs)} runs ok in {(time.time() - started) / 60:.1f} min"
              + (f"; failed: {', '.join(failures)}" if failures else ""), file=sys.stderr)
    return 1 if failures else 0


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


if __name__ == "__main__":
    sys.exit(main())
