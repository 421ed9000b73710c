"""The training worker: one process per rank, started by torchrun through run.py.

    torchrun --nproc-per-node N train_gpt.py --run-dir results/RUN [--resume]

Reads results/RUN/config.json (written by run.py), trains, and writes into results/RUN:
metrics.jsonl (a line per step, appended and flushed as it happens), summary.json, env.json and
checkpoints/. Only rank 0 writes files and logs; every rank computes.

train() is the loop; below it, in the order it calls them: set_up() (the `Run`: model, optimizers,
data, parallelism, restored from the newest checkpoint on a resume), open_log(), train_step(),
validate(), write_checkpoint() and finish(). The rest lives in the worker/ package:
worker/checkpoint.py (checkpoint files and their manifests), worker/metrics.py (metrics.jsonl, the
summary, the step clock, env.json), worker/memory.py (memory accounting), worker/parallel.py
(process group, DDP or FSDP2, gradient averaging), worker/spectrum.py (spectral diagnostics) and
worker/outcome.py (exit codes); optimizers/ holds RunOptimizers (the two optimizers and their
schedules).
"""

import argparse
import gc
import itertools
import json
import math
import os
import re
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from worker.checkpoint import agreed_resume_checkpoint, load_checkpoint, save_checkpoint
from configs import RunConfig, config_hash, resolve_path
from data.loader import StreamLoader, TokenLoader, val_sequences
from data.shards import find_shards
from worker.fileio import append_json_line, start_json_log, write_json
from mofasgd.optimizer import local_part
from worker.memory import current_memory_bytes, memory_parts, peak_memory_bytes, peak_memory_record, reset_peak_memory
from worker.metrics import MetricsLog, RunLog, StepClock, environment_info, start_wandb
from model import create_model, window_blocks_at
from optimizers import RunOptimizers, split_parameters, state_bytes
from worker.outcome import (DISK_ERRNOS, EXIT_FAILED, RunFailed, collective_failure, exit_process, launched_by_run_py,
                     write_summary_quietly)
from worker.parallel import (GradientExchange, all_reduce_sum, setup_distributed, shard_model, shutdown_distributed,
                      wrap_data_parallel)

# SIGTERM/SIGINT received (from the worker's start, see __main__): the run stops after the step
STOP_SIGNALS: list = []
# the step train() is on, as metrics.jsonl numbers it (None: before the first), for the line a collective
# that failed on a lost rank ends the run with
CURRENT_STEP: list = [None]


def train(run_dir: str, resume: bool = False) -> dict | None:
    """Trains the run in `run_dir` to train.steps, or until a stop signal; returns rank 0's summary."""
    run = set_up(run_dir, resume)
    cfg, total_steps = run.cfg, run.cfg.train.steps
    log = open_log(run)
    catch_stop_signals()
    if run.start_step == 0:
        log.write({"step": 0, **validate(run, 0), "tokens": 0, "elapsed_s": 0.0})
    step, clock = run.start_step, StepClock(run.elapsed)
    while step < total_steps:
        CURRENT_STEP[0] = step + 1
        record, stop_now = train_step(run, step, clock)
        step += 1
        last = step == total_steps
        if last or due(cfg.train.val_every, step):
            with clock.paused():
                record.update(validate(run, step))
        log.write(record)
        crash_if_asked(cfg, step)
        if last or stop_now or due(cfg.train.ckpt_every, step):
            with clock.paused():
                write_checkpoint(run, step, clock.elapsed)
        if stop_now:
            report_stop(run, step)
            break
    return finish(run, log, step, clock.elapsed)


# ---------------------------------------------------------------------------------------------
# Set-up


