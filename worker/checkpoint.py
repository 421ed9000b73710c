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

Every checkpoint is verified before it is used. Its manifest (beside a file: step_NNNNNNN.manifest.json;
in a folder: manifest.json, written last, before the folder is renamed) records each file's size and
CRC-32 (computed while the file is written, or by the rank that wrote a DCP shard), the step, and the
run's config (configs.fixed_entries: what its numbers depend on) with its hash. A checkpoint without
a manifest is unfinished (or written before manifests existed) and is not resumed from; a file whose
size or checksum differs is corrupt; a run whose config.json no longer hashes to the manifest's is
refused with the changed keys. CRC-32 (zlib, ~7 GB/s) rather than a cryptographic hash: it finds
changed, truncated and swapped bytes; it is not meant to resist deliberate forgery, and sha256 (~2 GB/s
here) would add ~30% to a GPT-2-small checkpoint write (docs/benchmarks.md, "Checkpoint checksums").
"""

import glob
import json
import os
import re
import shutil
import zlib

import torch
import torch.distributed as dist

from configs import config_changes, config_hash, fixed_entries
from worker.fileio import fsync_directory, write_atomic, write_json
from worker.outcome import RunFailed
from worker.parallel import all_reduce_sum, collective_device

CHECKPOINT_NAME = re.compile(r"step_(\d{1,18})(\.pt)?")
META_NAME = "meta.pt"  # in a sharded (DCP) checkpoint folder: what is not sharded
MANIFEST_NAME = "manifest.json"  # in a DCP folder; a file checkpoint's is step_NNNNNNN.manifest.json beside it
MANIFEST_FORMAT = 1
# logging.spectrum_shadow's full-rank momentum (worker/spectrum.py: SpectrumMonitor.shadow_state):
# a file checkpoint's entry {"since": step, "matrices": {name: M}}; in a DCP folder the matrices
# (row-sharded) under this key and {"since": step} in meta.pt
SHADOW_KEY = "spectrum_shadow"
CHUNK = 16 * 2**20  # bytes read at a time when a checksum is computed from a file
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


# ---------------------------------------------------------------------------------------------
# Manifests: what a checkpoint's files must hold, and the config it was made with


class ChecksumWriter:
    """A binary file wrapper that keeps the CRC-32 and size of what is written through it, so a
    checkpoint's checksum costs no second read (torch.save writes through any object with write())."""

    def __init__(self, file):
        self.file, self.crc, self.size = file, 0, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def entry(self) -> dict:
        return {"bytes": self.size, "crc32": f"{self.crc:08x}"}


def file_entry(path: str) -> dict:
    """{"bytes": size, "crc32": hex} of a file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def manifest_path(checkpoint: str) -> str:
    if is_sharded_checkpoint(checkpoint):
        return os.path.join(checkpoint, MANIFEST_NAME)
    return os.path.join(os.path.dirname(checkpoint), f"step_{checkpoint_step(checkpoint):07d}.manifest.json")


def make_manifest(step: int, config: dict, files: dict, world_size: int) -> dict:
    entries = fixed_entries(config)
    return {"format": MANIFEST_FORMAT, "step": step, "world_size": world_size, "checksum": "crc32",
            "files": files, "config_hash": config_hash(config), "config": entries}


def read_manifest(checkpoint: str) -> tuple[dict | None, str | None]:
    """(the checkpoint's manifest, None), or (None, what is wrong with it)."""
    path = manifest_path(checkpoint)
    if not os.path.isfile(path):
        return None, (f"it has no {os.path.basename(path)}: its write did not finish (or an older mofa wrote it, "
                      "without checksums)")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode())
    except (OSError, ValueError) as e:
        return None, f"its {os.path.basename(path)} is unreadable ({' '.join(str(e).split())[:120]})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not isinstance(manifest.get("config_hash"), str) \
            or not isinstance(manifest.get("config"), dict) or manifest.get("step") != checkpoint_step(checkpoint) \
            or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("crc32"), str)
                       for e in files.values()):
        return None, f"its {os.path.basename(path)} is not a manifest of step {checkpoint_step(checkpoint)}"
    return manifest, None


def checkpoint_files(checkpoint: str, manifest: dict) -> list[tuple[str, str]]:
    """(name in the manifest, path) of every file the manifest lists."""
    folder = checkpoint if is_sharded_checkpoint(checkpoint) else os.path.dirname(checkpoint)
    return [(name, os.path.join(folder, name)) for name in sorted(manifest["files"])]


