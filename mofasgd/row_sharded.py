"""MoFaSGD on row-sharded weights: FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps each weight
W (m x n) as a DTensor split by rows (Shard(0)), and its gradient the same way. MoFaSGD suits that
layout, because G enters only through thin sketches:

  * U (m x r) is split by rows like W; V (n x r) and S (r,) are replicated.
  * G V: local rows (rank k's rows of G times V), no communication.
  * G^T U = sum_k G_k^T U_k and U^T G V = sum_k U_k^T (G V)_k: one all-reduce of (n + r) r numbers.
  * The UMF's QR of the m x r block W_u = G V - U C is Cholesky-QR2 on row shards: the r x r Gram
    matrices are all-reduced (communication-avoiding tall-skinny QR); the n x r block and the
    2r x 2r SVD are computed on every rank from identical, all-reduced inputs.
  * The step U diag(d) V^T (and the eta2 term) applies to the local rows.
With memory_mode sketch, each reduce-scattered gradient shard is folded into this rank's share of
the sketches as FSDP produces it (a post-accumulate-grad hook on the sharded parameter, which FSDP2
calls after its reduce-scatter) and freed; the step all-reduces the partial sums.
No m x n matrix is gathered by a step: where Cholesky-QR is unreliable (rank-deficient W_u, m < 2r)
the reference Householder form runs on the thin m x 2r blocks [U, G V], gathered from the ranks.
The one full gather is init="weight_svd" at a matrix's first step (the SVD of the weight itself,
as FSDP's own forward gathers it). The results equal the unsharded optimizer's up to rounding
(tests/test_row_sharded.py: 1e-10 in fp64 against DDP over several steps; it also records every
collective of a step and bounds its size by the thin blocks above).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from mofasgd.factors import (
    _cholesky_qr2,
    _cholesky_tolerance,
    _umf_householder,
    apply_factor_step,
    check_orthonormal_grams,
    factor_dtype,
)


def is_row_sharded(p) -> bool:
    """A DTensor parameter split by rows over a 1-D mesh (FSDP2's default placement)."""
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(p, DTensor) and p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),)


def row_counts(m: int, world: int) -> list[int]:
    """Rows of each rank under Shard(0) (torch.chunk's split, the one FSDP2 and DTensor use)."""
    counts = [len(c) for c in torch.arange(m).chunk(world)]
    return counts + [0] * (world - len(counts))  # chunk makes fewer pieces when m < world


