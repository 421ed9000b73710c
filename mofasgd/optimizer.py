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
    than Householder QR of the m x 2r blocks. Cholesky-QR is unreliable when W is rank-deficient
    or badly conditioned (zero gradient, r >= min(m, n), m < 2r, low-rank gradients); that is
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

import math
import os
import sys
import warnings

import torch
from torch.optim import Optimizer

try:  # FSDP2's parameters (mofasgd.row_sharded); absent from torch builds without distributed
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:
    _DTensor = ()

from mofasgd import hyperparameters
from mofasgd.hyperparameters import Init, MemoryMode, Momentum, check_choice, needs_full_gradient

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

_METHOD_CHOICES = ("auto", "cholesky", "householder")
# Largest batch of same-shape matrices updated together, in elements of (m + n) r per matrix:
# bounds the transient (B, m, r) / (B, n, r) work arrays at a few times 16 M elements.
_MAX_BATCH_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# Pure building blocks (each testable alone).
# --------------------------------------------------------------------------------------------


def gradient_sketches(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor):
    """The only views of G that the factor update needs: (G V, G^T U, U^T G V).

    The two products with the m x n gradient are the dominant cost (2 m n r flops each); the
    optimizer computes them per matrix in `_batched_sketches`, which also picks the faster GEMM
    orientation on CPU. This is the plain reference form.
    """
    GV = G @ V  # m x r
    GtU = G.mT @ U  # n x r
    C = U.mT @ GV  # r x r, = U^T G V; thin, so computed from GV instead of touching G again
    return GV, GtU, C


