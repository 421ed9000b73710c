"""Run a sweep: a grid of training runs (optimizers x ranks x learning rates x seeds x any config
key), optionally tuning each entry's learning rate first and then rerunning the best one with
several seeds.

    python -m scripts.sweep sweeps/cpu-ranks.yaml             # run them, one after another
    python -m scripts.sweep sweeps/paper-ranks.yaml --dry-run  # print the run.py commands

A sweep file:
    name: cpu-ranks            # runs go to results/cpu-ranks/RUN
    launch: [--nproc, "1"]     # run.py arguments for every run (optional)
    preset: null               # a configs/presets name for every run (optional)
    config: {train: {steps: 300}}  # overrides for every run (optional)
    runs:
      - optimizer: adamw
      - optimizer: mfsgd
        config: {eta1: 0.5}    # overrides for this entry (optional)
        grid: {rank: [8, 16], lr: [0.02, 0.05], train.seed: [0, 1]}
      - optimizer: galore      # tune, then compare: see "Learning-rate tuning" below
        grid: {group_params.rank: [8, 32]}
        lr: {tune: [0.004, 0.008, 0.016], extend: 2, seeds: [0, 1, 2]}

A grid key is an optimizer key (rank, lr, ...), a dotted key into a section (train.seed) or into
a nested optimizer key (group_params.rank). Each entry expands to the product of its grid. Run
names say the optimizer (or the entry's `name`) and each grid value: mfsgd-rank16-lr0.05-seed0.
Every run's config is validated (keys, types, values) before anything runs, also with --dry-run.

Learning-rate tuning (an entry's `lr` mapping), for each combination of the entry's grid:
    tune: [lr, ...]   the grid, tried with one seed (tune_seed); at least two values
    extend: 2         while the best lr is the smallest or largest tried, try the edge / 2 (or x 2)
                      next (default 2); up to max_extend extra lrs (default 3), then the best is
                      used as it is, with a warning that it is still at an edge
    seeds: [0, 1, 2]  then the best lr runs with each of these seeds
    tune_seed: 0      the seed of the tuning runs (default: the first of seeds); its run at the
                      best lr is one of the seeds' runs when tune_seed is in seeds (it was picked
                      as the best on that seed, a small bias in its favour: give a tune_seed
                      outside seeds to compare on fresh seeds only)
"Best" is the lowest final val loss; a run stopped by the NaN/Inf guard (summary.json status
"diverged") counts as diverged, the worst lr. If every lr tried diverged, the entry stops there
with one line (no lr chosen, no seeds run; tuning.json says status "all-diverged") and the sweep
exits 1: try smaller lrs. Runs are named BASE-lrLR-seedS, so the seeds of the chosen lr form one
group in summarize.py and plot.py. The chosen lrs, with every lr tried and its loss, go to
RESULTS/NAME/tuning.json; the sweep file itself is copied to RESULTS/NAME/sweep.yaml.

Names: every run an entry can make (each grid point; for a tuned entry every lr it may try,
extensions included, with the tune seed and every seed) is named when the file loads; two
entries (or two grid values of one) that would make the same name are an error naming both.
Float values keep the digits that tell them apart (0.01 and 0.010000001 are two names).

Resumable, and only ever with the same config: an existing run is reused only if its config.json
is the config the sweep would launch now (resolved as run.py writes it; name and logging aside,
and for train.parallel fsdp runs the number of ranks aside, which a resume may change). Then a
finished run is skipped, one with a checkpoint is resumed, and one stopped by the NaN guard is
kept as diverged; one without a checkpoint is started again from scratch (run.py
--restart-broken, which re-checks that under the run folder's lock). If a finished, resumable or
diverged run was made with another config (or its config.json is unreadable), the sweep runs
nothing: it prints one line per such run with the keys that changed (old -> new) and exits 2
(--dry-run too). --rerun-changed runs them again with the new config, each old folder kept aside
(moved, never deleted) to RESULTS/NAME/_old/RUN-YYYYmmdd-HHMMSS, where summarize.py and plot.py
of RESULTS/NAME do not see it. --overwrite redoes every run anyway. A run another process owns
(a live launcher or its workers hold the folder's lock) is skipped, never overwritten. Tuning
decisions are re-derived from the finished runs, so a stopped sweep resumes where it was.

Top-level keys other than name, launch, preset, config and runs are errors; `name` and run names
are single folder names. Outcomes: ok, stopped (a graceful stop: SIGTERM/SIGINT (Ctrl-C) to the
sweep or the run; the run in progress writes a checkpoint, the sweep ends there with one line
saying so, exit 75; rerun the same command to resume), failed, diverged, or skipped; the exit code
is 1 if any run failed or was skipped, a run outside the tuning diverged, or no lr was chosen.
"""

import signal
import sys

