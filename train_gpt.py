"""The training worker: one process per rank, started by torchrun through run.py.

    torchrun --nproc-per-node N train_gpt.py --run-dir results/RUN [--resume]

Reads results/RUN/config.json (written by run.py), trains, and writes into results/RUN:
metrics.jsonl (a line per step, appended and flushed as it happens), summary.json, env.json and
checkpoints/. Only rank 0 writes files and logs; every rank computes.

Sections: distributed setup / schedules / evaluation / memory accounting / checkpoints / loop.
"""

import argparse
import errno
import glob
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configs import ROOT, RunConfig, resolve_path
from data.loader import StreamLoader, TokenLoader, val_sequences
from data.shards import find_shards
from model import WINDOW_BLOCK, create_model
from optimizers import OPTIMIZERS, build_optimizers, split_parameters, state_bytes


# ---------------------------------------------------------------------------------------------
# Distributed setup


def setup_distributed(cfg: RunConfig):
    """Initialises the process group when launched by torchrun; returns (rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if cfg.launch.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 or cfg.launch.distributed:
        dist.init_process_group(backend=cfg.launch.backend, device_id=device if device.type == "cuda" else None)
    if world_size != cfg.launch.world_size:
        raise SystemExit(f"error: launched with world size {world_size}, but config.json says {cfg.launch.world_size}")
    return rank, world_size, device


def shutdown_distributed() -> None:
    """Leaves the process group together: without the barrier a rank that finishes early (rank 0
    still writing the last checkpoint) can tear gloo's connections down under a peer, which then
    aborts ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------------------------------------
# Schedules


def lr_multiplier(step: int, total: int, warmup: int, cooldown_frac: float) -> float:
    """Optional linear warmup, flat, then linear decay to 0 over the last cooldown_frac of steps
    (the paper harness's 'original' schedule)."""
    factor = 1.0
    if step < warmup:
        factor = (step + 1) / warmup
    if cooldown_frac > 0 and step >= total * (1 - cooldown_frac):
        # min: when the warmup reaches into the cooldown, the lr follows the lower of the two lines
        factor = min(factor, max(0.0, (total - step) / (total * cooldown_frac)))
    return factor