def all_reduce_sum(tensors: list, group) -> list:
    """Sums each tensor over the ranks in one flat all-reduce; returns the summed tensors."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def gather_rows(local: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """The full matrix of a row-split thin matrix (rows padded to equal size for all_gather)."""
    padded = local.new_zeros(max(counts), *local.shape[1:])
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


def local_row_sketches(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> list:
    """This rank's share of the sketches: [G V (its rows), G_k^T U_k, U_k^T (G V)_k], the last two
    partial sums over the ranks. Linear in G, so memory_mode sketch sums them over micro-batches."""
    GV = G @ V
    return [GV, G.mT @ U, U.mT @ GV]


def finish_row_sketches(local: list, group):
    """(G V local rows, G^T U, U^T G V) from local_row_sketches: the partial sums all-reduced at once."""
    GV, GtU, C = local
    GtU, C = all_reduce_sum([GtU, C], group)
    return GV, GtU, C


def row_sharded_sketches(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor, group):
    """(G V local rows, G^T U, U^T G V) for local rows G (m_k x n), U (m_k x r), replicated V."""
    return finish_row_sketches(local_row_sketches(G, U, V), group)


def row_sharded_cholesky_qr2(W: torch.Tensor, basis: torch.Tensor, tolerance: float, group):
    """_cholesky_qr2 for one matrix whose rows are split over the ranks: the same two passes, with
    each r x r product over the rows (W^T W, basis^T Q1, Q1^T Q1) all-reduced. Returns local rows of
    Q, the replicated R and `reliable` (a Python bool, equal on every rank)."""
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    (gram1,) = all_reduce_sum([W.mT @ W], group)
    L1, info1 = torch.linalg.cholesky_ex(gram1)
    Q1 = W @ torch.linalg.solve_triangular(L1, eye, upper=False).mT
    (overlap,) = all_reduce_sum([basis.mT @ Q1], group)
    Q1 = Q1 - basis @ overlap  # the second Gram-Schmidt pass against the old basis
    (gram2,) = all_reduce_sum([Q1.mT @ Q1], group)
    L2, info2 = torch.linalg.cholesky_ex(gram2)
    Q = Q1 @ torch.linalg.solve_triangular(L2, eye, upper=False).mT
    R = (L1 @ L2).mT
    diag1 = L1.diagonal()
    reliable = bool(
        info1 == 0 and info2 == 0 and diag1.amin() > tolerance * diag1.amax()
        and torch.linalg.matrix_norm(gram2 - eye) < 0.5
    )
    return Q, R, reliable


def row_sharded_update_momentum_factors(U, S, V, GV, GtU, C, beta, momentum, counts, rank, group):
    """update_momentum_factors with U and G V split by rows (`counts` rows per rank, this rank
    `rank`): returns (local rows of U', S', V', took_fast_path)."""
    if momentum == "ema":
        GV, GtU, C = GV * (1.0 - beta), GtU * (1.0 - beta), C * (1.0 - beta)
    r = U.shape[-1]
    m, n = sum(counts), V.shape[0]
    if m >= 2 * r and n >= 2 * r:
        tolerance = _cholesky_tolerance(U.dtype)
        Q_w, R_w, reliable_u = row_sharded_cholesky_qr2(GV - U @ C, U, tolerance, group)
        Q_v, R_v, reliable_v = _cholesky_qr2((GtU - V @ C.mT)[None], V[None], tolerance)
        if reliable_u and bool(reliable_v[0]):
            mid = U.new_zeros(2 * r, 2 * r)
            mid[:r, :r] = C
            mid[:r, :r].diagonal().add_(S, alpha=beta)
            mid[:r, r:] = R_v[0].mT
            mid[r:, :r] = R_w
            u, s, vh = torch.linalg.svd(mid)
            U_new = U @ u[:r, :r] + Q_w @ u[r:, :r]
            V_new = V @ vh[:r, :r].mT + Q_v[0] @ vh[:r, r:].mT
            return U_new, s[:r], V_new, True
    # the reference form on the thin blocks [U, G V], gathered (m x 2r, never m x n)
    U_full, GV_full = gather_rows(torch.cat([U, GV], dim=1), counts, group).split(r, dim=1)
    U_new, S_new, V_new = _umf_householder(U_full, S, V, GV_full, GtU, C, beta)
    start = sum(counts[:rank])
    return U_new[start : start + counts[rank]].contiguous(), S_new, V_new, False


def init_row_sharded_state(p, rank: int, init: str) -> dict:
    """The factors of a row-sharded weight: U (a DTensor split like the weight, so distributed
    checkpoints reshard it), S and V (replicated plain tensors)."""
    from torch.distributed.tensor import DTensor, Shard

    m, n = p.shape
    dtype = factor_dtype(p.dtype)
    mesh = p.device_mesh
    counts = row_counts(m, mesh.size())
    me = mesh.get_local_rank()
    start = sum(counts[:me])
    local_device = p.to_local().device
    if init == "weight_svd":  # the one full gather: the SVD of the weight, at its first step
        U_full, S, Vh = torch.linalg.svd(p.full_tensor().to(dtype), full_matrices=False)
        U_local, S, V = U_full[start : start + counts[me], :rank], S[:rank], Vh[:rank].mT
    else:
        U_local = torch.eye(m, rank, dtype=dtype, device=local_device)[start : start + counts[me]]
        S, V = torch.zeros(rank, dtype=dtype, device=local_device), torch.eye(n, rank, dtype=dtype, device=local_device)
    U = DTensor.from_local(U_local.contiguous(), mesh, [Shard(0)], run_check=False, shape=(m, rank), stride=(rank, 1))
    return {"U": U, "S": S.clone(), "V": V.clone(), "step": torch.tensor(0.0, dtype=torch.float32)}


class RowShardedUpdate(NamedTuple):
    """One row-sharded weight's computed update, not yet stored (row_sharded_update)."""

    new_state: dict  # U (a Shard(0) DTensor), S, V after the factor update
    step_factors: tuple  # local rows of U, S, V the step applies
    projection: tuple | None  # the eta2 term's (U, V, all-reduced sketches), None: the step factors'
    fast: bool  # the factor update took the Cholesky fast path


@torch.no_grad()
def row_sharded_update(p, state: dict, group_hp: dict, check_orthonormal: float = 0.0,
                       local_sketches=None) -> RowShardedUpdate:
    """The factor update of a row-sharded weight `p` (FSDP2) from its sharded gradient, or from
    `local_sketches` (local_row_sketches summed over the micro-batches: memory_mode sketch, where the
    gradient is gone), against `state` (from init_row_sharded_state), writing nothing: MoFaSGD's
    step computes every matrix's update before it stores any (commit_row_sharded_update). Every rank
    of p's mesh must call it (collectives)."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = p.device_mesh
    group, me = mesh.get_group(), mesh.get_local_rank()
    counts = row_counts(p.shape[0], mesh.size())
    U, S, V = state["U"].to_local(), state["S"], state["V"]
    G = p.grad.to_local().to(U.dtype) if local_sketches is None else None  # sketch mode: eta2 0, no nesterov
    beta, momentum = group_hp["beta"], group_hp["momentum"]
    sketches = finish_row_sketches(local_sketches or local_row_sketches(G, U, V), group)
    U_new, S_new, V_new, fast = row_sharded_update_momentum_factors(
        U, S, V, *sketches, beta, momentum, counts, me, group)
    if check_orthonormal:
        (U_gram,) = all_reduce_sum([U_new.mT @ U_new], group)
        check_orthonormal_grams({"U": U_gram, "V": V_new.mT @ V_new}, check_orthonormal, tuple(p.shape))
    new_state = {"U": DTensor.from_local(U_new.contiguous(), mesh, [Shard(0)], run_check=False,
                                         shape=state["U"].shape, stride=state["U"].stride()),
                 "S": S_new.clone(), "V": V_new.clone()}
    if group_hp["nesterov"]:  # official semantics: a second UMF with the same G, used by the step only
        nesterov_sketches = row_sharded_sketches(G, U_new, V_new, group)
        U_new, S_new, V_new, _ = row_sharded_update_momentum_factors(
            U_new, S_new, V_new, *nesterov_sketches, beta, momentum, counts, me, group)
    projection = None  # the eta2 term's, with sketches all-reduced over the rows
    if group_hp["eta2"] != 0:
        projection = ((U_new, V_new, row_sharded_sketches(G, U_new, V_new, group))
                      if group_hp["use_current_projection"] else (U, V, sketches))
    return RowShardedUpdate(new_state, (U_new, S_new, V_new), projection, bool(fast))


@torch.no_grad()
def commit_row_sharded_update(p, state: dict, group_hp: dict, update: RowShardedUpdate) -> None:
    """Stores a row_sharded_update's factors in `state` and applies its step to p's local rows."""
    state.update(update.new_state)
    state["step"] += 1
    U = update.step_factors[0]
    # the gradient is cast again here rather than kept from the update: bf16 weights would
    # otherwise hold an fp32 copy of every matrix's gradient until the commit
    G = p.grad.to_local().to(U.dtype) if p.grad is not None and group_hp["eta2"] != 0 else None
    apply_factor_step(p.to_local(), G, *update.step_factors, group_hp, update.projection)


def row_sharded_step(p, state: dict, group_hp: dict, check_orthonormal: float = 0.0, local_sketches=None) -> bool:
    """One MoFaSGD step of a row-sharded weight: row_sharded_update, then commit_row_sharded_update;
    returns whether the factor update took the Cholesky fast path."""
    update = row_sharded_update(p, state, group_hp, check_orthonormal, local_sketches)
    commit_row_sharded_update(p, state, group_hp, update)
    return update.fast
