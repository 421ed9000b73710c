"""MoFaSGD: Momentum Factorized SGD (Mahdavinia & Mahdavi, TMLR 2025, arXiv 2507.08091).

Every hidden m x n weight keeps its momentum only as a rank-r SVD,

    M ~= U diag(S) V^T,   U: m x r, V: n x r (orthonormal columns), S: (r,),

so the optimizer state is (m + n) r + r floats per matrix instead of m n. Each step, for gradient G
(the paper's MoFaSGD algorithm and its UMF, "update momentum factor", routine; the comments in the
code refer to the numbered steps below):

  1. Tangent projection of G onto the tangent space of the rank-r manifold at M:
         G_hat = U U^T G + G V V^T - U U^T G V V^T.
  2. UMF: the new factors are exactly the rank-r truncated SVD of  beta M + G_hat  ("sum", the
     official code) or of  beta M + (1 - beta) G_hat  ("ema"). beta M + G_hat has rank <= 2r and
     lives in span[U, G V] x span[V, G^T U], so the SVD reduces to a 2r x 2r problem (QR of the two
     augmented bases, a small middle matrix, its SVD).
  3. Step:  W <- W - lr * (eta1 * U' diag(d) V'^T + eta2 * (I - P_U) G (I - P_V)),
     d_i = min(1 / S'_i, max_value) for S'_i > eps (else 0), or d_i = 1 (use_ones_for_nonzero_s: a
     spectrally normalised U V^T step, i.e. a low-rank Muon).

Implementation notes (why the code looks the way it does):
  * G enters only through three thin sketches  GV = G V,  GtU = G^T U,  C = U^T G V  (no m x m or
    n x n matrix is ever formed). `update_momentum_factors` is a pure function of the factors and
    the sketches, so sketches accumulated elsewhere (e.g. in backward hooks) can be fed in later.
  * Fast path: with W_u = G V - U C and W_v = G^T U - V C^T (the parts of the new directions that
    are orthogonal to the current bases) and W_u = Q_w R_w, W_v = Q_v R_v,
        beta M + G_hat = [U, Q_w] [[beta diag(S) + C, R_v^T], [R_w, 0]] [V, Q_v]^T,
    and [U, Q_w], [V, Q_v] are orthonormal, so only m x r and n x r blocks need a QR. These are done
    by Cholesky-QR2 (matmuls plus two r x r Cholesky factorisations), several times cheaper on CPU
    than Householder QR of the m x 2r blocks. Where W_u or W_v is zero (a zero gradient, or one
    inside the factors' span on that side), beta M + G_hat has rank <= r and an r x 2r, 2r x r or
    r x r SVD gives it exactly (`_umf_within_bases`). Cholesky-QR is otherwise unreliable when W is
    rank-deficient or badly conditioned (r >= min(m, n), m < 2r, low-rank gradients); that is
    detected per matrix and the update falls back to the reference form (Householder QR of
    [U, G V] and [V, G^T U], the form written in the paper and the official code).
  * Parameters of the same shape are updated as one batch: the dozens of small QR/SVD-sized
    operations per matrix become a few batched calls (the products with G stay per matrix).
  * Factor maths runs in fp32 (fp64 for fp64 params) whatever the parameter dtype; the state U, S,
    V is kept in that dtype and only the final update is cast to the parameter's dtype.

Initialisation: the paper's algorithm starts from M_0 = 0, which is init="zero" here (S = 0 and
U, V = the first r columns of the identity, deterministic and identical on every data-parallel
rank; the first momentum is then the tangent projection of G at those bases). The official training
harness instead seeds U, S, V with the top-r SVD of the weight at the first step; init="weight_svd"
(the default) reproduces the official runs.

nesterov=True reproduces the official code: the UMF update is applied a second time with the same
G; the stored factors are those of the first update, the step uses those of the second.
"""

from __future__ import annotations

import heapq
import math
import os
import sys
import warnings
import weakref

import torch
from torch.optim import Optimizer

try:  # FSDP2's parameters (mofasgd.row_sharded); absent from torch builds without distributed
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:
    _DTensor = ()

from mofasgd import hyperparameters
from mofasgd.hyperparameters import (Init, MemoryMode, Momentum, RankPolicy, check_choice, check_rank_policy,
                                     needs_full_gradient)
from mofasgd.factors import (  # noqa: F401 (re-exported: the package's public names)
    _umf_within_bases,
    _update_momentum_factors_impl,
    apply_factor_step,
    check_orthonormal_factors,
    expanded_momentum_factors,
    factor_dtype,
    gradient_sketches,
    orthogonal_complement_term,
    spectral_scales,
    tangent_projection,
    update_momentum_factors,
)
from mofasgd.rank_policy import allocate_ranks, factor_numbers, kept_share, rank_bounds, uniform_budget
from mofasgd.row_sharded import (commit_row_sharded_update, init_row_sharded_state, is_row_sharded, local_row_sketches,
                                 row_sharded_update)

__all__ = [
    "MoFaSGD",
    "ShardedState",
    "state_bytes",
    "tangent_projection",
    "gradient_sketches",
    "update_momentum_factors",
    "spectral_scales",
    "orthogonal_complement_term",
    "assign_owners",
    "apply_factor_step",
]

# Largest batch of same-shape matrices updated together, in elements of (m + n) r per matrix:
# bounds the transient (B, m, r) / (B, n, r) work arrays at a few times 16 M elements.
_MAX_BATCH_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# Sharding and accounting helpers (the factor math itself is in mofasgd/factors.py).
# --------------------------------------------------------------------------------------------


