"""Checkpoints: RUN/checkpoints/step_NNNNNNN.pt, written atomically by rank 0, the newest
train.keep_checkpoints kept, loaded with torch.load(weights_only=True).

A checkpoint holds the step, the training seconds so far, the model, the run's optimizers and
learning-rate schedulers (optimizers.RunOptimizers.state_dict: a sharded optimizer's state gathered
to rank 0) and every rank's RNG state. The data order is a pure function of (seed, step), so no
loader state is needed.

Under train.parallel fsdp a checkpoint is a folder, RUN/checkpoints/step_NNNNNNN/: a distributed
checkpoint (torch.distributed.checkpoint, DCP) of the model and the optimizers, each rank writing
its own shards, plus meta.pt (step, seconds, schedulers, RNG states) from rank 0. It is written
under step_NNNNNNN.tmp/ and renamed when complete, so a folder without .tmp is whole. DCP reshards
on load: such a checkpoint resumes on any number of ranks. One file of the whole model and state:
python -m torch.distributed.checkpoint.format_utils dcp_to_torch_save step_NNNNNNN/ model.pt
"""

import glob
import os
import re
import shutil

import torch
import torch.distributed as dist

from fileio import fsync_directory, write_atomic
from outcome import RunFailed
from parallel import all_reduce_sum, collective_device

CHECKPOINT_NAME = re.compile(r"step_(\d{1,18})(\.pt)?")
META_NAME = "meta.pt"  # in a sharded (DCP) checkpoint folder: what is not sharded
# DCP raises CheckpointException (a BaseException) when any rank fails to write or read
_DCP_ERRORS = (OSError, RuntimeError, ValueError, KeyError)


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_step(path: str) -> int | None:
    """The step number in a checkpoint's file name, or None for a name that is not a checkpoint's."""
    match = CHECKPOINT_NAME.fullmatch(os.path.basename(path))
    return int(match.group(1)) if match else None


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.isdir(path)


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoints, oldest first (by step number, which may outgrow the zero padding): step_N.pt
    files and sharded folders step_N/ (renamed from step_N.tmp/ only once complete, so one that
    lacks a file is damaged, and is listed for the resume check to report); names without a step
    number (step_x.pt, step_.pt) and unfinished step_N.tmp/ folders are not checkpoints and are left alone."""
    paths = [p for p in glob.glob(os.path.join(checkpoint_dir(run_dir), "step_*")) if checkpoint_step(p) is not None
             and (os.path.isfile(p) if p.endswith(".pt") else os.path.isdir(p))]
    return sorted(paths, key=checkpoint_step)


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


def gather_rng_states(rank: int, world_size: int) -> list[dict] | None:
    """Every rank's RNG states, gathered to rank 0 (a collective under a process group); None on
    the other ranks."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    if not dist.is_initialized():
        return [rng]
    rngs = [None] * world_size if rank == 0 else None
    dist.gather_object(rng, rngs, dst=0)
    return rngs


def save_checkpoint(run_dir: str, step: int, model, optimizers, elapsed: float, keep: int, rank: int,
                    world_size: int, sharded: bool = False) -> None:
    """Writes step `step`'s checkpoint (every rank calls this): on rank 0 one file, the optimizer
    states and RNG states gathered to it first; `sharded` (FSDP2): a DCP folder every rank writes
    its shards to. Then drops all but the newest `keep`. A failed write (a full disk) raises
    RunFailed on every rank, the older checkpoints untouched."""
    rngs = gather_rng_states(rank, world_size)
    folder = checkpoint_dir(run_dir)
    failure = None
    try:
        meta = {"step": step, "elapsed_s": elapsed, "rng": rngs}
        if sharded:
            _write_sharded_checkpoint(folder, step, model, optimizers, meta, rank, world_size)
        else:
            optimizer_states = optimizers.state_dict()  # {"optimizers": [...], "schedulers": [...]}
            if rank == 0:
                os.makedirs(folder, exist_ok=True)
                state = {**meta, "model": model.state_dict(), **optimizer_states}
                write_atomic(os.path.join(folder, f"step_{step:07d}.pt"), lambda f: torch.save(state, f), binary=True)
        if rank == 0:
            # older checkpoints past `keep`, and temp files and folders left by a run killed mid-write
            for old in list_checkpoints(run_dir)[:-keep] + glob.glob(os.path.join(folder, "*.tmp*")):
                shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    except (*_DCP_ERRORS, dcp_exception()) as e:  # torch.save reports a failed write as a RuntimeError
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200] or type(e).__name__
        failure = f"cannot write the checkpoint of step {step} to {folder}: {reason}"
    if dist.is_initialized():  # every rank learns whether rank 0's write failed, and stops with it
        flag = all_reduce_sum(torch.tensor([1.0 if failure else 0.0], device=collective_device()))
        if flag.item() > 0 and failure is None:
            failure = f"another rank could not write the checkpoint of step {step}"
    if failure:
        raise RunFailed(f"{failure}; the older checkpoints are kept, resume with --resume once there is space")


