"""mofa launcher: resolve and validate a run's config, then start the training workers.

    python run.py --optimizer mfsgd --config '{"lr": 0.05, "rank": 32}'
    python run.py --optimizer mfsgd --nproc 2 --config '{"train": {"micro_batch_size": 4}}'
    python run.py --optimizer galore --num-gpus 8 --preset nanogpt-paper --config '{"group_params": {"rank": 16}}'
    python run.py --resume RUN

configs/base.yaml + configs/optimizers/NAME.yaml (+ configs/presets/PRESET.yaml) + the JSON
overrides -> results/RUN/config.json -> `torch.distributed.run` workers running train_gpt.py
(gloo on CPU, nccl on GPU). Bad input exits with a one-line error and code 2.
"""

import signal
import sys

# A stop (Ctrl-C, SIGTERM) from the first line on is recorded, not a KeyboardInterrupt traceback in
# the imports below (torch takes seconds): a stop before the workers start ends the launch with one
# line; one after is handed to the workers, which stop gracefully.
STOPS: list[int] = []
if __name__ == "__main__":
    for _sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_sig, lambda signum, frame: STOPS.append(signum))

import argparse  # noqa: E402
import codecs  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from worker import runlock  # noqa: E402
from configs import NAME as RUN_NAME  # noqa: E402
from configs import (ConfigError, RunConfig, partial_nested_overrides, read_json_file, resolve_config,  # noqa: E402
                     resolve_path)
from data.shards import ShardError, find_shards, open_shard, read_header  # noqa: E402
from worker.fileio import write_json  # noqa: E402
from worker.outcome import EXIT_FAILED, EXIT_STOPPED, FAILED_STATUSES  # noqa: E402
from worker.runlock import RunLockError  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
SWEEP_ENV = "MOFA_SWEEP"  # set by scripts/sweep.py: the sweep says how to resume, not run.py


class LaunchError(ValueError):
    """A bad command line or environment; one line."""


def names_in(folder: str) -> list[str]:
    """NAME of every NAME.yaml in a configs/ folder."""
    path = os.path.join(ROOT, "configs", folder)
    return sorted(f[:-5] for f in os.listdir(path) if f.endswith(".yaml")) if os.path.isdir(path) else []


def build_parser() -> argparse.ArgumentParser:
    from model import PRESETS

    epilog = (f"optimizers (configs/optimizers/NAME.yaml): {', '.join(names_in('optimizers'))}\n"
              f"presets (configs/presets/NAME.yaml): {', '.join(names_in('presets')) or 'none'}\n"
              f"model sizes (model.preset): {', '.join(PRESETS)}\n\n"
              "example: MoFaSGD at rank 16 on the embedded corpus, 300 steps, 2 CPU workers:\n"
              "  python run.py --optimizer mfsgd --nproc 2 --config '{\"rank\": 16, \"train\": {\"steps\": 300, "
              "\"micro_batch_size\": 4}}'\n\n"
              "Every config key: docs/config.md. Exit codes: 0 finished, 2 bad input, 3 failed, 75 stopped.")
    p = argparse.ArgumentParser(description="Train GPT-2 with MoFaSGD, GaLore, AdamW, Muon or Adafactor.", epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", help="optimizer name: a file configs/optimizers/NAME.yaml")
    p.add_argument("--config", help="JSON overrides, or @file.json; flat keys are optimizer keys")
    p.add_argument("--preset", help="a file configs/presets/NAME.yaml merged over the base config")
    devices = p.add_mutually_exclusive_group()
    devices.add_argument("--num-gpus", type=int, help="GPU workers per node (nccl)")
    devices.add_argument("--nproc", type=int, help="CPU workers per node (gloo); default 1")
    p.add_argument("--distributed", action="store_true",
                   help="a process group and DDP even with one worker (so one GPU exercises NCCL, DDP and the "
                        "sketch/shard collectives)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", help="node 0's address (needed with --nnodes > 1)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--rdzv", choices=("c10d", "static"), default="c10d",
                   help="multi-node rendezvous: c10d (default; a failed node stops the others, --max-restarts restarts "
                        "all nodes; rank 0 may be on any node) or static (rank 0 on node 0, no failure detection)")
    p.add_argument("--node-wait", type=float, default=300.0, metavar="SECONDS",
                   help="node ranks > 0: how long to wait for node 0's config.json in the run folder before writing "
                        "their own (0 for a results dir not shared between nodes); default 300")
    p.add_argument("--max-restarts", type=int, default=0, help="passed to torchrun: restarts of failed workers")
    p.add_argument("--name", help="run name: the folder results/NAME (default: optimizer, rank and time)")
    p.add_argument("--results-dir", default=os.path.join(ROOT, "results"), help="where run folders go")
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN",
                   help="continue RUN (or --name) from its newest checkpoint, with the same number of workers")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--restart-broken", action="store_true",
                   help="start an existing run again only if it has no checkpoint and did not finish (what sweeps use)")
    p.add_argument("--drop-checkpoints", action="store_true",
                   help="delete the run's checkpoints/ once it has finished (a stopped or failed run keeps them)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the command; run nothing")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_settings(args) -> dict:
    """How many workers, on what device, with which backend."""
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise LaunchError(f"--nnodes must be >= 1 and 0 <= --node-rank < --nnodes, got {args.nnodes}, {args.node_rank}")
    if args.nnodes > 1 and not args.master_addr:
        raise LaunchError(f"--nnodes {args.nnodes} needs --master-addr HOST: node 0's address, the same on every node")
    if args.master_addr is not None and not re.fullmatch(r"[A-Za-z0-9._:\[\]-]{1,253}", args.master_addr):
        raise LaunchError(f"--master-addr must be a host name or IP address, got {args.master_addr!r}")
    if not 1 <= args.master_port <= 65535:
        raise LaunchError(f"--master-port must be in 1..65535, got {args.master_port}")
    if args.nnodes > 1 and not (getattr(args, "name", None) or getattr(args, "resume", None)):
        # the default name holds each node's own clock: the nodes would write different folders
        raise LaunchError(f"--nnodes {args.nnodes} needs --name NAME (or --resume NAME), the same on every node")
    if not 0 <= args.max_restarts <= 1000:
        raise LaunchError(f"--max-restarts must be in 0..1000, got {args.max_restarts}")
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
        cores = os.cpu_count() or 1
        if nproc > 4 * cores:
            raise LaunchError(f"--nproc {nproc} is more than 4 workers per CPU core ({cores} cores here)")
        device = "cpu"
    return dict(nproc=nproc, nnodes=args.nnodes, world_size=nproc * args.nnodes, device=device,
                backend="nccl" if device == "cuda" else "gloo", distributed=bool(getattr(args, "distributed", False)))


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