def assign_owners(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank of each matrix for sharded optimizer work: largest first, each onto the rank with
    the least total size so far (ties: lower rank). Deterministic, so every rank derives the same
    assignment, and no rank's load exceeds the mean by more than the largest matrix."""
    # A heap of (load, rank) pops exactly the (least load, lowest rank) choice, in O(log world)
    # per matrix instead of O(world): the memory planner assigns over tens of thousands of ranks.
    heap = [(0, k) for k in range(world_size)]  # sorted, so already a heap
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, owner = heapq.heappop(heap)
        owners[i] = owner
        heapq.heappush(heap, (load + sizes[i], owner))
    return owners


def pack_flat(tensors, length: int | None = None, dtype=None, device=None) -> torch.Tensor:
    """The tensors' elements one after another in one flat buffer, zero-padded to `length` (one
    collective for all of them; all_gather needs equal sizes on every rank). dtype and device are
    needed only when `tensors` may be empty."""
    parts = [t.reshape(-1) for t in tensors]
    total = sum(t.numel() for t in parts)
    if (length is not None and length > total) or not parts:
        like = parts[0] if parts else torch.empty(0, dtype=dtype, device=device)
        parts.append(like.new_zeros((length or 0) - total))
    return torch.cat(parts)


def unpack_flat(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    """Views of `flat`'s consecutive slices with the given shapes: pack_flat undone."""
    views, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[offset : offset + size].view(shape))
        offset += size
    return views


def copy_from_flat(flat: torch.Tensor, tensors) -> None:
    """Copies pack_flat(tensors)'s slices of `flat` (e.g. after an all-reduce) back into `tensors`."""
    for t, view in zip(tensors, unpack_flat(flat, [t.shape for t in tensors])):
        t.copy_(view)


def _tensors_in(obj, depth=0):
    """Tensors held by an optimizer state value: tensors, containers, or objects holding tensors
    (GaLore's projector)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 4:
        return
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            yield from _tensors_in(v, depth + 1)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `t`: a DTensor's local shard (FSDP2), any other tensor itself."""
    return t.to_local() if isinstance(t, _DTensor) else t


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of optimizer state actually held (by this rank), for any torch optimizer: distinct
    storages, so a view of a large tensor counts the whole storage it pins."""
    storages = {}
    for state in optimizer.state.values():
        for t in _tensors_in(state):
            s = local_part(t).untyped_storage()
            storages[(s.device, s.data_ptr()) if s.data_ptr() else id(s)] = s.nbytes()
    return sum(storages.values())


# --------------------------------------------------------------------------------------------
# The optimizer.
# --------------------------------------------------------------------------------------------


def _validate_hyperparameters(group: dict) -> None:
    """The rules of mofasgd/hyperparameters.py, for a param group."""
    for name in ("lr", "rank", "beta", "eta1", "eta2", "eps", "max_value"):
        hyperparameters.check(name, group[name])
    check_choice("init", group["init"], Init)
    check_choice("momentum", group["momentum"], Momentum)
    for name in ("use_current_projection", "use_ones_for_nonzero_s", "nesterov"):
        if not isinstance(group[name], bool):
            raise ValueError(f"{name} must be a bool, got {group[name]!r}")


def _unsupported_shape_message(shape: tuple) -> str:
    what = "a scalar" if len(shape) == 0 else "a 1-D parameter" if len(shape) == 1 else f"a {len(shape)}-D parameter"
    hint = (
        "give 1-D parameters (biases, norm gains) to torch.optim.AdamW instead, e.g. "
        "matrices = [p for p in model.parameters() if p.ndim == 2] for MoFaSGD and the rest for AdamW"
        if len(shape) < 2 else
        "for a conv weight (out, in, kh, kw), keep it as a 2-D parameter of shape (out, in*kh*kw) and "
        "view it as 4-D in forward (F.conv2d(x, w.view(out, in, kh, kw))), or give it to torch.optim.AdamW"
    )
    return f"MoFaSGD only supports 2-D weight matrices; got {what} of shape {shape}: {hint}"


def _parameter_label(group: dict, index: int, p) -> str:
    """How errors name a parameter: by name when the group has param_names (the optimizer was given
    named_parameters()), else by its position in its group; with its shape."""
    names = group.get("param_names")
    where = repr(names[index]) if names and index < len(names) else f"#{index} of its param group"
    return f"parameter {where} of shape {tuple(p.shape)}"


def _parameter_problem(p, sketch: bool) -> str | None:
    """Why MoFaSGD cannot train the 2-D parameter p, worded to follow its label, or None."""
    if p.numel() == 0:
        return "is empty: leave it out of the optimizer, it has nothing to train"
    if p.is_complex():
        return (f"is complex ({p.dtype}); MoFaSGD's factors are real: give it to torch.optim.AdamW, "
                "which trains complex parameters")
    if not p.is_floating_point():
        return f"has dtype {p.dtype}; MoFaSGD trains floating-point matrices (fp32, fp64, bf16, fp16)"
    if sketch and not p.requires_grad:
        return ("does not require grad, and memory_mode='sketch' hooks every parameter's gradient: leave "
                "frozen parameters out, or set requires_grad=True before building the optimizer")
    return None


def _check_dense_gradient(p, G) -> None:
    """Sparse gradients (nn.Embedding(sparse=True)) have no thin sketches here: one line, before
    anything is changed."""
    if G.layout != torch.strided:
        raise RuntimeError(f"MoFaSGD: the gradient of a {'x'.join(map(str, p.shape))} parameter is {G.layout}; "
                           "MoFaSGD needs dense gradients: build the layer with sparse=False (e.g. "
                           "nn.Embedding(sparse=False)) or give the parameter to torch.optim.SparseAdam")


class _SketchHook:
    """The post-accumulate-grad hook of a memory_mode="sketch" MoFaSGD on one parameter.

    It holds its optimizer through a weak reference: a hook must not keep a discarded optimizer
    alive (it would go on deleting every gradient of the parameter, so the next optimizer over it
    would silently never move it). The optimizer's finalizer removes its hooks; one whose optimizer
    is already gone does nothing."""

    __slots__ = ("optimizer",)

    def __init__(self, optimizer):
        self.optimizer = weakref.ref(optimizer)

    def __call__(self, p) -> None:
        optimizer = self.optimizer()
        if optimizer is not None and p.grad is not None:
            optimizer._fold_gradient_into_sketch(p, free=not _sketched_later(p, self))


def _side_stream(G: torch.Tensor):
    """The CUDA stream a gradient hook runs on when it is not the default one (FSDP2 runs
    post-accumulate-grad hooks on its reduce-scatter stream); None on the default stream and on CPU."""
    if not G.is_cuda:
        return None
    stream = torch.cuda.current_stream(G.device)
    return None if stream == torch.cuda.default_stream(G.device) else stream


def _sketched_later(p, hook: _SketchHook) -> bool:
    """Whether the hook of another live sketch-mode MoFaSGD runs on p after `hook`: then that one
    frees the gradient, so each optimizer over p sees it, as torch.optim optimizers do. torch keeps
    a tensor's post-accumulate-grad hooks in this ordered dict and runs them in its order (FSDP2
    reads it the same way)."""
    hooks = getattr(p, "_post_accumulate_grad_hooks", None) or {}
    after = False
    for other in list(hooks.values()):
        if other is hook:
            after = True
        elif after and isinstance(other, _SketchHook) and other.optimizer() is not None:
            return True
    return False


def _remove_handles(handles: list) -> None:
    """Removes hooks by their handles (the finalizer of a sketch-mode MoFaSGD, and remove_hooks)."""
    for handle in handles:
        handle.remove()
    handles.clear()


_STATE_KEYS = ("U", "S", "V", "step")
# A param group's MoFaSGD hyperparameters (torch.optim adds its own keys, e.g. "differentiable", to
# `defaults` on load_state_dict, which a saved group need not have)
_HYPERPARAMETERS = ("lr", "rank", "beta", "eta1", "eta2", "use_current_projection", "use_ones_for_nonzero_s",
                    "nesterov", "eps", "max_value", "init", "momentum")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _warn_at_caller(message: str, category=UserWarning) -> None:
    """warnings.warn attributed to the first frame outside this package and torch (the user's
    opt.step() or loss.backward() line), however deep in the optimizer the warning arises."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: the caller of this function
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR + os.sep)
                                 or frame.f_code.co_filename.startswith(_TORCH_DIR + os.sep)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class ShardedState:
    """Optimizer state split over data-parallel ranks: each parameter has one owner rank
    (`assign_owners`, size-balanced and deterministic), which alone runs its update and keeps its
    state. Mixed into MoFaSGD (shard=True) and the mofa harness's ShardedMuon; the subclass sets
    `shard` and `_process_group` and calls `_assign_owners()` once its param groups exist."""

    _owner_of: dict | None = None  # parameter -> owner rank while sharding, else None
    _shard_rank = 0  # this rank in the sharding group
    exchanged_bytes = 0  # bytes this rank contributed to the last step's exchange

    def _assign_owners(self) -> None:
        """Owners over the process group; nothing is sharded without an initialised one."""
        import torch.distributed as dist

        if not (self.shard and dist.is_available() and dist.is_initialized()):
            self._owner_of = None
            return
        self._shard_rank = dist.get_rank(self._process_group)
        params = [p for g in self.param_groups for p in g["params"]]
        owners = assign_owners([p.numel() for p in params], dist.get_world_size(self._process_group))
        self._owner_of = dict(zip(params, owners))

    def _owns(self, p) -> bool:
        return self._owner_of is None or self._owner_of[p] == self._shard_rank

    def consolidated_state_dict(self, dst: int = 0) -> dict:
        """state_dict() holding every parameter's state, gathered on rank `dst` of the sharding
        group alone (whoever writes the checkpoint): a collective that every rank calls. The other
        ranks get their own state_dict(), which load_state_dict() also takes. Without sharding it is
        state_dict() everywhere."""
        full = self.state_dict()
        if self._owner_of is None:
            return full
        import torch.distributed as dist

        params = [p for g in self.param_groups for p in g["params"]]
        mine = {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in full["state"][i].items()}
                for i, p in enumerate(params) if self._owns(p) and i in full["state"]}
        on_dst = self._shard_rank == dst
        parts = [None] * dist.get_world_size(self._process_group) if on_dst else None
        to = dst if self._process_group is None else dist.get_global_rank(self._process_group, dst)
        dist.gather_object(mine, parts, dst=to, group=self._process_group)
        if on_dst:
            full["state"] = dict(sorted((i, state) for part in parts for i, state in part.items()))
        return full


