"""Checkpoints: RUN/checkpoints/step_NNNNNNN.pt, written atomically by rank 0, the newest
train.keep_checkpoints kept, loaded with torch.load(weights_only=True).

A checkpoint holds the step, the training seconds so far, the model, the run's optimizers and
learning-rate schedulers (optimizers.RunOptimizers.state_dict: a sharded optimizer's state gathered
to rank 0) and every rank's RNG state. The data order is a pure function of (seed, step), so no
loader state is needed.
"""

import glob
import os
import re

import torch
import torch.distributed as dist

from fileio import write_atomic
from outcome import RunFailed
from parallel import all_reduce_sum, collective_device

CHECKPOINT_NAME = re.compile(r"step_(\d{1,18})\.pt")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


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
                    world_size: int) -> None:
    """Writes step `step`'s checkpoint on rank 0 (every rank calls this: the optimizer states and
    RNG states are gathered to rank 0 first), then drops all but the newest `keep`. A failed write
    (a full disk) raises RunFailed on every rank, the older checkpoints untouched."""
    rngs = gather_rng_states(rank, world_size)
    optimizer_states = optimizers.state_dict()  # {"optimizers": [...], "schedulers": [...]}
    failure = None
    if rank == 0:
        folder = checkpoint_dir(run_dir)
        try:
            os.makedirs(folder, exist_ok=True)
            state = {"step": step, "elapsed_s": elapsed, "model": model.state_dict(), **optimizer_states, "rng": rngs}
            write_atomic(os.path.join(folder, f"step_{step:07d}.pt"), lambda f: torch.save(state, f), binary=True)
            # older checkpoints past `keep`, and temp files left by a run killed mid-write
            for old in list_checkpoints(run_dir)[:-keep] + glob.glob(os.path.join(folder, "*.tmp.*")):
                os.remove(old)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200] or type(e).__name__
            failure = f"cannot write the checkpoint of step {step} to {folder}: {reason}"
    if dist.is_initialized():  # every rank learns whether rank 0's write failed, and stops with it
        flag = all_reduce_sum(torch.tensor([1.0 if failure else 0.0], device=collective_device()))
        if flag.item() > 0 and failure is None:
            failure = f"rank 0 could not write the checkpoint of step {step}"
    if failure:
        raise RunFailed(f"{failure}; the older checkpoints are kept, resume with --resume once there is space")


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


def load_checkpoint(path: str, model, optimizers, rank: int) -> tuple[int, float]:
    """Restores the model, the optimizers (RunOptimizers) and this rank's RNG state from `path`;
    returns (step, elapsed seconds). An unreadable or unusable file raises RunFailed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise RunFailed(f"checkpoint {path} is corrupt ({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
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
