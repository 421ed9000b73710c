"""Reading run folders: the one place that knows the layout of results/RUN, and how runs form
groups (runs whose configs differ only in train.seed).

    python -m scripts.results results/cpu-ranks     # one line per run: group, seed, status, steps, losses

A run whose files cannot be read, or hold wrong types or absurd values (RULES), is listed with
status "unreadable" after one warning line naming the file and key, and enters no statistic.

Used by scripts/plot.py, scripts/summarize.py and scripts/sweep.py.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field

if not __package__:  # python scripts/NAME.py: this checkout's modules first, not another install's
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Run:
    path: str
    config: dict
    metrics: list[dict]
    summary: dict | None = None
    env: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.get("name", os.path.basename(self.path))

    @property
    def optimizer(self) -> str:
        return self.config.get("optimizer_name", "?")

    @property
    def rank(self):
        opt = self.config.get("optimizer", {})
        if "rank" in opt:
            return opt["rank"]
        return (opt.get("group_params") or {}).get("rank")

    @property
    def label(self) -> str:
        """Legend text: optimizer, plus the rank for low-rank optimizers."""
        return self.optimizer if self.rank is None else f"{self.optimizer} r={self.rank}"

    @property
    def seed(self):
        return (self.config.get("train") or {}).get("seed")

    @property
    def lr(self):
        return (self.config.get("optimizer") or {}).get("lr")

    @property
    def usable(self) -> bool:
        """Whether the run may enter statistics at all (an unreadable or edited run never does)."""
        return self.status not in UNUSABLE

    def series(self, y: str, x: str = "step") -> tuple[list, list]:
        rows = [m for m in self.metrics if y in m and x in m and m[y] is not None]
        return [m[x] for m in rows], [m[y] for m in rows]

    def timed_steps(self) -> list[dict]:
        """The training steps' records that carry a step time (step 0, the first validation, has none)."""
        return [m for m in self.metrics if m.get("step") and m.get("step_ms") is not None]

    @property
    def median_step_ms(self) -> float | None:
        """The median training step's ms: the steady speed (warm-up and compile steps are outliers)."""
        step_ms = [m["step_ms"] for m in self.timed_steps()]
        return statistics.median(step_ms) if step_ms else None

    @property
    def finished(self) -> bool:
        return (self.summary is not None and self.summary.get("status", "finished") == "finished"
                and self.summary.get("steps") == self.config.get("train", {}).get("steps"))

    @property
    def status(self) -> str:
        """finished; stopped, failed or diverged (summary.json says so); edited (config.json changed
        after the run) or unreadable (a file of wrong types or absurd values): both never in
        statistics; running (a live launcher or its workers hold the folder); unfinished (no
        summary, or one with fewer steps than the config)."""
        if self.finished:
            return "finished"
        if self.summary is not None and self.summary.get("status") in ("stopped", "failed", "diverged") + UNUSABLE:
            return self.summary["status"]
        from worker import runlock

        return "running" if runlock.holder(self.path) else "unfinished"

    @property
    def steps_done(self) -> int:
        return max((m["step"] for m in self.metrics if isinstance(m.get("step"), int)), default=0)

    @property
    def final_val_loss(self):
        """summary.json's for a finished run, else the last val loss the run logged (or None)."""
        if self.finished and self.summary.get("final_val_loss") is not None:
            return self.summary["final_val_loss"]
        vals = self.series("val_loss")[1]
        return vals[-1] if vals else None

    @property
    def best_val_loss(self):
        if self.finished and self.summary.get("best_val_loss") is not None:
            return self.summary["best_val_loss"]
        vals = self.series("val_loss")[1]
        return min(vals) if vals else None


UNUSABLE = ("edited", "unreadable")  # statuses of runs that never enter statistics


class RunReadError(FileNotFoundError):
    """A run file that cannot be read; one line naming it (a FileNotFoundError, so the scripts that
    report missing folders report it the same way)."""