def check_packages(cfg: RunConfig) -> None:
    """Optional packages the run needs (galore-torch for GaLore, wandb for logging.wandb), checked
    before launching: one line naming the package, not a traceback from every worker."""
    import importlib.util

    from optimizers import OPTIMIZERS

    needed = []
    if OPTIMIZERS[cfg.optimizer_name].package:
        module, pip_name = OPTIMIZERS[cfg.optimizer_name].package
        needed.append((module, pip_name, f"optimizer {cfg.optimizer_name}", "another optimizer"))
    if cfg.logging.wandb != "off":
        needed.append(("wandb", "wandb", f"logging.wandb {cfg.logging.wandb}", 'logging.wandb "off"'))
    for module, pip_name, what, instead in needed:
        if importlib.util.find_spec(module) is None:
            raise LaunchError(f"{what} needs the package {pip_name}, which is not installed: pip install {pip_name}, "
                              f"or use {instead}")


def machine_memory_bytes(device: str) -> tuple[int, str] | None:
    """Memory one worker can have: (bytes, what) - a GPU's, or this machine's RAM; None if unknown."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory, "GPU"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "machine"
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: RunConfig) -> None:
    """Sizes no worker could hold are an error before anything starts (a lower bound: weights,
    gradients, two optimizer moments and one micro-batch's logits; activations not counted)."""
    need, params = cfg.estimate_worker_bytes()
    have = machine_memory_bytes(cfg.launch.device)
    if have is None:
        return
    total, what = have
    per_worker = total if cfg.launch.device == "cuda" else total // cfg.launch.nproc
    if need > per_worker:
        m = cfg.model.resolved()
        raise ConfigError(
            f"the model (n_layer {m['n_layer']}, n_embd {m['n_embd']}, block_size {m['block_size']}, vocab_size "
            f"{m['vocab_size']}: {params:.3g} parameters) and batch need at least {need / 2**30:.3g} GiB per worker, more "
            f"than the {per_worker / 2**30:.3g} GiB {'each GPU' if what == 'GPU' else 'this machine'} has"
            + ("" if what == "GPU" else f" per worker ({cfg.launch.nproc} workers)"))


# Seconds torchrun waits, after a stop signal, for the workers to finish their step, a due validation
# and the stop checkpoint before it kills them (its default, 30 s, is shorter than a validation or
# checkpoint of a large model).
WORKER_SHUTDOWN_TIMEOUT_S = 900


def torchrun_accepts(option: str) -> bool:
    """Whether this torch's torchrun knows `option`: torchrun rejects unknown options (torch 2.11's
    has no --shutdown-timeout), so the launcher passes optional ones only where they exist."""
    from torch.distributed.run import get_args_parser

    _, unknown = get_args_parser().parse_known_args([f"{option}=1", "train_gpt.py"])
    return not any(arg.startswith(option) for arg in unknown)


def torchrun_command(args, launch: dict, run_dir: str, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch['nproc']}",
           f"--max-restarts={args.max_restarts}"]
    if torchrun_accepts("--shutdown-timeout"):  # else torchrun's own 30 s grace for the stop checkpoint
        cmd.append(f"--shutdown-timeout={WORKER_SHUTDOWN_TIMEOUT_S}")
    if launch["nnodes"] == 1:
        cmd.append("--standalone")
    elif args.rdzv == "c10d":  # the rendezvous assigns ranks and reports a node that fails or leaves
        cmd += [f"--nnodes={launch['nnodes']}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={args.master_addr}:{args.master_port}", f"--rdzv-id={os.path.basename(run_dir)}"]
    else:
        cmd += [f"--nnodes={launch['nnodes']}", f"--node-rank={args.node_rank}",
                f"--master-addr={args.master_addr}", f"--master-port={args.master_port}"]
    cmd += [os.path.join(ROOT, "train_gpt.py"), "--run-dir", run_dir]
    # a restarted worker must pick up the newest checkpoint, so workers always look for one
    if resume or args.max_restarts > 0:
        cmd.append("--resume")
    return cmd


def resume_dir(args, name: str) -> str:
    """--resume NAME is results-dir/NAME; a run folder elsewhere must be named on purpose, as a path
    starting with / or ./"""
    if name.startswith(("/", "./")):
        return os.path.normpath(name)
    if not RUN_NAME.fullmatch(name) or len(name) > 200:
        raise LaunchError(f"--resume {name!r} is not a run name (letters, digits and . _ = , + -, a folder in "
                          f"{args.results_dir}); give a run folder elsewhere as /PATH or ./PATH")
    return os.path.join(args.results_dir, name)