def file_problem(name: str, path: str, expected: dict) -> str | None:
    """What is wrong with one listed file (missing, another size, another checksum), or None."""
    if not os.path.isfile(path):
        return f"its file {name} is missing"
    if os.path.getsize(path) != expected["bytes"]:
        return f"its file {name} has {os.path.getsize(path)} bytes, its manifest says {expected['bytes']}"
    got = file_entry(path)["crc32"]
    if got != expected["crc32"]:
        return f"its file {name} has checksum {got}, its manifest says {expected['crc32']} (changed bytes)"
    return None


def integrity_problem(checkpoint: str, share: tuple[int, int] = (0, 1)) -> str | None:
    """What makes a checkpoint unusable before any tensor of it is read: no or a bad manifest, or a
    listed file missing, of another size or another checksum; None when it is whole. `share`
    (rank, world): check only every world-th file from the rank-th, so ranks split a DCP folder's
    files between them."""
    manifest, problem = read_manifest(checkpoint)
    if problem:
        return problem
    if not is_sharded_checkpoint(checkpoint) and os.path.basename(checkpoint) not in manifest["files"]:
        return f"its manifest does not list {os.path.basename(checkpoint)}"
    if is_sharded_checkpoint(checkpoint):
        for name in (META_NAME, ".metadata"):
            if name not in manifest["files"]:
                return f"its manifest does not list {name}"
    rank, world = share
    for name, path in checkpoint_files(checkpoint, manifest)[rank::world]:
        problem = file_problem(name, path, manifest["files"][name])
        if problem:
            return problem
    return None


def config_problem(checkpoint: str, config: dict) -> str | None:
    """Whether `config` (a config dict: config.json) is the one the checkpoint was made with: None,
    or the changed keys (old -> new) in one line. A checkpoint without a readable manifest is
    integrity_problem's to report."""
    manifest, _ = read_manifest(checkpoint)
    if manifest is None or config_hash(config) == manifest["config_hash"]:
        return None
    changes = config_changes(manifest["config"], fixed_entries(config), ignore=())
    return (f"config.json is not the config {checkpoint} was made with: "
            + ("; ".join(changes) if changes else "its hash differs") + " (a run's config is fixed once it "
            "starts: put the old values back in config.json, or start a new run with the new ones)")