# A Ctrl-C while the imports below run (torch takes seconds) is a stop like any other, not a
# KeyboardInterrupt traceback: recorded here, acted on by main().
EARLY_STOPS: list[int] = []
if __name__ == "__main__":
    for _sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_sig, lambda signum, frame: EARLY_STOPS.append(signum))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import difflib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__ and sys.path[:1] != [ROOT]:  # python scripts/sweep.py: this checkout's modules, not another's
    sys.path.insert(0, ROOT)

import run as launcher  # noqa: E402
from worker import runlock  # noqa: E402
from configs import (NAME, ConfigError, RunConfig, config_changes, config_hash, read_json_file, read_text,  # noqa: E402
                     resolve_config, safe_yaml)
from worker.outcome import EXIT_STOPPED  # noqa: E402

TOP_KEYS = ("name", "launch", "preset", "config", "runs")
ENTRY_KEYS = ("optimizer", "config", "grid", "name", "lr")
TUNE_KEYS = ("tune", "extend", "max_extend", "seeds", "tune_seed")
# run.py arguments the sweep sets itself for every run
RESERVED_ARGS = ("--name", "--resume", "--overwrite", "--restart-broken", "--results-dir", "--optimizer", "--config",
                 "--preset", "--dry-run", "--drop-checkpoints")