def window_blocks_at(step: int, total: int, window_tokens) -> int | None:
    """The sliding window, in 128-token blocks, at `step` of `total`: grows linearly from
    window_tokens[0] to window_tokens[1] tokens, floored to whole blocks (the paper harness's schedule,
    128 -> 1856 tokens: 1 block at step 0, 14 at the end). None: no window."""
    if window_tokens is None:
        return None
    x = step / total
    return int(((1 - x) * window_tokens[0] + x * window_tokens[1]) // WINDOW_BLOCK)


def apply_group_schedules(optimizer, schedules: dict, step: int) -> dict:
    """Writes scheduled hyperparameters (e.g. MoFaSGD's beta) into every param group."""
    values = {key: fn(step) for key, fn in schedules.items()}
    for group in optimizer.param_groups:
        group.update(values)
    return values


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, cfg: RunConfig, rank: int, world_size: int, device, autocast, forward_kwargs=None) -> float:
    """Mean cross-entropy over the first data.val_tokens tokens of the val shards, all ranks together.
    `forward_kwargs`: the current sliding window, as in training."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of losses, number of tokens
    files = find_shards(resolve_path(cfg.data.val_files))
    for x, y in val_sequences(files, cfg.data.seq_len, cfg.data.val_tokens, rank, world_size, cfg.train.val_batch_size,
                              pin=device.type == "cuda"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            _, loss = model(x, y, **(forward_kwargs or {}))
        # accumulated on the device: no host sync per batch
        total[0] += loss.detach().double() * y.numel()
        total[1] += y.numel()
    all_reduce_sum(total)
    model.train()
    return (total[0] / total[1]).item()


# ---------------------------------------------------------------------------------------------
# Memory accounting


def reset_peak_memory(device) -> None:
    """Starts a new peak-memory window: the CUDA allocator's peak, or on Linux the process's peak
    resident set size (VmHWM, reset by writing 5 to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak then runs from the process start
        pass


def _proc_status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status (VmRSS, VmHWM), in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def peak_memory_bytes(device) -> int:
    """Peak since the last reset_peak_memory: CUDA allocator peak (allocated tensors) on GPU,
    peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_memory_bytes(device) -> int:
    """Memory held now: allocated CUDA tensors on GPU, the resident set size on CPU (0 if unknown)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS") or 0


def peak_memory_record(device, prefix: str = "") -> dict:
    """The peak-memory fields of a metrics record: `peak_mem_bytes` (training steps) or
    `val_peak_mem_bytes` (validation), plus the allocator's reserved peak on GPU."""
    record = {f"{prefix}peak_mem_bytes": peak_memory_bytes(device)}
    if device.type == "cuda":
        record[f"{prefix}peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return record


PEAK_KEYS = ("peak_mem_bytes", "peak_reserved_bytes", "activation_peak_bytes", "val_peak_mem_bytes",
             "val_peak_reserved_bytes")


def update_peaks(peaks: dict, record: dict) -> None:
    """Folds a metrics record's peak-memory fields into the run's maxima."""
    for key in PEAK_KEYS:
        if key in record:
            peaks[key] = record[key] if peaks.get(key) is None else max(peaks[key], record[key])


MEMORY_KEYS = ("param_bytes", "grad_bytes", "opt_state_bytes_hidden", "opt_state_bytes_other")


def memory_parts(model, hidden_opt, adam_opt) -> dict:
    """Exact bytes of parameters, gradients and optimizer state (hidden matrices vs the rest)."""
    params = list({id(p): p for p in model.parameters()}.values())
    return {
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        # gradients still held, plus the pending sketches that stand in for them in sketch mode
        "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        + (hidden_opt.sketch_bytes() if hasattr(hidden_opt, "sketch_bytes") else 0),
        "opt_state_bytes_hidden": state_bytes(hidden_opt),
        "opt_state_bytes_other": state_bytes(adam_opt),
    }


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, newest K kept, loaded with weights_only=True


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


CHECKPOINT_NAME = re.compile(r"step_(\d{1,18})\.pt")


def checkpoint_step(path: str) -> int | None:
    """The step number in a checkpoint's file name, or None for a name that is not a checkpoint's."""
    match = CHECKPOINT_NAME.fullmatch(os.path.basename(path))
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint files, oldest first (by step number, which may outgrow the zero padding); files
    whose names hold no step number (step_x.pt, step_.pt) are not checkpoints and are left alone."""
    paths = [p for p in glob.glob(os.path.join(checkpoint_dir(run_dir), "step_*.pt"))
             if checkpoint_step(p) is not None and os.path.isfile(p)]
    return sorted(paths, key=checkpoint_step)


class RunFailed(Exception):
    """A run that cannot go on (a full disk, an unusable checkpoint): one line, "failed" in summary.json."""


# errors of a full or size-limited disk: the run fails with one line, older checkpoints kept
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:  # a full disk (or a kill) mid-write: no temp file left behind
            os.remove(tmp)
        except OSError:
            pass
        raise


def checkpoint_problem(state, path: str, model=None) -> str | None:
    """What makes a loaded checkpoint unusable (missing or mistyped keys, a step unlike its file
    name's, a model of other shapes than `model`'s), or None."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a checkpoint"
    for key, kind in (("step", int), ("elapsed_s", (int, float)), ("model", dict), ("optimizers", list),
                      ("schedulers", list), ("rng", list)):
        if key not in state:
            return f"no {key!r} entry"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"its {key!r} entry is a {type(state[key]).__name__}"
    if checkpoint_step(path) is not None and state["step"] != checkpoint_step(path):
        return f"it holds step {state['step']}, its name says {checkpoint_step(path)}"
    if len(state["optimizers"]) != 2 or len(state["schedulers"]) != 2 \
            or not all(isinstance(s, dict) for s in state["optimizers"] + state["schedulers"]):
        return "it does not hold the two optimizer and scheduler states of a run"
    if not state["rng"] or not all(isinstance(r, dict) and isinstance(r.get("cpu"), torch.Tensor) for r in state["rng"]):
        return "its 'rng' entry holds no CPU random state"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        return "its 'model' entry is not a state dict of tensors"
    if model is not None:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state["model"].items()}
        if set(expected) != set(got):
            diff = sorted(set(expected) ^ set(got))
            return f"its model has other parameters than config.json's (e.g. {diff[0]})"
        for k in expected:
            if expected[k] != got[k]:
                return f"its model's {k} has shape {list(got[k])}, config.json's model {list(expected[k])}"
    return None


def save_checkpoint(run_dir, step, model, optimizers, schedulers, elapsed, keep, rank, world_size):
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = [None] * world_size
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    # a sharded optimizer's state is spread over the ranks: gather it (a collective) first
    optimizer_states = [opt.consolidated_state_dict() if hasattr(opt, "consolidated_state_dict") else opt.state_dict()
                        for opt in optimizers]
    failure = None
    if rank == 0:
        try:
            os.makedirs(checkpoint_dir(run_dir), exist_ok=True)
            state = {
                "step": step,
                "elapsed_s": elapsed,
                "model": model.state_dict(),
                "optimizers": optimizer_states,
                "schedulers": [s.state_dict() for s in schedulers],
                "rng": rngs,
            }
            atomic_torch_save(state, os.path.join(checkpoint_dir(run_dir), f"step_{step:07d}.pt"))
            # older checkpoints past `keep`, and temp files left by a run killed mid-write
            for old in list_checkpoints(run_dir)[:-keep] + glob.glob(os.path.join(checkpoint_dir(run_dir), "*.tmp.*")):
                os.remove(old)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200] or type(e).__name__
            failure = f"cannot write the checkpoint of step {step} to {checkpoint_dir(run_dir)}: {reason}"
    if dist.is_initialized():  # every rank learns whether rank 0's write failed, and stops with it
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([1.0 if failure else 0.0], device=device)
        dist.all_reduce(flag)
        if flag.item() > 0 and failure is None:
            failure = f"rank 0 could not write the checkpoint of step {step}"
    if failure:
        raise RunFailed(f"{failure}; the older checkpoints are kept, resume with --resume once there is space")


