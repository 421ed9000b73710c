"""mofa launcher: resolve and validate a run's config, then start the training workers.

    python run.py --optimizer mfsgd --config '{"lr": 0.05, "rank": 32}'
    python run.py --optimizer mfsgd --nproc 2 --config '{"train": {"micro_batch_size": 4}}'
    python run.py --optimizer galore --num-gpus 8 --preset nanogpt-paper --config '{"group_params": {"rank": 16}}'
    python run.py --resume RUN

configs/base.yaml + configs/optimizers/NAME.yaml (+ configs/presets/PRESET.yaml) + the JSON
overrides -> results/RUN/config.json -> `torch.distributed.run` workers running train_gpt.py
(gloo on CPU, nccl on GPU). Bad input exits with a one-line error and code 2.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from configs import ConfigError, RunConfig, resolve_config, resolve_path
from data.shards import ShardError, find_shards, open_shard, read_header

ROOT = os.path.dirname(os.path.abspath(__file__))
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")


class LaunchError(ValueError):
    """A bad command line or environment; one line."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train GPT-2 with MoFaSGD, GaLore, AdamW, Muon or Adafactor.")
    p.add_argument("--optimizer", help="optimizer name: a file configs/optimizers/NAME.yaml")
    p.add_argument("--config", help="JSON overrides, or @file.json; flat keys are optimizer keys")
    p.add_argument("--preset", help="a file configs/presets/NAME.yaml merged over the base config")
    devices = p.add_mutually_exclusive_group()
    devices.add_argument("--num-gpus", type=int, help="GPU workers per node (nccl)")
    devices.add_argument("--nproc", type=int, help="CPU workers per node (gloo); default 1")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--max-restarts", type=int, default=0, help="passed to torchrun: restarts of failed workers")
    p.add_argument("--name", help="run name: the folder results/NAME (default: optimizer, rank and time)")
    p.add_argument("--results-dir", default=os.path.join(ROOT, "results"), help="where run folders go")
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN",
                   help="continue RUN (or --name) from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the command; run nothing")
    return p.parse_args(argv)


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_settings(args) -> dict:
    """How many workers, on what device, with which backend."""
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise LaunchError(f"--nnodes must be >= 1 and 0 <= --node-rank < --nnodes, got {args.nnodes}, {args.node_rank}")
    if args.num_gpus is not None:
        available = cuda_device_count()
        if args.num_gpus < 1:
            raise LaunchError(f"--num-gpus must be >= 1, got {args.num_gpus}")
        if available == 0:
            raise LaunchError(f"--num-gpus {args.num_gpus} asked for GPUs, but this machine has none; use --nproc N for CPU workers")
        if args.num_gpus > available:
            raise LaunchError(f"--num-gpus {args.num_gpus} asked for more GPUs than the {available} this machine has")
        nproc, device = args.num_gpus, "cuda"
    else:
        nproc = args.nproc if args.nproc is not None else 1
        if nproc < 1:
            raise LaunchError(f"--nproc must be >= 1, got {nproc}")
        device = "cpu"
    return dict(nproc=nproc, nnodes=args.nnodes, world_size=nproc * args.nnodes, device=device,
                backend="nccl" if device == "cuda" else "gloo")


def default_run_name(optimizer: str, overrides: dict) -> str:
    rank = overrides.get("rank", overrides.get("group_params", {}).get("rank") if isinstance(overrides.get("group_params"), dict) else None)
    parts = [optimizer] + ([f"r{rank}"] if rank is not None else []) + [time.strftime("%Y%m%d-%H%M%S")]
    return "-".join(parts)


def check_data(cfg: RunConfig) -> None:
    """Fails fast, before any worker starts, on missing or corrupt shards and a too-small val split."""
    files = {}
    for key in ("train_files", "val_files"):
        pattern = getattr(cfg.data, key)
        files[key] = find_shards(resolve_path(pattern))
        tokens = sum(read_header(f) for f in files[key])
        if key == "val_files" and tokens < cfg.data.val_tokens + 1:
            raise ShardError(f"val shards {pattern} hold {tokens} tokens, fewer than data.val_tokens={cfg.data.val_tokens}")
        for f in files[key]:  # one pass over the memory-mapped tokens: ~0.1 s per 100M-token shard
            tokens = open_shard(f)
            top = int(tokens.max()) if len(tokens) else 0
            if top >= cfg.model.vocab_size:
                raise ShardError(f"{f} holds token id {top}, not below model.vocab_size={cfg.model.vocab_size}")
    # Windows never cross a shard boundary, so enough tokens can still be too few whole windows:
    # the worker's own loaders check that (and that training has one window at all) when they are
    # built (cheap: the shards are memory-mapped).
    from data.loader import StreamLoader, TokenLoader, val_sequences

    if cfg.data.layout == "stream":
        StreamLoader(files["train_files"], cfg.data.seq_len, cfg.train.batch_size)
    else:
        TokenLoader(files["train_files"], cfg.data.seq_len)
    val_sequences(files["val_files"], cfg.data.seq_len, cfg.data.val_tokens)


# Seconds torchrun waits, after a stop signal, for the workers to finish their step, a due validation
# and the stop checkpoint before it kills them (its default, 30 s, is shorter than a validation or
# checkpoint of a large model).
WORKER_SHUTDOWN_TIMEOUT_S = 900