def read_summary(run_dir: str) -> dict | None:
    """summary.json, or None when there is none; an unreadable one is reported and treated as none
    (resume writes a new one)."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.lexists(path):
        return None
    try:
        return read_json_file(path)
    except ConfigError as e:
        print(f"warning: {e}; ignored (the run writes a new one)", file=sys.stderr)
        return None


def prepare_run(args) -> tuple[list[str], str | None, int | None]:
    """Resolves everything; returns the worker command, the run dir and the fd of the run folder's
    lock (None, None for --dry-run)."""
    launch = launch_settings(args)
    resume_name = args.resume if isinstance(args.resume, str) else (args.name if args.resume else None)
    if args.resume and not resume_name:
        raise LaunchError("--resume needs a run name: --resume RUN or --name RUN --resume")
    if args.resume and (args.overwrite or args.restart_broken):
        raise LaunchError("--resume and --overwrite/--restart-broken exclude each other")

    if resume_name:
        run_dir = resume_dir(args, resume_name)
        config_path = os.path.join(run_dir, "config.json")
        if not os.path.isfile(config_path):
            raise LaunchError(f"cannot resume {resume_name!r}: {config_path} does not exist")
        if args.config or args.optimizer or args.preset:
            raise LaunchError("--resume continues a run with its saved config; drop --optimizer/--config/--preset")
        lock_fd = None
        if args.dry_run:
            holder = runlock.holder(run_dir, args.node_rank)
            if holder:
                raise RunLockError(f"run {resume_name!r} is in use by {holder}")
        else:
            lock_fd = runlock.claim(run_dir, args.node_rank)  # everything below is read under the lock
        try:
            saved = read_json_file(config_path)
            summary = read_summary(run_dir)
            if summary is not None and summary.get("status", "finished") == "finished":
                raise LaunchError(f"run {resume_name!r} already finished; --overwrite starts it again")
            saved_launch = saved.get("launch")
            saved_world = saved_launch.get("world_size") if isinstance(saved_launch, dict) else None
            saved_train = saved.get("train") if isinstance(saved.get("train"), dict) else {}
            if saved_world is not None and saved_world != launch["world_size"] and saved_train.get("parallel") != "fsdp":
                # the checkpoint holds one RNG state per rank and the run's bit-exact continuation
                # assumes the same reduction layout: a DDP resume keeps the world size (an FSDP one
                # reshards its distributed checkpoint to any)
                how = "--num-gpus" if (saved_launch.get("device") == "cuda") else "--nproc"
                per_node = saved_world // max(1, saved_launch.get("nnodes") or 1)
                raise LaunchError(f"{resume_name!r} ran on {saved_world} workers (config.json launch.world_size) and "
                                  f"resumes only on as many: --resume {resume_name} {how} {per_node}"
                                  " (train.parallel fsdp runs resume on any number)"
                                  + (f" on each of {saved_launch.get('nnodes')} nodes" if (saved_launch.get("nnodes") or 1) > 1 else ""))
            saved["launch"] = launch
            try:
                cfg = RunConfig.from_dict(saved)
            except ConfigError as e:
                raise ConfigError(f"{config_path}: {e}") from None
            check_newest_checkpoint(run_dir, cfg)
            check_data(cfg)
            check_packages(cfg)
            check_memory(cfg)
            step = newest_checkpoint_step(run_dir)
            launch_section = cfg.to_dict()["launch"]  # as config.json holds it
            if args.dry_run:
                print(f"# resumes {resume_name} " + (f"from its checkpoint of step {step}" if step is not None else
                                                      "from step 0 (it has no checkpoint)")
                      + (f" on {launch['world_size']} workers (it ran on {saved_world}: the distributed checkpoint is "
                         "resharded)" if saved_world not in (None, launch["world_size"]) else ""))
                return dry_run(cfg, torchrun_command(args, launch, run_dir, resume=True))
            if launch_section != saved_launch:  # the workers read it there; what the run computes is unchanged
                write_config(run_dir, cfg)
            if args.node_rank == 0:
                record_launch(run_dir, launch_section, step if step is not None else 0)
            if summary is not None or os.path.lexists(os.path.join(run_dir, "summary.json")):
                os.remove(os.path.join(run_dir, "summary.json"))  # a stale "stopped"/"failed": this launch writes its own
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return torchrun_command(args, launch, run_dir, resume=True), run_dir, lock_fd

    if not args.optimizer:
        raise LaunchError("--optimizer is required (or --resume RUN)")
    from configs import parse_overrides

    overrides = parse_overrides(args.config)
    name = args.name or default_run_name(args.optimizer, overrides)
    if not RUN_NAME.fullmatch(name) or len(name) > 200:
        raise LaunchError(f"run name {name!r} may hold only letters, digits and . _ = , + - (one folder name, at most "
                          "200 characters, starting with a letter or digit)")
    cfg = resolve_config(args.optimizer, overrides, preset=args.preset, name=name, launch=launch)
    for warning in cfg.warnings() + partial_nested_overrides(args.optimizer, overrides):
        print(f"warning: {warning}", file=sys.stderr)
    check_data(cfg)
    check_packages(cfg)
    check_memory(cfg)
    run_dir = os.path.join(args.results_dir, name)
    if args.dry_run:
        return dry_run(cfg, torchrun_command(args, launch, run_dir, resume=False))
    # node ranks > 0 wait for node 0 to create the folder and write config.json (a shared results
    # dir); creating it first would make node 0 refuse it as an existing run
    node0_wrote = args.node_rank > 0 and wait_for_node0_config(run_dir, cfg, args)
    lock_fd = claim_run_dir(run_dir, args, cfg)
    try:
        if not node0_wrote:
            write_config(run_dir, cfg)
        if args.node_rank == 0:  # (a node rank > 0 leaves the folder holding config.json alone)
            record_launch(run_dir, cfg.to_dict()["launch"], None)
    except BaseException:
        os.close(lock_fd)
        raise
    return torchrun_command(args, launch, run_dir, resume=False), run_dir, lock_fd


def node_config_matches(run_dir: str, cfg: RunConfig, args) -> bool:
    """Node ranks > 0: True if node 0 already wrote this very config (a shared filesystem); an error
    if it wrote another one (config.json is never rewritten from here without --overwrite)."""
    if not os.path.exists(os.path.join(run_dir, "config.json")):
        return False
    same = holds_config(run_dir, cfg)
    if not same and not args.overwrite:
        raise LaunchError(f"run {cfg.name!r} already exists in {run_dir} with another config; every node needs "
                          f"node 0's arguments (or --resume {cfg.name} / --overwrite)")
    return same


def holds_config(run_dir: str, cfg: RunConfig) -> bool:
    """Whether run_dir/config.json is readable and is `cfg` (as written: through JSON)."""
    try:
        return read_json_file(os.path.join(run_dir, "config.json")) == json.loads(json.dumps(cfg.to_dict()))
    except ConfigError:
        return False


def wait_for_node0_config(run_dir: str, cfg: RunConfig, args) -> bool:
    """Node ranks > 0: True once node 0's config.json (the same config) is in the run folder; False
    after --node-wait seconds without one: the results dir is this node's own, not shared."""
    deadline = time.monotonic() + args.node_wait
    while not node_config_matches(run_dir, cfg, args):
        if time.monotonic() >= deadline:
            if args.node_wait > 0:
                print(f"note: no config.json from node 0 in {run_dir} after {args.node_wait:g} s: this node writes "
                      "its own (a results dir not shared between nodes)", file=sys.stderr)
            return False
        time.sleep(0.25)
    return True