@dataclass
class Run:
    """What train() runs on, built by set_up() on every rank."""

    run_dir: str
    cfg: RunConfig
    rank: int
    world_size: int
    device: torch.device
    raw_model: torch.nn.Module  # the parameters themselves (FSDP2: sharded): checkpoints, clipping, memory accounting
    model: torch.nn.Module  # what training calls: compiled (train.compile), in DDP under a process group (not FSDP)
    eval_model: torch.nn.Module  # what validation calls: compiled too, not in DDP
    optimizers: RunOptimizers
    loader: TokenLoader | StreamLoader
    autocast: object  # torch.autocast to bf16, or a null context
    window: "SlidingWindow"
    comm: GradientExchange
    spectrum: "SpectrumMonitor | None" = None  # logging.spectrum_every: spectral diagnostics around the step
    rank_log: "RankLog | None" = None  # MoFaSGD rank_policy energy: RUN/ranks.jsonl (rank 0)
    start_step: int = 0  # a resume's checkpoint step
    elapsed: float = 0.0  # training seconds before start_step
    memory: dict = field(default_factory=dict)  # memory_parts, logged with every step

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP2 (train.parallel fsdp): parameters, gradients and optimizer state split over the ranks."""
        return self.cfg.train.parallel == "fsdp"


def set_up(run_dir: str, resume: bool) -> Run:
    """Builds the run of run_dir/config.json on this rank: the process group, the model (FSDP2 sharded
    under train.parallel fsdp) and its optimizers (restored from the newest checkpoint, the one every
    rank agrees on, when resuming), compile and DDP, the data loader."""
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = RunConfig.from_dict(json.load(f))
    rank, world_size, device = setup_distributed(cfg)
    torch.manual_seed(cfg.train.seed)
    raw_model = create_model(cfg.model.arch, **cfg.model.resolved()).to(device)
    sharded = cfg.train.parallel == "fsdp"
    if sharded:  # before the optimizers: they keep state for the sharded parameters
        shard_model(raw_model)
    optimizers = RunOptimizers.for_run(raw_model, cfg, device.type)
    # before the checkpoint is loaded: it may hold the monitor's shadow momentum
    spectrum = spectrum_monitor(cfg, run_dir, split_parameters(raw_model)["hidden"], optimizers.hidden, rank)
    start_step, elapsed = 0, 0.0
    checkpoint = agreed_resume_checkpoint(run_dir, rank) if resume else None
    if checkpoint:
        start_step, elapsed = load_checkpoint(checkpoint, raw_model, optimizers, rank, sharded, config=cfg.to_dict(),
                                              spectrum=spectrum)
    if spectrum is not None:
        spectrum.prepare_file(start_step)
    if sharded and getattr(optimizers.hidden, "memory_mode", "full") == "sketch":
        # the factors of FSDP2's row-sharded weights are made here, on the default stream and in one
        # order on every rank, not in the backward hooks on FSDP's reduce-scatter stream
        optimizers.hidden.init_state_()
    model = torch.compile(raw_model) if cfg.train.compile else raw_model
    eval_model = model
    routing = split_parameters(raw_model)
    block_params = {id(p) for block in raw_model.transformer_blocks() for p in block.parameters()}
    comm = GradientExchange.for_run(cfg, routing, block_params)
    if comm.distributed and not sharded:  # DDP wherever there is a process group (run.py --distributed: also on one worker)
        model = wrap_data_parallel(model, [p for _, p in routing["hidden"]] if comm.sketch else [], device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.autocast == "bf16" else nullcontext()
    window = SlidingWindow(cfg.train.window_tokens, cfg.train.steps, device)
    rank_log = RankLog.for_run(run_dir, routing["hidden"], optimizers.hidden, rank, start_step)
    return Run(run_dir, cfg, rank, world_size, device, raw_model, model, eval_model, optimizers,
               training_loader(cfg, device), autocast, window, comm, spectrum, rank_log, start_step, elapsed)


@dataclass
class RankLog:
    """MoFaSGD's rank_policy energy: RUN/ranks.jsonl, one line per re-allocation (and the starting
    ranks at step 0): {"step", "ranks": {matrix: r}, "kept_share": {matrix: share of its momentum
    expansion's energy kept, null if not stepped}, "budget", "held"} (numbers of factors). Rank 0
    writes it; the replicas allocate alike. A resume keeps the lines up to its checkpoint."""

    path: str
    names: list  # the optimizer's parameters' names, in its order
    optimizer: object

    @classmethod
    def for_run(cls, run_dir: str, named_hidden, optimizer, rank: int, start_step: int) -> "RankLog | None":
        if getattr(optimizer, "rank_policy", "fixed") != "energy" or rank != 0:
            return None
        path = os.path.join(run_dir, "ranks.jsonl")
        name_of = {id(p): name for name, p in named_hidden}
        log = cls(path, [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]], optimizer)
        start_json_log(path, start_step)
        if not start_step:
            log.write(0, optimizer.ranks(), [None] * len(log.names))
        return log

    def write(self, step: int, ranks, kept) -> None:
        append_json_line(self.path, {"step": step, "ranks": dict(zip(self.names, ranks)),
                                     "kept_share": dict(zip(self.names, kept)),
                                     "budget": self.optimizer.rank_budget_numbers(),
                                     "held": self.optimizer.factor_numbers_held()})

    def after_step(self, step: int) -> None:
        """Writes the re-allocation of optimizer step `step` + 1, if it made one."""
        allocation = self.optimizer.last_allocation
        if allocation is not None and allocation["step"] == step + 1:
            self.write(step + 1, allocation["ranks"], allocation["kept_share"])


def spectrum_monitor(cfg: RunConfig, run_dir: str, named_hidden, hidden_optimizer, rank: int):
    """logging.spectrum_every's monitor: under DDP on rank 0 alone (the replicas are equal, so its
    values are every rank's); under FSDP and optimizer.shard on every rank (each holds a part of
    the matrices or of their state, and the logged steps' collectives need them all). Rank 0 writes
    RUN/spectrum.jsonl (prepare_file: a resume keeps the lines up to its checkpoint). None when off:
    no extra work or memory. Built before a resume's checkpoint is loaded, which restores its
    shadow momentum."""
    if not cfg.logging.spectrum_every:
        return None
    from worker.spectrum import SpectrumMonitor, runs_on_every_rank

    if rank != 0 and not runs_on_every_rank(named_hidden, hidden_optimizer):
        return None
    path = os.path.join(run_dir, "spectrum.jsonl") if rank == 0 else None
    return SpectrumMonitor(named_hidden, hidden_optimizer, cfg.logging.spectrum_every, cfg.logging.spectrum_shadow, path)


def training_loader(cfg: RunConfig, device) -> TokenLoader | StreamLoader:
    """The training batches of data.layout; on GPU pinned, so the non_blocking copies to the device
    overlap the previous step's kernels."""
    files = find_shards(resolve_path(cfg.data.train_files))
    pin = device.type == "cuda"
    if cfg.data.layout == "stream":
        return StreamLoader(files, cfg.data.seq_len, cfg.train.batch_size, vocab_size=cfg.model.vocab_size, pin=pin)
    return TokenLoader(files, cfg.data.seq_len, seed=cfg.train.seed, shuffle=cfg.data.shuffle,
                       vocab_size=cfg.model.vocab_size, pin=pin)


class SlidingWindow:
    """The speedrun model's sliding attention window (train.window_tokens), set before each step
    and validation: a 0-d tensor updated in place, so a compiled model does not recompile as it
    grows. Without train.window_tokens it does nothing."""

    def __init__(self, window_tokens, total_steps: int, device):
        self.window_tokens, self.total_steps = window_tokens, total_steps
        self.blocks = torch.zeros((), dtype=torch.int64, device=device) if window_tokens else None
        self.forward_kwargs = {"window_blocks": self.blocks} if self.blocks is not None else {}

    def set(self, step: int) -> dict:
        """Sets step `step`'s window; returns its metrics field ({} without a window)."""
        if self.blocks is None:
            return {}
        blocks = window_blocks_at(step, self.total_steps, self.window_tokens)
        self.blocks.fill_(blocks)
        return {"window_blocks": blocks}


def open_log(run: Run) -> RunLog:
    """metrics.jsonl (a resume keeps its records up to the checkpoint, a fresh run starts a new
    file), wandb, the progress bar and env.json, on rank 0; elsewhere a log that writes nothing."""
    cfg, run_dir, is_main = run.cfg, run.run_dir, run.is_main
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), is_main, run.start_step if run.start_step > 0 else None)
    wandb_run = start_wandb(cfg, run_dir) if is_main and cfg.logging.wandb != "off" else None

    progress = None
    if is_main and cfg.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.steps, initial=run.start_step, desc=cfg.name, unit="step", dynamic_ncols=True)
    if is_main:  # after the optional imports (wandb, tqdm), so env.json lists their versions too
        write_json(os.path.join(run_dir, "env.json"), environment_info(run.device, run.world_size))
    return RunLog(metrics, wandb_run, progress)


