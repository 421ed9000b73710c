"""What a run records: metrics.jsonl (a line per step), the values summary.json reports, the
training clock, and env.json (the software and machine it ran on). Rank 0 writes; the other ranks
keep logs that write nothing."""

import json
import re
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

from configs import ROOT
from worker.fileio import write_text_atomic
from worker.memory import MEMORY_KEYS, PEAK_KEYS

# ---------------------------------------------------------------------------------------------
# metrics.jsonl

# what each training step records about the machine's load (StepClock.load_fields), so the reports
# can tell when its times are not the optimizer's: a shared or oversubscribed CPU
LOAD_KEYS = ("load_avg_1m", "cpu_s")
METRIC_NUMBERS = ("train_loss", "val_loss", "lr", "tokens", "elapsed_s") + MEMORY_KEYS + LOAD_KEYS


def metrics_record(raw: bytes) -> dict | None:
    """A metrics.jsonl line as a record, or None for a line that is not one: cut short by a kill,
    not UTF-8, not JSON, not an object with an integer step, or with a non-number where a number goes."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    for key in METRIC_NUMBERS:
        value = record.get(key)
        if key in record and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return None
    return record


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written (rank 0 only)."""

    def __init__(self, path: str, enabled: bool, keep_until_step: int | None):
        self.enabled = enabled
        self.file = None
        self.kept: list[dict] = []  # resuming: the records up to the checkpoint, in order
        if not enabled:
            return
        if keep_until_step is not None and os.path.exists(path):
            # resuming: drop lines past the checkpoint so no step is missing or duplicated, and a
            # line cut short by a crash mid-write (it cannot be at or before the checkpoint's step)
            lines, dropped = [], 0
            with open(path, "rb") as f:
                for raw in f:
                    record = metrics_record(raw)
                    if record is None or record["step"] > keep_until_step:
                        dropped += record is None and bool(raw.strip())
                        continue
                    if self.kept and record["step"] <= self.kept[-1]["step"]:
                        dropped += 1  # a repeated step: every step once
                        continue
                    lines.append(json.dumps(record) + "\n")
                    self.kept.append(record)
            if dropped:
                print(f"warning: {path}: dropped {dropped} line(s) that are not step records", file=sys.stderr)
            write_text_atomic(path, "".join(lines))
        elif os.path.exists(path):
            os.remove(path)
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


# ---------------------------------------------------------------------------------------------
# The summary's values and the run's log


class RunSummary:
    """summary.json's values, folded in from each record as it is logged (and, on a resume, from the
    records kept from before the checkpoint): the last and best validation loss, the last training
    loss, the memory parts, and the peaks, training steps and validation apart."""

    def __init__(self, records=()):
        self.peaks = {key: None for key in PEAK_KEYS}
        self.val_loss = self.best_val_loss = self.train_loss = None
        self.memory = {}
        for record in records:
            self.add(record)

    def add(self, record: dict) -> None:
        for key in PEAK_KEYS:
            if key in record:
                self.peaks[key] = record[key] if self.peaks[key] is None else max(self.peaks[key], record[key])
        if "val_loss" in record:
            self.val_loss = record["val_loss"]
            self.best_val_loss = self.val_loss if self.best_val_loss is None else min(self.best_val_loss, self.val_loss)
        if "train_loss" in record:
            self.train_loss = record["train_loss"]
        self.memory.update({key: record[key] for key in MEMORY_KEYS if key in record})

    def finished(self, cfg, steps: int, elapsed: float, world_size: int, device) -> dict:
        """summary.json of a run that trained all its `steps` (a RunConfig's)."""
        tokens = steps * cfg.train.batch_size * cfg.data.seq_len
        return {
            "name": cfg.name,
            "status": "finished",
            "optimizer": cfg.optimizer_name,
            "rank": getattr(cfg.optimizer, "rank", None),
            "steps": steps,
            "tokens": tokens,
            "final_val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss,
            "final_train_loss": self.train_loss,
            "elapsed_s": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed else None,
            **{key: value for key, value in self.peaks.items() if value is not None},
            **self.memory,
            "world_size": world_size,
            "device": str(device),
        }