SWEEP_ENV = "MOFA_SWEEP"  # set for run.py: the sweep, not run.py, tells how to resume
OLD_RUNS = "_old"  # runs kept aside by --rerun-changed: RESULTS/NAME/_old/RUN-TIME (never a run name: see NAME)


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
    """A grid value as it goes into a run name: floats as `:g` (0.002, 1e-05) where that reads back
    as the same number, else with every digit needed (0.010000001): distinct floats, distinct names."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).replace(" ", "")


def check_name(name: str, where: str) -> None:
    if not NAME.fullmatch(name) or len(name) > 200:
        raise SweepError(f"{where} would be named {name!r}: a run name is one folder name of letters, digits "
                         "and . _ = , + -; give the entry a 'name' or change the grid values")


def _unknown(key, valid, where: str) -> SweepError:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return SweepError(f"{where} has unknown key {key!r}{hint}; valid: {', '.join(valid)}")


@dataclass
class TuneJob:
    """One grid combination of an entry with an `lr` mapping: tune the lr with one seed, widen the
    lr range while the best is at its edge, then run the best lr with every seed."""

    base: str  # run names are BASE-lrLR-seedS
    optimizer: str
    config: dict  # overrides, without lr and train.seed
    preset: str | None
    grid: list[float]
    seeds: list[int]
    tune_seed: int
    extend: float = 2.0
    max_extend: int = 3

    def run_name(self, lr: float, seed: int) -> str:
        return f"{self.base}-lr{format_value(lr)}-seed{seed}"

    def run(self, lr: float, seed: int) -> dict:
        config = copy.deepcopy(self.config)
        config["lr"] = lr
        set_dotted(config, "train.seed", seed)
        return dict(name=self.run_name(lr, seed), optimizer=self.optimizer, config=config, preset=self.preset)

    def possible_lrs(self) -> list[float]:
        """Every lr the tuning may try: the grid and up to max_extend extensions past either edge
        (tune_state widens one side only, but which one depends on losses not known yet)."""
        lrs, low, high = set(self.grid), self.grid[0], self.grid[-1]
        for _ in range(self.max_extend):
            low, high = extension_lr(low, self.extend, down=True), extension_lr(high, self.extend, down=False)
            lrs.update((low, high))
        return sorted(lrs)

    def all_seeds(self) -> list[int]:
        """The tune seed, then the other seeds."""
        return [self.tune_seed] + [s for s in self.seeds if s != self.tune_seed]

    def possible_names(self) -> list[str]:
        """Every run name the job may create: each lr it may try with every seed (the chosen lr,
        which the seeds run, is one of them)."""
        return [self.run_name(lr, seed) for lr in self.possible_lrs() for seed in self.all_seeds()]


def tune_spec(value, where: str) -> dict:
    """An entry's `lr` mapping, checked: {tune, extend, max_extend, seeds, tune_seed}."""
    if not isinstance(value, dict):
        raise SweepError(f"{where} must be a mapping {{tune: [lr, ...], extend: 2, seeds: [0, 1, 2]}}; a fixed lr goes "
                         "in the entry's config or grid")
    for key in value:
        if key not in TUNE_KEYS:
            raise _unknown(key, TUNE_KEYS, where)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    tune = value.get("tune")
    if not isinstance(tune, list) or len(set(tune)) < 2 or not all(number(v) and v > 0 for v in tune):
        raise SweepError(f"{where}.tune must be a list of at least two different learning rates > 0, got {tune!r:.80}")
    seeds = value.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(integer(s) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise SweepError(f"{where}.seeds must be a non-empty list of different integers >= 0, got {seeds!r:.80}")
    extend = value.get("extend", 2)
    if not number(extend) or extend <= 1:
        raise SweepError(f"{where}.extend must be a number > 1 (the factor past the edge lr), got {extend!r}")
    max_extend = value.get("max_extend", 3)
    if not integer(max_extend) or not 0 <= max_extend <= 20:
        raise SweepError(f"{where}.max_extend must be an integer in 0..20, got {max_extend!r}")
    tune_seed = value.get("tune_seed", seeds[0])
    if not integer(tune_seed) or tune_seed < 0:
        raise SweepError(f"{where}.tune_seed must be an integer >= 0, got {tune_seed!r}")
    return dict(grid=sorted({float(v) for v in tune}), extend=float(extend), max_extend=max_extend, seeds=seeds,
                tune_seed=tune_seed)


def expand(sweep: dict) -> list:
    """The sweep's jobs in file order: a run {name, optimizer, config, preset} for each grid point of
    a plain entry, a TuneJob for each grid point of an entry with an `lr` mapping."""
    if not isinstance(sweep.get("runs"), list) or not sweep["runs"]:
        raise SweepError("a sweep file needs a non-empty list 'runs'")
    common = sweep.get("config") or {}
    if not isinstance(common, dict):
        raise SweepError(f"config must be a mapping of config keys, got {type(common).__name__}")
    preset = sweep.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise SweepError(f"preset must be a preset name, got {type(preset).__name__}")
    jobs, owners = [], {}  # owners: run name -> the entry that makes it

    def claim_name(name: str, where: str) -> None:
        """Each run folder belongs to one run of one entry: two would share (and mix) its results."""
        check_name(name, where)
        if name in owners:
            other = owners[name]
            whose = f"{other} and {where}" if other != where else f"both {where} (two grid values that print alike)"
            raise SweepError(f"two runs of the sweep would be named {name!r}: {whose}; give an entry a 'name' or "
                             "change the grid values")
        owners[name] = where

    for i, entry in enumerate(sweep["runs"]):
        where = f"runs[{i}]"
        if not isinstance(entry, dict) or "optimizer" not in entry:
            raise SweepError(f"{where} needs an 'optimizer' key")
        for key in entry:
            if key not in ENTRY_KEYS:
                raise _unknown(key, ENTRY_KEYS, where)
        if not isinstance(entry["optimizer"], str):
            raise SweepError(f"{where}.optimizer must be an optimizer name, got {type(entry['optimizer']).__name__}")
        if "name" in entry and not isinstance(entry["name"], str):
            raise SweepError(f"{where}.name must be a string, got {type(entry['name']).__name__}")
        for key in ("config", "grid"):
            if entry.get(key) is not None and not isinstance(entry[key], dict):
                raise SweepError(f"{where}.{key} must be a mapping, got {type(entry[key]).__name__}")
        grid = entry.get("grid") or {}
        for key, values in grid.items():
            if not isinstance(key, str):
                raise SweepError(f"{where}.grid key {key!r} must be a string")
            if not isinstance(values, list) or not values:
                raise SweepError(f"{where}.grid.{key} must be a non-empty list")
        tuning = tune_spec(entry["lr"], f"{where}.lr") if "lr" in entry else None
        if tuning:
            clash = [k for k in grid if k in ("lr", "optimizer.lr", "train.seed")] + \
                [k for k in (entry.get("config") or {}) if k in ("lr", "optimizer")]
            if clash:
                raise SweepError(f"{where} tunes lr over seeds: remove {clash[0]!r} from its grid/config (the tuning sets "
                                 "lr and train.seed)")
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            overrides = copy.deepcopy(common)
            for key, value in (entry.get("config") or {}).items():
                if not isinstance(key, str):
                    raise SweepError(f"{where}.config key {key!r} must be a string")
                set_dotted(overrides, key, copy.deepcopy(value))
            for key, value in zip(keys, combo):
                set_dotted(overrides, key, value)
            base = entry.get("name", entry["optimizer"])
            name = "-".join([base] + [f"{k.split('.')[-1]}{format_value(v)}" for k, v in zip(keys, combo)])
            if tuning is None:
                claim_name(name, where)
                jobs.append(dict(name=name, optimizer=entry["optimizer"], config=overrides, preset=preset))
                continue
            overrides.pop("lr", None)  # the tuning sets these per run
            if isinstance(overrides.get("train"), dict):
                overrides["train"].pop("seed", None)
            job = TuneJob(base=name, optimizer=entry["optimizer"], config=overrides, preset=preset, **tuning)
            for run_name in job.possible_names():
                claim_name(run_name, where)
            jobs.append(job)
    return jobs


# ---------------------------------------------------------------------------------------------
# Learning-rate tuning: each decision is a pure function of the finished tuning runs


@dataclass
class TuneState:
    """Where a TuneJob stands: the lrs tried so far with their tune-seed losses (None: not run yet,
    inf: diverged), the runs still needed, and the chosen lr once the tuning is done."""

    tried: dict = field(default_factory=dict)  # lr -> loss or None
    extensions: list = field(default_factory=list)
    need: list = field(default_factory=list)  # lrs to run with the tune seed before deciding
    chosen: float | None = None
    at_edge: bool = False
    all_diverged: bool = False  # every lr tried diverged: none is chosen (no extension past an inf)
    failed: str | None = None  # set by the sweep: a tuning run failed (not by diverging) or was skipped


def round_lr(lr: float) -> float:
    """6 significant digits: 0.02 / 2 twice is 0.005, not 0.0049999999."""
    return float(f"{lr:.6g}")


def extension_lr(edge: float, extend: float, down: bool) -> float:
    """The next lr past an edge of the lrs tried: below the smallest, or above the largest."""
    return round_lr(edge / extend if down else edge * extend)


def tune_state(job: TuneJob, loss_of) -> TuneState:
    """Replays the tuning: `loss_of(lr)` is the tune seed's final val loss at lr (inf if it
    diverged, None if it has not finished)."""
    state = TuneState()
    lrs = list(job.grid)
    while True:
        for lr in lrs:
            if lr not in state.tried:
                state.tried[lr] = loss_of(lr)
        state.need = [lr for lr in lrs if state.tried[lr] is None]
        if state.need:
            return state
        best = min(lrs, key=lambda lr: (state.tried[lr], lr))
        edge = best == lrs[0] or best == lrs[-1]
        if not math.isfinite(state.tried[best]):  # nothing to go on: which way is better is unknown
            state.all_diverged = True
            return state
        if edge and len(state.extensions) < job.max_extend:
            new = extension_lr(lrs[0] if best == lrs[0] else lrs[-1], job.extend, down=best == lrs[0])
            state.extensions.append(new)
            lrs = sorted(lrs + [new])
            continue
        state.chosen, state.at_edge = best, edge
        return state


def tune_record(job: TuneJob, state: TuneState) -> dict:
    return {"optimizer": job.optimizer, "grid": job.grid, "extend": job.extend, "max_extend": job.max_extend,
            "tune_seed": job.tune_seed, "seeds": job.seeds,
            "tried": {format_value(lr): loss for lr, loss in sorted(state.tried.items())},
            "extensions": state.extensions, "chosen_lr": state.chosen, "chosen_at_edge": state.at_edge,
            "status": "failed" if state.failed else "all-diverged" if state.all_diverged
            else "chosen" if state.chosen is not None else "tuning"}


def run_loss(run_dir: str):
    """A tuning run's outcome: its final val loss when finished, inf when the NaN/Inf guard stopped
    it (the lr diverged), None otherwise (not run yet, unfinished, or failed for another reason:
    the sweep resumes or restarts it like any other run)."""
    state = run_state(run_dir)
    if state == "finished":
        summary = read_json_file(os.path.join(run_dir, "summary.json"))
        loss = summary.get("final_val_loss")
        return float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else math.inf
    return math.inf if state == "diverged" else None


def diverged(summary) -> bool:
    """summary.json of a run the NaN/Inf guard stopped: status "diverged" (or, as older runs wrote
    it, "failed" with a non-finite reason)."""
    if not isinstance(summary, dict):
        return False
    status = summary.get("status")
    return status == "diverged" or (status == "failed" and "non-finite" in str(summary.get("reason", "")))


def read_summary_if_any(run_dir: str) -> dict | None:
    try:
        path = os.path.join(run_dir, "summary.json")
        return read_json_file(path) if os.path.exists(path) else None
    except ConfigError:
        return None


# ---------------------------------------------------------------------------------------------
# Run folders and commands


def run_holder(run_dir: str) -> str | None:
    """Who owns the run folder now (a live launcher or its workers), or None."""
    return runlock.holder(run_dir) if os.path.isdir(run_dir) else None


def run_state(run_dir: str) -> str:
    """new, running (another process owns it), finished, diverged (the NaN/Inf guard stopped it:
    resumed, it would diverge again), resumable (has a checkpoint) or broken (started, nothing to
    resume from). Unreadable files never make a run look finished."""
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
    if diverged(summary):
        return "diverged"
    ckpts = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpts) and any(f.startswith("step_") and f.endswith(".pt") for f in os.listdir(ckpts)):
        return "resumable"
    return "broken"