def load_checkpoint(path: str, model, optimizers, schedulers, rank: int) -> tuple[int, float]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise RunFailed(f"checkpoint {path} is corrupt ({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
    problem = checkpoint_problem(state, path, model)
    if problem:
        raise RunFailed(f"checkpoint {path} is unusable: {problem}")
    model.load_state_dict(state["model"])
    for opt, s in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(s)
    for sched, s in zip(schedulers, state["schedulers"]):
        sched.load_state_dict(s)
    rng = state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"], state["elapsed_s"]


# ---------------------------------------------------------------------------------------------
# Output files


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


METRIC_NUMBERS = ("train_loss", "val_loss", "lr", "tokens", "elapsed_s") + MEMORY_KEYS


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


def write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:  # a full disk: no temp file left behind, the old file stays whole
            os.remove(tmp)
        except OSError:
            pass
        raise


def write_json(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


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


def start_wandb(cfg: RunConfig, run_dir: str):
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


def first_non_finite_parameter(model) -> str | None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return name
    return None


def fail_non_finite(run_dir, cfg, model, step, reason, is_main):
    """Stops the run: the reason goes to stderr (one line) and summary.json; checkpoints stay as they were."""
    bad = first_non_finite_parameter(model)
    if bad and "parameter" not in reason:
        reason += f" (first non-finite parameter: {bad})"
    if is_main:
        write_summary_quietly(run_dir, {"name": cfg.name, "status": "failed", "reason": reason, "steps": step - 1,
                                        "optimizer": cfg.optimizer_name})
        if not launched_by_run_py():  # run.py prints the line itself, as the last thing printed
            print(f"error: {reason}; the last good checkpoint is kept", file=sys.stderr, flush=True)
    shutdown_distributed()
    exit_process(EXIT_FAILED)


# Exit codes of a run (run.py's, and a worker's when started without run.py): a worker started by
# run.py exits 0 after a handled end (torchrun would print a ChildFailedError traceback, or restart
# it, for any other code) and run.py reads the outcome from summary.json.
EXIT_FAILED = 3  # the NaN guard, a full disk, an unusable checkpoint: "failed" in summary.json
EXIT_STOPPED = 75  # a graceful stop (SIGTERM/SIGINT): "stopped" in summary.json, resumable (EX_TEMPFAIL)

# Stop signals that arrive while the worker starts up (before train() runs) are kept here too.
STOP_SIGNALS: list = []


def launched_by_run_py() -> bool:
    return bool(os.environ.get("MOFA_LAUNCHER_PID"))


def exit_process(code: int) -> None:
    """Exits without the interpreter's teardown (see main); 0 under run.py, which reports the outcome."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if launched_by_run_py() else code)


def write_summary_quietly(run_dir: str, summary: dict) -> bool:
    """summary.json if it can be written (a full disk may not let it)."""
    try:
        write_json(os.path.join(run_dir, "summary.json"), summary)
        return True
    except OSError:
        return False


def report_stop(run_dir: str, cfg, step: int, is_main: bool, signals: list) -> None:
    """A graceful stop: "stopped" in summary.json (resumable; sweeps record it as stopped)."""
    if not is_main:
        return
    name = signal.Signals(signals[0]).name if signals else "signal"
    write_summary_quietly(run_dir, {"name": cfg.name, "status": "stopped", "reason": f"stopped by {name} at step {step}",
                                    "steps": step, "optimizer": cfg.optimizer_name})
    if not launched_by_run_py():
        print(f"stopped by signal at step {step}, checkpoint written; resume with --resume", file=sys.stderr, flush=True)


def exclude_from_ddp(model: torch.nn.Module, params: list) -> None:
    """Marks `params` for DDP to leave alone (no gradient all-reduce). DDP matches by name in the
    module it wraps, so the names are looked up there by identity: a compiled model's parameters
    are named "_orig_mod.<name>", and the plain names would silently match nothing."""
    ids = {id(p) for p in params}
    names = [name for name, p in model.named_parameters() if id(p) in ids]
    if len(names) != len(ids):
        raise RuntimeError(f"exclude_from_ddp: found {len(names)} of {len(ids)} parameters in the model")
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)


# ---------------------------------------------------------------------------------------------
# The training loop


def train(run_dir: str, resume: bool = False) -> dict | None:
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = RunConfig.from_dict(json.load(f))
    rank, world_size, device = setup_distributed(cfg)
    is_main = rank == 0
    torch.manual_seed(cfg.train.seed)

    model = create_model(cfg.model.arch, **cfg.model.resolved()).to(device)
    raw_model = model
    hidden_opt, adam_opt = build_optimizers(model, cfg.optimizer_name, cfg.optimizer, cfg.adam, device.type)
    optimizers = [hidden_opt, adam_opt]
    total_steps = cfg.train.steps
    lr_lambda = lambda step: lr_multiplier(step, total_steps, cfg.optimizer.lr_warmup_steps, cfg.optimizer.cooldown_frac)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) for opt in optimizers]
    group_schedules = OPTIMIZERS[cfg.optimizer_name].schedules(cfg.optimizer)

    start_step, elapsed = 0, 0.0
    checkpoints = list_checkpoints(run_dir) if resume else []
    if checkpoints:
        start_step, elapsed = load_checkpoint(checkpoints[-1], raw_model, optimizers, schedulers, rank)
    if cfg.train.compile:
        model = torch.compile(model)
    eval_model = model  # validation runs through the compiled model too (not through DDP)
    routing = split_parameters(raw_model)
    comm_sketch = getattr(cfg.optimizer, "comm", "full") == "sketch"
    # memory_mode sketch + comm sketch: each matrix's sketches are all-reduced while backward
    # still runs, on a process group of their own (independent of the order of DDP's all-reduces)
    sketch_group, overlap_sketches = None, False
    # DDP and the collectives wherever there is a process group (run.py --distributed: also on one worker)
    distributed = dist.is_initialized()
    if distributed:
        if comm_sketch:
            # MoFaSGD's matrices leave DDP's reducer: their sketches are all-reduced instead
            exclude_from_ddp(model, [p for _, p in routing["hidden"]])
            sketch_group = dist.new_group()
            overlap_sketches = cfg.optimizer.memory_mode == "sketch"
        # gradients as views into DDP's buckets (no second gradient-sized copy); the speedrun's
        # buffers (rotary tables) are the same on every rank, so none are broadcast per forward
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True, broadcast_buffers=False)
    # bytes all-reduced per step by DDP (gradients in the parameter dtype), by parameter kind
    kind_bytes = {kind: sum(p.numel() * p.element_size() for _, p in ps) for kind, ps in routing.items()}
    comm_other = (sum(kind_bytes.values()) - kind_bytes["hidden"]) if distributed else 0

    train_files = find_shards(resolve_path(cfg.data.train_files))
    # on GPU: pinned batches, so the non_blocking copies below overlap the previous step's kernels
    if cfg.data.layout == "stream":
        loader = StreamLoader(train_files, cfg.data.seq_len, cfg.train.batch_size, vocab_size=cfg.model.vocab_size,
                              pin=device.type == "cuda")
    else:
        loader = TokenLoader(train_files, cfg.data.seq_len, seed=cfg.train.seed, shuffle=cfg.data.shuffle,
                             vocab_size=cfg.model.vocab_size, pin=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.autocast == "bf16" else nullcontext()
    # the sliding window (speedrun): a 0-d tensor updated in place, so a compiled model does not
    # recompile as it grows
    window = torch.zeros((), dtype=torch.int64, device=device) if cfg.train.window_tokens else None
    forward_kwargs = {"window_blocks": window} if window is not None else {}

    def set_window(at_step: int) -> dict:
        if window is None:
            return {}
        blocks = window_blocks_at(at_step, total_steps, cfg.train.window_tokens)
        window.fill_(blocks)
        return {"window_blocks": blocks}

    def validate(at_step: int) -> dict:
        set_window(at_step)
        reset_peak_memory(device)
        loss = evaluate(eval_model, cfg, rank, world_size, device, autocast, forward_kwargs)
        return {"val_loss": loss, **peak_memory_record(device, "val_")}

    grad_accum = cfg.grad_accum
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len

    # resuming from step k keeps metrics lines up to k; starting from scratch starts a new file
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), is_main, start_step if start_step > 0 else None)
    wandb_run = start_wandb(cfg, run_dir) if is_main and cfg.logging.wandb != "off" else None

    progress = None
    if is_main and cfg.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc=cfg.name, unit="step", dynamic_ncols=True)
    if is_main:  # after the optional imports (wandb, tqdm), so env.json lists their versions too
        write_json(os.path.join(run_dir, "env.json"), environment_info(device, world_size))

    stop_signal = STOP_SIGNALS
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    # the run's peaks, training steps and validation apart (each resets the counter), over the
    # records kept from before a resume and the new ones
    peaks = {key: None for key in PEAK_KEYS}

    def log(record):
        update_peaks(peaks, record)
        metrics.write(record)
        if wandb_run is not None:
            wandb_run.log(record, step=record["step"])

    for record in metrics.kept:
        update_peaks(peaks, record)

    val_loss = None
    if start_step == 0:
        first = validate(0)
        val_loss = first["val_loss"]
        log({"step": 0, **first, "tokens": 0, "elapsed_s": 0.0})
    # resuming: the summary's losses and memory fields continue from the records before the checkpoint
    kept_vals = [r["val_loss"] for r in metrics.kept if "val_loss" in r]
    val_loss = kept_vals[-1] if kept_vals else val_loss
    best_val = min(kept_vals) if kept_vals else val_loss
    losses = [r["train_loss"] for r in metrics.kept if "train_loss" in r][-1:]
    step = start_step
    last_kept = metrics.kept[-1] if metrics.kept else {}
    mem = {key: last_kept[key] for key in MEMORY_KEYS if key in last_kept}
    # A step's time runs from the end of the previous step's timing to the end of its own, so it
    # includes the previous step's logging (metrics.jsonl, progress bar); validation and
    # checkpointing are paused out (elapsed_s and tokens/s measure training only).
    step_start = time.perf_counter()
    while step < total_steps:
        scheduled = {**apply_group_schedules(hidden_opt, group_schedules, step), **set_window(step)}
        held_before_forward = current_memory_bytes(device)
        reset_peak_memory(device)
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = loader.micro_batch(step, cfg.train.batch_size, micro, grad_accum, rank, world_size)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # DDP all-reduces gradients only on the last micro step
            sync = micro == grad_accum - 1 or not isinstance(model, DDP)
            with (nullcontext() if sync else model.no_sync()), autocast:
                _, loss = model(x, y, **forward_kwargs)
            if overlap_sketches and micro == grad_accum - 1:
                hidden_opt.all_reduce_sketches_during_backward(sketch_group)
            # the batch-mean gradient (averaged over micro batches, DDP averages over ranks), x grad_scale
            (loss * (cfg.train.grad_scale / grad_accum)).backward()
            loss_sum += loss.detach()
        # the forward+backward peak above what was held before it: activations and the head's logits
        # (and the gradients made in backward)
        activation_peak = peak_memory_bytes(device) - held_before_forward
        comm_hidden = kind_bytes["hidden"] if distributed else 0
        if comm_sketch:
            hidden_opt.sketch_gradients_()
            comm_hidden = hidden_opt.all_reduce_sketches(sketch_group) if distributed else 0
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.train.grad_clip)
        lr = hidden_opt.param_groups[0]["lr"]
        mem = memory_parts(raw_model, hidden_opt, adam_opt) if step == start_step else mem
        for opt in optimizers:
            opt.step()
        comm_hidden += getattr(hidden_opt, "exchanged_bytes", 0)  # shard: the all-gathered step factors
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        for sched in schedulers:
            sched.step()
        # one collective for the logged loss and the stop flag, so every rank stops at the same step
        reduced = all_reduce_sum(torch.stack([loss_sum.float(), torch.tensor(float(bool(stop_signal)), device=device)]))
        train_loss = (reduced[0] / (grad_accum * world_size)).item()
        stop_now = reduced[1].item() > 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timed_until = time.perf_counter()
        step_time = timed_until - step_start
        elapsed += step_time
        paused = 0.0  # validation and checkpoint time, left out of the next step's time
        step += 1
        if step == start_step + 1:  # optimizer state exists after the first step
            mem.update(opt_state_bytes_hidden=state_bytes(hidden_opt), opt_state_bytes_other=state_bytes(adam_opt))
        if not math.isfinite(train_loss):
            fail_non_finite(run_dir, cfg, raw_model, step, f"non-finite training loss {train_loss} at step {step}", is_main)
        losses.append(train_loss)
        record = {"step": step, "train_loss": train_loss, "lr": lr, **scheduled,
                  "tokens": step * tokens_per_step, "elapsed_s": elapsed, "step_ms": step_time * 1000,
                  "tokens_per_s": tokens_per_step / step_time, **peak_memory_record(device),
                  "activation_peak_bytes": activation_peak, **mem,
                  "comm_bytes_hidden": comm_hidden, "comm_bytes_other": comm_other, "comm_bytes": comm_hidden + comm_other}
        last = step == total_steps
        if last or (cfg.train.val_every and step % cfg.train.val_every == 0):
            pause_start = time.perf_counter()
            record.update(validate(step))
            val_loss = record["val_loss"]
            paused += time.perf_counter() - pause_start
            best_val = val_loss if best_val is None else min(best_val, val_loss)
        log(record)
        if cfg.train.debug_crash_at_step == step and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            raise RuntimeError(f"debug_crash_at_step: injected crash at step {step}")
        if progress is not None:
            progress.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}" if val_loss else "-",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            progress.update(1)
        if last or stop_now or (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0):
            pause_start = time.perf_counter()
            bad = first_non_finite_parameter(raw_model)
            if bad:  # never replace a good checkpoint with a broken model
                fail_non_finite(run_dir, cfg, raw_model, step, f"non-finite values in parameter {bad} after step {step}", is_main)
            save_checkpoint(run_dir, step, raw_model, optimizers, schedulers, elapsed, cfg.train.keep_checkpoints,
                            rank, world_size)
            paused += time.perf_counter() - pause_start
        step_start = timed_until + paused
        if stop_now:
            report_stop(run_dir, cfg, step, is_main, stop_signal)
            break
    if progress is not None:
        progress.close()
    metrics.close()
    summary = None
    if is_main and step == total_steps:
        summary = {
            "name": cfg.name,
            "status": "finished",
            "optimizer": cfg.optimizer_name,
            "rank": getattr(cfg.optimizer, "rank", None),
            "steps": step,
            "tokens": step * tokens_per_step,
            "final_val_loss": val_loss,
            "best_val_loss": best_val,
            "final_train_loss": losses[-1] if losses else None,
            "elapsed_s": elapsed,
            "tokens_per_s": step * tokens_per_step / elapsed if elapsed else None,
            **{key: value for key, value in peaks.items() if value is not None},
            **mem,
            "world_size": world_size,
            "device": str(device),
        }
        write_json(os.path.join(run_dir, "summary.json"), summary)
    if wandb_run is not None:
        wandb_run.finish()
    shutdown_distributed()
    return summary


def main():
    parser = argparse.ArgumentParser(description="mofa training worker (start it with run.py)")
    parser.add_argument("--run-dir", required=True, help="results/RUN holding config.json")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run dir")
    args = parser.parse_args()
    import runlock

    runlock.worker_dies_with_launcher()  # no trainer outlives its launcher
    runlock.hold_as_worker(args.run_dir, int(os.environ.get("GROUP_RANK", "0")))  # kept until this process dies
    try:
        train(args.run_dir, resume=args.resume)
    except RunFailed as e:
        fail_run(args.run_dir, str(e))
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        fail_run(args.run_dir, f"cannot write to {e.filename or args.run_dir}: {e.strerror}; resume with --resume "
                               "once there is space")
    # Every output is written and closed and the process group is left: skip the interpreter's
    # and C++ static teardown, where a communication thread's destructor can abort a finished
    # rank (SIGABRT, "terminate called without an active exception", seen rarely with gloo).
    exit_process(0)


def fail_run(run_dir: str, reason: str) -> None:
    """A handled failure of every rank (RunFailed), or of rank 0 alone (a full disk): one line on
    stderr (from run.py when it launched us), "failed" in summary.json if it can be written."""
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            with open(os.path.join(run_dir, "config.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = {}
        saved = saved if isinstance(saved, dict) else {}
        write_summary_quietly(run_dir, {"name": saved.get("name"), "status": "failed", "reason": reason,
                                        "optimizer": saved.get("optimizer_name")})
        if not launched_by_run_py():
            print(f"error: {reason}", file=sys.stderr, flush=True)
    try:
        shutdown_distributed()
    except Exception:  # noqa: BLE001 - a peer already gone; the outcome is written
        pass
    exit_process(EXIT_FAILED)


if __name__ == "__main__":
    for _sig in (signal.SIGTERM, signal.SIGINT):  # from the start: a stop before train() runs is kept
        signal.signal(_sig, lambda signum, frame: STOP_SIGNALS.append(signum))
    main()