# What the reports read from a run's files, and what each value must be. A file that breaks a rule
# (a string where a number belongs, a negative or astronomically large loss, a section that is no
# mapping) makes its run "unreadable": listed with one warning line naming the file and the key, and
# left out of every statistic, instead of a traceback or a wrong mean. The bounds are far beyond any
# real run and keep the statistics' arithmetic finite.
LOSS = ("a number in [0, 1e6]", lambda v: _real(v) and 0 <= v <= 1e6)
AMOUNT = ("a number in [0, 1e18]", lambda v: _real(v) and 0 <= v <= 1e18)
COUNT = ("an integer in [0, 2^62]", lambda v: _integer(v) and 0 <= v <= 2**62)
RULES = {
    "config.json": {
        "name": ("a string", lambda v: isinstance(v, str)),
        "optimizer_name": ("a string", lambda v: isinstance(v, str)),
        "optimizer": ("a mapping", lambda v: isinstance(v, dict)),
        "optimizer.lr": ("a number >= 0", lambda v: _real(v) and v >= 0),
        "optimizer.rank": ("an integer >= 1 or null", lambda v: v is None or (_integer(v) and v >= 1)),
        "optimizer.group_params": ("a mapping", lambda v: isinstance(v, dict)),
        "optimizer.group_params.rank": ("an integer >= 1 or null", lambda v: v is None or (_integer(v) and v >= 1)),
        "train": ("a mapping", lambda v: isinstance(v, dict)),
        "train.steps": COUNT,
        "train.seed": ("an integer or null", lambda v: v is None or _integer(v)),
    },
    "summary.json": {
        "status": ("a string", lambda v: isinstance(v, str)),
        "steps": COUNT,
        "final_val_loss": LOSS,
        "best_val_loss": LOSS,
        "tokens_per_s": AMOUNT,
        "peak_mem_bytes": AMOUNT,
        "opt_state_bytes_hidden": AMOUNT,
        "opt_state_bytes_other": AMOUNT,
        "config_hash": ("a string", lambda v: isinstance(v, str)),
    },
    "metrics.jsonl": {
        "step": COUNT,
        "val_loss": LOSS,
        "train_loss": LOSS,
        "tokens": AMOUNT,
        "elapsed_s": AMOUNT,
        "step_ms": AMOUNT,
        "comm_bytes": AMOUNT,
        "load_avg_1m": AMOUNT,
        "cpu_s": AMOUNT,
    },
}
NULLABLE = {"summary.json", "metrics.jsonl"}  # null there means "not measured" (a run without validation)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _lookup(data: dict, dotted: str):
    """data's value at a dotted key, or KeyError (also where a section on the way is no mapping:
    its own rule reports that)."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(dotted)
        data = data[part]
    return data


def _show_value(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def file_problem(file: str, data: dict, where: str = "") -> str | None:
    """The first value of `data` (one of a run's files) that breaks RULES, as 'KEY must be ..., got
    VALUE', or None."""
    for key, (what, holds) in RULES[file].items():
        try:
            value = _lookup(data, key)
        except KeyError:
            continue
        if value is None and file in NULLABLE:
            continue
        if not holds(value):
            return f"{where}{key} must be {what}, got {_show_value(value)}"
    return None


def run_problem(path: str, config: dict, summary: dict | None, metrics: list[dict]) -> str | None:
    """Why the reports cannot use this run's files (one line naming the file and key), or None."""
    problem = file_problem("config.json", config)
    if problem:
        return f"{os.path.join(path, 'config.json')}: {problem}"
    if summary is not None:
        problem = file_problem("summary.json", summary)
        if problem:
            return f"{os.path.join(path, 'summary.json')}: {problem}"
    for row in metrics:
        if "step" not in row:
            return f"{os.path.join(path, 'metrics.jsonl')}: a record without a step"
        problem = file_problem("metrics.jsonl", row, f"the record of step {_show_value(row['step'])}: ")
        if problem:
            return f"{os.path.join(path, 'metrics.jsonl')}: {problem}"
    return None


def read_jsonl(path: str) -> list[dict]:
    """The records of a .jsonl file; lines that are not JSON objects (cut short by a kill, not
    UTF-8, or anything else) are skipped, as a resume drops them."""
    rows = []
    if os.path.exists(path):
        with open(path, "rb") as f:
            for raw in f:
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError):
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunReadError(f"{path} is unreadable: {(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
    if not isinstance(data, dict):
        raise RunReadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_run(path: str) -> Run:
    """A run folder's files. A file that cannot be read, or holds values the reports cannot use,
    gives an "unreadable" run (one warning line naming the file and key), never an exception."""
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is not a run folder (no config.json)")
    files = {}
    problem = None
    for name in ("config.json", "summary.json", "env.json"):
        try:
            files[name] = _read_json(os.path.join(path, name))
        except RunReadError as e:
            files[name], problem = None, problem or str(e)
    config, summary = files["config.json"] or {}, files["summary.json"]
    metrics = read_jsonl(os.path.join(path, "metrics.jsonl"))
    problem = problem or run_problem(path, config, summary, metrics)
    if problem:
        print(f"warning: {problem}: the run is listed as unreadable and left out", file=sys.stderr)
        if file_problem("config.json", config) is not None:  # keep only what names the run
            config = {k: config[k] for k in ("name", "optimizer_name") if isinstance(config.get(k), str)}
        if any(file_problem("metrics.jsonl", row) is not None or "step" not in row for row in metrics):
            metrics = []
        return Run(path=path, config=config, metrics=metrics, summary={"status": "unreadable"},
                   env=files["env.json"] or {})
    if isinstance(summary, dict) and isinstance(summary.get("config_hash"), str) and not made_with(config, summary):
        print(f"warning: {path}/config.json was edited after the run finished (it no longer hashes to summary.json's "
              "config_hash): the run is left out", file=sys.stderr)
        summary = {**summary, "status": "edited"}
    return Run(path=path, config=config, metrics=metrics, summary=summary, env=files["env.json"] or {})


def made_with(config: dict, summary: dict) -> bool:
    """Whether config.json is the config the finished run recorded (its hash in summary.json)."""
    from configs import ConfigError, RunConfig, config_hash  # torch: only for runs that recorded a hash

    try:
        return config_hash(RunConfig.from_dict(config).to_dict()) == summary["config_hash"]
    except (ConfigError, ValueError, TypeError):
        return False


def find_runs(paths: list[str]) -> list[Run]:
    """Run folders named directly, or found one level below the given folders (a sweep's folder)."""
    runs = []
    for path in paths:
        if os.path.exists(os.path.join(path, "config.json")):
            runs.append(load_run(path))
        elif os.path.isdir(path):
            try:
                entries = sorted(os.listdir(path))
            except OSError as e:
                raise RunReadError(f"cannot list {path}: {e.strerror or e}") from None
            for entry in entries:
                if os.path.exists(os.path.join(path, entry, "config.json")):
                    runs.append(load_run(os.path.join(path, entry)))
        elif os.path.exists(path):
            raise FileNotFoundError(f"{path} is a file, not a results folder (a run folder or a folder of runs)")
        else:
            raise FileNotFoundError(f"no such results folder: {path}")
    return runs


def find_runs_or_report(paths: list[str]) -> list[Run] | None:
    """find_runs for a command line: None (after a one-line error on stderr) when nothing is found."""
    import sys

    try:
        runs = find_runs(paths)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if not runs:
        print(f"error: no runs found under {', '.join(paths)}", file=sys.stderr)
        return None
    return runs


# ---------------------------------------------------------------------------------------------
# Groups: runs that differ only in their seed

# Config entries that never change what a run computes: a run's name and seed, logging, and when
# checkpoints are written. Runs whose configs agree on everything else form a group.
NOT_GROUPING = ("name", "train.seed", "train.ckpt_every", "train.keep_checkpoints", "train.debug_crash_at_step",
                "train.debug_hang_at_step", "train.collective_timeout_s", "logging")


def flatten(config: dict, prefix: str = "") -> dict:
    """{'train.steps': 300, 'optimizer.group_params.rank': 8, ...}"""
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def grouping_entries(config: dict) -> dict:
    """What a run computes, seed aside: its flattened config without the NOT_GROUPING entries."""
    return {k: v for k, v in flatten(config).items()
            if not any(k == skip or k.startswith(skip + ".") for skip in NOT_GROUPING)}


def group_key(config: dict) -> str:
    return json.dumps(grouping_entries(config), sort_keys=True)


@dataclass
class Group:
    """Runs of one config over seeds. `name` is the runs' common name without its seed part
    (mfsgd-rank8-lr0.02 for mfsgd-rank8-lr0.02-seed0, -seed1, ...); `label` says what the group
    is: optimizer, rank, lr and any other key that tells it from groups of the same optimizer."""

    name: str
    label: str
    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def optimizer(self) -> str:
        return self.first.optimizer

    @property
    def rank(self):
        return self.first.rank

    @property
    def lr(self):
        return self.first.lr

    def included(self, include_unfinished: bool = False) -> list[Run]:
        """The runs that enter the group's statistics: finished ones, or (on request) every run
        that logged a value, but never an unreadable or edited one."""
        return [r for r in self.runs if r.status == "finished" or (include_unfinished and r.usable)]

    def per_seed(self, metric: str, include_unfinished: bool = False) -> dict:
        """seed -> the metric (final_val_loss, best_val_loss) of the included runs; two runs of one
        seed (the same init and data order: repeats, not independent samples) count once, averaged."""
        values: dict = {}
        for run in self.included(include_unfinished):
            value = getattr(run, metric)
            if value is not None:
                values.setdefault(run.seed, []).append(value)
        return {seed: sum(v) / len(v) for seed, v in values.items()}


def strip_seed(name: str, seed) -> str:
    """A run name without its seed part: 'x-lr0.02-seed1' -> 'x-lr0.02' (sweep names say the seed
    as seedN)."""
    return re.sub(rf"(^|-)seed{re.escape(str(seed))}(?=-|$)", "", name).strip("-") if seed is not None else name


def _value_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs that differ only in their seed (and name, logging, checkpointing), as groups, in the
    order of their first run; each group's runs sorted by seed."""
    by_key: dict[str, list[Run]] = {}
    for run in runs:
        by_key.setdefault(group_key(run.config), []).append(run)
    members = [sorted(rs, key=lambda r: (r.seed is None, r.seed if isinstance(r.seed, int) else 0, r.name))
               for rs in by_key.values()]
    # labels: optimizer, rank, lr, then every other key that differs between groups of one optimizer
    flat = [grouping_entries(rs[0].config) for rs in members]
    shown = {"optimizer_name", "optimizer.lr", "optimizer.rank", "optimizer.group_params.rank"}
    groups, names = [], set()
    for i, rs in enumerate(members):
        same_opt = [f for f, other in zip(flat, members) if other[0].optimizer == rs[0].optimizer]
        extra = sorted(k for k in flat[i] if k not in shown and any(f.get(k) != flat[i][k] for f in same_opt))
        run = rs[0]
        label = run.label + (f" lr {_value_text(run.lr)}" if run.lr is not None else "")
        label += "".join(f" {k.rsplit('.', 1)[-1]}={_value_text(flat[i][k])}" for k in extra)
        stripped = {strip_seed(r.name, r.seed) for r in rs}
        name = stripped.pop() if len(stripped) == 1 else label.replace(" r=", "-rank").replace(" lr ", "-lr").replace(" ", "-")
        base, k = name, 2
        while name in names:  # different configs whose runs strip to one name
            name, k = f"{base}#{k}", k + 1
        names.add(name)
        groups.append(Group(name=name, label=label, runs=rs))
    return groups


def select_groups(runs: list[Run], min_seeds: int = 0, include_unfinished: bool = False) -> list[Group]:
    """The groups of `runs` with at least `min_seeds` seeds in their statistics (0: every group, also
    one whose runs all did not finish), sorted by optimizer, rank, lr and name."""
    groups = [g for g in group_runs(runs) if len(g.per_seed("final_val_loss", include_unfinished)) >= min_seeds]
    return sorted(groups, key=lambda g: (g.optimizer, g.rank or 0, g.lr or 0, g.name))


# ---------------------------------------------------------------------------------------------
# Whether a run's times can be trusted: the load it ran under

# A CPU run whose process had a CPU for less than this share of its step time (median over steps)
# was waiting for one: other processes competed for the cores
CPU_SHARE_FLOOR = 0.5


@dataclass(frozen=True)
class Load:
    """What a run recorded about the machine's load while it trained (metrics.jsonl's load_avg_1m
    and cpu_s per step, env.json's cpu_count), and whether its step times are unreliable for it."""

    recorded: bool  # False: the run predates the load fields; nothing is known either way
    load_avg: float | None = None  # median over the training steps of the 1-minute load average
    cpus: int | None = None  # env.json's cpu_count: the machine's CPUs the load average counts against
    cpu_share: float | None = None  # median of cpu_s / step time, CPU runs only
    reason: str | None = None  # why the times are unreliable ("load average 3.1 on 2 CPUs"), or None

    @property
    def unreliable(self) -> bool:
        return self.reason is not None


def run_load(run: Run) -> Load:
    """The run's load. Its times are unreliable when the median load average exceeded the CPU count
    (more runnable processes than cores: every one of them, this run's too, waited its turn), or, on
    a CPU device, when rank 0's process got a CPU for less than CPU_SHARE_FLOOR of its step time."""
    steps = run.timed_steps()
    loads = [m["load_avg_1m"] for m in steps if m.get("load_avg_1m") is not None]
    shares = [m["cpu_s"] / (m["step_ms"] / 1000) for m in steps if m.get("cpu_s") is not None and m["step_ms"] > 0]
    if not loads and not shares:
        return Load(recorded=False)
    cpus = run.env.get("cpu_count") if _integer(run.env.get("cpu_count")) and run.env["cpu_count"] > 0 else None
    load_avg = statistics.median(loads) if loads else None
    device = str(run.env.get("device") or (run.config.get("launch") or {}).get("device") or "")
    share = statistics.median(shares) if shares and device.startswith("cpu") else None
    reason = None
    if load_avg is not None and cpus is not None and load_avg > cpus:
        reason = f"load average {load_avg:.1f} on {cpus} CPUs"
    elif share is not None and share < CPU_SHARE_FLOOR:
        reason = f"the process had a CPU {share:.0%} of its step time"
    return Load(recorded=True, load_avg=load_avg, cpus=cpus, cpu_share=share, reason=reason)


def load_summary(runs: list[Run]) -> str | None:
    """One phrase on the times of `runs` together, for a plot or a table note: which were timed
    under load ("times unreliable: load average 3.1 on 2 CPUs (4 of 9 runs)"), which recorded no
    load, or None when every run recorded it and none was loaded."""
    loads = [run_load(r) for r in runs]
    bad = [ld for ld in loads if ld.unreliable]
    missing = sum(not ld.recorded for ld in loads)
    parts = []
    if bad:
        worst = max(bad, key=lambda ld: (ld.load_avg or 0, -(ld.cpu_share or 1)))
        share = f" ({len(bad)} of {len(loads)} runs)" if len(loads) > 1 else ""
        parts.append(f"times unreliable: {worst.reason}{share}")
    if missing:
        parts.append("load not recorded" + (f" for {missing} of {len(loads)} runs" if missing < len(loads) else ""))
    return "; ".join(parts) or None


# ---------------------------------------------------------------------------------------------
# Learning-rate tuning: the sweep's tuning.json (scripts/sweep.py writes it next to the runs)


def read_tuning(folder: str) -> dict:
    """A sweep folder's tuning.json as {entry: record}; {} where there is none. A file that cannot
    be read is one warning line and counts as none (the tables then mark no edge)."""
    try:
        data = _read_json(os.path.join(folder, "tuning.json"))
    except RunReadError as e:
        print(f"warning: {e}: lr edges are not marked", file=sys.stderr)
        return {}
    return {k: v for k, v in (data or {}).items() if isinstance(v, dict)}


def tuning_of(group: Group, tunings: dict[str, dict]) -> dict | None:
    """The tuning record (of `tunings`: folder -> read_tuning) whose chosen lr `group` is, or None.
    The sweep names a tuned entry's runs BASE-lrLR-seedS, so the group, named without the seed, is
    BASE-lrLR: its folder's tuning.json has an entry BASE whose chosen_lr is LR."""
    folder = os.path.dirname(group.first.path)
    for base, record in tunings.get(folder, {}).items():
        prefix = f"{base}-lr"
        if not group.name.startswith(prefix) or record.get("optimizer", group.optimizer) != group.optimizer:
            continue
        try:
            lr = float(group.name[len(prefix):])
        except ValueError:
            continue
        if lr == record.get("chosen_lr") == group.lr:
            return record
    return None


def read_tunings(groups: list[Group]) -> dict[str, dict]:
    """folder -> its tuning.json (read_tuning) for the folders holding `groups`' runs, each read once."""
    return {folder: read_tuning(folder) for folder in sorted({os.path.dirname(g.first.path) for g in groups})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="List the runs under results folders, one line each: the group they belong to (runs whose "
                    "configs differ only in train.seed), seed, status (finished, stopped, failed, diverged, running, "
                    "unfinished, edited, unreadable), steps done of the configured steps, final and best val loss. "
                    "scripts/summarize.py aggregates the groups; scripts/plot.py draws them.")
    p.add_argument("paths", nargs="+", help="run folders, or folders of runs (a sweep's results folder)")
    args = p.parse_args(argv)
    runs = find_runs_or_report(args.paths)
    if runs is None:
        return 2
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for group in group_runs(runs):
        for run in group.runs:
            steps = (run.config.get("train") or {}).get("steps")
            print(f"{group.name}\tseed {run.seed}\t{run.status}\t{run.steps_done}/{steps} steps\t"
                  f"final {fmt(run.final_val_loss)}\tbest {fmt(run.best_val_loss)}\t{run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