# ---------------------------------------------------------------------------------------------
# Reuse: an existing run counts only if it was made with the config the sweep would launch now

REUSED_STATES = ("finished", "resumable", "diverged")  # what the sweep takes over: skip, resume, keep
# config.json keys that may differ between a run and the sweep's config for it: the folder name and
# logging change nothing a run computes (the launch section does: the world size fixes the batch's
# reduction layout, the device the numbers)
UNCOMPARED_KEYS = ("name", "logging")
# a train.parallel fsdp run resumes on any number of ranks (its checkpoint is resharded), and run.py
# then records that launch: for those the number of ranks is not compared
RESHARDABLE_LAUNCH_KEYS = ("nproc", "nnodes", "world_size")


def launched_config(run: dict, launch: dict) -> dict:
    """The config.json run.py would write for `run` now: resolved, and through JSON as written."""
    cfg = resolve_config(run["optimizer"], run["config"], preset=run["preset"], name=run["name"], launch=launch)
    return json.loads(json.dumps(cfg.to_dict()))


def is_fsdp(config: dict) -> bool:
    train = config.get("train")
    return isinstance(train, dict) and train.get("parallel") == "fsdp"


def as_resumed(saved: dict) -> dict:
    """A run's config.json as run.py reads it to resume the run: a key added to the configs since the
    run started gets its default, which is what the run goes on with. One that no longer loads (a
    key since removed, a value no longer valid) is compared as written: it shows as changed."""
    try:
        return json.loads(json.dumps(RunConfig.from_dict(saved).to_dict()))
    except (ConfigError, ValueError, TypeError):
        return copy.deepcopy(saved)