def dcp_exception() -> type:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _write_sharded_checkpoint(folder: str, step: int, model, optimizers, meta: dict, rank: int,
                              world_size: int) -> None:
    """The DCP folder of step `step`: written under step_N.tmp/ (every rank its shards, rank 0
    DCP's .metadata once all have written, then meta.pt), renamed to step_N/ by rank 0. The folder
    must be one every rank sees (a shared filesystem across nodes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = os.path.join(folder, f"step_{step:07d}")
    staging = final + ".tmp"
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a write killed midway
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizers.all)
    dcp.save({"model": model_state, "optimizers": optimizer_state}, checkpoint_id=staging)
    if rank == 0:  # dcp.save returns once every rank's shards and the .metadata are written
        meta = {**meta, "schedulers": optimizers.scheduler_states(), "world_size": world_size}
        write_atomic(os.path.join(staging, META_NAME), lambda f: torch.save(meta, f), binary=True)
        if os.path.isdir(final):  # the same step written again (a resume that redoes it)
            shutil.rmtree(final)
        os.rename(staging, final)
        fsync_directory(folder)


def agreed_resume_checkpoint(run_dir: str, rank: int) -> str | None:
    """The checkpoint every rank resumes from: rank 0's newest, its step broadcast, so ranks whose
    folders differ (nodes without a shared filesystem, a restart after a partial copy) never start
    from different steps and hang in mismatched collectives. A rank without that step's file fails
    the run on every rank, with the step and the folder it is missing from."""
    checkpoints = list_checkpoints(run_dir)
    if not dist.is_initialized():
        return checkpoints[-1] if checkpoints else None
    chosen = [checkpoint_step(checkpoints[-1]) if checkpoints else None]
    dist.broadcast_object_list(chosen, src=0)
    step = chosen[0]
    if step is None:
        return None
    path = next((p for p in checkpoints if checkpoint_step(p) == step), None)
    missing = all_reduce_sum(torch.tensor([0.0 if path else 1.0], device=collective_device()))
    if missing.item() > 0:
        where = f"rank {rank} has no {checkpoint_dir(run_dir)}/step_{step:07d}.pt" if path is None else \
            f"{int(missing.item())} rank(s) lack the checkpoint of step {step}"
        raise RunFailed(f"cannot resume at step {step}, rank 0's newest checkpoint: {where}; without a filesystem "
                        f"shared by all nodes, copy rank 0's checkpoints folder to every node first")
    return path


def load_checkpoint(path: str, model, optimizers, rank: int, sharded: bool = False) -> tuple[int, float]:
    """Restores the model, the optimizers (RunOptimizers) and this rank's RNG state from `path`
    (a file, or a DCP folder when `sharded`: every rank calls it); returns (step, elapsed seconds).
    An unreadable or unusable checkpoint raises RunFailed."""
    if sharded != is_sharded_checkpoint(path):
        kinds = ("a sharded (train.parallel fsdp) checkpoint folder", "a single-file (train.parallel ddp) checkpoint")
        raise RunFailed(f"checkpoint {path} is {kinds[0] if is_sharded_checkpoint(path) else kinds[1]}, but this run "
                        f"is {'fsdp' if sharded else 'ddp'}: resume with the train.parallel it was written with")
    if sharded:
        state = _load_sharded_checkpoint(path, model, optimizers)
    else:
        state = _read(path, path)
        problem = checkpoint_problem(state, path, model)
        if problem:
            raise RunFailed(f"checkpoint {path} is unusable: {problem}")
        model.load_state_dict(state["model"])
        optimizers.load_state_dict(state)
    rng = state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"], state["elapsed_s"]


def _read(path: str, shown: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise RunFailed(f"checkpoint {shown} is corrupt ({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None


def _load_sharded_checkpoint(path: str, model, optimizers) -> dict:
    """Loads a DCP folder into the FSDP2 model and the optimizers, whatever number of ranks wrote it
    (DCP reads each rank's rows from the shards that hold them); returns meta.pt's entries."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = _read(os.path.join(path, META_NAME), path)
    problem = meta_problem(meta, path)
    if problem:
        raise RunFailed(f"checkpoint {path} is unusable: {problem}")
    # the state of this run's model and optimizers as templates: DCP fills them in place (an
    # optimizer without state yet gets it from a zero-gradient step at lr 0)
    model_state, optimizer_state = get_state_dict(model, optimizers.all)
    try:
        dcp.load({"model": model_state, "optimizers": optimizer_state}, checkpoint_id=path)
    except (*_DCP_ERRORS, dcp_exception()) as e:
        raise RunFailed(f"checkpoint {path} is unusable: {' '.join(str(e).split())[:300]}") from None
    set_state_dict(model, optimizers.all, model_state_dict=model_state, optim_state_dict=optimizer_state)
    optimizers.load_scheduler_states(meta["schedulers"])
    return meta


def sharded_checkpoint_problem(path: str, model=None) -> str | None:
    """What makes a sharded checkpoint folder unusable (an unreadable meta.pt or DCP metadata, a shard
    file missing or shorter than the metadata says, a step unlike its name's, a model of other shapes
    than `model`'s: read from the metadata, no tensor loaded), or None."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in (META_NAME, ".metadata"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"its {name} is missing"
    try:
        meta = torch.load(os.path.join(path, META_NAME), map_location="cpu", weights_only=True)
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        return (str(e).splitlines() or [type(e).__name__])[0][:200]
    for item in (metadata.storage_data or {}).values():  # where each saved tensor's bytes are
        file = os.path.join(path, item.relative_path)
        if not os.path.isfile(file):
            return f"its shard file {item.relative_path} is missing"
        if os.path.getsize(file) < item.offset + item.length:
            return f"its shard file {item.relative_path} is truncated"
    saved = metadata.state_dict_metadata
    problem = meta_problem(meta, path)
    if problem or model is None:
        return problem
    got = {k[len("model."):]: tuple(v.size) for k, v in saved.items() if k.startswith("model.") and hasattr(v, "size")}
    for name, tensor in model.state_dict().items():
        if name not in got:
            return f"its model has no {name} (config.json's model has)"
        if got[name] != tuple(tensor.shape):
            return f"its model's {name} has shape {list(got[name])}, config.json's model {list(tensor.shape)}"
    return None


def meta_problem(meta, path: str) -> str | None:
    """What makes a sharded checkpoint's meta.pt unusable, or None."""
    if not isinstance(meta, dict):
        return f"its {META_NAME} holds a {type(meta).__name__}"
    for key, kind in (("step", int), ("elapsed_s", (int, float)), ("schedulers", list), ("rng", list)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"its {META_NAME} has no valid {key!r} entry"
    if checkpoint_step(path) is not None and meta["step"] != checkpoint_step(path):
        return f"it holds step {meta['step']}, its name says {checkpoint_step(path)}"
    if len(meta["schedulers"]) != 2 or not meta["rng"]:
        return f"its {META_NAME} does not hold the two scheduler states and the RNG states of a run"
    return None