def written_by_peer_node(run_dir: str, cfg: RunConfig) -> bool:
    """A folder holding nothing but another node's lock files and output log and this very
    config.json: a node rank > 0 whose --node-wait ran out before this node started; node 0 takes it
    over as a new run."""
    entries = [e for e in os.listdir(run_dir) if not runlock.is_lock_file(e) and not re.fullmatch(r"workers\.node\d+\.log", e)]
    return entries == ["config.json"] and holds_config(run_dir, cfg)


def write_config(run_dir: str, cfg: RunConfig) -> None:
    path = os.path.join(run_dir, "config.json")
    try:
        write_json(path, cfg.to_dict())
    except OSError as e:
        raise LaunchError(f"cannot write {path}: {e.strerror}") from None


def dry_run(cfg, command: list[str]):
    """--dry-run: print the resolved config and the worker command; launch nothing, write nothing."""
    print(json.dumps(cfg.to_dict(), indent=2))
    print(" ".join(command))
    return [], None, None


def check_newest_checkpoint(run_dir: str, cfg: RunConfig | None = None) -> None:
    """The newest checkpoint is verified before anything starts: its files against its manifest
    (sizes and checksums: every byte is read), then `cfg` against the config it was made with, then
    its structure (keys, the model's shapes: read without loading the tensors). A problem is one
    line naming the checkpoint and the older one to fall back to."""
    import torch

    from worker.checkpoint import (checkpoint_problem, config_problem, integrity_problem, is_sharded_checkpoint,
                            list_checkpoints, older_checkpoint_hint, sharded_checkpoint_problem)
    from model import create_model

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return
    newest = checkpoints[-1]
    problem = integrity_problem(newest)
    if problem is None and cfg is not None:
        changed = config_problem(newest, cfg.to_dict())
        if changed:
            raise LaunchError(f"cannot resume: {changed}")
    if problem is None:
        model = None
        if cfg is not None:
            with torch.device("meta"):  # shapes only, no memory
                model = create_model(cfg.model.arch, **cfg.model.resolved())
        if is_sharded_checkpoint(newest):  # train.parallel fsdp: a DCP folder
            problem = sharded_checkpoint_problem(newest, model)
        else:
            try:  # mmap: reads the archive's index, not the tensors
                state = torch.load(newest, map_location="cpu", weights_only=True, mmap=True)
                problem = checkpoint_problem(state, newest, model)
            except Exception as e:  # any unreadable file is reported the same way
                problem = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if problem:
        raise LaunchError(f"checkpoint {newest} is unusable: {problem}{older_checkpoint_hint(newest)}") from None


def newest_checkpoint_step(run_dir: str) -> int | None:
    from worker.checkpoint import checkpoint_step, list_checkpoints

    checkpoints = list_checkpoints(run_dir)
    return checkpoint_step(checkpoints[-1]) if checkpoints else None


