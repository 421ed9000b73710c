"""Data parallelism for the worker: the process group, the small collectives the harness needs, DDP
or FSDP2 over the model, and how a step's gradients are averaged (and the bytes that costs each rank)."""

import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def setup_distributed(cfg):
    """Initialises the process group when launched by torchrun (or with launch.distributed);
    returns (rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if cfg.launch.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 or cfg.launch.distributed or cfg.train.parallel == "fsdp":  # FSDP2 needs a mesh, even of 1
        # a collective that waits longer than this raises on the ranks that wait (gloo: a RuntimeError
        # "Timed out waiting ...ms"), instead of gloo's 30-minute default: train_gpt.main fails the run
        timeout = datetime.timedelta(seconds=cfg.train.collective_timeout_s)
        dist.init_process_group(backend=cfg.launch.backend, device_id=device if device.type == "cuda" else None,
                                timeout=timeout)
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


def collective_device() -> torch.device:
    """Where a small tensor for a collective lives: the GPU under nccl, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def exclude_from_ddp(model: torch.nn.Module, params: list) -> None:
    """Marks `params` for DDP to leave alone (no gradient all-reduce). DDP matches by name in the
    module it wraps, so the names are looked up there by identity: a compiled model's parameters
    are named "_orig_mod.<name>", and the plain names would silently match nothing."""
    ids = {id(p) for p in params}
    names = [name for name, p in model.named_parameters() if id(p) in ids]
    if len(names) != len(ids):
        raise RuntimeError(f"exclude_from_ddp: found {len(names)} of {len(ids)} parameters in the model")
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)


def wrap_data_parallel(model: torch.nn.Module, sketched_params: list, device) -> DDP:
    """DDP over the model, but for `sketched_params` (MoFaSGD comm sketch), whose low-rank sketches
    the optimizer all-reduces instead. Those all-reduces go to the default process group, DDP's
    own: one NCCL communicator runs its collectives in the order they are issued, and every rank
    issues DDP's bucket all-reduces and the sketch all-reduces in one order (both are launched
    from backward's hooks, which fire in the same order on every rank). A second group would run
    concurrently on its own stream, which torch documents as unsafe with NCCL (it can deadlock).
    Gradients are views into DDP's buckets (no second gradient-sized copy); buffers (the rotary
    tables) are the same on every rank, so none are broadcast per forward."""
    if sketched_params:
        exclude_from_ddp(model, sketched_params)
    # torch >= 2.13 names the per-forward buffer sync forward_sync_buffers (broadcast_buffers, the
    # older name, now warns on every launch); either way the equal buffers are synced once at init
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               gradient_as_bucket_view=True, **no_buffer_sync)


def _unit_modules(unit: torch.nn.Module, stop: set) -> list[torch.nn.Module]:
    """`unit` and its submodules, leaving out the subtrees of `stop` (modules already sharded), in
    post-order (children first, as fully_shard must be called bottom-up)."""
    order = []
    for child in unit.children():
        if child not in stop:
            order += _unit_modules(child, stop)
    return order + [unit]