class RunLog:
    """Where a run's records go: metrics.jsonl, wandb and the progress bar (each only where it is
    open: rank 0), and the summary's values (`summary`)."""

    def __init__(self, metrics: MetricsLog, wandb_run=None, progress=None):
        self.metrics, self.wandb_run, self.progress = metrics, wandb_run, progress
        self.summary = RunSummary(metrics.kept)

    def write(self, record: dict) -> None:
        self.summary.add(record)
        self.metrics.write(record)
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record["step"])
        if self.progress is not None and "train_loss" in record:
            val = self.summary.val_loss
            self.progress.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{val:.3f}" if val else "-",
                                      tok_s=f"{record['tokens_per_s']:.0f}")
            self.progress.update(1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.metrics.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class StepClock:
    """Training time. A step's time runs from the end of the previous step's timing to the end of
    its own, so it includes the previous step's logging (metrics.jsonl, progress bar); validation
    and checkpointing are paused out, so elapsed_s and tokens/s measure training only.

    The clock also keeps the step's CPU time (this process's, all its threads; paused out the same
    way), and load_fields() adds the machine's 1-minute load average at the step's end: a step time
    measured while other processes competed for the CPUs is not the optimizer's, and the reports
    say so (scripts/results.py run_load)."""

    def __init__(self, elapsed: float = 0.0):
        self.elapsed = elapsed  # training seconds so far (a resumed run starts from its checkpoint's)
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.cpu_s = 0.0  # the last step's CPU seconds

    def lap(self) -> float:
        """Ends a step's timing; returns its seconds."""
        now, cpu_now = time.perf_counter(), time.process_time()
        step_time, self.start = now - self.start, now
        self.cpu_s, self.cpu_start = cpu_now - self.cpu_start, cpu_now
        self.elapsed += step_time
        return step_time

    def load_fields(self) -> dict:
        """The last step's load record: `cpu_s` (its process CPU seconds) and `load_avg_1m` (the
        system's 1-minute load average, where the platform has one)."""
        fields = {"cpu_s": self.cpu_s}
        try:
            fields["load_avg_1m"] = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform (Windows)
            pass
        return fields

    @contextmanager
    def paused(self):
        """Time spent inside is left out of the next step's time."""
        began, cpu_began = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began
            self.cpu_start += time.process_time() - cpu_began


# ---------------------------------------------------------------------------------------------
# env.json


def git_state(path: str = ROOT) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether the work tree has local changes: modified, staged or untracked files
    outside .gitignore); (None, None) outside a git checkout or without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if commit.returncode != 0 or status.returncode != 0:
        return None, None
    return commit.stdout.strip() or None, bool(status.stdout.strip())


def imported_distributions() -> dict[str, str]:
    """{distribution: version} of every installed distribution that provides a top-level module
    imported in this process (importlib.metadata's module -> distribution map; the harness's own
    modules, run from the repo, belong to none)."""
    from importlib import metadata

    providers = metadata.packages_distributions()
    found = {}
    for module in sorted({name.partition(".")[0] for name in list(sys.modules)}):
        for dist in providers.get(module, ()):
            try:
                found[metadata.distribution(dist).metadata["Name"]] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def environment_info(device, world_size: int) -> dict:
    commit, dirty = git_state()
    import numpy

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "world_size": world_size,
        "cuda": torch.version.cuda,
        "packages": imported_distributions(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


WANDB_ID_FILE = "wandb_id.txt"


def start_wandb(cfg, run_dir: str):
    """The run's wandb run, files under RUN/wandb/. Its id is made once and kept in RUN/wandb_id.txt,
    so a resumed run (or a restarted worker) continues the same wandb run (resume="allow")."""
    import wandb

    id_path = os.path.join(run_dir, WANDB_ID_FILE)
    run_id = open(id_path).read().strip() if os.path.exists(id_path) else ""
    if not re.fullmatch(r"[a-z0-9]{8,64}", run_id):
        run_id = os.urandom(8).hex()  # wandb ids: letters and digits
        write_text_atomic(id_path, run_id + "\n")
    return wandb.init(project=cfg.logging.wandb_project, name=cfg.name, id=run_id, dir=run_dir,
                      mode=cfg.logging.wandb, config=cfg.to_dict(), resume="allow")