def tangent_projection(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """G_hat = U U^T G + G V V^T - U U^T G V V^T (paper step 1), as a dense m x n matrix.

    Thin products only: G_hat = U (U^T G - C V^T) + (G V) V^T with C = U^T G V.
    """
    UtG = U.mT @ G  # r x n
    GV = G @ V  # m x r
    C = UtG @ V  # r x r
    return torch.matmul(U, UtG - C @ V.mT) + GV @ V.mT


def _add_orthogonal_complement_(
    target: torch.Tensor,
    G: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    alpha: float,
    sketches=None,
) -> torch.Tensor:
    """target += alpha * (I - P_U) G (I - P_V), in place, without any m x n temporary.

    (I - P_U) G (I - P_V) = G - G_hat = G - U (U^T G - C V^T) - (G V) V^T. `sketches` may pass a
    precomputed (G V, G^T U, U^T G V) for these U, V so G is not read again.
    """
    GV, GtU, C = gradient_sketches(G, U, V) if sketches is None else sketches
    target.add_(G, alpha=alpha)
    target.addmm_(U, GtU.mT - C @ V.mT, alpha=-alpha)
    target.addmm_(GV, V.mT, alpha=-alpha)
    return target


def orthogonal_complement_term(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(I - U U^T) G (I - V V^T) (the eta2 term of the step) via thin products."""
    return _add_orthogonal_complement_(torch.zeros_like(G), G, U, V, 1.0)


def spectral_scales(S: torch.Tensor, eps: float, max_value: float, use_ones: bool) -> torch.Tensor:
    """Per-direction step scales d (paper step 3; official handling of small singular values).

    d_i = min(1 / S_i, max_value) where |S_i| > eps, else 0; with use_ones, d_i = 1 where
    |S_i| > eps (the spectrally normalised U V^T step).
    """
    nonzero = S.abs() > eps
    if use_ones:
        return nonzero.to(S.dtype)
    # reciprocal of an exact 0 is inf, never NaN, and torch.where discards it.
    return torch.where(nonzero, S.reciprocal().clamp(max=max_value), torch.zeros_like(S))


def check_orthonormal_factors(U: torch.Tensor, V: torch.Tensor, tolerance: float, shape: tuple) -> None:
    """Raises when a batch of factors (B, m, r), (B, n, r) is not orthonormal to `tolerance`:
    max |U^T U - I| or max |V^T V - I| above it (a failed QR or SVD, e.g. of an all-zero matrix on
    a solver the CPU tests do not cover)."""
    check_orthonormal_grams({"U": U.mT @ U, "V": V.mT @ V}, tolerance, shape)


def check_orthonormal_grams(grams: dict, tolerance: float, shape: tuple) -> None:
    """check_orthonormal_factors from the factors' Gram matrices Q^T Q (name -> (..., r, r)): a
    row-sharded factor's Gram matrix is the all-reduced sum of its shards'."""
    for name, gram in grams.items():
        error = (gram - torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)).abs().amax()
        if not error <= tolerance:  # also catches NaN
            raise RuntimeError(f"MoFaSGD: the factor {name} of a {shape[0]}x{shape[1]} matrix lost orthonormality: "
                               f"max |{name}^T {name} - I| = {error.item():.3g} > check_orthonormal = {tolerance:g}")


def assign_owners(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank of each matrix for sharded optimizer work: largest first, each onto the rank with
    the least total size so far (ties: lower rank). Deterministic, so every rank derives the same
    assignment, and no rank's load exceeds the mean by more than the largest matrix."""
    loads = [0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(range(world_size), key=lambda k: (loads[k], k))
        owners[i] = owner
        loads[owner] += sizes[i]
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


def _cholesky_qr2(W: torch.Tensor, basis: torch.Tensor, tolerance: float):
    """QR of (I - basis basis^T) W by Cholesky-QR2 for a batch W (B, m, r), basis (B, m, r);
    returns (Q, R, reliable) with `reliable` a (B,) bool tensor.

    Pass 1: W = Q1 L1^T with L1 = chol(W^T W). Q1 is then projected off `basis` once more, which is
    the second Gram-Schmidt pass against the old basis ("twice is enough"; the first is W = G V - U C)
    and makes Q orthogonal to it to rounding level whatever the conditioning of W. Because
    (I - P) W = (I - P) Q1 L1^T exactly, pass 2 (Q1 = Q L2^T) gives (I - P) W = Q (L1 L2)^T.
    `reliable`: both Cholesky factorisations succeeded, W is not numerically rank-deficient
    (min/max of diag(L1) > tolerance) and Q1 was close enough to orthonormal (||Q1^T Q1 - I||_F < 1/2
    bounds its condition number by sqrt(3)) for pass 2 to be accurate.
    """
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    L1, info1 = torch.linalg.cholesky_ex(W.mT @ W)
    # Both passes multiply by the explicit inverse of the r x r factor instead of solving with the
    # tall matrix: 10-13% of the whole optimizer step faster on CPU (batched tall triangular
    # solves are slow there). The price is a residual ||Q1 L1^T - W|| of O(eps cond(W) ||W||)
    # instead of O(eps ||W||); the checks below keep eps cond(W)^2 below ~1/2, so that is at most
    # ~sqrt(eps) ||W||, and an fp32 test at cond(W) = 3e3 still matches an fp64 reference to 1e-5.
    Q1 = W @ torch.linalg.solve_triangular(L1, eye, upper=False).mT
    Q1.baddbmm_(basis, basis.mT @ Q1, alpha=-1.0)  # in place: Q1 is a fresh (B, m, r) array
    gram2 = Q1.mT @ Q1
    L2, info2 = torch.linalg.cholesky_ex(gram2)
    Q = Q1 @ torch.linalg.solve_triangular(L2, eye, upper=False).mT
    R = (L1 @ L2).mT
    diag1 = L1.diagonal(dim1=-2, dim2=-1)
    reliable = (
        (info1 == 0)
        & (info2 == 0)
        & (diag1.amin(-1) > tolerance * diag1.amax(-1))
        & (torch.linalg.matrix_norm(gram2 - eye) < 0.5)
    )
    return Q, R, reliable


def _cholesky_tolerance(dtype: torch.dtype) -> float:
    # Cholesky of W^T W squares the condition number: it is meaningful only for
    # cond(W) below ~ eps^(-1/2) (about 3e3 in fp32, 7e7 in fp64).
    return math.sqrt(torch.finfo(dtype).eps)


def _umf_fast(U, S, V, GV, GtU, C, beta):
    """UMF via the new directions only (module docstring), batched over the leading dim.

    Inputs are (B, m, r), (B, r), (B, n, r), (B, m, r), (B, n, r), (B, r, r). Returns
    (U', S', V', reliable); entries where `reliable` is False are meaningless (the caller redoes
    them with the Householder form).
    """
    r = U.shape[-1]
    tolerance = _cholesky_tolerance(U.dtype)
    # New directions: the parts of G V and G^T U outside span(U) and span(V).
    W_u = torch.baddbmm(GV, U, C, alpha=-1.0)  # G V - U (U^T G V)
    W_v = torch.baddbmm(GtU, V, C.mT, alpha=-1.0)  # G^T U - V (V^T G^T U)
    Q_w, R_w, reliable_u = _cholesky_qr2(W_u, U, tolerance)
    Q_v, R_v, reliable_v = _cholesky_qr2(W_v, V, tolerance)
    reliable = reliable_u & reliable_v
    # beta M + G_hat = [U, Q_w] Mid [V, Q_v]^T with the 2r x 2r middle block below.
    mid = U.new_zeros(U.shape[0], 2 * r, 2 * r)
    mid[:, :r, :r] = C
    mid[:, :r, :r].diagonal(dim1=-2, dim2=-1).add_(S, alpha=beta)
    mid[:, :r, r:] = R_v.mT
    mid[:, r:, :r] = R_w
    # Unreliable entries may hold NaN, which LAPACK's SVD refuses; blank them (redone later).
    mid = torch.where(reliable[:, None, None], mid, 0.0)
    u, s, vh = torch.linalg.svd(mid)
    # Rotate the augmented bases by the leading r singular vectors of Mid (top r = SVD_r).
    U_new = torch.bmm(U, u[:, :r, :r]).baddbmm_(Q_w, u[:, r:, :r])
    V_new = torch.bmm(V, vh[:, :r, :r].mT).baddbmm_(Q_v, vh[:, :r, r:].mT)
    return U_new, s[:, :r], V_new, reliable


def _umf_householder(U, S, V, GV, GtU, C, beta):
    """Reference UMF (paper / official code) for one matrix: Householder QR of the augmented bases.

    [U, G V] = Q_U R_U, [V, G^T U] = Q_V R_V, B = [[beta diag(S) - C, I], [I, 0]],
    beta M + G_hat = Q_U (R_U B R_V^T) Q_V^T. Reduced QR makes this valid for any rank of the
    blocks and for m < 2r or n < 2r (Q_U is then m x m and the middle block is not square).
    """
    r = U.shape[-1]
    Q_U, R_U = torch.linalg.qr(torch.cat([U, GV], dim=-1))
    Q_V, R_V = torch.linalg.qr(torch.cat([V, GtU], dim=-1))
    B = U.new_zeros(2 * r, 2 * r)
    B[:r, :r] = -C
    B[:r, :r].diagonal().add_(S, alpha=beta)
    B[:r, r:].diagonal().fill_(1.0)
    B[r:, :r].diagonal().fill_(1.0)
    mid = R_U @ B @ R_V.mT
    if not bool(torch.isfinite(mid).all()):
        raise FloatingPointError("MoFaSGD: non-finite gradient or momentum factors (NaN/inf)")
    u, s, vh = torch.linalg.svd(mid, full_matrices=False)
    return Q_U @ u[:, :r], s[:r], Q_V @ vh[:r].mT


def _update_momentum_factors_impl(U, S, V, GV, GtU, C, beta, momentum, method):
    """update_momentum_factors on a batch (B, m, r) ...; also returns a (B,) bool tensor telling
    which entries took the Cholesky fast path."""
    check_choice("momentum", momentum, Momentum)
    if method not in _METHOD_CHOICES:
        raise ValueError(f"method must be one of {_METHOD_CHOICES}, got {method!r}")
    if momentum == "ema":
        # beta M + (1 - beta) G_hat: G_hat is linear in G, so scaling the sketches suffices.
        scale = 1.0 - beta
        GV, GtU, C = GV * scale, GtU * scale, C * scale
    batch, m, r = U.shape
    n = V.shape[-2]
    # With m < 2r (or n < 2r) the new directions cannot all be independent of U (V): W is
    # rank-deficient by construction, so Cholesky-QR would fail anyway.
    fast_possible = m >= 2 * r and n >= 2 * r
    if method == "cholesky" and not fast_possible:
        raise RuntimeError(f"Cholesky-QR path needs m, n >= 2r; got m={m}, n={n}, r={r}")
    if method != "householder" and fast_possible:
        U_new, S_new, V_new, fast = _umf_fast(U, S, V, GV, GtU, C, beta)
        redo = (~fast).nonzero().flatten().tolist()  # the one host sync per batch
        if redo and method == "cholesky":
            raise RuntimeError("Cholesky-QR path unreliable here (rank-deficient or ill-conditioned)")
    else:
        U_new, S_new, V_new = torch.empty_like(U), torch.empty_like(S), torch.empty_like(V)
        fast = torch.zeros(batch, dtype=torch.bool, device=U.device)
        redo = range(batch)
    for i in redo:
        U_new[i], S_new[i], V_new[i] = _umf_householder(U[i], S[i], V[i], GV[i], GtU[i], C[i], beta)
    return U_new, S_new, V_new, fast


def update_momentum_factors(U, S, V, GV, GtU, C, beta, momentum="sum", method="auto"):
    """UMF: the rank-r truncated SVD of  beta M + G_hat  (momentum="sum", official) or of
    beta M + (1 - beta) G_hat  (momentum="ema"), where M = U diag(S) V^T and G_hat is the tangent
    projection of G, computed from the sketches GV = G V, GtU = G^T U, C = U^T G V only.

    Shapes: U (m, r), S (r,), V (n, r), GV (m, r), GtU (n, r), C (r, r), or all of them with one
    leading batch dim (matrices of the same shape are updated together, which saves per-call
    overhead). method: "auto" (Cholesky-QR2 fast path, Householder fallback where it is
    unreliable), "cholesky" (fast path only; raises RuntimeError where it is unreliable) or
    "householder" (the reference form). Returns (U', S', V'), S' in decreasing order.
    """
    batched = U.dim() == 3
    if not batched:
        U, S, V, GV, GtU, C = (t.unsqueeze(0) for t in (U, S, V, GV, GtU, C))
    U_new, S_new, V_new, _ = _update_momentum_factors_impl(U, S, V, GV, GtU, C, beta, momentum, method)
    if not batched:
        return U_new[0], S_new[0], V_new[0]
    return U_new, S_new, V_new


# --------------------------------------------------------------------------------------------
# The optimizer.
# --------------------------------------------------------------------------------------------


def apply_factor_step(W, G, U, S, V, group: dict, projection=None) -> None:
    """Step 3 on W in place: W -= lr (eta1 U diag(d) V^T + eta2 (I - P_U) G (I - P_V)). The eta2
    term projects with `projection` = (U_p, V_p, their sketches of G or None) when given, else with
    U, V. W and G may be one rank's rows (mofasgd.row_sharded passes all-reduced sketches). fp32/fp64
    weights take the update in place; lower-precision ones get it accumulated in the factors' dtype
    and rounded once."""
    lr, eta1, eta2 = group["lr"], group["eta1"], group["eta2"]
    target = W if W.dtype == U.dtype else torch.zeros_like(W, dtype=U.dtype)
    if eta1 != 0:
        d = spectral_scales(S, group["eps"], group["max_value"], group["use_ones_for_nonzero_s"])
        # U diag(d) V^T: scale whichever factor is smaller.
        if U.shape[0] <= V.shape[0]:
            target.addmm_(U * d, V.mT, alpha=-lr * eta1)
        else:
            target.addmm_(U, (V * d).mT, alpha=-lr * eta1)
    if eta2 != 0:
        U_p, V_p, sketches = projection or (U, V, None)
        _add_orthogonal_complement_(target, G.to(U.dtype), U_p, V_p, -lr * eta2, sketches)
    if target is not W:
        W.add_(target)


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a matrix's factors and of the step's math: fp64 for fp64 weights, else fp32
    (bf16 and fp16 weights too: the QRs and the SVD need fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    ):
        check_choice("memory_mode", memory_mode, MemoryMode)
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
        super().__init__(params, defaults)
        if memory_mode == "sketch":
            # No m x n gradient survives backward: each one is folded into its three thin
            # sketches as soon as it is accumulated, then dropped (see _fold_gradient_into_sketch).
            for group in self.param_groups:
                for p in group["params"]:
                    p.register_post_accumulate_grad_hook(self._fold_gradient_into_sketch)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_hyperparameters(group)
        if getattr(self, "memory_mode", "full") == "sketch" and needs_full_gradient(group["eta2"], group["nesterov"]):
            raise ValueError(
                "memory_mode='sketch' needs eta2 == 0 and nesterov=False: both use the full gradient "
                "(the complement term, and a second factor update against the new factors)"
            )
        for p in group["params"]:
            if p.dim() != 2:
                raise ValueError(_unsupported_shape_message(tuple(p.shape)))
            if _is_dtensor(p):
                _check_row_sharded(p, getattr(self, "shard", False))
        if getattr(self, "shard", False):
            self._assign_owners()

    # -- state ---------------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        m, n = p.shape
        rank = min(group["rank"], m, n)
        if _is_dtensor(p):  # FSDP2: U split by rows like the weight (mofasgd.row_sharded)
            from mofasgd.row_sharded import init_row_sharded_state

            self.state[p].update(init_row_sharded_state(p, rank, group["init"]))
            return self.state[p]
        rank = group["rank"]
        if rank > min(m, n):
            if (m, n) not in self._rank_warned_shapes:
                self._rank_warned_shapes.add((m, n))
                _warn_at_caller(
                    f"MoFaSGD: rank {rank} > min(m, n) for a {m}x{n} parameter; using rank {min(m, n)}"
                )
            rank = min(m, n)
        dtype = factor_dtype(p.dtype)
        state = self.state[p]
        if group["init"] == "weight_svd":
            U_full, S_full, Vh_full = torch.linalg.svd(p.detach().to(dtype), full_matrices=False)
            state["U"] = U_full[:, :rank].clone()
            state["S"] = S_full[:rank].clone()
            state["V"] = Vh_full[:rank].mT.clone()
        else:  # "zero": M_0 = 0 with a deterministic orthonormal basis
            state["U"] = torch.eye(m, rank, dtype=dtype, device=p.device)
            state["S"] = torch.zeros(rank, dtype=dtype, device=p.device)
            state["V"] = torch.eye(n, rank, dtype=dtype, device=p.device)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        return state

    def state_bytes(self) -> int:
        """Bytes held by all state tensors (each distinct storage counted once): `state_bytes(self)`."""
        return state_bytes(self)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim casts floating state to each param's dtype (bf16 params would get bf16
        # factors); the factors live in the compute dtype, so restore them from the saved values.
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            dtype = factor_dtype(p.dtype)
            for key in ("U", "S", "V"):
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype)

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
            self._init_state(p, self._group_of(p))
        U, V = state["U"], state["V"]
        if _is_dtensor(p):  # FSDP2: this rank's rows of the reduced gradient, partial sums
            from mofasgd.row_sharded import local_row_sketches

            sketches = local_row_sketches(G.to_local().to(V.dtype), U.to_local(), V)
        else:
            sketches = gradient_sketches(G.to(U.dtype), U, V)
        acc = self._sketches.get(p)
        if acc is None:
            self._sketches[p] = list(sketches)
        else:
            for total, part in zip(acc, sketches):
                total.add_(part)

    def _fold_gradient_into_sketch(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook of memory_mode="sketch": sketch, then free the gradient."""
        self._add_sketch(p, p.grad)
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

    def _launch_all_reduce(self, p) -> None:
        import torch.distributed as dist

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
        for group in self.param_groups:
            if needs_full_gradient(group["eta2"], group["nesterov"]):
                raise ValueError("sketched gradients need eta2 == 0 and nesterov=False")
            for p in group["params"]:
                if p.grad is not None:
                    self._add_sketch(p, p.grad)
                    p.grad = None

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
        sketches = [t for p in params for t in self._sketches[p]]
        flat = pack_flat(sketches)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(dist.get_world_size(group))
        copy_from_flat(flat, sketches)
        return flat.numel() * flat.element_size()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._sketches.clear()
        self._overlap = None

    # -- step ----------------------------------------------------------------------------------

    def _factor_update(self, U, S, V, gradients, beta, momentum, sketches=None):
        """Sketch each gradient against its factors (unless the sketches are given) and run the
        batched UMF (steps 1-2)."""
        if sketches is None:
            sketches = _batched_sketches(gradients, U, V)
        U_new, S_new, V_new, fast = _update_momentum_factors_impl(U, S, V, *sketches, beta, momentum, "auto")
        fast_count = int(fast.sum())
        self.cholesky_updates += fast_count
        self.householder_updates += len(gradients) - fast_count
        return U_new, S_new, V_new, sketches

    def _update_bucket_factors(self, params, group):
        """Steps 1-2 for parameters of identical shape, dtype, device and rank, updating their
        state; returns, per parameter, what its step needs: (U, S, V) of the step and, when the
        eta2 term projects with the pre-update factors, those factors and their sketches."""
        beta, momentum = group["beta"], group["momentum"]
        states = [self.state[p] for p in params]
        # Raw gradients; each is cast to the compute dtype only where used (no-op for fp32/fp64),
        # so bf16 models never hold the whole bucket's gradients in fp32 at once.
        gradients = [p.grad for p in params]
        U_old = torch.stack([st["U"] for st in states])
        S_old = torch.stack([st["S"] for st in states])
        V_old = torch.stack([st["V"] for st in states])
        given = None
        if params[0] in self._sketches:  # sketched gradients (memory_mode="sketch" or all-reduced)
            accs = [self._sketches.pop(p) for p in params]
            given = tuple(torch.stack([acc[k] for acc in accs]) for k in range(3))

        U_new, S_new, V_new, old_sketches = self._factor_update(U_old, S_old, V_old, gradients, beta, momentum, given)
        if self.check_orthonormal:
            check_orthonormal_factors(U_new, V_new, self.check_orthonormal, tuple(params[0].shape))
        for i, st in enumerate(states):
            # Clones, so each parameter owns its state (no storage shared across parameters).
            st["U"], st["S"], st["V"] = U_new[i].clone(), S_new[i].clone(), V_new[i].clone()
            st["step"] += 1
        if group["nesterov"]:
            # Official semantics: a second UMF with the same G; only the step uses it.
            U_new, S_new, V_new, _ = self._factor_update(U_new, S_new, V_new, gradients, beta, momentum)
        old_projection = group["eta2"] != 0 and not group["use_current_projection"]
        return [
            (U_new[i], S_new[i], V_new[i])
            + ((U_old[i], V_old[i], tuple(t[i] for t in old_sketches)) if old_projection else ())
            for i in range(len(params))
        ]

    @staticmethod
    def _apply_step(p, group, update) -> None:
        """Step 3 for one parameter from its step factors (and, for the eta2 term with the
        pre-update projection, the old factors and their sketches)."""
        projection = None
        if group["eta2"] != 0 and not group["use_current_projection"]:
            projection = (update[3], update[4], update[5] if len(update) > 5 else None)  # sharded steps recompute them
        apply_factor_step(p, p.grad, *update[:3], group, projection)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        updates = {}  # sharded only: parameter -> its step factors, applied after the exchange
        for group in self.param_groups:
            # Same-shape parameters are updated as one batch: the small QR/SVD work of the UMF is
            # then a few batched calls instead of dozens of calls per matrix.
            buckets = {}
            for p in group["params"]:
                if (p.grad is None and p not in self._sketches) or not self._owns(p):
                    continue
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("MoFaSGD does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, group)
                if _is_dtensor(p):  # FSDP2's row-sharded weights: one matrix at a time, on local rows
                    self._row_sharded_step(p, group)
                    continue
                key = (tuple(p.shape), p.dtype, p.device, state["U"].shape[1])
                buckets.setdefault(key, []).append(p)
            for (shape, _, _, rank), params in buckets.items():
                # Bound the batch so the transient (B, m + n, r) work arrays stay small.
                per_matrix = (shape[0] + shape[1]) * rank
                chunk = max(1, _MAX_BATCH_ELEMENTS // per_matrix)
                for start in range(0, len(params), chunk):
                    part = params[start : start + chunk]
                    for p, update in zip(part, self._update_bucket_factors(part, group)):
                        if self._owner_of is None:
                            self._apply_step(p, group, update)
                        else:
                            updates[p] = update
        if self._owner_of is not None:
            self._exchange_step_factors(updates)
            for group in self.param_groups:
                for p in group["params"]:
                    if p in updates:
                        self._apply_step(p, group, updates[p])
        return loss

    def _row_sharded_step(self, p, group) -> None:
        from mofasgd.row_sharded import row_sharded_step

        fast = row_sharded_step(p, self.state[p], group, self.check_orthonormal, self._sketches.pop(p, None))
        self.cholesky_updates += int(fast)
        self.householder_updates += int(not fast)

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
    from mofasgd.row_sharded import is_row_sharded

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