def torchrun_command(args, launch: dict, run_dir: str, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch['nproc']}",
           f"--max-restarts={args.max_restarts}", f"--shutdown-timeout={WORKER_SHUTDOWN_TIMEOUT_S}"]
    if launch["nnodes"] == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={launch['nnodes']}", f"--node-rank={args.node_rank}",
                f"--master-addr={args.master_addr}", f"--master-port={args.master_port}"]
    cmd += [os.path.join(ROOT, "train_gpt.py"), "--run-dir", run_dir]
    # a restarted worker must pick up the newest checkpoint, so workers always look for one
    if resume or args.max_restarts > 0:
        cmd.append("--resume")
    return cmd


def prepare_run(args) -> tuple[list[str], str | None]:
    """Resolves everything; returns the worker command and the run dir (None for --dry-run)."""
    launch = launch_settings(args)
    resume_name = args.resume if isinstance(args.resume, str) else (args.name if args.resume else None)
    if args.resume and not resume_name:
        raise LaunchError("--resume needs a run name: --resume RUN or --name RUN --resume")
    if args.resume and args.overwrite:
        raise LaunchError("--resume and --overwrite exclude each other")

    if resume_name:
        run_dir = os.path.join(args.results_dir, resume_name)
        config_path = os.path.join(run_dir, "config.json")
        if not os.path.isfile(config_path):
            raise LaunchError(f"cannot resume {resume_name!r}: {config_path} does not exist")
        if args.config or args.optimizer or args.preset:
            raise LaunchError("--resume continues a run with its saved config; drop --optimizer/--config/--preset")
        with open(config_path) as f:
            saved = json.load(f)
        summary_path = os.path.join(run_dir, "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                if json.load(f).get("status", "finished") == "finished":
                    raise LaunchError(f"run {resume_name!r} already finished; --overwrite starts it again")
        if saved["launch"]["world_size"] != launch["world_size"]:
            raise LaunchError(f"{resume_name!r} ran on {saved['launch']['world_size']} workers; resume it with the same number")
        check_newest_checkpoint(run_dir)
        saved["launch"] = launch
        cfg = RunConfig.from_dict(saved)
        check_data(cfg)
        if args.dry_run:
            return dry_run(cfg, torchrun_command(args, launch, run_dir, resume=True))
        return torchrun_command(args, launch, run_dir, resume=True), run_dir

    if not args.optimizer:
        raise LaunchError("--optimizer is required (or --resume RUN)")
    from configs import parse_overrides

    overrides = parse_overrides(args.config)
    name = args.name or default_run_name(args.optimizer, overrides)
    if not RUN_NAME.match(name):
        raise LaunchError(f"run name {name!r} may hold only letters, digits and . _ = , + -")
    cfg = resolve_config(args.optimizer, overrides, preset=args.preset, name=name, launch=launch)
    for warning in cfg.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    check_data(cfg)
    run_dir = os.path.join(args.results_dir, name)
    if args.dry_run:
        return dry_run(cfg, torchrun_command(args, launch, run_dir, resume=False))
    claim_run_dir(run_dir, args.overwrite, args.node_rank)
    tmp = os.path.join(run_dir, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    os.replace(tmp, os.path.join(run_dir, "config.json"))
    return torchrun_command(args, launch, run_dir, resume=False), run_dir


def dry_run(cfg, command: list[str]):
    """--dry-run: print the resolved config and the worker command; launch nothing, write nothing."""
    print(json.dumps(cfg.to_dict(), indent=2))
    print(" ".join(command))
    return [], None


def check_newest_checkpoint(run_dir: str) -> None:
    """A corrupt newest checkpoint is a clear error that names an older one to fall back to."""
    import torch

    from train_gpt import list_checkpoints

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return
    try:  # mmap: reads the archive's index, not the tensors, so this is cheap even for big models
        torch.load(checkpoints[-1], map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # any unreadable file is reported the same way
        older = f"; the older checkpoint {checkpoints[-2]} exists: delete the corrupt file to resume from it" \
            if len(checkpoints) > 1 else "; no older checkpoint exists: --overwrite starts the run again"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LaunchError(f"checkpoint {checkpoints[-1]} is corrupt ({reason}){older}") from None


def claim_run_dir(run_dir: str, overwrite: bool, node_rank: int) -> None:
    """Creates the run folder; never replaces an existing run unless --overwrite."""
    name = os.path.basename(run_dir)
    try:
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    except OSError as e:
        raise LaunchError(f"cannot create the results dir {os.path.dirname(run_dir)}: {e.strerror}") from None
    if os.path.exists(run_dir):
        if node_rank > 0:
            return  # on a shared filesystem node 0 made it
        if not overwrite:
            raise LaunchError(f"run {name!r} already exists in {run_dir}; pass --resume {name} to continue it or --overwrite to replace it")
        shutil.rmtree(run_dir)
    try:
        os.makedirs(run_dir)  # atomic: of two launches with one name, one fails here
    except FileExistsError:
        raise LaunchError(f"run {name!r} was just created by another launch; choose another --name") from None
    except OSError as e:
        raise LaunchError(f"cannot create the run dir {run_dir}: {e.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise LaunchError(f"the run dir {run_dir} is not writable")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cmd, run_dir = prepare_run(args)
    except (ConfigError, ShardError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cmd:
        return 0
    print(f"run dir: {run_dir}", file=sys.stderr)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):  # a stop sent to the launcher alone reaches the workers too
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