def dtype_units(unit: torch.nn.Module, stop: set) -> list[torch.nn.Module]:
    """The submodules of `unit` to shard on their own so that every FSDP unit holds parameters of
    one dtype (FSDP2 flattens a unit's parameters into one all-gather buffer and refuses mixed
    dtypes: "FSDP expects uniform original parameter dtype"). `unit` keeps the dtype of its own
    parameters (those registered on it: they cannot move), or, when it has none, the dtype of most
    of its elements; every submodule whose own parameters have another dtype becomes a unit. Tied
    parameters count once, where first seen. `stop`: modules already sharded, left out."""
    modules = _unit_modules(unit, stop)
    seen, own = set(), {}
    for module in reversed(modules):  # parents first: a tied parameter belongs to the outer owner
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            dtypes = {p.dtype for p in params}
            if len(dtypes) > 1:
                raise ValueError(f"FSDP: {type(module).__name__} holds parameters of {len(dtypes)} dtypes "
                                 f"({', '.join(sorted(str(d) for d in dtypes))}): one FSDP unit needs one dtype")
            own[module] = (dtypes.pop(), sum(p.numel() for p in params))
    if len({dtype for dtype, _ in own.values()}) < 2:
        return []
    if unit in own:
        keep = own[unit][0]
    else:
        sizes = {}
        for dtype, numel in own.values():
            sizes[dtype] = sizes.get(dtype, 0) + numel
        keep = max(sizes, key=sizes.get)
    split = [m for m in modules if m in own and own[m][0] != keep]
    for module in split:  # its unsharded submodules' parameters go into its unit: they must match it
        inner = {own[m][0] for m in _unit_modules(module, stop | set(split) - {module}) if m in own}
        if len(inner) > 1:
            raise ValueError(f"FSDP: {type(module).__name__} ({own[module][0]}) contains parameters of another "
                             "dtype: give them their own module, or one dtype")
    return split


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over the model (train.parallel fsdp): fully_shard on each transformer block, then on the
    root, which takes the embeddings, the head and the final norm. Every parameter becomes a DTensor
    split by rows (Shard(0)) over all ranks; a block's full weights exist only while its forward or
    backward runs (all-gathered, freed after), and its gradients are reduce-scattered (averaged over
    the ranks) as soon as backward has made them. Parameters stay in their dtype: with train.autocast
    the forward casts, as under DDP, so both give the same numbers.

    One FSDP unit holds one dtype (dtype_units): a module whose parameters have a dtype other than
    its unit's is sharded on its own first (the paper preset's bf16 embedding tables, beside the
    root's fp32 head and skip weights). Such a unit is gathered by its own forward pre-hook, so the
    module must be called, not only have its weight read (the speedrun's lm_head is read, and is
    fp32 like the root). Units split off the root keep their parameters gathered from forward to
    backward, as the root does (one all-gather per micro-batch, the GradientExchange count); those
    split off a block reshard after forward, as the block. Call before building the optimizers,
    which must see the sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    blocks = model.transformer_blocks()
    for block in blocks:
        for module in dtype_units(block, set()):
            fully_shard(module)
        fully_shard(block)
    for module in dtype_units(model, set(blocks)):
        fully_shard(module, reshard_after_forward=False)
    return fully_shard(model)


@dataclass(frozen=True)
class GradientExchange:
    """How a step's gradients are averaged over the ranks, and the bytes each rank sends for it:
    DDP all-reduces the gradients in backward (in the parameters' dtype), but with MoFaSGD's
    `comm: sketch` the hidden matrices leave DDP and the optimizer all-reduces their sketches. FSDP2
    moves, per micro-batch, each block's parameters twice (all-gathered for forward and again for
    backward) and its gradients once (reduce-scattered); the root's parameters are gathered once and
    kept through backward. Bytes are those of the full-size tensors of each collective, as for DDP."""

    distributed: bool  # a process group: DDP and the collectives (run.py --distributed: also on one worker)
    sketch: bool  # comm sketch
    overlap: bool  # comm and memory_mode sketch: each matrix's sketches all-reduced while backward still runs
    hidden_bytes: int  # DDP's all-reduce of the hidden matrices' gradients, per step (0 on one worker)
    other_bytes: int  # DDP's all-reduce of every other gradient, per step (0 on one worker)

    @classmethod
    def for_run(cls, cfg, routing: dict, block_params: set | None = None) -> "GradientExchange":
        """From a RunConfig and the model's parameter routing (optimizers.split_parameters);
        `block_params`: under FSDP, the ids of the parameters inside transformer blocks."""
        distributed = dist.is_initialized()
        sketch = getattr(cfg.optimizer, "comm", "full") == "sketch"

        def moved(p) -> int:  # bytes per step: once (DDP), or 3 or 2 times per micro-batch (FSDP)
            if cfg.train.parallel != "fsdp":
                return p.numel() * p.element_size()
            return (3 if id(p) in (block_params or set()) else 2) * cfg.grad_accum * p.numel() * p.element_size()

        kind_bytes = {kind: sum(moved(p) for _, p in ps) for kind, ps in routing.items()}
        other = sum(kind_bytes.values()) - kind_bytes["hidden"]
        return cls(distributed, sketch, distributed and sketch and cfg.optimizer.memory_mode == "sketch",
                   kind_bytes["hidden"] if distributed else 0, other if distributed else 0)

    def average_hidden_gradients(self, hidden_opt) -> int:
        """After backward: with comm sketch, folds the hidden gradients into the optimizer's
        sketches and averages those over the ranks; returns the bytes this rank sent for the hidden
        matrices (DDP already averaged their gradients when not sketching)."""
        if not self.sketch:
            return self.hidden_bytes
        hidden_opt.sketch_gradients_()
        return hidden_opt.all_reduce_sketches() if self.distributed else 0