def catch_stop_signals() -> None:
    """SIGTERM and SIGINT (preemption, Ctrl-C) are noted, not obeyed at once: every rank finishes
    the step, a checkpoint is written, and the run stops (train_step shares the flag)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: STOP_SIGNALS.append(signum))


# ---------------------------------------------------------------------------------------------
# One step, validation, checkpoints


def train_step(run: Run, step: int, clock: StepClock) -> tuple[dict, bool]:
    """Optimizer step `step` (counting from 0) on this rank; returns its metrics record (the record
    of step + 1: metrics.jsonl's step 0 is the first validation) and whether a stop signal reached
    any rank, so every rank stops after the same step."""
    cfg, device, optimizers = run.cfg, run.device, run.optimizers
    scheduled = {**optimizers.apply_schedules(step), **run.window.set(step)}
    held_before_forward = current_memory_bytes(device)
    reset_peak_memory(device)
    loss_sum = forward_backward(run, step)
    # the forward+backward peak above what was held before it: activations and the head's logits
    # (and the gradients made in backward)
    activation_peak = peak_memory_bytes(device) - held_before_forward
    comm_hidden = run.comm.average_hidden_gradients(optimizers.hidden)
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.train.grad_clip)
    lr = optimizers.lr
    if step == run.start_step:  # the gradients as held at the step
        run.memory = memory_parts(run.raw_model, optimizers.hidden, optimizers.adam)
    # one collective, before the update, for the logged loss, the stop flag and the divergence
    # check: every rank learns together whether any rank's loss or gradients are non-finite, and
    # no rank applies an update made from them
    stopping = torch.tensor(float(bool(STOP_SIGNALS)), device=device)
    reduced = all_reduce_sum(torch.stack([loss_sum.float(), stopping, non_finite_gradients(run.raw_model)]))
    train_loss = (reduced[0] / (cfg.grad_accum * run.world_size)).item()
    if not math.isfinite(train_loss) or reduced[2].item() > 0:
        what = f"training loss {train_loss}" if not math.isfinite(train_loss) else "gradients (NaN or inf)"
        fail_non_finite(run, step + 1, f"non-finite {what} at step {step + 1}")
    if run.spectrum is not None:
        run.spectrum.before_step(step)
    try:
        optimizers.step()
    except FloatingPointError as e:  # an optimizer's own finiteness check (MoFaSGD's factors)
        fail_non_finite(run, step + 1, f"non-finite values in the optimizer step at step {step + 1}: {e}",
                        agreed=not run.sharded and not getattr(cfg.optimizer, "shard", False))
    comm_hidden += optimizers.exchanged_bytes  # shard: the all-gathered step factors
    if run.spectrum is not None:
        run.spectrum.after_step(step)
    if run.rank_log is not None:
        run.rank_log.after_step(step)
    check_replicas_allocate_alike(run, step)
    optimizers.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_time = clock.lap()
    if step == run.start_step:  # optimizer state exists after the first step
        # rank_policy energy: its budget's bytes, the most the changing ranks may hold (metrics'
        # factor_numbers gives what they hold at each step)
        budget_bytes = getattr(optimizers.hidden, "budget_state_bytes", lambda: None)()
        run.memory.update(opt_state_bytes_hidden=budget_bytes or state_bytes(optimizers.hidden),
                          opt_state_bytes_other=state_bytes(optimizers.adam))
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    record = {"step": step + 1, "train_loss": train_loss, "lr": lr, **scheduled,
              "tokens": (step + 1) * tokens_per_step, "elapsed_s": clock.elapsed, "step_ms": step_time * 1000,
              "tokens_per_s": tokens_per_step / step_time, **clock.load_fields(), **peak_memory_record(device),
              "activation_peak_bytes": activation_peak, **run.memory, "comm_bytes_hidden": comm_hidden,
              "comm_bytes_other": run.comm.other_bytes, "comm_bytes": comm_hidden + run.comm.other_bytes,
              **({"spectrum_shadow_bytes": run.spectrum.shadow_bytes} if run.spectrum and run.spectrum.shadow else {}),
              **({"factor_numbers": optimizers.hidden.factor_numbers_held()}
                 if getattr(optimizers.hidden, "rank_policy", "fixed") == "energy" else {})}
    return record, reduced[1].item() > 0


def check_replicas_allocate_alike(run: Run, step: int) -> None:
    """MoFaSGD rank_policy energy under DDP: after a re-allocation every replica must hold the same
    ranks (they allocate from the same averaged gradient with the same operations). One small
    all-reduce (max of the ranks and of their negatives) per re-allocation says so on every rank
    alike; replicas that disagree would train different models without a word, so the run fails."""
    optimizer = run.optimizers.hidden
    allocation = getattr(optimizer, "last_allocation", None)
    if run.world_size < 2 or allocation is None or allocation["step"] != step + 1:
        return
    import torch.distributed as dist

    ranks = torch.tensor(allocation["ranks"], dtype=torch.float64, device=run.device)
    both = torch.cat([ranks, -ranks])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if not torch.equal(both[: len(ranks)], -both[len(ranks):]):
        raise RunFailed(f"the data-parallel replicas re-allocated MoFaSGD's ranks differently at step {step + 1} "
                        "(optimizer.rank_policy energy): their factors no longer agree")


def forward_backward(run: Run, step: int) -> torch.Tensor:
    """Forward and backward over the step's micro-batches on this rank; returns the sum of their
    losses. The gradient left is the batch mean (over micro-batches here, over ranks by DDP or the
    sketch all-reduce) times train.grad_scale."""
    cfg, accum = run.cfg, run.cfg.grad_accum
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(accum):
        x, y = run.loader.micro_batch(step, cfg.train.batch_size, micro, accum, run.rank, run.world_size)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        last = micro == accum - 1
        # DDP all-reduces gradients only on the last micro step
        with (nullcontext() if last or not isinstance(run.model, DDP) else run.model.no_sync()), run.autocast:
            _, loss = run.model(x, y, **run.window.forward_kwargs)
        if run.comm.overlap and last:  # each matrix's sketches all-reduced as soon as backward made them
            run.optimizers.hidden.all_reduce_sketches_during_backward()
        (loss * (cfg.train.grad_scale / accum)).backward()
        loss_sum += loss.detach()
    return loss_sum


def due(every: int, step: int) -> bool:
    """Whether something done every `every` steps (0: never) is due after `step`."""
    return bool(every) and step % every == 0


def validate(run: Run, step: int) -> dict:
    """The validation loss at `step` (with that step's sliding window) and validation's own peak memory."""
    run.window.set(step)
    reset_peak_memory(run.device)
    loss = evaluate(run.eval_model, run.cfg, run.rank, run.world_size, run.device, run.autocast,
                    run.window.forward_kwargs, lockstep=run.sharded)
    return {"val_loss": loss, **peak_memory_record(run.device, "val_")}


@torch.no_grad()
def evaluate(model, cfg: RunConfig, rank: int, world_size: int, device, autocast, forward_kwargs=None,
             lockstep: bool = False) -> float:
    """Mean cross-entropy over the first data.val_tokens tokens of the val shards, all ranks together.
    `forward_kwargs`: the current sliding window, as in training. `lockstep` (FSDP2, whose forward is
    a collective): every rank runs as many forwards as the rank with the most windows, a rank out of
    windows repeating its last batch with weight 0."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of losses, number of tokens
    files = find_shards(resolve_path(cfg.data.val_files))
    batches = val_sequences(files, cfg.data.seq_len, cfg.data.val_tokens, rank, world_size, cfg.train.val_batch_size,
                            pin=device.type == "cuda")
    most_windows = -(-(cfg.data.val_tokens // cfg.data.seq_len) // world_size)
    forwards = -(-most_windows // cfg.train.val_batch_size) if lockstep else None
    x = y = torch.zeros((1, cfg.data.seq_len), dtype=torch.long)  # a rank with no window at all
    for i in itertools.count():
        batch = next(batches, None)
        if batch is None and (forwards is None or i >= forwards):
            break
        weight = 1.0 if batch is not None else 0.0
        x, y = batch if batch is not None else (x, y)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            _, loss = model(x, y, **(forward_kwargs or {}))
        # accumulated on the device: no host sync per batch
        total[0] += weight * loss.detach().double() * y.numel()
        total[1] += weight * y.numel()
    all_reduce_sum(total)
    model.train()
    return (total[0] / total[1]).item()


def write_checkpoint(run: Run, step: int, elapsed: float) -> None:
    """Step `step`'s checkpoint (rank 0 writes, or under FSDP every rank its shards; every rank takes
    part), after checking the weights: a broken model never replaces a good checkpoint."""
    bad = first_non_finite_parameter(run.raw_model)
    if run.sharded and all_reduce_sum(torch.tensor([float(bad is not None)], device=run.device)).item() > 0:
        bad = bad or "held by another rank"  # each rank checks its own shards; all stop together
    if bad:
        fail_non_finite(run, step, f"non-finite values in parameter {bad} after step {step}")
    save_checkpoint(run.run_dir, step, run.raw_model, run.optimizers, elapsed, run.cfg.train.keep_checkpoints,
                    run.rank, run.world_size, run.sharded, config=run.cfg.to_dict(), spectrum=run.spectrum)


def crash_if_asked(cfg: RunConfig, step: int) -> None:
    """Testing aids, in the first attempt only (not a torchrun restart): train.debug_crash_at_step
    crashes every rank; train.debug_hang_at_step stops the last rank (SIGSTOP, as `kill -STOP`), so
    the others wait in their next collective: the next step's, or this step's checkpoint when due."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if cfg.train.debug_crash_at_step == step:
        raise RuntimeError(f"debug_crash_at_step: injected crash at step {step}")
    if cfg.train.debug_hang_at_step == step and int(os.environ.get("RANK", "0")) == cfg.launch.world_size - 1:
        os.kill(os.getpid(), signal.SIGSTOP)


# ---------------------------------------------------------------------------------------------
# How the run ends


def finish(run: Run, log: RunLog, step: int, elapsed: float) -> dict | None:
    """Closes the log and, when all steps are done, writes summary.json (rank 0); leaves the
    process group. Returns the summary (None on other ranks and after a stop)."""
    log.close()
    summary = None
    if run.is_main and step == run.cfg.train.steps:
        # the hash of what the numbers depend on: a later edit of config.json shows (sweeps, reports)
        summary = {**log.summary.finished(run.cfg, step, elapsed, run.world_size, run.device),
                   "config_hash": config_hash(run.cfg.to_dict())}
        write_json(os.path.join(run.run_dir, "summary.json"), summary)
    leave_process_group(run)
    return summary


def leave_process_group(run: Run) -> None:
    """Frees the DDP wrapper, then leaves the process group. DDP's C++ reducer holds the group: freed
    later (when train() returns), after destroy_process_group, it would be the group's last holder,
    and gloo's destructor, run there with the GIL held, joins a worker thread that may need the GIL
    to free a finished collective's tensors: a deadlock at the end of a run, seen rarely with gloo.
    Freed here, while the group is still registered, the reducer frees nothing but itself."""
    if isinstance(run.model, DDP):
        run.model = run.raw_model
        gc.collect()  # the wrapper's reference cycles (module hooks) go now, not at a later collection
    shutdown_distributed()


def first_non_finite_parameter(model) -> str | None:
    """The first parameter with a NaN or infinity in what this rank holds of it (FSDP2: its shard)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(local_part(p)).all():
            return name
    return None


def non_finite_gradients(model) -> torch.Tensor:
    """1.0 if a gradient this rank holds (FSDP2: its shard) has a NaN or an infinity, else 0.0, as
    a tensor (no host sync): the largest magnitude of each gradient, one fused pass
    (sketch memory mode holds no hidden gradients: MoFaSGD checks its sketches in the step)."""
    grads = [g for g in (local_part(p.grad) for p in model.parameters() if p.grad is not None) if g.numel()]
    if not grads:
        return torch.zeros((), device=next(model.parameters()).device)
    largest = torch.stack([g.float() for g in torch._foreach_norm(grads, float("inf"))]).max()
    return (~torch.isfinite(largest)).float()


def fail_non_finite(run: Run, step: int, reason: str, agreed: bool = True) -> None:
    """The NaN guard, one path for every optimizer: stops the run as "diverged", the reason on
    stderr (one line) and in summary.json, exit code 3 (EXIT_FAILED); checkpoints stay as they
    were. `agreed`: every rank stops here together (a rank-local failure, an optimizer raising on
    one shard, leaves the process group without the closing barrier: its peers fail at their next
    collective or train.collective_timeout_s)."""
    bad = first_non_finite_parameter(run.raw_model)
    if bad and "parameter" not in reason:
        reason += f" (first non-finite parameter: {bad})"
    if run.is_main:
        write_summary_quietly(run.run_dir, {"name": run.cfg.name, "status": "diverged", "reason": reason,
                                            "steps": step - 1, "optimizer": run.cfg.optimizer_name})
        if not launched_by_run_py():  # run.py prints the line itself, as the last thing printed
            print(f"error: {reason}; the last good checkpoint is kept", file=sys.stderr, flush=True)
    if agreed:
        leave_process_group(run)
    exit_process(EXIT_FAILED)


def report_stop(run: Run, step: int) -> None:
    """A graceful stop: "stopped" in summary.json (resumable; sweeps record it as stopped)."""
    if not run.is_main:
        return
    name = signal.Signals(STOP_SIGNALS[0]).name if STOP_SIGNALS else "signal"
    write_summary_quietly(run.run_dir, {"name": run.cfg.name, "status": "stopped",
                                        "reason": f"stopped by {name} at step {step}", "steps": step,
                                        "optimizer": run.cfg.optimizer_name})
    if not launched_by_run_py():
        print(f"stopped by signal at step {step}, checkpoint written; resume with --resume", file=sys.stderr, flush=True)


def fail_run(run_dir: str, reason: str, peers_lost: bool = False) -> None:
    """A handled failure of every rank (RunFailed), or of rank 0 alone (a full disk): one line on
    stderr (from run.py when it launched us), "failed" in summary.json if it can be written.
    `peers_lost` (a collective failed on a rank that stopped or died): every rank that saw it writes
    the summary (rank 0 may be the one lost), and none waits for the others on the way out."""
    if peers_lost or int(os.environ.get("RANK", "0")) == 0:
        try:
            with open(os.path.join(run_dir, "config.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = {}
        saved = saved if isinstance(saved, dict) else {}
        summary = {"name": saved.get("name"), "status": "failed", "reason": reason, "optimizer": saved.get("optimizer_name")}
        if peers_lost:  # run.py puts a crashed rank's own error before this one
            summary["lost_rank"] = True
        write_summary_quietly(run_dir, summary)
        if not launched_by_run_py():
            print(f"error: {reason}", file=sys.stderr, flush=True)
    if not peers_lost:  # leaving together takes a barrier, which a lost rank never reaches
        try:
            shutdown_distributed()
        except Exception:  # noqa: BLE001 - a peer already gone; the outcome is written
            pass
    exit_process(EXIT_FAILED)


# what train() was doing, by the function a collective failed in
PHASES = {"set_up": "during set-up", "train_step": "in the training step", "validate": "in validation",
          "write_checkpoint": "while writing its checkpoint", "finish": "while finishing"}


def lost_rank_reason(run_dir: str, error: BaseException) -> str | None:
    """The one line for a collective that failed because a rank stopped answering (timed out) or is
    gone, naming the step and what the run was doing; None for any other error."""
    import traceback

    message = str(error).strip()
    kind = collective_failure(message)
    if kind is None:
        return None
    names = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
    doing = next((PHASES[name] for name in names if name in PHASES), None)
    step = CURRENT_STEP[0]
    if step is None and doing == PHASES["validate"]:
        step = 0  # the first validation, before any step
    where = ", ".join(filter(None, [f"at step {step}" if step is not None else None, doing])) or "before the first step"
    if kind == "timeout":
        timeout = configured_collective_timeout(run_dir)
        return (f"a collective did not complete within train.collective_timeout_s={timeout:g} s {where} "
                "(a rank stopped responding or died)")
    # gloo's message: "[.../pair.cc:553] Connection closed by peer [ADDR]:PORT. This is typically ..."
    detail = re.sub(r"^\[[^\]]*\]\s*", "", message.splitlines()[0]).split(". ")[0]
    return f"a collective lost its connection to another rank {where} (a rank died or stopped): {detail}"


def torchrun_restarts_left() -> bool:
    """Whether torchrun restarts the workers after a failure (run.py --max-restarts, not used up)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) < int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def configured_collective_timeout(run_dir: str) -> float:
    """train.collective_timeout_s of the run (config.json), as the process group was given it."""
    with open(os.path.join(run_dir, "config.json")) as f:
        return float(RunConfig.from_dict(json.load(f)).train.collective_timeout_s)


def main():
    parser = argparse.ArgumentParser(description="mofa training worker (start it with run.py)")
    parser.add_argument("--run-dir", required=True, help="results/RUN holding config.json")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run dir")
    args = parser.parse_args()
    from worker import runlock

    runlock.worker_dies_with_launcher()  # no trainer outlives its launcher
    runlock.hold_as_worker(args.run_dir, int(os.environ.get(runlock.NODE_RANK_ENV, "0")))  # kept until this process dies
    try:
        train(args.run_dir, resume=args.resume)
    except RunFailed as e:
        fail_run(args.run_dir, str(e))
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        fail_run(args.run_dir, f"cannot write to {e.filename or args.run_dir}: {e.strerror}; resume with --resume "
                               "once there is space")
    except RuntimeError as e:  # gloo's and NCCL's collective errors (DistBackendError, ...) are RuntimeErrors
        reason = lost_rank_reason(args.run_dir, e)
        if reason is None or torchrun_restarts_left():  # a crash: torchrun restarts every rank
            raise
        fail_run(args.run_dir, reason, peers_lost=True)
    # Every output is written and closed and the process group is left: skip the interpreter's
    # and C++ static teardown, where a communication thread's destructor can abort a finished
    # rank (SIGABRT, "terminate called without an active exception", seen rarely with gloo).
    exit_process(0)


if __name__ == "__main__":
    catch_stop_signals()  # from the start: a stop before train() runs is kept
    main()