def config_drift(run_dir: str, expected: dict) -> list[str]:
    """How the run folder's config.json differs from `expected` ('key old -> new' each; [] when
    they agree). An unreadable config.json differs: nothing says what the run computed."""
    try:
        saved = as_resumed(read_json_file(os.path.join(run_dir, "config.json")))
    except ConfigError as e:
        return [f"config.json unreadable ({str(e).splitlines()[0]})"]
    made_with = (read_summary_if_any(run_dir) or {}).get("config_hash")
    if isinstance(made_with, str) and made_with != config_hash(saved):
        return ["config.json was edited after the run finished (it no longer hashes to summary.json's config_hash)"]
    expected = copy.deepcopy(expected)
    if is_fsdp(saved) and is_fsdp(expected):
        for config in (saved, expected):
            if isinstance(config.get("launch"), dict):
                for key in RESHARDABLE_LAUNCH_KEYS:
                    config["launch"].pop(key, None)
    return config_changes(saved, expected, ignore=UNCOMPARED_KEYS)


def drift_line(name: str, changes: list[str], most: int = 8) -> str:
    shown = "; ".join(changes[:most]) + (f"; and {len(changes) - most} more" if len(changes) > most else "")
    return f"{name}: made with another config than the sweep's now: {shown}"


def sweep_runs(jobs: list) -> list[dict]:
    """Every run the jobs may make: plain runs, and each tuning's runs at every lr it may try."""
    runs = []
    for job in jobs:
        if isinstance(job, TuneJob):
            runs += [job.run(lr, seed) for lr in job.possible_lrs() for seed in job.all_seeds()]
        else:
            runs.append(job)
    return runs


def changed_runs(results_dir: str, jobs: list, expected) -> list[tuple[str, list[str]]]:
    """The existing runs the sweep would take over (finished, resumable, diverged) whose config.json
    is not `expected(run)`, with their changed keys."""
    found = []
    for run in sweep_runs(jobs):
        run_dir = os.path.join(results_dir, run["name"])
        if os.path.isdir(run_dir) and run_state(run_dir) in REUSED_STATES:
            changes = config_drift(run_dir, expected(run))
            if changes:
                found.append((run["name"], changes))
    return found


def keep_aside(run_dir: str) -> str:
    """Moves a run folder to SWEEP/_old/RUN-YYYYmmdd-HHMMSS (-2, -3, ... if taken), under the
    folder's lock so no launch starts in it meanwhile; returns the new path. Nothing is deleted."""
    old_dir = os.path.join(os.path.dirname(run_dir), OLD_RUNS)
    os.makedirs(old_dir, exist_ok=True)
    stem = os.path.join(old_dir, f"{os.path.basename(run_dir)}-{time.strftime('%Y%m%d-%H%M%S')}")
    target, n = stem, 1
    while os.path.lexists(target):
        n += 1
        target = f"{stem}-{n}"
    lock_fd = runlock.claim(run_dir)  # RunLockError if a launcher or its workers hold it
    try:
        os.rename(run_dir, target)  # the lock keeps another sweep from taking `target` for this run meanwhile
    finally:
        os.close(lock_fd)
    return target


