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
is resumed; one without a checkpoint is started again from scratch (run.py --restart-broken, which
re-checks that under the run folder's lock). A run another process owns (a live launcher or its
workers hold the folder's lock) is skipped, never overwritten. Never mixed silently.

Top-level keys other than name, launch, preset, config and runs are errors; `name` and run names
are single folder names. Outcomes: ok, stopped (a graceful stop: SIGTERM/SIGINT to the sweep or the
run; the sweep ends there, exit 75), failed, or skipped; the exit code is 1 if any run failed.
"""

import argparse
import copy
import itertools
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `python scripts/sweep.py`: this checkout's modules, whatever the env's .pth names

import runlock
from configs import NAME, ConfigError, read_json_file, read_text, safe_yaml
from outcome import EXIT_STOPPED

TOP_KEYS = ("name", "launch", "preset", "config", "runs")
# run.py arguments the sweep sets itself for every run
RESERVED_ARGS = ("--name", "--resume", "--overwrite", "--restart-broken", "--results-dir", "--optimizer", "--config",
                 "--preset", "--dry-run")


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
    if not isinstance(common, dict):
        raise SweepError(f"config must be a mapping of config keys, got {type(common).__name__}")
    preset = sweep.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise SweepError(f"preset must be a preset name, got {type(preset).__name__}")
    runs, names = [], set()
    for i, entry in enumerate(sweep["runs"]):
        if not isinstance(entry, dict) or "optimizer" not in entry:
            raise SweepError(f"runs[{i}] needs an 'optimizer' key")
        unknown = set(entry) - {"optimizer", "config", "grid", "name"}
        if unknown:
            raise SweepError(f"runs[{i}] has unknown key {sorted(unknown, key=str)[0]!r}; valid: optimizer, config, grid, name")
        if not isinstance(entry["optimizer"], str):
            raise SweepError(f"runs[{i}].optimizer must be an optimizer name, got {type(entry['optimizer']).__name__}")
        if "name" in entry and not isinstance(entry["name"], str):
            raise SweepError(f"runs[{i}].name must be a string, got {type(entry['name']).__name__}")
        for key in ("config", "grid"):
            if entry.get(key) is not None and not isinstance(entry[key], dict):
                raise SweepError(f"runs[{i}].{key} must be a mapping, got {type(entry[key]).__name__}")
        grid = entry.get("grid") or {}
        for key, values in grid.items():
            if not isinstance(key, str):
                raise SweepError(f"runs[{i}].grid key {key!r} must be a string")
            if not isinstance(values, list) or not values:
                raise SweepError(f"runs[{i}].grid.{key} must be a non-empty list")
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            overrides = copy.deepcopy(common)
            for key, value in (entry.get("config") or {}).items():
                if not isinstance(key, str):
                    raise SweepError(f"runs[{i}].config key {key!r} must be a string")
                set_dotted(overrides, key, copy.deepcopy(value))
            for key, value in zip(keys, combo):
                set_dotted(overrides, key, value)
            base = entry.get("name", entry["optimizer"])
            name = "-".join([base] + [f"{k.split('.')[-1]}{format_value(v)}" for k, v in zip(keys, combo)])
            if not NAME.fullmatch(name) or len(name) > 200:
                raise SweepError(f"runs[{i}] would be named {name!r}: a run name is one folder name of letters, digits "
                                 "and . _ = , + -; give the entry a 'name' or change the grid values")
            if name in names:
                raise SweepError(f"two runs of the sweep would be named {name!r}; give an entry a 'name'")
            names.add(name)
            runs.append(dict(name=name, optimizer=entry["optimizer"], config=overrides, preset=preset))
    return runs


def run_holder(run_dir: str) -> str | None:
    """Who owns the run folder now (a live launcher or its workers), or None."""
    return runlock.holder(run_dir) if os.path.isdir(run_dir) else None


def run_state(run_dir: str) -> str:
    """new, running (another process owns it), finished, resumable (has a checkpoint) or broken
    (started, nothing to resume from). Unreadable files never make a run look finished."""
    if run_holder(run_dir):
        return "running"
    if not os.path.exists(os.path.join(run_dir, "config.json")):
        return "new"
    try:
        config = read_json_file(os.path.join(run_dir, "config.json"))
        summary_path = os.path.join(run_dir, "summary.json")
        summary = read_json_file(summary_path) if os.path.exists(summary_path) else None
    except ConfigError:
        config, summary = {}, None
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    if isinstance(summary, dict) and summary.get("status", "finished") == "finished" \
            and summary.get("steps") == train.get("steps"):
        return "finished"
    ckpts = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpts) and any(f.startswith("step_") and f.endswith(".pt") for f in os.listdir(ckpts)):
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
    if state == "finished" or overwrite:
        cmd.append("--overwrite")
    elif state == "broken":
        cmd.append("--restart-broken")  # run.py re-checks under the folder's lock: never a run with a checkpoint
    return cmd


def load_sweep(path: str) -> dict:
    if not os.path.isfile(path):
        raise SweepError(f"sweep file not found: {path}")
    try:
        sweep = safe_yaml(read_text(path, "sweep file"), path)
    except ConfigError as e:
        raise SweepError(str(e)) from None
    sweep = {} if sweep is None else sweep
    if not isinstance(sweep, dict):
        raise SweepError(f"{path} must hold a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in sweep if k not in TOP_KEYS]
    if unknown:
        raise SweepError(f"{path}: unknown key {str(unknown[0])!r}; valid keys: {', '.join(TOP_KEYS)}")
    name = sweep.get("name")
    if not name:
        raise SweepError(f"{path} needs a 'name' (the folder under results/)")
    if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > 200:
        raise SweepError(f"{path}: name {name!r} must be one folder name of letters, digits and . _ = , + -")
    launch = sweep.get("launch")
    if launch is not None:
        if not isinstance(launch, list) or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                                   for a in launch):
            raise SweepError(f"{path}: launch must be a list of run.py arguments, e.g. [--nproc, 1]; got {launch!r:.80}")
        reserved = [a for a in launch if isinstance(a, str) and a.split("=")[0] in RESERVED_ARGS]
        if reserved:
            raise SweepError(f"{path}: launch may not hold {reserved[0]} (the sweep sets it for each run)")
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
    except SweepError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.only:
        runs = [r for r in runs if args.only in r["name"]]
    results_dir = os.path.join(args.results_dir, sweep["name"])
    started, outcomes = time.time(), {}
    done_times = []
    stops, child = [], None

    def on_signal(signum, frame):  # stop the sweep: the running run stops gracefully, no new one starts
        stops.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    if not args.dry_run:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    for i, run in enumerate(runs, 1):
        if stops:
            break
        run_dir = os.path.join(results_dir, run["name"])
        state = run_state(run_dir)
        if state == "running":
            line = f"{run['name']}: in use by {run_holder(run_dir) or 'another process'}, skipped"
            if args.dry_run:
                print(f"# {line}")
            else:
                outcomes[run["name"]] = "skipped"
                print(f"[{i}/{len(runs)}] {line}", file=sys.stderr, flush=True)
            continue
        cmd = run_command(sweep, run, results_dir, state, args.overwrite)
        if args.dry_run:
            print(" ".join(_quote(c) for c in cmd))
            continue
        if state == "finished" and not args.overwrite:
            print(f"[{i}/{len(runs)}] {run['name']}: finished, skipped", file=sys.stderr, flush=True)
            outcomes[run["name"]] = "ok"
            continue
        eta = ""
        if done_times:
            eta = f", ETA {sum(done_times) / len(done_times) * (len(runs) - i + 1) / 60:.1f} min"
        print(f"[{i}/{len(runs)}] {run['name']}: {state}{eta}", file=sys.stderr, flush=True)
        t0 = time.time()
        child = subprocess.Popen(cmd)
        rc = child.wait()
        child = None
        done_times.append(time.time() - t0)
        if rc == 0:
            outcomes[run["name"]] = "ok"
        elif rc == EXIT_STOPPED or (stops and rc != 0 and run_state(run_dir) == "resumable"):
            outcomes[run["name"]] = "stopped"
            print(f"[{i}/{len(runs)}] {run['name']}: stopped (resumable)", file=sys.stderr, flush=True)
            break
        else:
            outcomes[run["name"]] = "failed"
            print(f"[{i}/{len(runs)}] {run['name']}: FAILED (exit {rc})", file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    by = {k: [n for n, o in outcomes.items() if o == k] for k in ("ok", "stopped", "failed", "skipped")}
    not_run = len(runs) - len(outcomes)
    print(f"sweep {sweep['name']}: {len(by['ok'])}/{len(runs)} runs ok in {(time.time() - started) / 60:.1f} min"
          + (f"; stopped: {', '.join(by['stopped'])}" if by["stopped"] else "")
          + (f"; failed: {', '.join(by['failed'])}" if by["failed"] else "")
          + (f"; skipped (in use elsewhere): {', '.join(by['skipped'])}" if by["skipped"] else "")
          + (f"; {not_run} not started (sweep stopped)" if not_run and (stops or by["stopped"]) else ""),
          file=sys.stderr)
    if by["failed"] or by["skipped"]:
        return 1
    return EXIT_STOPPED if (stops or by["stopped"]) else 0


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


if __name__ == "__main__":
    sys.exit(main())