class MoFaSGD(ShardedState, Optimizer):
    """Momentum Factorized SGD for 2-D weights (see the module docstring for the algorithm).

    The defaults are the paper's NanoGPT values (configs/optimizers/mfsgd.yaml, tested equal):
    lr 0.05, rank 32, eta1 0.25, max_value 5, eps 1e-10. The paper's runs also warm beta up from
    0.65 to 0.85 over the first 300 steps: add `BetaWarmup(opt)` (mofasgd.schedule) and call its
    step() after each opt.step(); without it beta stays at `beta` (0.95, the harness's value when
    its warmup is off).

    Only 2-D weight matrices: give 1-D parameters (biases, norm gains), and as in the paper the
    embeddings and the output head, to torch.optim.AdamW; a conv weight (out, in, kh, kw) must be
    kept as a 2-D (out, in * kh * kw) parameter and viewed as 4-D in forward.

    Args (all are param-group defaults; lr and beta may be rewritten in the groups by schedules):
        lr: learning rate (> 0).
        rank: rank r of the momentum factorisation, clipped to min(m, n) per parameter.
        beta: momentum decay in [0, 1).
        eta1: scale of the rank-r momentum step U' diag(d) V'^T.
        eta2: scale of the orthogonal-complement gradient term (I - P_U) G (I - P_V); 0 skips it.
        use_current_projection: P_U, P_V of the eta2 term from the updated factors (True) or the
            pre-update ones (False).
        use_ones_for_nonzero_s: d_i = 1 instead of min(1 / S_i, max_value) for S_i > eps.
        nesterov: apply the factor update twice per step (official semantics, see module doc).
        eps: singular values <= eps get d_i = 0.
        max_value: clip of the reciprocal singular values.
        init: "weight_svd" (top-r SVD of the weight at the first step, official) or "zero".
        momentum: "sum" (M <- beta M + G_hat, official) or "ema" (M <- beta M + (1-beta) G_hat).
        memory_mode: "full" (step() reads p.grad) or "sketch": a post-accumulate-grad hook folds
            each gradient into G V, G^T U and U^T G V as soon as backward produces it and frees
            it, so no m x n gradient survives backward; the step is the same (needs eta2 == 0 and
            nesterov=False, which use the full gradient).
        shard: under data parallelism, each rank runs the factor update only for the matrices it
            owns (`assign_owners`: size-balanced, deterministic) and keeps their factors; the step
            factors (U, S, V of the step, (m + n) r + r numbers per matrix) are then all-gathered
            and every rank applies every matrix's update with the same operations, so the
            replicas stay identical. Factor compute and memory per rank fall by the world size
            (ranks that sketch gradients keep replicas of U, S, V: sketching needs them). A no-op
            without an initialised process group. Every rank must call step() (a collective).
        process_group: the data-parallel group for shard (default: the world).
        check_orthonormal: > 0 checks after every factor update that U and V stay orthonormal
            to this tolerance (0: off).
        rank_policy: "fixed" (every matrix keeps `rank`) or "energy": every `rank_every` steps the
            ranks are re-allocated across all of the optimizer's matrices so as to keep as much of
            each momentum's energy as `rank_budget` factor numbers allow (mofasgd/rank_policy.py,
            docs/optimizers.md "Adaptive rank"); `rank` is then every matrix's starting rank.
            Works with memory_mode "full" and "sketch", not with shard=True or FSDP2 weights.
        rank_budget: the most factor numbers, sum of (m + n + 1) r_i over the matrices, at any step
            (energy only; unset: what uniform `rank` holds, so both policies use the same memory).
        min_rank, max_rank: bounds of each matrix's rank (energy only; default 1 and min(m, n)).
        rank_every: steps between re-allocations (energy only; default 100).

    Contract (as torch.optim optimizers; tests/test_package_edges.py):
      * Parameters: real floating-point, non-empty 2-D matrices, each listed once; in sketch mode
        they must require grad. Anything else is refused by the constructor and add_param_group
        with one line naming the parameter; a refused group leaves the optimizer unchanged.
        Sparse gradients are refused by step() (and the sketch hook), before anything changes.
      * Hooks (memory_mode="sketch"): held through weak references, so they never keep the
        optimizer alive; they are removed when it is garbage-collected, by remove_hooks(), or on
        leaving `with MoFaSGD(...) as opt:`. While they are registered the optimizer consumes its
        parameters' gradients; several live sketch-mode MoFaSGDs over one parameter each get
        them (the last frees them). After remove_hooks() it steps from p.grad (memory_mode "full").
      * State: per parameter U (m x r), S (r), V (n x r) in the compute dtype and a 0-d float32
        `step`, tensors only. load_state_dict checks every group's hyperparameters and every
        parameter's keys, shapes (r = min(group rank, m, n)), dtypes and finiteness before changing
        anything, naming the parameter in one line.
      * step() is atomic: every factor update is computed first (new tensors, nothing written),
        then every state and weight is written. An error (FloatingPointError for non-finite
        gradients, factors or weights) leaves all weights, states and pending sketches as they
        were. The price: the new factors of every matrix are held at once before the commit (one
        more copy of the state, transiently).
    """

    def __init__(
        self,
        params,
        lr: float = 0.05,
        rank: int = 32,
        beta: float = 0.95,
        eta1: float = 0.25,
        eta2: float = 0.0,
        use_current_projection: bool = True,
        use_ones_for_nonzero_s: bool = False,
        nesterov: bool = False,
        eps: float = 1e-10,
        max_value: float = 5.0,
        init: Init = "weight_svd",
        momentum: Momentum = "sum",
        memory_mode: MemoryMode = "full",
        shard: bool = False,
        process_group=None,
        check_orthonormal: float = 0.0,
        rank_policy: RankPolicy = "fixed",
        rank_budget: int | None = None,
        min_rank: int | None = None,
        max_rank: int | None = None,
        rank_every: int | None = None,
    ):
        check_choice("memory_mode", memory_mode, MemoryMode)
        energy = check_rank_policy(rank_policy, dict(rank_budget=rank_budget, min_rank=min_rank, max_rank=max_rank,
                                                     rank_every=rank_every))
        if energy and shard:
            raise ValueError("rank_policy='energy' needs shard=False: re-allocating ranks needs every matrix's "
                             "spectrum on every rank, and shard keeps each matrix's factors on its owner only")
        self.rank_policy = rank_policy
        # rank_policy "energy": rank_budget (None: uniform `rank`'s), min_rank, max_rank, rank_every
        self.rank_settings = energy
        # the newest re-allocation (energy): its step and, per parameter in order, rank and kept share
        self.last_allocation: dict | None = None
        if not isinstance(shard, bool):
            raise ValueError(f"shard must be a bool, got {shard!r}")
        hyperparameters.check("check_orthonormal", check_orthonormal)
        self.memory_mode = memory_mode
        self.shard = shard
        # > 0: after every factor update, max |U^T U - I| and max |V^T V - I| must stay below it
        self.check_orthonormal = check_orthonormal
        self._process_group = process_group
        # Gradient sketches (G V, G^T U, U^T G V) summed over micro-batches, per parameter, until
        # step() consumes them; filled by the backward hooks (memory_mode="sketch") or by
        # sketch_gradients_(). Not part of the state: they never outlive a step.
        self._sketches: dict = {}
        # CUDA: the event of the side stream a hook sketched p on (FSDP2's reduce-scatter stream),
        # waited on before the sketches are used (_wait_for_sketches)
        self._sketch_events: dict = {}
        # all_reduce_sketches_during_backward(): the launch order and the all-reduces in flight.
        self._overlap: dict | None = None
        defaults = dict(
            lr=lr,
            rank=rank,
            beta=beta,
            eta1=eta1,
            eta2=eta2,
            use_current_projection=use_current_projection,
            use_ones_for_nonzero_s=use_ones_for_nonzero_s,
            nesterov=nesterov,
            eps=eps,
            max_value=max_value,
            init=init,
            momentum=momentum,
        )
        _validate_hyperparameters(defaults)
        self._rank_warned_shapes: set = set()
        # Diagnostic counters (plain ints, not state): how often each UMF path ran.
        self.cholesky_updates = 0
        self.householder_updates = 0
        # Handles of the sketch hooks; the finalizer removes them once this optimizer is collected
        # (it holds the list, never the optimizer).
        self._hook_handles: list = []
        self._constructed = False
        super().__init__(params, defaults)
        self._check_rank_budget()
        weakref.finalize(self, _remove_handles, self._hook_handles)
        # Hooks only once every group is accepted: a constructor that fails leaves no hook behind.
        for group in self.param_groups:
            self._register_sketch_hooks(group)
        self._constructed = True

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise
        if self._constructed:
            self._register_sketch_hooks(self.param_groups[-1])
            self._check_rank_budget()
        if getattr(self, "shard", False):
            self._assign_owners()

    # -- adaptive rank (rank_policy "energy"; mofasgd/rank_policy.py) ---------------------------

    def rank_budget_numbers(self) -> int | None:
        """The most factor numbers the energy policy holds at any step: rank_budget, or what every
        group's `rank` holds uniformly when unset; None under rank_policy "fixed"."""
        if self.rank_policy != "energy":
            return None
        if self.rank_settings["rank_budget"] is not None:
            return self.rank_settings["rank_budget"]
        return sum(uniform_budget([tuple(p.shape) for p in g["params"]], g["rank"]) for g in self.param_groups)

    def ranks(self) -> list[int]:
        """Each parameter's rank (in param-group order): its factors' width, or the rank its first
        step will give it."""
        return [self.state[p]["U"].shape[1] if self.state.get(p) else min(g["rank"], *p.shape)
                for g in self.param_groups for p in g["params"]]

    def factor_numbers_held(self) -> int:
        """Sum of (m + n + 1) r over the matrices at their current (or starting) ranks."""
        params = [p for g in self.param_groups for p in g["params"]]
        return sum(factor_numbers(*p.shape, r) for p, r in zip(params, self.ranks()))

    def budget_state_bytes(self) -> int | None:
        """rank_policy "energy": the bytes of the state when the factors hold the whole budget, the
        most it holds at any step (budget numbers in the factors' dtype, plus each matrix's float32
        step counter); None under "fixed"."""
        if self.rank_policy != "energy":
            return None
        params = [p for g in self.param_groups for p in g["params"]]
        itemsize = factor_dtype(params[0].dtype).itemsize if params else 4
        return self.rank_budget_numbers() * itemsize + 4 * len(params)

    def _check_rank_budget(self) -> None:
        """rank_policy "energy": the starting ranks must fit the budget (the budget holds at every step)."""
        if self.rank_policy != "energy":
            return
        budget, held = self.rank_budget_numbers(), self.factor_numbers_held()
        if held > budget:
            raise ValueError(f"MoFaSGD: rank_budget {budget} numbers is below the {held} the starting rank holds "
                             f"(sum of (m + n + 1) r over the matrices); lower rank or raise rank_budget")

    def _reallocation_due(self, work) -> bool:
        """Whether this step re-allocates the ranks: rank_policy "energy" and the step count the
        stepped matrices reach is a multiple of rank_every (the same on every replica)."""
        if self.rank_policy != "energy":
            return False
        counts = [int(self.state[p]["step"]) + 1 if self.state.get(p) else 1 for _, params in work for p in params]
        return bool(counts) and max(counts) % self.rank_settings["rank_every"] == 0

    def _reallocate(self, work):
        """A step that re-allocates the ranks: each stepped matrix's factor update untruncated
        (expanded_momentum_factors: all of beta M + G_hat's up to 2r directions), then ranks
        chosen by allocate_ranks under the budget left after the matrices not stepped now, then
        each matrix truncated to its new rank (growing keeps its directions and adds the next ones
        of the expansion; shrinking drops the smallest singular values). Writes nothing; returns
        step()'s `pending` entries, the UMF path counts (all Householder) and the allocation that
        becomes `last_allocation` once step() commits."""
        entries = []  # (p, group, fresh, U_old, S_old, V_old, sketches, expansion)
        for group, params in work:
            for p in params:
                state = self.state.get(p)
                fresh = None if state else self._initial_state(p, group)
                st = fresh or state
                U, S, V = st["U"], st["S"], st["V"]
                sketches = self._bucket_sketches([p], [st])
                sketches = tuple(t[0] for t in sketches) if sketches is not None else \
                    gradient_sketches(p.grad.to(U.dtype), U, V)
                expansion = expanded_momentum_factors(U, S, V, *sketches, group["beta"], group["momentum"])
                entries.append((p, group, fresh, U, S, V, sketches, expansion))
        stepped = {p for p, *_ in entries}
        params = [p for g in self.param_groups for p in g["params"]]
        others = sum(factor_numbers(*p.shape, r) for p, r in zip(params, self.ranks()) if p not in stepped)
        settings = self.rank_settings
        new_ranks = allocate_ranks([e[7][1] ** 2 for e in entries], [tuple(e[0].shape) for e in entries],
                                   self.rank_budget_numbers() - others, settings["min_rank"], settings["max_rank"])
        pending = []
        for (p, group, fresh, U, S, V, sketches, (U2, S2, V2)), r in zip(entries, new_ranks):
            new = (U2[:, :r].clone(), S2[:r].clone(), V2[:, :r].clone())
            if self.check_orthonormal:
                check_orthonormal_factors(new[0][None], new[2][None], self.check_orthonormal, tuple(p.shape))
            step_factors = new
            if group["nesterov"]:  # the second UMF, at the new rank, as in _compute_bucket
                U_n, S_n, V_n, _, _ = self._factor_update(*(t[None] for t in new), [p.grad], group["beta"],
                                                          group["momentum"])
                step_factors = (U_n[0], S_n[0], V_n[0])
            old_projection = group["eta2"] != 0 and not group["use_current_projection"]
            update = step_factors + ((U, V, sketches) if old_projection else ())
            pending.append((p, group, fresh, new, update))
        # what train_gpt logs (RUN/ranks.jsonl): every parameter's rank after this step, and the
        # share of its expansion's energy the new rank keeps (None: not stepped now)
        index = {p: i for i, p in enumerate(params)}
        ranks, kept = self.ranks(), [None] * len(params)
        for (p, *_, (_, S2, _)), r in zip(entries, new_ranks):
            ranks[index[p]], kept[index[p]] = r, kept_share(S2 ** 2, r)
        step = max(int((fresh or self.state[p])["step"]) for p, _, fresh, *_ in entries) + 1
        allocation = {"step": step, "ranks": ranks, "kept_share": kept, "budget": self.rank_budget_numbers(),
                      "held": sum(factor_numbers(*p.shape, r) for p, r in zip(params, ranks))}
        return pending, [0, len(entries)], allocation

    def _check_group(self, group: dict) -> None:
        """Raises a one-line ValueError for a param group MoFaSGD cannot train."""
        _validate_hyperparameters(group)
        sketch = self.memory_mode == "sketch"
        if sketch and needs_full_gradient(group["eta2"], group["nesterov"]):
            raise ValueError(
                "memory_mode='sketch' needs eta2 == 0 and nesterov=False: both use the full gradient "
                "(the complement term, and a second factor update against the new factors)"
            )
        seen = set()
        for i, p in enumerate(group["params"]):
            if p.layout != torch.strided:
                raise ValueError(f"MoFaSGD: {_parameter_label(group, i, p)} is a {p.layout} tensor; MoFaSGD trains "
                                 "dense matrices: give it to torch.optim.SparseAdam or make it dense")
            if p.dim() != 2:
                raise ValueError(_unsupported_shape_message(tuple(p.shape)))
            problem = _parameter_problem(p, sketch)
            if problem:
                raise ValueError(f"MoFaSGD: {_parameter_label(group, i, p)} {problem}")
            if id(p) in seen:  # torch.optim only warns; the bucketed step would apply it twice
                raise ValueError(f"MoFaSGD: {_parameter_label(group, i, p)} is listed twice in one param group; "
                                 "list each parameter once")
            seen.add(id(p))
            if _is_dtensor(p):
                _check_row_sharded(p, self.shard)
                if self.rank_policy == "energy":
                    raise ValueError(f"MoFaSGD: rank_policy='energy' does not run on FSDP2 (DTensor) weights "
                                     f"({_parameter_label(group, i, p)}); use rank_policy='fixed'")

    def _register_sketch_hooks(self, group: dict) -> None:
        """memory_mode="sketch": no m x n gradient survives backward; each one is folded into its
        three thin sketches as soon as it is accumulated, then dropped (_fold_gradient_into_sketch)."""
        if self.memory_mode != "sketch":
            return
        for p in group["params"]:
            self._hook_handles.append(p.register_post_accumulate_grad_hook(_SketchHook(self)))

    def remove_hooks(self) -> None:
        """Removes the gradient hooks of memory_mode="sketch" now (they also go when the optimizer is
        garbage-collected, and on leaving `with MoFaSGD(...) as opt:`), handing the parameters'
        gradients back to whoever else uses them. The optimizer then steps from p.grad, as
        memory_mode="full" (sketches already pending still count, added to p.grad's). Call it
        between steps."""
        _remove_handles(self._hook_handles)
        self.memory_mode = "full"
        self._overlap = None

    # Settings that travel with pickle and copy.deepcopy (torch.optim's own state is defaults, state and
    # param_groups); the process group, the hooks and pending sketches do not.
    _PICKLED = ("memory_mode", "shard", "check_orthonormal", "cholesky_updates", "householder_updates",
                "_rank_warned_shapes", "rank_policy", "rank_settings", "last_allocation")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({key: getattr(self, key) for key in self._PICKLED})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also how torch.optim's load_state_dict installs a state
        if "_hook_handles" in self.__dict__:
            return
        # an unpickled (or deep-copied) optimizer: its own hooks on its own parameters
        self._process_group, self._sketches, self._overlap, self._sketch_events = None, {}, None, {}
        self._hook_handles, self._constructed = [], True
        weakref.finalize(self, _remove_handles, self._hook_handles)
        for group in self.param_groups:
            self._register_sketch_hooks(group)
        if self.shard:
            self._assign_owners()

    def __enter__(self) -> "MoFaSGD":
        return self

    def __exit__(self, *exc_info) -> bool:
        self.remove_hooks()
        return False

    # -- state ---------------------------------------------------------------------------------

    def _initial_state(self, p: torch.Tensor, group: dict) -> dict:
        """p's state before its first update (init "weight_svd" or "zero"), not yet stored: a
        step stores it only once every matrix's update has succeeded."""
        m, n = p.shape
        if _is_dtensor(p):  # FSDP2: U split by rows like the weight (mofasgd.row_sharded)

            return init_row_sharded_state(p, min(group["rank"], m, n), group["init"])
        rank = group["rank"]
        if rank > min(m, n):
            if (m, n) not in self._rank_warned_shapes:
                self._rank_warned_shapes.add((m, n))
                _warn_at_caller(
                    f"MoFaSGD: rank {rank} > min(m, n) for a {m}x{n} parameter; using rank {min(m, n)}"
                )
            rank = min(m, n)
        dtype = factor_dtype(p.dtype)
        state = {}
        if group["init"] == "weight_svd":
            W = p.detach().to(dtype)
            if not bool(torch.isfinite(W).all()):  # LAPACK would fail with an unrelated message
                raise FloatingPointError(f"MoFaSGD: non-finite weight (NaN/inf) in a {m}x{n} parameter at its first "
                                         "step (init='weight_svd' takes its SVD)")
            U_full, S_full, Vh_full = torch.linalg.svd(W, full_matrices=False)
            state["U"] = U_full[:, :rank].clone()
            state["S"] = S_full[:rank].clone()
            state["V"] = Vh_full[:rank].mT.clone()
        else:  # "zero": M_0 = 0 with a deterministic orthonormal basis
            state["U"] = torch.eye(m, rank, dtype=dtype, device=p.device)
            state["S"] = torch.zeros(rank, dtype=dtype, device=p.device)
            state["V"] = torch.eye(n, rank, dtype=dtype, device=p.device)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        return state

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        self.state[p].update(self._initial_state(p, group))
        return self.state[p]

    @torch.no_grad()
    def init_state_(self) -> None:
        """Initialises the factors of every parameter that has no state yet, in parameter order,
        on the current stream (the result is what the first step would make: the weights do not
        change before it). Needed before the first backward in sketch memory mode on FSDP2 weights:
        initialising a row-sharded matrix gathers it (a collective) and takes an SVD, which must not
        run inside FSDP's post-reduce hook, on its reduce-scatter stream, in whatever order the
        hooks fire (train_gpt.set_up calls it for such runs). With shard=True only the matrices this
        rank owns get state, as in step()."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state.get(p) and self._owns(p):
                    self._init_state(p, group)

    def state_bytes(self) -> int:
        """Bytes held by all state tensors (each distinct storage counted once): `state_bytes(self)`."""
        return state_bytes(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load_state_dict (the saved groups' hyperparameters replace the current
        ones), after checking the whole state_dict against this optimizer's parameters first: a
        bad one raises a one-line ValueError naming the group or parameter and changes nothing."""
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        # torch.optim casts floating state to each param's dtype (bf16 params would get bf16
        # factors); the factors live in the compute dtype, so restore them from the saved values.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state = self.state[p]
            dtype = factor_dtype(p.dtype)
            for key in ("U", "S", "V"):
                state[key] = saved[key].to(device=p.device, dtype=dtype)
            state["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).detach().reshape(()).clone().cpu()

    def _check_state_dict(self, state_dict) -> None:
        prefix = "MoFaSGD.load_state_dict:"
        if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
                and isinstance(state_dict.get("param_groups"), list)):
            raise ValueError(f"{prefix} expected a dict with 'state' (a dict) and 'param_groups' (a list), as "
                             f"MoFaSGD.state_dict() returns; got {type(state_dict).__name__}"
                             + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else ""))
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{prefix} the state_dict has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        owner = {}  # saved parameter id -> (parameter, its group here, its saved group, position)
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(f"{prefix} param group {g} must be a dict with a 'params' list")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{prefix} param group {g} holds {len(saved['params'])} parameters in the "
                                 f"state_dict and {len(group['params'])} here")
            missing = [k for k in _HYPERPARAMETERS if k not in saved]
            if missing:
                raise ValueError(f"{prefix} param group {g} lacks MoFaSGD's {', '.join(missing)}: not a MoFaSGD "
                                 "state_dict (another optimizer's?)")
            try:
                _validate_hyperparameters(saved)
                if self.memory_mode == "sketch" and needs_full_gradient(saved["eta2"], saved["nesterov"]):
                    raise ValueError("eta2 must be 0 and nesterov False with memory_mode='sketch'")
            except ValueError as e:
                raise ValueError(f"{prefix} param group {g}: {e}") from None
            for i, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
                if saved_id in owner:
                    raise ValueError(f"{prefix} parameter id {saved_id!r} is listed twice in the param groups")
                owner[saved_id] = (p, group, saved, i)
        energy_held = 0  # rank_policy "energy": the factor numbers the state_dict holds
        for saved_id, state in state_dict["state"].items():
            if saved_id not in owner:
                raise ValueError(f"{prefix} the state holds parameter id {saved_id!r}, which no param group lists")
            p, group, saved, i = owner[saved_id]
            label = _parameter_label(group, i, p)
            if not isinstance(state, dict):
                raise ValueError(f"{prefix} the state of {label} must be a dict, got {type(state).__name__}")
            if not state:  # no step taken yet
                continue
            if set(state) != set(_STATE_KEYS):
                raise ValueError(f"{prefix} the state of {label} holds {', '.join(sorted(map(str, state)))}; a "
                                 f"MoFaSGD state holds {', '.join(_STATE_KEYS)} (another optimizer's state?)")
            m, n = p.shape
            r = min(saved["rank"], m, n)
            if self.rank_policy == "energy":  # each matrix at its own rank, within the policy's bounds
                width = state["U"].shape[-1] if isinstance(state["U"], torch.Tensor) and state["U"].dim() == 2 else -1
                low, high = rank_bounds(m, n, self.rank_settings["min_rank"], self.rank_settings["max_rank"], min(m, n))
                if not low <= width <= high:
                    raise ValueError(f"{prefix} U of {label} has rank {width}, outside [{low}, {high}] (min_rank, "
                                     "max_rank and min(m, n) of rank_policy 'energy')")
                r = width
                energy_held = energy_held + factor_numbers(m, n, r)
            for key, shape in (("U", (m, r)), ("S", (r,)), ("V", (n, r))):
                t = state[key]
                if not isinstance(t, torch.Tensor) or t.is_complex() or not t.is_floating_point():
                    what = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{prefix} {key} of {label} is {what}; expected a real floating-point tensor")
                if tuple(t.shape) != shape:
                    raise ValueError(f"{prefix} {key} of {label} has shape {tuple(t.shape)}, expected {shape} (rank "
                                     f"{r} = min(group rank {saved['rank']}, m, n)); a state of another rank or model?")
                if not bool(torch.isfinite(local_part(t)).all()):
                    raise ValueError(f"{prefix} {key} of {label} holds NaN or inf")
            step = state["step"]
            value = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex() \
                else step if isinstance(step, (int, float)) and not isinstance(step, bool) else None
            if value is None or not math.isfinite(value) or value < 0:
                raise ValueError(f"{prefix} step of {label} must be a number >= 0 (a 0-d tensor), got {step!r}")
        if self.rank_policy == "energy":
            saved_ids = {i for g in saved_groups for i in g["params"]}
            unstarted = sum(factor_numbers(*p.shape, min(group["rank"], *p.shape))
                            for i, (p, group, _, _) in owner.items() if not state_dict["state"].get(i) and i in saved_ids)
            if energy_held + unstarted > self.rank_budget_numbers():
                raise ValueError(f"{prefix} the state's factors hold {energy_held + unstarted} numbers, over this "
                                 f"optimizer's rank_budget of {self.rank_budget_numbers()}")

    # -- gradient sketches (memory_mode="sketch" and low-rank communication) ----------------

    def _group_of(self, p):
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter not managed by this optimizer")

    @torch.no_grad()
    def _add_sketch(self, p: torch.Tensor, G: torch.Tensor) -> None:
        """Adds the sketches of G against p's current factors to p's accumulators. The sketches
        are linear in G, so summing them over micro-batches gives the sketches of the summed
        (averaged) gradient."""
        state = self.state[p]
        if len(state) == 0:
            if _is_dtensor(p):
                raise RuntimeError("MoFaSGD: call init_state_() before the first backward on FSDP2 weights in "
                                   "sketch memory mode (initialising a row-sharded matrix is a collective)")
            self._init_state(p, self._group_of(p))
        U, V = state["U"], state["V"]
        if _is_dtensor(p):  # FSDP2: this rank's rows of the reduced gradient, partial sums

            U_rows, G_rows = U.to_local(), G.to_local()
            side = _side_stream(G_rows)
            sketches = local_row_sketches(G_rows.to(V.dtype), U_rows, V)
        else:
            U_rows, side = U, _side_stream(G)
            sketches = gradient_sketches(G.to(U.dtype), U, V)
        if side is not None:
            # FSDP2 runs this hook on its reduce-scatter stream, the step on the default one. By
            # torch's caching-allocator contract, a tensor used on a stream other than the one
            # it was made on is recorded there: the factors read here, and the sketches, which the
            # step reads (and frees) on the default stream. Its event orders the step after them.
            for t in (U_rows, V):
                t.record_stream(side)
            for t in sketches:
                t.record_stream(torch.cuda.default_stream(t.device))
            self._sketch_events[p] = side.record_event()
        acc = self._sketches.get(p)
        if acc is None:
            self._sketches[p] = list(sketches)
        else:
            for total, part in zip(acc, sketches):
                total.add_(part)

    def _fold_gradient_into_sketch(self, p: torch.Tensor, free: bool = True) -> None:
        """Post-accumulate-grad hook of memory_mode="sketch": sketch, then free the gradient (unless
        another live sketch-mode MoFaSGD over p still has to see it)."""
        _check_dense_gradient(p, p.grad)
        self._add_sketch(p, p.grad)
        if free:
            p.grad = None
        if self._overlap is not None:
            self._overlap["ready"].add(p)
            self._launch_ready_all_reduces()

    def all_reduce_sketches_during_backward(self, group=None) -> None:
        """memory_mode="sketch": call before the last backward of a step (the last micro-batch).
        Each matrix's summed sketches are then all-reduced asynchronously as soon as backward has
        folded its gradient in, overlapping communication with the rest of backward;
        all_reduce_sketches() waits for them. Launches follow one fixed order (the reverse of the
        parameter order, backward's usual order: a matrix ready early waits for its predecessors),
        so every rank issues the same sequence of collectives whatever order its hooks fire in.
        With DDP reducing other parameters, keep DDP's group (the default): NCCL runs one group's
        collectives in issue order, while two groups used at once can deadlock."""
        if self.memory_mode != "sketch":
            raise RuntimeError("all_reduce_sketches_during_backward needs memory_mode='sketch'")
        order = [p for g in self.param_groups for p in g["params"]][::-1]
        self._overlap = {"group": group, "order": order, "next": 0, "ready": set(), "pending": []}

    def _wait_for_sketches(self, p) -> None:
        """Orders the current stream after the side stream p's sketches were made on (CUDA, FSDP2's
        reduce-scatter stream); nothing otherwise."""
        event = self._sketch_events.pop(p, None)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def _launch_all_reduce(self, p) -> None:
        import torch.distributed as dist

        self._wait_for_sketches(p)
        flat = pack_flat(self._sketches[p])
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._overlap["group"], async_op=True)
        self._overlap["pending"].append((p, flat, work))

    def _launch_ready_all_reduces(self) -> None:
        overlap = self._overlap
        order = overlap["order"]
        while overlap["next"] < len(order) and order[overlap["next"]] in overlap["ready"]:
            self._launch_all_reduce(order[overlap["next"]])
            overlap["next"] += 1

    def _finish_overlapped_all_reduces(self) -> int:
        import torch.distributed as dist

        overlap = self._overlap
        for p in overlap["order"][overlap["next"] :]:  # not ready during backward: launch now, in order
            if p in self._sketches:
                self._launch_all_reduce(p)
        world = dist.get_world_size(overlap["group"])
        sent = 0
        for p, flat, work in overlap["pending"]:
            work.wait()
            flat.div_(world)
            copy_from_flat(flat, self._sketches[p])
            sent += flat.numel() * flat.element_size()
        self._overlap = None
        return sent

    def sketch_gradients_(self) -> None:
        """Folds the full gradients still held by this optimizer's parameters into sketches and
        frees them (for low-rank communication without the backward hooks)."""
        for group in self.param_groups:  # every check before the first gradient is folded
            if needs_full_gradient(group["eta2"], group["nesterov"]):
                raise ValueError("sketched gradients need eta2 == 0 and nesterov=False")
            for p in group["params"]:
                if p.grad is not None:
                    _check_dense_gradient(p, p.grad)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._add_sketch(p, p.grad)
                    p.grad = None

    @torch.no_grad()
    def pending_sketches(self, p: torch.Tensor):
        """The sketches (G V, G^T U, U^T G V) of the gradient the next step() will use for p, as
        new tensors (nothing pending changes), or None when none were sketched (memory_mode
        "full" without low-rank communication: that step reads p.grad). The pending ones plus
        those of any gradient still in p.grad, against p's current factors; averaged over the ranks
        once all_reduce_sketches() ran. On an FSDP2 weight: this rank's share (local_row_sketches:
        its rows of G V; G^T U and U^T G V partial sums over the ranks)."""
        if p not in self._sketches:
            return None
        return tuple(t.clone() for t in self._step_sketches(p, self.state[p]))

    def sketch_bytes(self) -> int:
        """Bytes of all pending sketches: (m + n) r + r^2 numbers per matrix."""
        return sum(t.numel() * t.element_size() for acc in self._sketches.values() for t in acc)

    @torch.no_grad()
    def all_reduce_sketches(self, group=None) -> int:
        """Averages the pending sketches over the data-parallel ranks in one flat all-reduce;
        returns the bytes this rank contributed. Because the sketches are linear in G, this gives
        exactly the sketches of the all-reduced (averaged) gradient."""
        import torch.distributed as dist

        if self._overlap is not None:  # launched during backward: wait for them
            return self._finish_overlapped_all_reduces()
        params = [p for g in self.param_groups for p in g["params"] if p in self._sketches]
        if not params:
            return 0
        for p in params:
            self._wait_for_sketches(p)
        sketches = [t for p in params for t in self._sketches[p]]
        flat = pack_flat(sketches)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(dist.get_world_size(group))
        copy_from_flat(flat, sketches)
        return flat.numel() * flat.element_size()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._sketches.clear()
        self._sketch_events.clear()
        self._overlap = None

    # -- step ----------------------------------------------------------------------------------
    #
    # A step is atomic: _params_to_step checks what no step can take, the factor updates of every
    # matrix are then computed into new tensors (nothing stored), and only then are the states,
    # the weights and the pending sketches written (_commit). An error on the way leaves the
    # optimizer and the model as they were.

    def _factor_update(self, U, S, V, gradients, beta, momentum, sketches=None):
        """Sketch each gradient against its factors (unless the sketches are given) and run the
        batched UMF (steps 1-2). Returns the new factors, the sketches and how many matrices took
        the Cholesky fast path."""
        if sketches is None:
            sketches = _batched_sketches(gradients, U, V)
        U_new, S_new, V_new, fast = _update_momentum_factors_impl(U, S, V, *sketches, beta, momentum, "auto")
        return U_new, S_new, V_new, sketches, int(fast.sum())

    def _bucket_sketches(self, params, states):
        """The sketches of a bucket's gradients when any of them were sketched (memory_mode
        "sketch", sketch_gradients_ or all_reduce_sketches): the pending ones plus those of any
        gradient still in p.grad (the sketches are linear in G), stacked; None when none were."""
        if not any(p in self._sketches for p in params):
            return None
        per_param = [self._step_sketches(p, st) for p, st in zip(params, states)]
        return tuple(torch.stack([acc[k] for acc in per_param]) for k in range(3))

    def _step_sketches(self, p, state: dict):
        """p's sketches for its step: the pending ones plus those of any gradient still in p.grad
        (the sketches are linear in G; an FSDP2 weight's gradient is only ever sketched by its
        hook), against `state`'s factors; None when there are neither."""
        self._wait_for_sketches(p)
        pending = self._sketches.get(p)
        fresh = None
        if p.grad is not None and not _is_dtensor(p):
            fresh = gradient_sketches(p.grad.to(state["U"].dtype), state["U"], state["V"])
        if pending is None or fresh is None:
            return pending if fresh is None else fresh
        return [a + b for a, b in zip(pending, fresh)]  # new tensors: nothing pending changes

    def _compute_bucket(self, params, group, states):
        """Steps 1-2 for parameters of identical shape, dtype, device and rank, from their `states`,
        writing nothing. Returns, per parameter, (its new U, S, V, what its step needs: U, S, V of the
        step and, when the eta2 term projects with the pre-update factors, those factors and their
        sketches), and how many updates took each UMF path."""
        beta, momentum = group["beta"], group["momentum"]
        # Raw gradients; each is cast to the compute dtype only where used (no-op for fp32/fp64),
        # so bf16 models never hold the whole bucket's gradients in fp32 at once.
        gradients = [p.grad for p in params]
        U_old = torch.stack([st["U"] for st in states])
        S_old = torch.stack([st["S"] for st in states])
        V_old = torch.stack([st["V"] for st in states])
        given = self._bucket_sketches(params, states)
        U_new, S_new, V_new, old_sketches, fast = self._factor_update(
            U_old, S_old, V_old, gradients, beta, momentum, given)
        counts = [fast, len(params) - fast]
        if self.check_orthonormal:
            check_orthonormal_factors(U_new, V_new, self.check_orthonormal, tuple(params[0].shape))
        # Clones, so each parameter owns its state (no storage shared across parameters).
        new = [(U_new[i].clone(), S_new[i].clone(), V_new[i].clone()) for i in range(len(params))]
        step_factors = new
        if group["nesterov"]:
            # Official semantics: a second UMF with the same G; only the step uses it.
            U_new, S_new, V_new, _, fast = self._factor_update(U_new, S_new, V_new, gradients, beta, momentum)
            counts = [counts[0] + fast, counts[1] + len(params) - fast]
            step_factors = [(U_new[i], S_new[i], V_new[i]) for i in range(len(params))]
        old_projection = group["eta2"] != 0 and not group["use_current_projection"]
        results = [
            (new[i], step_factors[i]
             + ((U_old[i], V_old[i], tuple(t[i] for t in old_sketches)) if old_projection else ()))
            for i in range(len(params))
        ]
        return results, counts

    @staticmethod
    def _apply_step(p, group, update) -> None:
        """Step 3 for one parameter from its step factors (and, for the eta2 term with the
        pre-update projection, the old factors and their sketches)."""
        projection = None
        if group["eta2"] != 0 and not group["use_current_projection"]:
            projection = (update[3], update[4], update[5] if len(update) > 5 else None)  # sharded steps recompute them
        apply_factor_step(p, p.grad, *update[:3], group, projection)

    def _params_to_step(self) -> list:
        """(group, the parameters this rank steps) per group: those with a gradient or pending
        sketches. Raises, before anything changes, for what no step can take."""
        work = []
        for group in self.param_groups:
            params = []
            for p in group["params"]:
                if p.grad is None and p not in self._sketches:
                    continue
                if p.grad is not None:
                    _check_dense_gradient(p, p.grad)
                if p in self._sketches and needs_full_gradient(group["eta2"], group["nesterov"]):
                    raise ValueError("MoFaSGD: sketched gradients are pending but the group's eta2 != 0 or nesterov "
                                     "needs the full gradient: set eta2 = 0 and nesterov = False, or zero_grad()")
                if self._owns(p):
                    params.append(p)
            work.append((group, params))
        return work

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        pending = []  # (parameter, group, its fresh state or None, new U S V, step update); nothing stored yet
        row_sharded = []  # (parameter, group, its fresh state or None, its RowShardedUpdate)
        counts = [0, 0]  # Cholesky and Householder UMF updates
        work = self._params_to_step()
        allocation = None
        if self._reallocation_due(work):  # rank_policy "energy", every rank_every steps
            pending, counts, allocation = self._reallocate(work)
            work = []
        for group, params in work:
            # Same-shape parameters are updated as one batch: the small QR/SVD work of the UMF is
            # then a few batched calls instead of dozens of calls per matrix.
            buckets = {}
            for p in params:
                if _is_dtensor(p):  # FSDP2's row-sharded weights: one matrix at a time, on local rows
                    row_sharded.append((p, group, *self._row_sharded_step(p, group)))
                    continue
                state = self.state.get(p)
                fresh = None if state else self._initial_state(p, group)
                key = (tuple(p.shape), p.dtype, p.device, (fresh or state)["U"].shape[1])
                buckets.setdefault(key, []).append((p, fresh))
            for (shape, _, _, rank), entries in buckets.items():
                # Bound the batch so the transient (B, m + n, r) work arrays stay small.
                per_matrix = (shape[0] + shape[1]) * rank
                chunk = max(1, _MAX_BATCH_ELEMENTS // per_matrix)
                for start in range(0, len(entries), chunk):
                    part = entries[start : start + chunk]
                    params_part = [p for p, _ in part]
                    states = [fresh or self.state[p] for p, fresh in part]
                    results, done = self._compute_bucket(params_part, group, states)
                    counts = [counts[0] + done[0], counts[1] + done[1]]
                    for (p, fresh), (new, update) in zip(part, results):
                        pending.append((p, group, fresh, new, update))
        if self._owner_of is not None:
            # shard: every rank gets every matrix's step factors (a collective; it also refreshes the
            # factor replicas a rank keeps to sketch with) and applies them all, the same way
            updates = {p: update for p, _, _, _, update in pending}
            self._exchange_step_factors(updates)
            pending = [(p, group, fresh, new, updates[p]) for p, group, fresh, new, _ in pending]
            owned = {p for p, *_ in pending}
            others = [(p, group, updates[p]) for group in self.param_groups for p in group["params"]
                      if p in updates and p not in owned]
        self._commit(pending, row_sharded, counts)
        if allocation is not None:
            self.last_allocation = allocation
        if self._owner_of is not None:
            for p, group, update in others:
                self._apply_step(p, group, update)
        return loss

    def _commit(self, pending, row_sharded, counts) -> None:
        """The write half of step(): every computed update goes into the states, the weights and
        the sketch accumulators (consumed)."""
        for p, group, fresh, new, update in pending:
            state = self.state[p]
            if fresh is not None:
                state.update(fresh)
            state["U"], state["S"], state["V"] = new
            state["step"] += 1
            self._sketches.pop(p, None)
            self._apply_step(p, group, update)
        for p, group, fresh, update in row_sharded:

            state = self.state[p]
            if fresh is not None:
                state.update(fresh)
            self._sketches.pop(p, None)
            commit_row_sharded_update(p, state, group, update)
        self.cholesky_updates += counts[0] + sum(int(u.fast) for *_, u in row_sharded)
        self.householder_updates += counts[1] + sum(int(not u.fast) for *_, u in row_sharded)

    def _row_sharded_step(self, p, group):
        """The factor update of one row-sharded weight (collectives over its mesh), stored nowhere:
        (its fresh state or None, mofasgd.row_sharded.row_sharded_update's result); _commit stores
        and applies it."""
        state = self.state.get(p)
        fresh = None if state else self._initial_state(p, group)
        self._wait_for_sketches(p)
        update = row_sharded_update(p, fresh or state, group, self.check_orthonormal, self._sketches.get(p))
        return fresh, update

    def _exchange_step_factors(self, updates: dict) -> int:
        """shard=True: all-gathers every owner's step factors so each rank holds `updates` for all
        parameters with a gradient; returns the bytes this rank contributed.

        Each parameter contributes U (m r), S (r), V (n r), plus the pre-update U, V when the eta2
        term needs them, in one flat buffer per rank (padded to the longest: all_gather needs equal
        sizes). Which parameters take part is known to every rank (the same ones hold gradients or
        sketches under data parallelism), so the layout needs no extra message. The old sketches
        are dropped so every rank applies the step with identical inputs and operations.
        """
        import torch.distributed as dist

        me, world = self._shard_rank, dist.get_world_size(self._process_group)
        layout = [[] for _ in range(world)]  # per owner: (param, group, shapes)
        for group in self.param_groups:
            old_projection = group["eta2"] != 0 and not group["use_current_projection"]
            for p in group["params"]:
                if p.grad is None and p not in self._sketches and p not in updates:
                    continue
                m, n = p.shape
                r = min(group["rank"], m, n)
                shapes = [(m, r), (r,), (n, r)] + ([(m, r), (n, r)] if old_projection else [])
                layout[self._owner_of[p]].append((p, shapes))
        sizes = [sum(math.prod(sh) for _, shapes in entries for sh in shapes) for entries in layout]
        if max(sizes) == 0:
            return 0
        dtypes = {factor_dtype(p.dtype) for entries in layout for p, _ in entries}
        if len(dtypes) != 1:
            raise RuntimeError("MoFaSGD(shard=True) needs all parameters in one compute dtype (fp32 or fp64)")
        dtype = dtypes.pop()
        device = layout[me][0][0].device if layout[me] else next(p for e in layout for p, _ in e).device
        send = pack_flat([t for p, shapes in layout[me] for t in updates[p][: len(shapes)]], max(sizes), dtype, device)
        received = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(received, send, group=self._process_group)
        for owner, entries in enumerate(layout):
            if owner == me:
                for p, shapes in entries:  # drop the old sketches: non-owners cannot have them
                    updates[p] = updates[p][: len(shapes)]
                continue
            views = iter(unpack_flat(received[owner], [sh for _, shapes in entries for sh in shapes]))
            for p, shapes in entries:
                parts = tuple(next(views) for _ in shapes)
                updates[p] = parts
                state = self.state.get(p)
                if state:
                    if p in self._sketches:
                        # this rank sketches p's gradients, which needs the current factors
                        # (non-nesterov here: the stored factors are those of the step)
                        self._sketches.pop(p)
                        state["U"], state["S"], state["V"] = (t.clone() for t in parts[:3])
                        state["step"] += 1
                    else:  # a replica left by load_state_dict that this rank never needs
                        del self.state[p]
        self.exchanged_bytes = send.numel() * send.element_size()
        return self.exchanged_bytes


def _is_dtensor(p) -> bool:
    return isinstance(p, _DTensor)


def _check_row_sharded(p, shard: bool) -> None:
    """DTensor parameters: only FSDP2's row split (Shard(0) on a 1-D mesh), without shard (FSDP
    already splits the factors with the rows)."""
    if not is_row_sharded(p):
        raise ValueError(f"MoFaSGD supports DTensor parameters split by rows on a 1-D mesh (FSDP2's Shard(0)); "
                         f"got placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh")
    if shard:
        raise ValueError("MoFaSGD on FSDP2 (DTensor) parameters needs shard=False: "
                         "FSDP already splits the factors with the weight's rows")


def _batched_sketches(gradients, U, V):
    """gradient_sketches for a list of same-shape gradients against stacked U (B, m, r), V (B, n, r).

    The two big products run per gradient (the gradients are separate tensors) and write straight
    into the batch buffers; C = U^T (G V) is one batched product. On CPU the product's orientation
    is chosen by shape (a fixed rule, so results are reproducible): MKL's kernels for an output
    only r < 16 columns wide are several times slower than for the transposed r-row output, and for
    a wide G (m < n) U^T G beats G^T U (measured on the 2-core benchmark VM, docs/benchmarks.md).
    """
    batch, m, r = U.shape
    n = V.shape[-2]
    on_cpu = U.device.type == "cpu"
    gv_transposed = on_cpu and r < 16
    gtu_transposed = on_cpu and (r < 16 or m < n)
    # A transposed product fills an (r, m) / (r, n) buffer; its .mT is the (m, r) / (n, r) view.
    GV = U.new_empty(batch, r, m).mT if gv_transposed else U.new_empty(batch, m, r)
    GtU = V.new_empty(batch, r, n).mT if gtu_transposed else V.new_empty(batch, n, r)
    for i, G in enumerate(gradients):
        G = G.to(U.dtype)
        if gv_transposed:
            torch.mm(V[i].mT, G.mT, out=GV[i].mT)
        else:
            torch.mm(G, V[i], out=GV[i])
        if gtu_transposed:
            torch.mm(U[i].mT, G, out=GtU[i].mT)
        else:
            torch.mm(G.mT, U[i], out=GtU[i])
    return GV, GtU, U.mT @ GV