def older_checkpoint_hint(checkpoint: str) -> str:
    """Where to go from an unusable checkpoint: the newest older one, or starting again."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    older = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) < checkpoint_step(checkpoint)]
    if older:
        return f"; the older checkpoint {older[-1]} exists: delete {os.path.basename(checkpoint)} to resume from it"
    return "; no older checkpoint exists: --overwrite starts the run again"


def embedded_config_problem(state: dict, config: dict) -> str | None:
    """The config hash a checkpoint file (or a DCP folder's meta.pt) holds itself, inside its
    checksummed bytes, against `config`'s: a manifest that agrees with config.json but not with the
    file (copied from another checkpoint, or edited) cannot pass a foreign state to the optimizers."""
    if state.get("config_hash") == config_hash(config):
        return None
    return ("it was made with another config than config.json (the config hash it holds differs; its manifest "
            "does not belong to it)")


def agreed_problem(problem: str | None) -> str | None:
    """The first problem any rank found (every rank gets the same answer), so all stop together."""
    if not dist.is_initialized():
        return problem
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


def write_file_manifest(checkpoint: str, step: int, config: dict, written: ChecksumWriter, world_size: int) -> None:
    write_json(manifest_path(checkpoint), make_manifest(step, config, {os.path.basename(checkpoint): written.entry()},
                                                        world_size))


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
                    world_size: int, sharded: bool = False, *, config: dict, spectrum=None) -> None:
    """Writes step `step`'s checkpoint (every rank calls this): on rank 0 one file, the optimizer
    states and RNG states gathered to it first, then its manifest; `sharded` (FSDP2): a DCP folder
    every rank writes its shards to, its manifest last. `config`: the run's config dict (its
    fixed entries and their hash are recorded). `spectrum`: the run's SpectrumMonitor (or None),
    whose shadow momentum is saved with the rest when logging.spectrum_shadow is on. Then drops all
    but the newest `keep`. A failed write (a full disk) raises RunFailed on every rank, the older
    checkpoints untouched."""
    rngs = gather_rng_states(rank, world_size)
    folder = checkpoint_dir(run_dir)
    failure = None
    try:
        meta = {"step": step, "elapsed_s": elapsed, "rng": rngs, "config_hash": config_hash(config)}
        if sharded:
            _write_sharded_checkpoint(folder, step, model, optimizers, meta, rank, world_size, config, spectrum)
        else:
            optimizer_states = optimizers.state_dict()  # {"optimizers": [...], "schedulers": [...]}
            shadow = spectrum.shadow_state() if spectrum is not None else None  # shard: gathered to rank 0
            if rank == 0:
                os.makedirs(folder, exist_ok=True)
                state = {**meta, "model": model.state_dict(), **optimizer_states, **({SHADOW_KEY: shadow} if shadow else {})}
                path = os.path.join(folder, f"step_{step:07d}.pt")
                writer = None

                def write(f):
                    nonlocal writer
                    writer = ChecksumWriter(f)
                    torch.save(state, writer)

                write_atomic(path, write, binary=True)
                write_file_manifest(path, step, config, writer, world_size)  # last: the checkpoint is finished
        if rank == 0:
            # older checkpoints past `keep`, unfinished ones (no manifest: killed before it was
            # written), and temp files and folders left by a run killed mid-write
            checkpoints = list_checkpoints(run_dir)
            finished = [c for c in checkpoints if os.path.exists(manifest_path(c))]
            unfinished = [c for c in checkpoints if c not in finished]
            for old in finished[:-keep] + unfinished + glob.glob(os.path.join(folder, "*.tmp*")):
                remove_checkpoint(old)
    except (*_DCP_ERRORS, dcp_exception()) as e:  # torch.save reports a failed write as a RuntimeError
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200] or type(e).__name__
        failure = f"cannot write the checkpoint of step {step} to {folder}: {reason}"
    if dist.is_initialized():  # every rank learns whether rank 0's write failed, and stops with it
        flag = all_reduce_sum(torch.tensor([1.0 if failure else 0.0], device=collective_device()))
        if flag.item() > 0 and failure is None:
            failure = f"another rank could not write the checkpoint of step {step}"
    if failure:
        raise RunFailed(f"{failure}; the older checkpoints are kept, resume with --resume once there is space")


def remove_checkpoint(path: str) -> None:
    """Deletes a checkpoint (file or folder) with its manifest; the manifest goes first, so a
    deletion cut short leaves an unfinished checkpoint, never a verified one that lacks data."""
    if checkpoint_step(path) is not None and not path.endswith(".tmp") and not is_sharded_checkpoint(path):
        manifest = manifest_path(path)
        if os.path.exists(manifest):
            os.remove(manifest)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def dcp_exception() -> type:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _write_sharded_checkpoint(folder: str, step: int, model, optimizers, meta: dict, rank: int,
                              world_size: int, config: dict, spectrum=None) -> None:
    """The DCP folder of step `step`: written under step_N.tmp/ (every rank its shards, rank 0
    DCP's .metadata once all have written, then meta.pt), each rank checksums a share of its files,
    rank 0 writes manifest.json with them all, then renames the folder to step_N/. The folder must
    be one every rank sees (a shared filesystem across nodes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = os.path.join(folder, f"step_{step:07d}")
    staging = final + ".tmp"
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a write killed midway
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizers.all)
    shadow = spectrum.shadow_state() if spectrum is not None else None  # each rank's rows, as DTensors
    dcp.save({"model": model_state, "optimizers": optimizer_state, **({SHADOW_KEY: shadow["matrices"]} if shadow else {})},
             checkpoint_id=staging)
    if rank == 0:  # dcp.save returns once every rank's shards and the .metadata are written
        meta = {**meta, "schedulers": optimizers.scheduler_states(), "world_size": world_size,
                **({SHADOW_KEY: {"since": shadow["since"]}} if shadow else {})}
        write_atomic(os.path.join(staging, META_NAME), lambda f: torch.save(meta, f), binary=True)
    dist.barrier()  # meta.pt is there: every file of the folder is written
    # the ranks checksum the folder's files between them (re-read from the page cache, in parallel)
    names = sorted(os.listdir(staging))
    mine = {name: file_entry(os.path.join(staging, name)) for name in names[rank::world_size]}
    shares = [None] * world_size if rank == 0 else None
    dist.gather_object(mine, shares, dst=0)
    if rank == 0:
        files = {name: entry for share in shares for name, entry in share.items()}
        write_json(os.path.join(staging, MANIFEST_NAME), make_manifest(step, config, files, world_size))
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


def load_checkpoint(path: str, model, optimizers, rank: int, sharded: bool = False, *, config: dict,
                    spectrum=None) -> tuple[int, float]:
    """Restores the model, the optimizers (RunOptimizers) and this rank's RNG state from `path`
    (a file, or a DCP folder when `sharded`: every rank calls it); returns (step, elapsed seconds).
    First, before any tensor is read, the checkpoint's files are checked against its manifest (a
    file checkpoint by every rank, in case nodes hold copies; a DCP folder's files split between the
    ranks) and `config` (config.json's dict) against the config it was made with. An unreadable,
    corrupt or unusable checkpoint, or a changed config, raises RunFailed on every rank. `spectrum`:
    the run's SpectrumMonitor (or None), given the checkpoint's shadow momentum (load_shadow)."""
    if sharded != is_sharded_checkpoint(path):
        kinds = ("a sharded (train.parallel fsdp) checkpoint folder", "a single-file (train.parallel ddp) checkpoint")
        raise RunFailed(f"checkpoint {path} is {kinds[0] if is_sharded_checkpoint(path) else kinds[1]}, but this run "
                        f"is {'fsdp' if sharded else 'ddp'}: resume with the train.parallel it was written with")
    world = dist.get_world_size() if dist.is_initialized() else 1
    problem = agreed_problem(integrity_problem(path, (rank, world) if sharded else (0, 1)))
    if problem:
        raise RunFailed(f"checkpoint {path} is unusable: {problem}{older_checkpoint_hint(path)}")
    problem = config_problem(path, config)
    if problem:
        raise RunFailed(problem)
    if sharded:
        state = _load_sharded_checkpoint(path, model, optimizers, config, spectrum)
    else:
        state = _read(path, path)
        problem = checkpoint_problem(state, path, model) or embedded_config_problem(state, config)
        if problem:
            raise RunFailed(f"checkpoint {path} is unusable: {problem}")
        model.load_state_dict(state["model"])
        try:
            optimizers.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            raise RunFailed(f"checkpoint {path} does not fit this run's optimizers ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:150]}): it was written by another optimizer or "
                            "configuration") from None
        if spectrum is not None:
            try:
                spectrum.load_shadow(state.get(SHADOW_KEY))
            except (KeyError, ValueError, TypeError) as e:
                raise RunFailed(f"checkpoint {path} is unusable: {e}") from None
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


def _load_sharded_checkpoint(path: str, model, optimizers, config: dict, spectrum=None) -> dict:
    """Loads a DCP folder into the FSDP2 model and the optimizers, whatever number of ranks wrote it
    (DCP reads each rank's rows from the shards that hold them); returns meta.pt's entries."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = _read(os.path.join(path, META_NAME), path)
    problem = meta_problem(meta, path) or embedded_config_problem(meta, config)
    if problem:
        raise RunFailed(f"checkpoint {path} is unusable: {problem}")
    # the state of this run's model and optimizers as templates: DCP fills them in place (an
    # optimizer without state yet gets it from a zero-gradient step at lr 0)
    model_state, optimizer_state = get_state_dict(model, optimizers.all)
    # the shadow momentum, when this run keeps one and the checkpoint holds it (meta.pt says so)
    saved_shadow = meta.get(SHADOW_KEY)
    shadow = spectrum.shadow_template() if spectrum is not None and isinstance(saved_shadow, dict) else None
    try:
        dcp.load({"model": model_state, "optimizers": optimizer_state, **({SHADOW_KEY: shadow} if shadow else {})},
                 checkpoint_id=path)
        set_state_dict(model, optimizers.all, model_state_dict=model_state, optim_state_dict=optimizer_state)
        optimizers.load_scheduler_states(meta["schedulers"])
        if shadow:
            spectrum.load_shadow({"since": saved_shadow["since"], "matrices": shadow})
    except (*_DCP_ERRORS, TypeError, IndexError, dcp_exception()) as e:
        raise RunFailed(f"checkpoint {path} cannot be loaded into this run: {dcp_failure_cause(e)}"
                        f"{older_checkpoint_hint(path)}") from None
    return meta


def dcp_failure_cause(error: BaseException) -> str:
    """One line for a failed DCP load: the first failing rank's exception (type and first line of
    its message; DCP's own text is a flattened traceback), or the error itself."""
    failures = getattr(error, "failures", None)
    if failures:
        rank, (cause, _) = sorted(failures.items(), key=lambda item: item[0])[0]
        where = f"rank {rank}: "
    else:
        cause, where = error, ""
    text = (str(cause).strip().splitlines() or [""])[0]
    if isinstance(cause, KeyError):
        text = f"no entry {text} in the checkpoint (another optimizer or model wrote it)"
    return f"{where}{type(cause).__name__}: {text[:200]}"


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