def record_launch(run_dir: str, launch: dict, resumed_at: int | None) -> None:
    """One line per launch of the run in RUN/launches.jsonl: when, on what, from which step (an FSDP
    run may resume on another number of ranks; config.json's launch section is the latest one)."""
    from worker.fileio import append_json_line

    try:
        append_json_line(os.path.join(run_dir, "launches.jsonl"),
                         {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_at_step": resumed_at, "launch": launch})
    except OSError as e:
        raise LaunchError(f"cannot write {os.path.join(run_dir, 'launches.jsonl')}: {e.strerror}") from None


def claim_run_dir(run_dir: str, args, cfg: RunConfig) -> int:
    """Creates and locks the run folder (returns the lock's fd); never replaces an existing run
    unless --overwrite (or, with --restart-broken, one that has no checkpoint and did not finish),
    and never one another process owns."""
    name = os.path.basename(run_dir)
    try:
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    except OSError as e:
        raise LaunchError(f"cannot create the results dir {os.path.dirname(run_dir)}: {e.strerror}") from None
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise LaunchError(f"{run_dir} exists and is not a run folder")
    if args.node_rank > 0:  # on a shared filesystem node 0 creates it; never cleared from here
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise LaunchError(f"cannot create the run dir {run_dir}: {e.strerror}") from None
        return runlock.claim(run_dir, args.node_rank)
    try:
        os.mkdir(run_dir)  # atomic: of two launches with one name, one fails here
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        raise LaunchError(f"cannot create the run dir {run_dir}: {e.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise LaunchError(f"the run dir {run_dir} is not writable")
    if created or written_by_peer_node(run_dir, cfg):
        return runlock.claim(run_dir)
    if not (args.overwrite or args.restart_broken):
        holder = runlock.holder(run_dir)
        raise LaunchError(f"run {name!r} already exists in {run_dir}" + (f" and is in use by {holder}" if holder else
                          f"; pass --resume {name} to continue it or --overwrite to replace it"))
    fd = runlock.claim(run_dir)  # the folder is ours from here on: what is checked stays true
    try:
        if args.restart_broken and not args.overwrite:
            from worker.checkpoint import list_checkpoints

            summary = read_summary(run_dir)
            if summary is not None and summary.get("status") == "finished":
                raise LaunchError(f"run {name!r} in {run_dir} finished; --restart-broken restarts only broken runs")
            if list_checkpoints(run_dir):
                raise LaunchError(f"run {name!r} in {run_dir} has a checkpoint; resume it with --resume {name}")
        for entry in os.listdir(run_dir):  # cleared in place: the lock files (and so the claim) stay
            if runlock.is_lock_file(entry):
                continue
            path = os.path.join(run_dir, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    except OSError as e:
        os.close(fd)
        raise LaunchError(f"cannot clear the run dir {run_dir}: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def caught_signals(pid: int) -> int:
    """The mask of signals `pid` has handlers for (Linux /proc; -1 where unknown)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return -1


def outcome(args, run_dir: str, rc: int, stopped: bool, crash: str | None = None) -> int:
    """run.py's last line and exit code, from summary.json and torchrun's exit code. `crash`: what the
    workers' output says failed (a worker's error line, or torchrun's word on a worker killed by a
    signal), the reason when the workers wrote none."""
    summary = None
    path = os.path.join(run_dir, "summary.json")
    try:
        summary = read_json_file(path) if os.path.exists(path) else None
    except ConfigError:
        pass
    status = summary.get("status") if isinstance(summary, dict) else None
    if status == "finished" and rc == 0:
        return 0
    name = os.path.basename(run_dir)
    if status == "stopped":
        device = f"--num-gpus {args.num_gpus}" if args.num_gpus else f"--nproc {args.nproc or 1}"
        if os.path.normpath(os.path.dirname(run_dir)) == os.path.normpath(args.results_dir):
            target = name
            default = os.path.normpath(args.results_dir) == os.path.join(ROOT, "results")
            results = "" if default else f" --results-dir {args.results_dir}"
        else:  # resumed from an explicit path
            target, results = (run_dir if os.path.isabs(run_dir) else "./" + run_dir), ""
        if not os.environ.get(SWEEP_ENV):  # a sweep prints its own line: rerun the sweep
            print(f"stopped by signal at step {summary.get('steps')}, checkpoint written; resume with: python run.py "
                  f"--resume {target} {device}{results}", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    # diverged: the NaN guard (train_gpt.fail_non_finite); a crashed rank's error comes before the
    # failure its peers then wrote (lost_rank: a collective lost its connection to it)
    if status in FAILED_STATUSES and not (crash and summary.get("lost_rank")):
        reason = summary.get("reason") or f"the workers exited with code {rc}"
        print(f"error: {reason}" + ("" if "checkpoint" in reason else "; the last good checkpoint is kept"),
              file=sys.stderr, flush=True)
        return EXIT_FAILED
    # a crash (its traceback is in the workers' log): the summary says what happened
    if crash:
        reason = crash + (f"; then {summary['reason']}" if status in FAILED_STATUSES else "") + \
            (" (after a stop signal)" if stopped else "")
    else:
        reason = (f"the workers exited with code {rc}" if rc else "the workers ended without a summary") + \
            (" after a stop signal" if stopped else "")
    write_failed_summary(run_dir, reason)
    print(f"error: {reason}; resume with --resume {name} (from its newest checkpoint)", file=sys.stderr, flush=True)
    return rc if rc > 0 and rc not in (2, EXIT_FAILED, EXIT_STOPPED) else 1  # torchrun killed: 1 too


def drop_checkpoints(run_dir: str) -> bool:
    """Deletes the checkpoints/ of a finished run, under the run folder's lock (never a run another
    process holds or one that did not finish: those need their checkpoints to resume). True if
    something was deleted."""
    path = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(path):
        return False
    try:
        fd = runlock.claim(run_dir)
    except RunLockError:
        return False
    try:
        summary = read_summary(run_dir)
        if summary is None or summary.get("status") != "finished":  # checked under the lock
            return False
        shutil.rmtree(path)
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The workers' output: all of it in RUN/workers.log; on the terminal without their failure reports


WORKER_LOG_NAME = re.compile(r"workers(\.node\d+)?\.log")


def worker_log_path(run_dir: str, node_rank: int) -> str:
    """RUN/workers.log: torchrun's and the workers' stdout and stderr, each launch appended (node rank
    K > 0: workers.nodeK.log, as a results dir shared between nodes holds every node's)."""
    return os.path.join(run_dir, "workers.log" if node_rank == 0 else f"workers.node{node_rank}.log")


def open_worker_log(path: str, cmd: list[str]) -> tuple[int, int]:
    """Opens the log for torchrun to append to, after a line that starts this launch's part; returns
    (its fd, the offset where torchrun's output starts)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        return fd, os.fstat(fd).st_size
    except OSError:
        os.close(fd)
        raise


# A line a worker's uncaught exception prints under a process group: "[rank1]: Traceback ..."
RANK_LINE = re.compile(rb"\[rank(\d+)\]: ?")
TRACEBACK = b"Traceback (most recent call last):"
# torchrun's log lines on its worker processes ("failed (exitcode: 1) local_rank: 0 (pid: ...)", "Sending
# process N closing signal SIGTERM"): the start of its failure report
TORCHRUN_LINE = re.compile(rb"[IWE]\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/multiprocessing/")
REPORT_START = re.compile(b"|".join([RANK_LINE.pattern, re.escape(TRACEBACK), TORCHRUN_LINE.pattern]))
WORKER_FAILED = re.compile(rb"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
CHAINED = (b"During handling of the above exception", b"The above exception was the direct cause")
NCCL_WATCHDOG = b"Watchdog caught collective operation timeout"


class WorkerOutput:
    """Shows RUN/workers.log on the launcher's stderr as torchrun and the workers write it, but for
    their failure reports, which only the log keeps: a worker's traceback shows as its error line
    (once per distinct error, pointing to the log), torchrun's own report (its lines on failed
    workers, its ChildFailedError traceback) not at all. Bytes are shown as they come, so the
    progress bar's \\r updates show live; a line without \\r is shown once complete (it may start a
    traceback). `crash`: the first worker error shown, the reason of a crash; `failed_worker`:
    torchrun's word on the first worker that failed (one killed by a signal prints no traceback)."""

    def __init__(self, path: str, offset: int):
        self.path = path
        self.file = open(path, "rb")
        self.file.seek(offset)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.line = b""  # the line being received, not complete yet
        self.shown = 0  # how many of its bytes are on the terminal already (a progress bar)
        self.at_line_start = True  # the terminal's cursor: whether the last byte shown ended a line
        self.block = None  # a traceback without rank prefix being kept off the terminal: stack, after, report
        self.rules = 0  # "=====" lines seen of torchrun's ChildFailedError report
        self.in_stack: set = set()  # ranks whose traceback's stack lines are coming
        self.errors: dict = {}  # rank (None: no prefix) -> its traceback's error line, not shown yet
        self.seen: set = set()  # error lines shown
        self.kept_back = self.pointed = False  # something was kept off the terminal; a line said where it is
        self.crash: str | None = None
        self.failed_worker: str | None = None

    def pump(self) -> bool:
        """Shows what was written since the last call; False if nothing was."""
        data = self.file.read(1 << 20)
        if not data:
            self.show_errors()  # a pause in the output: the tracebacks held are complete
            return False
        self.line += data
        while (end := self.line.find(b"\n")) >= 0:
            line, self.line = self.line[:end + 1], self.line[end + 1:]
            shown, self.shown = self.shown, 0
            self.take_line(line, shown)
        if b"\r" in self.line and self.block is None:  # a progress bar, shown as it updates
            safe = self.showable_end(self.line)
            if safe > self.shown:
                self.echo(self.line[self.shown:safe])
                self.shown = safe
        return True

    def close(self) -> None:
        """Shows the rest, ends the terminal's line, points to the log if it kept something back."""
        while self.pump():
            pass
        if self.line:
            line, self.line = self.line + b"\n", b""
            self.take_line(line, self.shown)
        self.block = None
        self.show_errors()
        if not self.at_line_start:
            self.echo(b"\n")
        if self.kept_back and not self.pointed:
            self.echo(f"(the workers' full output: {self.path})\n".encode())
        self.file.close()

    def take_line(self, line: bytes, shown: int) -> None:
        """A complete line whose first `shown` bytes are on the terminal already."""
        if self.block and self.keep_in_block(line.rstrip(b"\r\n")):
            return
        start = REPORT_START.search(line, shown)
        if start is None:
            self.echo(line[shown:])
            return
        if start.start() > 0:  # a progress bar's text before it: its line ends here
            self.echo(line[shown:start.start()] + b"\n")
        self.kept_back = True
        text = line[start.start():].rstrip(b"\r\n")
        rank = RANK_LINE.match(text)
        if rank:
            self.take_rank_line(int(rank[1]), text[rank.end():])
        elif text.startswith(TRACEBACK):
            self.block = "stack"
        else:
            self.take_torchrun_line(text)

    def keep_in_block(self, text: bytes) -> bool:
        """Whether a line belongs to the traceback (or torchrun report) being kept off the terminal."""
        if self.block == "stack":
            if not text or text[:1] in (b" ", b"\t"):
                return True
            if b"ChildFailedError" in text:  # torchrun's own: its report follows, between two rules
                self.block, self.rules = "report", 0
            else:  # the error line of a worker without a process group (a chain's last one wins)
                self.errors[None] = text
                self.block = "after"
            return True
        if self.block == "report":
            if len(text) >= 10 and text == b"=" * len(text):
                self.rules += 1
            if self.rules >= 2:
                self.block = None
            return True
        if not text or text.startswith(CHAINED):  # "after": between the tracebacks of a chain
            return True
        if text.startswith(TRACEBACK):
            self.block = "stack"
            return True
        self.block = None
        self.show_errors()
        return False

    def take_rank_line(self, rank: int, text: bytes) -> None:
        """A line of rank `rank`'s traceback (the "[rankN]: " prefix taken off)."""
        if text.startswith(TRACEBACK):
            self.in_stack.add(rank)
        elif rank in self.in_stack and (not text or text[:1] in (b" ", b"\t")):
            pass  # the stack
        elif rank in self.in_stack:
            self.in_stack.discard(rank)
            self.errors[rank] = text  # its error line (a chained traceback's later one replaces it)
        elif NCCL_WATCHDOG in text:  # NCCL ends the process itself: its log line is the error
            self.errors.setdefault(rank, re.sub(rb"^\[[^\]]*\]\s*", b"", text))

    def take_torchrun_line(self, text: bytes) -> None:
        failed = WORKER_FAILED.search(text)
        if failed and self.failed_worker is None:
            code, local_rank = int(failed[1]), int(failed[2])
            how = f"exited with code {code}"
            if code < 0 and -code in signal.valid_signals():
                how = f"was killed by {signal.Signals(-code).name}"
            self.failed_worker = f"the worker of local rank {local_rank} {how}"

    def show_errors(self) -> None:
        """Shows the error lines of the tracebacks held, each distinct one once, with where the rest is."""
        if self.block == "after":
            return  # another traceback of the chain may follow
        if self.errors and not self.at_line_start:  # under a progress bar, not on its line
            self.echo(b"\n")
        for rank, text in self.errors.items():
            error = text.decode(errors="replace").strip()
            who = "a worker" if rank is None else f"rank {rank}"
            self.crash = self.crash or f"{who} crashed: {error}"
            if error not in self.seen:
                self.seen.add(error)
                prefix = "" if rank is None else f"[rank{rank}]: "
                self.echo(f"{prefix}{error} (traceback: {self.path})\n".encode())
                self.pointed = True
        self.errors.clear()

    def echo(self, data: bytes) -> None:
        if not data:
            return
        try:
            sys.stderr.write(self.decoder.decode(data))
            sys.stderr.flush()
        except OSError:  # a terminal gone (a closed pipe): the launcher goes on, the log has it all
            pass
        self.at_line_start = data.endswith(b"\n")

    @staticmethod
    def showable_end(line: bytes) -> int:
        """How much of an incomplete line may be shown: up to what may start a report."""
        start = REPORT_START.search(line)
        end = start.start() if start else len(line)
        for marker in (b"[rank", TRACEBACK):
            for k in range(min(len(marker) - 1, end), 0, -1):
                if line[:end].endswith(marker[:k]):
                    end -= k
                    break
        return end


# ---------------------------------------------------------------------------------------------
# Workers that cannot end by themselves: stuck after a stop, or left over after a failure

# After a stop reached every worker, how long they may go without writing to the run folder before
# the launcher takes them for stuck (a rank waiting on a stopped one) and kills them: at least this,
# and twice the longest they went without writing so far in this launch (a slow step, validation or
# checkpoint of a big model, the first step's compile)
STOP_GRACE_S = 5.0
# A further stop at least this long after the first kills the workers at once (one Ctrl-C can arrive
# twice: through the terminal's process group and from a sweep that passes it on)
FORCE_STOP_AFTER_S = 2.0
# After a worker reported the run failed (summary.json says so, or torchrun a failed worker), how long
# the others get to exit by themselves (a stopped or stuck rank never does; torchrun would wait for
# it for its --shutdown-timeout)
FAILED_GRACE_S = 1.0
POLL_S = 0.1


class RunWatch:
    """What the launcher sees of the run folder while the workers run: when they last wrote to it
    (metrics.jsonl, checkpoints, summary.json), the longest they went without writing, summary.json's
    status. Polled every half second (a few stat calls)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.state = self.files()
        self.checked = self.changed = None  # monotonic times; changed: None until the workers write
        self.longest_quiet = 0.0
        self.status = None

    def files(self) -> frozenset:
        """(path, size, mtime) of every file of the run folder and its checkpoints/, but the workers' logs."""
        found = set()
        for folder, dirs, names in os.walk(self.run_dir):
            if folder == self.run_dir:
                dirs[:] = [d for d in dirs if d == "checkpoints"]
            for name in names:
                path = os.path.join(folder, name)
                if not WORKER_LOG_NAME.fullmatch(name):
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue  # renamed or removed meanwhile
                    found.add((path, st.st_size, st.st_mtime_ns))
        return frozenset(found)

    def poll(self, now: float) -> None:
        if self.checked is not None and now - self.checked < 0.5:
            return
        self.checked = now
        state = self.files()
        if state == self.state:
            return
        if self.changed is not None:
            self.longest_quiet = max(self.longest_quiet, now - self.changed)
        self.state, self.changed = state, now
        try:
            summary = read_json_file(os.path.join(self.run_dir, "summary.json"))
            self.status = summary.get("status") if isinstance(summary, dict) else None
        except (ConfigError, OSError):
            self.status = None

    def stuck_since(self, stop_reached: float, now: float) -> float | None:
        """Seconds the workers have been quiet since a stop reached them and past the grace they get,
        or None while they may still be busy (or have not written anything yet: still starting,
        where only the collective timeout bounds a lost rank)."""
        if self.changed is None:
            return None
        grace = max(STOP_GRACE_S, 2 * self.longest_quiet)
        quiet = now - max(stop_reached, self.changed)
        return quiet if quiet > grace else None


def kill_workers(child: subprocess.Popen) -> None:
    """SIGKILL to torchrun and everything under it: a stopped or stuck worker ends only so (SIGTERM
    waits until a stopped process continues)."""
    for pid in [child.pid] + runlock.descendants(child.pid):  # collected before torchrun dies
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def supervise(child: subprocess.Popen, output: WorkerOutput, watch: RunWatch, stops: list, stop_times: list,
              deliver, signalled: set, max_restarts: int) -> tuple[int, str | None]:
    """Waits for torchrun, showing the workers' output; kills the workers when they cannot end by
    themselves: stuck after a stop (past their grace, or at a further stop), or left over after a
    failure (FAILED_GRACE_S). Returns (torchrun's exit code, why the launcher killed them: None,
    "failed", or after a stop how: "at a further stop", "after N s without progress")."""
    stop_reached = failed = None  # monotonic times: a stop reached every worker; a worker reported failure
    while (rc := child.poll()) is None:
        output.pump()
        now = time.monotonic()
        watch.poll(now)
        why = None
        if stops:
            deliver()  # a worker whose stop handler was not in place yet gets it now
            workers = runlock.child_pids(child.pid)
            if stop_reached is None and workers and set(workers) <= signalled:
                stop_reached = now
            quiet = watch.stuck_since(stop_reached, now) if stop_reached is not None else None
            if len(stop_times) > 1 and stop_times[-1] - stop_times[0] >= FORCE_STOP_AFTER_S:
                why = "at a further stop"
            elif quiet is not None:
                why = f"after {quiet:.0f} s without progress"
        if failed is None and (watch.status in FAILED_STATUSES or (output.failed_worker and max_restarts == 0)):
            failed = now
        if failed is not None and now - failed > FAILED_GRACE_S:
            why = why or "failed"
        if why:
            kill_workers(child)
            return child.wait(), why
        time.sleep(POLL_S)
    return rc, None


def last_logged_step(run_dir: str) -> int | None:
    """The step of metrics.jsonl's last complete record (read from its end), or None."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def write_failed_summary(run_dir: str, reason: str) -> None:
    """summary.json: "failed" with `reason`, where the workers could not write it themselves."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = json.load(f)
        write_json(os.path.join(run_dir, "summary.json"), {"name": saved.get("name"), "status": "failed",
                                                           "reason": reason, "optimizer": saved.get("optimizer_name")})
    except (OSError, ValueError, AttributeError):
        pass


def record_stuck_stop(run_dir: str, stops: list, how: str) -> None:
    """After the launcher killed workers that had not stopped (`how`: "after N s without progress",
    or "at a further stop"): "failed" in summary.json, with where the run stood and where a resume
    starts, unless the workers wrote their own outcome first."""
    summary = read_summary(run_dir)
    if isinstance(summary, dict) and summary.get("status") in ("stopped", *FAILED_STATUSES):
        return
    name = os.path.basename(run_dir)
    stop = signal.Signals(stops[0]).name if stops else "a signal"
    step = last_logged_step(run_dir)
    at = f" after step {step} (the last logged)" if step is not None else ""
    state = "busy" if how == "at a further stop" else "stuck"  # a further stop may cut a slow checkpoint short
    checkpoint = newest_checkpoint_step(run_dir)
    written = checkpoint is not None and step is not None and checkpoint >= step
    resume = (f"resume with --resume {name} from step {checkpoint}" if checkpoint is not None else
              f"resume with --resume {name} from step 0 (no checkpoint yet)")
    write_failed_summary(run_dir, f"stopped by {stop}, but the workers were {state}{at} and were killed {how}; "
                                  f"{'' if written else 'no stop checkpoint written; '}{resume}")


def stopped_before_start(args, run_dir: str) -> int:
    """A stop that came before the workers started: nothing trained; one line, exit 75."""
    if not os.environ.get(SWEEP_ENV):
        resumable = os.path.exists(os.path.join(run_dir, "config.json"))
        print("stopped before training started, nothing trained" +
              (f"; resume with: python run.py --resume {os.path.basename(run_dir)}" if resumable else ""),
              file=sys.stderr, flush=True)
    return EXIT_STOPPED


def main(argv=None) -> int:
    args = parse_args(argv)
    stops = STOPS if argv is None else []  # as a script: the stops recorded since its first line
    try:
        cmd, run_dir, lock_fd = prepare_run(args)
    except (ConfigError, ShardError, LaunchError, RunLockError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cmd:
        return 0
    if stops:
        os.close(lock_fd)
        return stopped_before_start(args, run_dir)
    runlock.write_holder(lock_fd)
    print(f"run dir: {run_dir}", file=sys.stderr)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env[runlock.LAUNCHER_ENV] = str(os.getpid())
    env[runlock.NODE_RANK_ENV] = str(args.node_rank)  # c10d numbers nodes its own way (GROUP_RANK)
    # torchrun: holds the folder's lock too (inherited), dies with us (SIGTERM: it stops the workers,
    # which write a stop checkpoint), and has a session of its own, so a Ctrl-C reaches only us and
    # we hand it to the workers (a signal to torchrun ends in its ChildFailedError traceback)
    signalled = set()
    log_path = worker_log_path(run_dir, args.node_rank)
    try:  # torchrun's and the workers' output, all of it; the terminal gets it without failure reports
        log_fd, log_start = open_worker_log(log_path, cmd)
    except OSError as e:
        os.close(lock_fd)
        print(f"error: cannot write {log_path}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        child = subprocess.Popen(cmd, env=env, pass_fds=(lock_fd,), start_new_session=True, stdout=log_fd,
                                 stderr=log_fd, preexec_fn=runlock.torchrun_preexec(os.getpid()))
    finally:
        os.close(lock_fd)  # torchrun holds it now: the folder stays claimed as long as torchrun lives
        os.close(log_fd)
    output, watch, stop_times = WorkerOutput(log_path, log_start), RunWatch(run_dir), []

    def deliver(resend=False):
        # Whatever stop we got, the workers get SIGTERM: Python turns SIGINT into KeyboardInterrupt
        # from a process's first instant, so a worker still importing torch would die with a
        # traceback (and torchrun add its own); SIGTERM shows up as caught only once train_gpt.py's
        # stop handler is in place, and until then it is held back here.
        for pid in runlock.child_pids(child.pid):
            if (resend or pid not in signalled) and caught_signals(pid) & (1 << (signal.SIGTERM - 1)):
                try:
                    os.kill(pid, signal.SIGTERM)
                    signalled.add(pid)
                except ProcessLookupError:
                    pass
        if caught_signals(child.pid) == -1:  # no /proc: torchrun passes it on
            child.send_signal(signal.SIGTERM)

    def forward(signum, frame):  # a stop sent to the launcher alone reaches the workers too
        stops.append(signum)
        stop_times.append(time.monotonic())
        deliver(resend=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    rc, killed = supervise(child, output, watch, stops, stop_times, deliver, signalled, args.max_restarts)
    output.close()
    if killed and killed != "failed":  # stuck after a stop
        record_stuck_stop(run_dir, stops, killed)
    code = outcome(args, run_dir, rc, bool(stops), crash=output.crash or output.failed_worker)
    if code == 0 and args.drop_checkpoints and drop_checkpoints(run_dir):
        print(f"checkpoints of {os.path.basename(run_dir)} dropped (--drop-checkpoints)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