def run_command(sweep: dict, run: dict, results_dir: str, state: str, overwrite: bool,
                drop_checkpoints: bool = False) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, "run.py")] + [str(a) for a in sweep.get("launch") or []]
    cmd += ["--results-dir", results_dir] + (["--drop-checkpoints"] if drop_checkpoints else [])
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
        close = difflib.get_close_matches(str(unknown[0]), TOP_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SweepError(f"{path}: unknown key {str(unknown[0])!r}{hint}; valid keys: {', '.join(TOP_KEYS)}")
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


def launch_settings(launch_args: list) -> dict:
    """The workers' layout the sweep's `launch` gives every run (world size, device), for checking
    configs; what the machine has is run.py's to check when a run starts."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args, unknown = launcher.build_parser().parse_known_args([str(a) for a in launch_args])
    except SystemExit:
        raise SweepError(f"launch {launch_args} is not valid run.py arguments: "
                         f"{(errors.getvalue().strip().splitlines() or ['?'])[-1]}") from None
    if unknown:
        raise SweepError(f"launch holds {unknown[0]!r}, which run.py does not take (python run.py --help)")
    nproc = args.num_gpus or args.nproc or 1
    device = "cuda" if args.num_gpus else "cpu"
    return dict(nproc=nproc, nnodes=args.nnodes, world_size=nproc * args.nnodes, device=device,
                backend="nccl" if device == "cuda" else "gloo", distributed=bool(args.distributed))


def validate_configs(jobs: list, launch: dict) -> None:
    """Every run's config resolved and checked as run.py will (unknown keys, types, values), so a
    typo in the last run stops the sweep before the first one starts."""
    for job in jobs:
        if isinstance(job, TuneJob):
            runs = [job.run(lr, job.tune_seed) for lr in job.grid] + [job.run(job.grid[0], s) for s in job.seeds]
        else:
            runs = [job]
        for run in runs:
            try:
                resolve_config(run["optimizer"], run["config"], preset=run["preset"], name=run["name"], launch=launch)
            except ConfigError as e:
                raise SweepError(f"run {run['name']}: {e}") from None


def record_sweep_file(sweep_path: str, results_dir: str) -> None:
    """A copy of the sweep file in the results folder: what produced these runs."""
    from worker.fileio import write_text_atomic

    os.makedirs(results_dir, exist_ok=True)
    write_text_atomic(os.path.join(results_dir, "sweep.yaml"), read_text(sweep_path, "sweep file"))


def write_tuning(results_dir: str, tuning: dict) -> None:
    from worker.fileio import write_json

    write_json(os.path.join(results_dir, "tuning.json"), tuning)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description=doc[0].replace("\n", " "), epilog="\n\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="a sweep YAML file (see sweeps/)")
    p.add_argument("--results-dir", default=os.path.join(ROOT, "results"), help="the sweep goes to RESULTS_DIR/NAME")
    p.add_argument("--dry-run", action="store_true",
                   help="check every run's config and print the commands the sweep would run now; run nothing")
    p.add_argument("--overwrite", action="store_true", help="redo finished runs too")
    p.add_argument("--rerun-changed", action="store_true",
                   help="run again the existing runs made with another config than the sweep's now, each old folder "
                        f"kept aside in RESULTS_DIR/NAME/{OLD_RUNS}/RUN-YYYYmmdd-HHMMSS (without it the sweep refuses)")
    p.add_argument("--only", help="run only the runs (and tuned entries) whose name contains this text")
    p.add_argument("--drop-checkpoints", action="store_true",
                   help="delete the checkpoints of every finished run (they can be large); unfinished runs keep theirs")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    stops = list(EARLY_STOPS) if argv is None else []
    try:
        sweep = load_sweep(args.sweep)
        jobs = expand(sweep)
        if args.only:
            jobs = [j for j in jobs if args.only in (j.base if isinstance(j, TuneJob) else j["name"])]
        launch = launch_settings(sweep.get("launch") or [])
        validate_configs(jobs, launch)
    except SweepError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    results_dir = os.path.join(args.results_dir, sweep["name"])
    expected_configs = {}

    def expected(run: dict) -> dict:  # resolved once per run name: the tuning asks again after every run
        if run["name"] not in expected_configs:
            try:
                expected_configs[run["name"]] = launched_config(run, launch)
            except ConfigError as e:  # an extension lr's run: the rest was validated above
                raise SweepError(f"run {run['name']}: {e}") from None
        return expected_configs[run["name"]]

    if not args.overwrite:  # --overwrite redoes every run: nothing old is taken over
        try:
            changed = changed_runs(results_dir, jobs, expected)
        except SweepError as e:
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        if changed and not args.rerun_changed:
            for name, changes in changed:
                print(drift_line(name, changes), file=sys.stderr)
            print(f"error: {len(changed)} existing run(s) of {results_dir} differ from the config the sweep would run "
                  f"now (listed above), so nothing was run: to run them again with this config add --rerun-changed "
                  f"(each old folder is kept aside in {os.path.join(results_dir, OLD_RUNS)}), or undo the change to "
                  f"{args.sweep}", file=sys.stderr)
            return 2
    started, outcomes, done_times = time.time(), {}, []
    child = None
    rerun = "python -m scripts.sweep " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    def on_signal(signum, frame):  # stop the sweep: the running run stops gracefully, no new one starts
        stops.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    if not args.dry_run:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        record_sweep_file(args.sweep, results_dir)
    planned = sum(1 if not isinstance(j, TuneJob) else len(j.grid) + len(set(j.seeds) - {j.tune_seed}) for j in jobs)
    counter = itertools.count(1)
    redone = set()  # --overwrite: each run is redone once per invocation

    def say(tag: str, line: str) -> None:  # --dry-run: `# line` among the commands; else a progress line
        if args.dry_run:
            print(f"# {line}", flush=True)
        else:
            print(f"{tag} {line}".lstrip(), file=sys.stderr, flush=True)

    def take_over(run: dict, run_dir: str, tag: str, state: str) -> str:
        """The state to go on from for an existing run (finished, resumable, diverged): its own when
        its config is the sweep's, "new" once a changed one is kept aside (--rerun-changed), or
        "changed" / "running" when it must be left alone."""
        changes = config_drift(run_dir, expected(run))
        if not changes:
            return state
        if not args.rerun_changed:  # it appeared after the check at the start
            say(tag, drift_line(run["name"], changes) + "; not run (--rerun-changed runs it again)")
            return "changed"
        if args.dry_run:
            say(tag, drift_line(run["name"], changes) + f"; would be kept aside in {OLD_RUNS}/ and run again")
            return "new"
        try:
            aside = keep_aside(run_dir)
        except runlock.RunLockError as e:
            say(tag, f"{run['name']}: {e}; skipped")
            return "running"
        except OSError as e:
            say(tag, f"{run['name']}: cannot keep it aside ({e.strerror}); not run")
            return "changed"
        say(tag, drift_line(run["name"], changes) + f"; kept aside as {os.path.relpath(aside, results_dir)}, run again")
        return "new"

    def execute(run: dict) -> str:
        """Runs (or, with --dry-run, prints) one run; its outcome: ok, stopped, failed, diverged, skipped,
        changed (made with another config: left alone), planned or not started (a stop came first)."""
        nonlocal child
        i = next(counter)
        tag = f"[{i}/{max(planned, i)}]"
        run_dir = os.path.join(results_dir, run["name"])
        state = run_state(run_dir)
        overwrite = args.overwrite and run["name"] not in redone
        if state in REUSED_STATES and not overwrite:
            state = take_over(run, run_dir, tag, state)
            if state == "changed":
                return "changed"
        if state == "running":
            say(tag, f"{run['name']}: in use by {run_holder(run_dir) or 'another process'}, skipped")
            return "skipped"
        if state == "finished" and not overwrite:
            dropped = not args.dry_run and args.drop_checkpoints and launcher.drop_checkpoints(run_dir)
            say(tag, f"{run['name']}: finished, skipped" + (" (checkpoints dropped)" if dropped else ""))
            return "ok"
        if state == "diverged" and not overwrite:  # resumed, it would diverge again
            reason = (read_summary_if_any(run_dir) or {}).get("reason", "non-finite values")
            say(tag, f"{run['name']}: diverged ({reason}), not run again (--overwrite does)")
            return "diverged"
        cmd = run_command(sweep, run, results_dir, state, overwrite, args.drop_checkpoints)
        if args.dry_run:
            print(" ".join(shlex.quote(c) for c in cmd))
            return "planned"
        if stops:
            return "not started"
        eta = ""
        if done_times:
            eta = f", ETA {sum(done_times) / len(done_times) * (max(planned, i) - i + 1) / 60:.1f} min"
        print(f"{tag} {run['name']}: {state}{eta}", file=sys.stderr, flush=True)
        redone.add(run["name"])
        t0 = time.time()
        child = subprocess.Popen(cmd, env=dict(os.environ, **{SWEEP_ENV: "1"}))
        if stops:  # a stop that came while it was being started: it never saw the signal
            child.send_signal(signal.SIGTERM)
        rc = child.wait()
        child = None
        done_times.append(time.time() - t0)
        if rc == 0:
            return "ok"
        if rc == EXIT_STOPPED or (stops and rc != 0):
            return "stopped"
        summary = read_summary_if_any(run_dir)
        if diverged(summary):
            print(f"{tag} {run['name']}: diverged ({summary.get('reason', 'non-finite values')})", file=sys.stderr,
                  flush=True)
            return "diverged"
        print(f"{tag} {run['name']}: FAILED (exit {rc})", file=sys.stderr, flush=True)
        return "failed"

    tuning, extensions = {}, {}
    tuning_runs, no_lr = set(), []  # the tune-seed runs launched (their divergence is a result); all-diverged entries
    stopped_run = None

    def tuning_loss(job: TuneJob, lr: float):
        run = job.run(lr, job.tune_seed)
        run_dir = os.path.join(results_dir, run["name"])
        if args.overwrite and run["name"] not in redone:
            return None  # to be redone by this invocation
        if run_state(run_dir) in REUSED_STATES and config_drift(run_dir, expected(run)):
            return None  # not this config's result: execute() reruns it (--rerun-changed) or refuses
        return run_loss(run_dir)

    def record(name: str, outcome: str) -> None:
        nonlocal stopped_run
        outcomes[name] = outcome
        if outcome == "stopped":
            stopped_run = name

    for job in jobs:
        if stops or stopped_run:
            break
        if not isinstance(job, TuneJob):
            record(job["name"], execute(job))
            continue
        # tuning: run what the decision needs, one run at a time, and re-derive the decision
        while True:
            state = tune_state(job, lambda lr: tuning_loss(job, lr))
            planned += len(state.extensions) - extensions.get(job.base, 0)
            extensions[job.base] = len(state.extensions)
            tuning[job.base] = tune_record(job, state)
            if state.failed or not state.need or stops or stopped_run:
                break
            if args.dry_run:  # the commands the sweep would run now; what follows depends on their losses
                for lr in state.need:
                    execute(job.run(lr, job.tune_seed))
                break
            run = job.run(state.need[0], job.tune_seed)
            outcome = execute(run)
            tuning_runs.add(run["name"])
            record(run["name"], outcome)  # diverged: this lr is too large, the tuning goes on
            if outcome in ("failed", "skipped", "changed"):
                state.failed = f"{run['name']} {outcome}"
                tuning[job.base] = tune_record(job, state)
                break
        if not args.dry_run:
            write_tuning(results_dir, tuning)
        if stops or stopped_run:
            break
        if state.failed:
            print(f"{job.base}: the lr tuning stopped: {state.failed}", file=sys.stderr, flush=True)
            continue
        if state.all_diverged:
            no_lr.append(job.base)
            say("", f"{job.base}: every lr tried diverged (lr {', '.join(map(format_value, sorted(state.tried)))}): "
                    "no lr chosen, no seeds run; try smaller lrs")
            continue
        if state.chosen is None:  # --dry-run: the rest depends on losses not known yet
            print(f"# {job.base}: then lrs past an edge (x{job.extend:g}, at most {job.max_extend} more) while the best "
                  f"is at an edge, then the best lr with seeds {', '.join(map(str, job.seeds))}")
            continue
        note = f"{job.base}: lr {format_value(state.chosen)} chosen (tune seed {job.tune_seed}: " + \
            ", ".join(f"lr {format_value(lr)} {loss:.4f}" for lr, loss in sorted(state.tried.items())) + ")"
        if state.at_edge:
            note += f"; warning: still at an edge of the lrs tried after {len(state.extensions)} extensions"
        print(("# " if args.dry_run else "") + note, file=sys.stdout if args.dry_run else sys.stderr, flush=True)
        for seed in job.seeds:
            if stops or stopped_run:
                break
            if seed == job.tune_seed:  # that run is the tuning run at the chosen lr, finished already
                continue
            run = job.run(state.chosen, seed)
            record(run["name"], execute(run))
    if args.dry_run:
        return 0
    by = {k: [n for n, o in outcomes.items() if o == k]
          for k in ("ok", "stopped", "failed", "skipped", "diverged", "changed")}
    tuned_diverged = [n for n in by["diverged"] if n in tuning_runs]
    other_diverged = [n for n in by["diverged"] if n not in tuning_runs]  # at a fixed or chosen lr: a failure
    failures = by["failed"] or by["skipped"] or by["changed"] or other_diverged or no_lr
    minutes = (time.time() - started) / 60
    if stops or stopped_run:
        not_started = [n for n, o in outcomes.items() if o == "not started"]
        what = f"{not_started[0]} was not started" if not_started else "no run was in progress"
        if stopped_run:
            summary = read_summary_if_any(os.path.join(results_dir, stopped_run)) or {}
            state = run_state(os.path.join(results_dir, stopped_run))
            what = (f"{stopped_run} stopped at step {summary.get('steps')}, checkpoint written" if state == "resumable"
                    else f"{stopped_run} stopped before it trained a step")
        print(f"sweep {sweep['name']} interrupted after {minutes:.1f} min: {what}; {len(by['ok'])} of at least "
              f"{planned} runs finished; rerun the same command to resume: {rerun}", file=sys.stderr, flush=True)
        return 1 if failures else EXIT_STOPPED
    # the counter's total ([i/N]) counted every run a tuning could need: say why fewer ran
    unneeded = planned - len(outcomes)
    print(f"sweep {sweep['name']}: {len(by['ok'])}/{len(outcomes)} runs ok in {minutes:.1f} min"
          + (f" ({unneeded} of the {planned} counted runs were not needed: a tuning stopped or chose no lr)"
             if unneeded > 0 else "")
          + (f"; diverged while tuning (counted as the worst lr): {', '.join(tuned_diverged)}"
             if tuned_diverged else "")
          + (f"; no lr chosen (every lr diverged): {', '.join(no_lr)}" if no_lr else "")
          + (f"; diverged: {', '.join(other_diverged)}" if other_diverged else "")
          + (f"; failed: {', '.join(by['failed'])}" if by["failed"] else "")
          + (f"; not run (made with another config): {', '.join(by['changed'])}" if by["changed"] else "")
          + (f"; skipped (in use elsewhere): {', '.join(by['skipped'])}" if by["skipped"] else ""),
          file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
