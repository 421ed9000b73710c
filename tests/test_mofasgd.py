"""MoFaSGD against dense fp64 references (explicit m x m / n x n projectors, full SVDs).

Reference checks are exact identities up to rounding (1e-10 in fp64; fp32/bf16 checks use
fp32-level tolerances), never "the loss went down". Gradients have geometrically decaying spectra
so the rank-r truncations are well separated (distinct singular values), which makes the truncated
SVD products unique. `pytest -s` prints the largest error of each reference check.
"""

import math
import warnings

import pytest
import torch

from optimizers.mofasgd import (
    MoFaSGD,
    _cholesky_qr2,
    _cholesky_tolerance,
    _update_momentum_factors_impl,
    gradient_sketches,
    orthogonal_complement_term,
    spectral_scales,
    tangent_projection,
    update_momentum_factors,
)

F64 = torch.float64
TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # These matrices are tiny: intra-op threads only add OpenMP synchronisation, which becomes
    # very slow when another process shares the 2 cores. Restored for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def record(name, err):
    print(f"[max error] {name}: {err:.3e}")
    return err


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_orthonormal(m, r, g):
    return torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))[0]


def decaying_matrix(m, n, g, scale=1.0, decay=0.6, rank=None):
    """Random singular vectors, singular values scale * decay^k (distinct, well separated)."""
    k = min(m, n) if rank is None else rank
    A, B = random_orthonormal(m, k, g), random_orthonormal(n, k, g)
    s = scale * decay ** torch.arange(k, dtype=F64)
    return (A * s) @ B.T


def dense_svd_r(X, r):
    u, s, vh = torch.linalg.svd(X, full_matrices=False)
    return u[:, :r], s[:r], vh[:r].T


def dense_tangent(G, U, V):
    """G_hat with explicit projectors P_U = U U^T (m x m), P_V = V V^T (n x n)."""
    P_U, P_V = U @ U.T, V @ V.T
    return P_U @ G + G @ P_V - P_U @ G @ P_V


def product(U, S, V):
    return (U * S) @ V.T


def max_abs(x):
    return x.abs().max().item()


# ---------------------------------------------------------------------------------------------
# Pure building blocks.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,n,r", [(40, 24, 3), (24, 40, 5), (16, 16, 4)])
def test_sketches_tangent_projection_and_complement_match_dense(m, n, r):
    g = gen(1)
    G = torch.randn(m, n, generator=g, dtype=F64)
    U, V = random_orthonormal(m, r, g), random_orthonormal(n, r, g)
    GV, GtU, C = gradient_sketches(G, U, V)
    assert max_abs(GV - G @ V) < TOL and max_abs(GtU - G.T @ U) < TOL and max_abs(C - U.T @ G @ V) < TOL

    G_hat = tangent_projection(G, U, V)
    err = record("tangent_projection", max_abs(G_hat - dense_tangent(G, U, V)))
    assert err < TOL
    # The residual lies in the orthogonal complement on both sides ...
    residual = G - G_hat
    assert max_abs(U.T @ residual) < TOL and max_abs(residual @ V) < TOL
    # ... and re-projecting is a no-op (a projection is idempotent).
    assert max_abs(tangent_projection(G_hat, U, V) - G_hat) < TOL

    P_U, P_V = U @ U.T, V @ V.T
    I_m, I_n = torch.eye(m, dtype=F64), torch.eye(n, dtype=F64)
    complement = orthogonal_complement_term(G, U, V)
    err = record("orthogonal_complement_term", max_abs(complement - (I_m - P_U) @ G @ (I_n - P_V)))
    assert err < TOL
    assert max_abs(complement - residual) < TOL


def test_spectral_scales():
    S = torch.tensor([10.0, 0.5, 1e-3, 1e-12, 0.0], dtype=F64)
    d = spectral_scales(S, eps=1e-10, max_value=100.0, use_ones=False)
    assert torch.equal(d, torch.tensor([0.1, 2.0, 100.0, 0.0, 0.0], dtype=F64))
    d1 = spectral_scales(S, eps=1e-10, max_value=100.0, use_ones=True)
    assert torch.equal(d1, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0], dtype=F64))
    assert torch.isfinite(d).all()


# (m, n, r): m > n, m < n, square, rank 1, and 2r > min(m, n) (only the Householder form applies).
UMF_CASES = [(40, 24, 1), (40, 24, 3), (24, 40, 3), (16, 16, 4), (12, 7, 5), (7, 12, 5), (16, 16, 10)]


# The forced Cholesky path only exists where m, n >= 2r.
UMF_METHOD_CASES = [
    (m, n, r, method)
    for m, n, r in UMF_CASES
    for method in ("auto", "cholesky", "householder")
    if method != "cholesky" or min(m, n) >= 2 * r
]


@pytest.mark.parametrize("momentum", ["sum", "ema"])
@pytest.mark.parametrize("m,n,r,method", UMF_METHOD_CASES)
def test_factor_update_equals_dense_truncated_svd(m, n, r, method, momentum):
    g = gen(100 * m + 10 * n + r)
    beta = 0.9
    weight = 1.0 - beta if momentum == "ema" else 1.0
    U, S, V = dense_svd_r(decaying_matrix(m, n, g, scale=2.0), r)
    M_dense = product(U, S, V)  # the dense chain, run independently of the factored one
    err = 0.0
    for step in range(6):
        G = decaying_matrix(m, n, g, scale=1.0 + 0.5 * step)
        U_d, _, V_d = dense_svd_r(M_dense, r)
        M_dense = product(*dense_svd_r(beta * M_dense + weight * dense_tangent(G, U_d, V_d), r))
        batch = (t.unsqueeze(0) for t in (U, S, V, *gradient_sketches(G, U, V)))
        U, S, V, used_fast = _update_momentum_factors_impl(*batch, beta, momentum, method)
        U, S, V = U[0], S[0], V[0]
        assert bool(used_fast[0]) == (method == "cholesky" or (method == "auto" and min(m, n) >= 2 * r))
        err = max(err, max_abs(product(U, S, V) - M_dense))
        eye = torch.eye(r, dtype=F64)
        assert max_abs(U.T @ U - eye) < 1e-12 and max_abs(V.T @ V - eye) < 1e-12
        assert bool((S[:-1] >= S[1:]).all())
    record(f"UMF vs dense SVD_r ({method})", err)
    assert err < TOL


def test_cholesky_qr2_orthogonalises_against_the_basis():
    # W carries a sizeable component along the old basis U (as rounding leaves in G V - U C):
    # the result must still be exactly orthogonal to U and factor the projected W.
    m, r = 40, 4
    g = gen(37)
    U = random_orthonormal(m, r, g)
    W_perp = torch.randn(m, r, generator=g, dtype=F64)
    W_perp -= U @ (U.T @ W_perp)
    W = W_perp + 1e-3 * U @ torch.randn(r, r, generator=g, dtype=F64)
    Q, R, reliable = _cholesky_qr2(W[None], U[None], _cholesky_tolerance(F64))  # batched helper
    Q, R = Q[0], R[0]
    assert bool(reliable)
    assert max_abs(U.T @ Q) < 1e-15
    assert max_abs(Q.T @ Q - torch.eye(r, dtype=F64)) < 1e-14
    assert max_abs(Q @ R - W_perp) < 1e-14
    assert torch.equal(R, R.triu())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cholesky_qr2_flags_unreliable_inputs(dtype):
    m, r = 40, 4
    g = gen(39)
    U = random_orthonormal(m, r, g)
    A = random_orthonormal(m, 2 * r, g)[:, r:] @ random_orthonormal(r, r, g)  # orthogonal to U
    tol = _cholesky_tolerance(dtype)
    cases = {
        "well conditioned": (A * torch.tensor([1.0, 0.5, 0.2, 0.1], dtype=F64), True),
        "zero": (torch.zeros(m, r, dtype=F64), False),
        "rank-deficient": (A * torch.tensor([1.0, 0.5, 0.2, 0.0], dtype=F64), False),
        "cond 1e12": (A * torch.tensor([1.0, 0.5, 0.2, 1e-12], dtype=F64), False),
    }
    for name, (W, expected) in cases.items():
        _, _, reliable = _cholesky_qr2(W.to(dtype)[None], U.to(dtype)[None], tol)
        assert bool(reliable) == expected, name


@pytest.mark.parametrize("cond", [1e1, 1e3, 3e3])
def test_fp32_fast_path_with_ill_conditioned_new_directions(cond):
    # G V - U C gets condition number `cond`; the fp32 fast path must still match an fp64 dense
    # reference to fp32 accuracy (the explicit-inverse Cholesky-QR residual is O(eps cond ||W||)).
    m, n, r = 60, 40, 4
    g = gen(61)
    X, Y = random_orthonormal(m, 2 * r, g), random_orthonormal(n, 2 * r, g)
    U, A = X[:, :r], X[:, r:] @ random_orthonormal(r, r, g)
    V, B = Y[:, :r], Y[:, r:] @ random_orthonormal(r, r, g)
    S = torch.logspace(0, -1, r, dtype=F64)
    s = torch.logspace(0, -math.log10(cond), r, dtype=F64)
    G = (A * s) @ (V @ random_orthonormal(r, r, g)).T + U @ B.T
    expected = product(*dense_svd_r(0.9 * product(U, S, V) + dense_tangent(G, U, V), r))
    batch = [t.float()[None] for t in (U, S, V, *gradient_sketches(G, U, V))]
    U1, S1, V1, fast = _update_momentum_factors_impl(*batch, 0.9, "sum", "auto")
    assert bool(fast[0])
    rel = max_abs(product(U1[0], S1[0], V1[0]).double() - expected) / max_abs(expected)
    assert rel < 1e-5
    assert max_abs(U1[0].T @ U1[0] - torch.eye(r)) < 1e-5


@pytest.mark.parametrize("method", ["auto", "householder"])
def test_rank_deficient_gradient_falls_back_and_stays_exact(method):
    m, n, r = 24, 16, 3
    g = gen(7)
    U, S, V = torch.eye(m, r, dtype=F64), torch.zeros(r, dtype=F64), torch.eye(n, r, dtype=F64)
    err = 0.0
    for step in range(4):
        # Rank-1 gradient: the new directions W = G V - U C have rank <= 1 < r.
        G = decaying_matrix(m, n, g, rank=1)
        sketches = gradient_sketches(G, U, V)
        if step == 0:
            with pytest.raises(RuntimeError):
                update_momentum_factors(U, S, V, *sketches, 0.9, method="cholesky")
        # The momentum is itself rank-deficient here, so its tangent space is fixed by the stored
        # U, V (not by an SVD of the dense product): compare step by step from the same factors.
        expected = product(*dense_svd_r(0.9 * product(U, S, V) + dense_tangent(G, U, V), r))
        U, S, V = update_momentum_factors(U, S, V, *sketches, 0.9, method=method)
        err = max(err, max_abs(product(U, S, V) - expected))
        assert max_abs(U.T @ U - torch.eye(r, dtype=F64)) < 1e-12
    record("rank-deficient gradient vs dense", err)
    assert err < TOL


def test_batched_update_with_mixed_paths_matches_per_matrix_dense():
    # One batch where some entries take the fast path, a zero gradient the no-new-direction path
    # and a rank-1 gradient the fallback: every entry must still equal its own dense truncated SVD.
    m, n, r, beta = 30, 20, 3, 0.9
    g = gen(53)
    grads = [
        decaying_matrix(m, n, g),
        torch.zeros(m, n, dtype=F64),
        decaying_matrix(m, n, g, scale=3.0),
        decaying_matrix(m, n, g, rank=1),
    ]
    factors = [dense_svd_r(decaying_matrix(m, n, g, scale=2.0), r) for _ in grads]
    U, S, V = (torch.stack([f[k] for f in factors]) for k in range(3))
    sketches = [torch.stack(t) for t in zip(*(gradient_sketches(G, *f[::2]) for G, f in zip(grads, factors)))]
    U_new, S_new, V_new, fast = _update_momentum_factors_impl(U, S, V, *sketches, beta, "sum", "auto")
    assert fast.tolist() == [True, True, True, False]  # the zero gradient: _umf_within_bases, no fallback
    err = 0.0
    for i, (G, (U0, S0, V0)) in enumerate(zip(grads, factors)):
        expected = product(*dense_svd_r(beta * product(U0, S0, V0) + dense_tangent(G, U0, V0), r))
        err = max(err, max_abs(product(U_new[i], S_new[i], V_new[i]) - expected))
    record("batched mixed paths vs dense", err)
    assert err < TOL
    # The public 2-D form gives the same as the batch.
    U1, S1, V1 = update_momentum_factors(U[2], S[2], V[2], *(t[2] for t in sketches), beta)
    assert max_abs(product(U1, S1, V1) - product(U_new[2], S_new[2], V_new[2])) < 1e-13


def test_orthogonality_holds_over_50_steps():
    m, n, r = 40, 24, 4
    g = gen(3)
    for method in ("auto", "householder"):
        U, S, V = dense_svd_r(torch.randn(m, n, generator=g, dtype=F64), r)
        worst = 0.0
        for _ in range(50):
            G = torch.randn(m, n, generator=g, dtype=F64)
            U, S, V = update_momentum_factors(U, S, V, *gradient_sketches(G, U, V), 0.95, method=method)
            eye = torch.eye(r, dtype=F64)
            worst = max(worst, max_abs(U.T @ U - eye), max_abs(V.T @ V - eye))
        record(f"orthogonality over 50 steps ({method})", worst)
        assert worst < 1e-12


# ---------------------------------------------------------------------------------------------
# The optimizer against a dense fp64 re-implementation.
# ---------------------------------------------------------------------------------------------


def make_param(m, n, g, scale=1.0):
    return torch.nn.Parameter(decaying_matrix(m, n, g, scale=scale))


@pytest.mark.parametrize("momentum", ["sum", "ema"])
@pytest.mark.parametrize("m,n", [(12, 7), (7, 12), (16, 16)])
def test_full_rank_factors_equal_dense_heavy_ball(m, n, momentum):
    g = gen(11)
    r = min(m, n)
    p = make_param(m, n, g)
    beta = 0.9
    opt = MoFaSGD([p], lr=0.01, rank=r, beta=beta, init="zero", momentum=momentum)
    M_dense = torch.zeros(m, n, dtype=F64)
    err = 0.0
    for _ in range(10):
        G = torch.randn(m, n, generator=g, dtype=F64)
        M_dense = beta * M_dense + ((1 - beta) * G if momentum == "ema" else G)
        p.grad = G
        opt.step()
        st = opt.state[p]
        err = max(err, max_abs(product(st["U"], st["S"], st["V"]) - M_dense))
    record("full-rank factors vs dense momentum", err)
    assert err < TOL


def dense_step_reference(W, G, U, S, V, group, nesterov=False):
    """One MoFaSGD step written densely: returns (new weight, stored U S V^T product)."""
    r = U.shape[1]
    beta = group["beta"]
    weight = 1.0 - beta if group["momentum"] == "ema" else 1.0

    def umf(U_, S_, V_):
        return dense_svd_r(beta * product(U_, S_, V_) + weight * dense_tangent(G, U_, V_), r)

    U1, S1, V1 = umf(U, S, V)
    U2, S2, V2 = umf(U1, S1, V1) if nesterov else (U1, S1, V1)
    nonzero = S2.abs() > group["eps"]
    if group["use_ones_for_nonzero_s"]:
        d = nonzero.to(F64)
    else:
        d = torch.where(nonzero, torch.clamp(1.0 / S2, max=group["max_value"]), torch.zeros_like(S2))
    Up, Vp = (U2, V2) if group["use_current_projection"] else (U, V)
    I_m, I_n = torch.eye(W.shape[0], dtype=F64), torch.eye(W.shape[1], dtype=F64)
    complement = (I_m - Up @ Up.T) @ G @ (I_n - Vp @ Vp.T)
    W_new = W - group["lr"] * (group["eta1"] * (U2 * d) @ V2.T + group["eta2"] * complement)
    return W_new, product(U1, S1, V1)


@pytest.mark.parametrize("use_ones", [False, True])
@pytest.mark.parametrize("current_projection", [True, False])
@pytest.mark.parametrize("m,n,momentum", [(40, 24, "sum"), (24, 40, "ema")])
def test_step_equals_dense_reference(m, n, momentum, current_projection, use_ones):
    g = gen(5)
    p = make_param(m, n, g, scale=0.5)  # small trailing singular values: max_value clips some
    opt = MoFaSGD(
        [p], lr=0.1, rank=3, beta=0.8, eta1=0.7, eta2=0.3, max_value=3.0, momentum=momentum,
        use_current_projection=current_projection, use_ones_for_nonzero_s=use_ones,
    )
    err = 0.0
    for step in range(4):
        G = decaying_matrix(m, n, g, scale=1.0 + step)
        W = p.detach().clone()
        if step == 0:  # weight_svd init happens inside the first step
            U, S, V = dense_svd_r(W, 3)
        else:
            st = opt.state[p]
            U, S, V = st["U"], st["S"], st["V"]
        W_ref, M_ref = dense_step_reference(W, G, U, S, V, opt.param_groups[0])
        p.grad = G
        opt.step()
        st = opt.state[p]
        err = max(err, max_abs(p.detach() - W_ref), max_abs(product(st["U"], st["S"], st["V"]) - M_ref))
    record("optimizer step vs dense", err)
    assert err < TOL


def test_nesterov_matches_official_semantics():
    m, n, r = 24, 40, 3
    g = gen(9)
    p = make_param(m, n, g)
    opt = MoFaSGD([p], lr=0.05, rank=r, beta=0.9, eta1=1.0, eta2=0.2, nesterov=True)
    err = 0.0
    for step in range(4):
        G = decaying_matrix(m, n, g, scale=1.0 + step)
        W = p.detach().clone()
        U, S, V = dense_svd_r(W, r) if step == 0 else (opt.state[p]["U"], opt.state[p]["S"], opt.state[p]["V"])
        W_ref, M_ref = dense_step_reference(W, G, U, S, V, opt.param_groups[0], nesterov=True)
        p.grad = G
        opt.step()
        st = opt.state[p]
        err = max(err, max_abs(p.detach() - W_ref), max_abs(product(st["U"], st["S"], st["V"]) - M_ref))
    record("nesterov vs dense", err)
    assert err < TOL


@pytest.mark.parametrize("init", ["zero", "weight_svd"])
def test_first_step_state_matches_init_definition(init):
    m, n, r = 24, 16, 3
    g = gen(13)
    p = make_param(m, n, g)
    W = p.detach().clone()
    G = decaying_matrix(m, n, g)
    opt = MoFaSGD([p], lr=0.1, rank=r, beta=0.9, init=init)
    p.grad = G
    opt.step()
    st = opt.state[p]
    if init == "zero":
        # M_0 = 0 with U = I[:, :r], V = I[:, :r]: M_1 = SVD_r(tangent projection of G there).
        U0, V0 = torch.eye(m, r, dtype=F64), torch.eye(n, r, dtype=F64)
        expected = product(*dense_svd_r(dense_tangent(G, U0, V0), r))
    else:
        # M_0 = top-r SVD of the weight: M_1 = SVD_r(beta W_r + G_hat at W's singular vectors).
        U0, S0, V0 = dense_svd_r(W, r)
        expected = product(*dense_svd_r(0.9 * product(U0, S0, V0) + dense_tangent(G, U0, V0), r))
    err = record(f"first step ({init})", max_abs(product(st["U"], st["S"], st["V"]) - expected))
    assert err < TOL
    assert st["U"].shape == (m, r) and st["S"].shape == (r,) and st["V"].shape == (n, r)
    assert st["step"].item() == 1 and st["step"].dim() == 0
    assert all(st[k].dtype == F64 for k in ("U", "S", "V"))


# ---------------------------------------------------------------------------------------------
# State handling, dtypes, edge cases, argument checking.
# ---------------------------------------------------------------------------------------------


def test_state_dict_round_trip_is_bit_exact(tmp_path):
    g = gen(17)
    shapes = [(24, 16), (16, 40)]
    params = [torch.nn.Parameter(decaying_matrix(m, n, g).float()) for m, n in shapes]
    grads = [[torch.randn(m, n, generator=g, dtype=F64).float() for m, n in shapes] for _ in range(8)]
    kwargs = dict(lr=0.05, rank=4, beta=0.9, eta2=0.1, nesterov=True)
    opt = MoFaSGD(params, **kwargs)

    def step(optimizer, ps, gs):
        for p, G in zip(ps, gs):
            p.grad = G.clone()
        optimizer.step()

    for gs in grads[:3]:
        step(opt, params, gs)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = MoFaSGD(resumed_params, **kwargs)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    for gs in grads[3:]:
        step(opt, params, gs)
        step(resumed, resumed_params, gs)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        for key in ("U", "S", "V", "step"):
            assert torch.equal(opt.state[p][key], resumed.state[q][key])
    assert resumed.state[resumed_params[0]]["step"].item() == 8


def test_bf16_params_track_fp32_and_keep_fp32_state(tmp_path):
    g = gen(19)
    m, n, r = 40, 24, 4
    w0 = decaying_matrix(m, n, g).to(torch.bfloat16)
    p16 = torch.nn.Parameter(w0.clone())
    p32 = torch.nn.Parameter(w0.float())
    kwargs = dict(lr=0.01, rank=r, beta=0.9, eta1=1.0, eta2=0.5, max_value=50.0)
    opt16, opt32 = MoFaSGD([p16], **kwargs), MoFaSGD([p32], **kwargs)
    for _ in range(5):
        G = decaying_matrix(m, n, g).to(torch.bfloat16)
        p16.grad, p32.grad = G.clone(), G.float()
        opt16.step()
        opt32.step()
    assert p16.dtype == torch.bfloat16 and torch.isfinite(p16).all()
    assert all(opt16.state[p16][k].dtype == torch.float32 for k in ("U", "S", "V"))
    moved = (p32.detach() - w0.float()).abs().max().item()
    assert moved > 1e-2  # the update is not lost to bf16 rounding
    assert (p16.float() - p32.detach()).abs().max().item() < 0.02 * moved + 1e-2 * w0.float().abs().max().item()
    # Reloading must not cast the factors to the parameter's bf16.
    path = tmp_path / "bf16.pt"
    torch.save(opt16.state_dict(), path)
    q = torch.nn.Parameter(p16.detach().clone())
    reloaded = MoFaSGD([q], **kwargs)
    reloaded.load_state_dict(torch.load(path, weights_only=True))
    assert all(torch.equal(reloaded.state[q][k], opt16.state[p16][k]) for k in ("U", "S", "V"))
    assert reloaded.state[q]["U"].dtype == torch.float32


@pytest.mark.parametrize("init", ["zero", "weight_svd"])
def test_zero_gradient_and_zero_weight_are_finite(init):
    for weight in (torch.zeros(16, 24, dtype=F64), decaying_matrix(16, 24, gen(23))):
        p = torch.nn.Parameter(weight.clone())
        opt = MoFaSGD([p], lr=0.1, rank=4, eta2=0.5, init=init)
        for grad in (torch.zeros_like(weight), decaying_matrix(16, 24, gen(29)), torch.zeros_like(weight)):
            p.grad = grad
            opt.step()
            st = opt.state[p]
            assert torch.isfinite(p).all()
            assert all(torch.isfinite(st[k]).all() for k in ("U", "S", "V"))
            assert max_abs(st["U"].T @ st["U"] - torch.eye(4, dtype=F64)) < 1e-12
    # init zero + zero gradient: the momentum stays 0 and the weight does not move.
    p = torch.nn.Parameter(decaying_matrix(16, 24, gen(31)))
    w = p.detach().clone()
    opt = MoFaSGD([p], lr=0.1, rank=4, init="zero")
    p.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(p.detach(), w) and torch.equal(opt.state[p]["S"], torch.zeros(4, dtype=F64))


def test_non_finite_gradient_raises():
    p = torch.nn.Parameter(torch.randn(16, 12, generator=gen(47), dtype=F64))
    opt = MoFaSGD([p], lr=0.1, rank=3)
    p.grad = torch.full_like(p, math.nan)
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()


def test_rank_above_min_dim_is_clipped_with_one_warning():
    ps = [torch.nn.Parameter(torch.randn(6, 9, generator=gen(s), dtype=F64)) for s in range(3)]
    opt = MoFaSGD(ps, lr=0.1, rank=32, eta2=0.3)
    with pytest.warns(UserWarning, match="rank 32") as caught:
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(6, 9, generator=gen(41), dtype=F64)
            opt.step()
    assert len([w for w in caught if "rank" in str(w.message)]) == 1  # once per shape
    for p in ps:
        assert opt.state[p]["U"].shape == (6, 6) and opt.state[p]["V"].shape == (9, 6)
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("max_batch_elements", [None, 1])
def test_bucketed_step_equals_one_optimizer_per_param(max_batch_elements, monkeypatch):
    # Same-shape params are updated as a batch (optionally split into chunks of one): the result
    # must equal running each parameter through its own optimizer.
    import mofasgd.optimizer as module

    if max_batch_elements is not None:
        monkeypatch.setattr(module, "_MAX_BATCH_ELEMENTS", max_batch_elements)
    g = gen(59)
    shapes = [(24, 16), (16, 40), (24, 16), (24, 16)]
    weights = [decaying_matrix(m, n, g) for m, n in shapes]
    kwargs = dict(lr=0.05, rank=3, beta=0.9, eta2=0.2, use_current_projection=False, nesterov=True)
    together = [torch.nn.Parameter(w.clone()) for w in weights]
    alone = [torch.nn.Parameter(w.clone()) for w in weights]
    opt_together = MoFaSGD(together, **kwargs)
    opts_alone = [MoFaSGD([p], **kwargs) for p in alone]
    for step in range(4):
        for i, (m, n) in enumerate(shapes):
            G = None if (step == 2 and i == 2) else decaying_matrix(m, n, g)  # one param skips a step
            together[i].grad = None if G is None else G.clone()
            alone[i].grad = None if G is None else G.clone()
        opt_together.step()
        for opt in opts_alone:
            opt.step()
    for p, q, opt in zip(together, alone, opts_alone):
        assert max_abs(p.detach() - q.detach()) < 1e-13
        a, b = opt_together.state[p], opt.state[q]
        assert max_abs(product(a["U"], a["S"], a["V"]) - product(b["U"], b["S"], b["V"])) < 1e-12
        assert torch.equal(opt_together.state[p]["step"], opt.state[q]["step"])
    assert opt_together.state[together[2]]["step"].item() == 3


def test_params_without_grad_are_skipped():
    a, b = (torch.nn.Parameter(torch.randn(8, 5, generator=gen(s), dtype=F64)) for s in (1, 2))
    b_before = b.detach().clone()
    opt = MoFaSGD([a, b], lr=0.1, rank=2)
    a.grad = torch.randn(8, 5, generator=gen(3), dtype=F64)
    opt.step()
    assert len(opt.state[b]) == 0 and torch.equal(b.detach(), b_before)
    assert len(opt.state[a]) == 4


def test_state_bytes_counts_factor_storage():
    shapes = [(24, 16), (16, 40), (5, 7)]
    ps = [torch.nn.Parameter(torch.randn(m, n, generator=gen(1), dtype=F64)) for m, n in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MoFaSGD(ps, lr=0.1, rank=6)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    expected = sum(((m + n) * min(6, m, n) + min(6, m, n)) * 8 + 4 for m, n in shapes)
    assert opt.state_bytes() == expected


def test_non_2d_parameter_is_rejected():
    with pytest.raises(ValueError, match=r"\(3, 4, 5\)"):
        MoFaSGD([torch.nn.Parameter(torch.zeros(3, 4, 5))])
    with pytest.raises(ValueError, match=r"\(7,\)"):
        MoFaSGD([torch.nn.Parameter(torch.zeros(7))])


@pytest.mark.parametrize(
    "name,value",
    [("lr", 0.0), ("lr", -1.0), ("rank", 0), ("rank", 2.5), ("beta", 1.0), ("beta", -0.1),
     ("init", "random"), ("momentum", "nesterov"), ("eps", -1e-3), ("max_value", 0.0), ("lr", math.nan)],
)
def test_bad_arguments_raise_clear_errors(name, value):
    with pytest.raises(ValueError, match=name):
        MoFaSGD([torch.nn.Parameter(torch.zeros(4, 4))], **{name: value})


def test_group_hyperparameters_are_read_each_step():
    # Schedules rewrite group["lr"] / group["beta"]; the step must use the current values.
    g = gen(43)
    p = make_param(16, 12, g)
    opt = MoFaSGD([p], lr=0.1, rank=2, beta=0.9, eta2=0.4, use_current_projection=False)
    p.grad = decaying_matrix(16, 12, g)
    opt.step()
    opt.param_groups[0]["lr"], opt.param_groups[0]["beta"] = 0.03, 0.5
    st = opt.state[p]
    W, G = p.detach().clone(), decaying_matrix(16, 12, g)
    W_ref, M_ref = dense_step_reference(W, G, st["U"], st["S"], st["V"], opt.param_groups[0])
    p.grad = G
    opt.step()
    assert max_abs(p.detach() - W_ref) < TOL
    assert max_abs(product(opt.state[p]["U"], opt.state[p]["S"], opt.state[p]["V"]) - M_ref) < TOL


def test_orthonormality_check_passes_real_updates_and_catches_broken_factors(monkeypatch):
    """check_orthonormal: real updates (also of all-zero weights and gradients, whose SVDs go to
    degenerate solver paths) keep U and V orthonormal; a broken factor fails loudly."""
    from mofasgd import MoFaSGD as PackageMoFaSGD

    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(12, 8, dtype=torch.float64))
    opt = PackageMoFaSGD([W], rank=4, check_orthonormal=1e-10)
    for _ in range(3):
        W.grad = torch.randn_like(W)
        opt.step()
    Z = torch.nn.Parameter(torch.zeros(6, 10))  # zero-initialised, like the speedrun's projections
    zero = PackageMoFaSGD([Z], rank=3, check_orthonormal=1e-5)
    for grad in (torch.zeros_like(Z), torch.randn_like(Z)):
        Z.grad = grad
        zero.step()
    import mofasgd.optimizer as impl

    real = impl._update_momentum_factors_impl

    def broken(*args):  # a solver that returns a non-orthonormal U
        U, S, V, fast = real(*args)
        return 2 * U, S, V, fast

    monkeypatch.setattr(impl, "_update_momentum_factors_impl", broken)
    W.grad = torch.randn_like(W)
    with pytest.raises(RuntimeError, match=r"the factor U of a 12x8 matrix lost orthonormality: max \|U\^T U - I\|"):
        opt.step()
    nan = torch.full((1, 5, 2), float("nan"))
    with pytest.raises(RuntimeError, match="factor U of a 5x3 matrix"):
        impl.check_orthonormal_factors(nan, torch.eye(3, 2)[None], 1e-3, (5, 3))
    with pytest.raises(ValueError, match="check_orthonormal must be a number >= 0"):
        PackageMoFaSGD([W], check_orthonormal=-1)


def test_config_and_constructor_apply_the_same_rules():
    """Each rule of mofasgd/hyperparameters.py is checked by both layers, each naming the key its way."""
    import re

    from configs import ConfigError, resolve_config
    from mofasgd.hyperparameters import RULES

    bad = {"lr": 0.0, "rank": 0, "beta": 1.0, "eta1": -0.1, "eta2": -0.1, "eps": -1e-3, "max_value": 0.0,
           "check_orthonormal": -1.0, "rank_budget": 0, "min_rank": 0, "max_rank": 0, "rank_every": 0}
    assert set(bad) | {"warmup_steps"} == set(RULES)
    for key, value in bad.items():
        extra = {"rank_policy": "energy"} if key in ("rank_budget", "min_rank", "max_rank", "rank_every") else {}
        with pytest.raises(ValueError, match=f"^{key} must be .*{re.escape(RULES[key][0])}"):
            MoFaSGD([torch.nn.Parameter(torch.zeros(4, 4))], **{key: value}, **extra)
        with pytest.raises(ConfigError, match=f"optimizer.{key} must be .*{re.escape(RULES[key][0])}"):
            resolve_config("mfsgd", {key: value, **extra})


def test_pack_and_unpack_flat_buffers():
    from mofasgd.optimizer import copy_from_flat, pack_flat, unpack_flat

    tensors = [torch.arange(6.0).view(2, 3), torch.tensor([7.0]), torch.arange(4.0).view(4, 1)]
    flat = pack_flat(tensors, length=16)
    assert flat.shape == (16,) and flat[11:].eq(0).all()
    for a, b in zip(unpack_flat(flat, [t.shape for t in tensors]), tensors):
        assert torch.equal(a, b)
    targets = [torch.zeros_like(t) for t in tensors]
    copy_from_flat(flat, targets)
    assert all(torch.equal(a, b) for a, b in zip(targets, tensors))
    assert pack_flat([], length=3, dtype=torch.float64, device="cpu").tolist() == [0.0, 0.0, 0.0]


def _no_new_direction_gradients(m, n, U, V, g):
    """Gradients whose new directions W_u = G V - U C, W_v = G^T U - V C^T vanish on one side or
    both: name -> (G, the path _update_momentum_factors_impl takes for it)."""
    P_U, P_V = U @ U.T, V @ V.T
    A = torch.randn(m, n, generator=g, dtype=F64)
    r = U.shape[1]
    return {
        # the UMF sees only the sketches: a gradient exactly orthogonal to the factors has zero
        # sketches, which is this case
        "zero": (torch.zeros(m, n, dtype=F64), "both"),
        # orthogonal up to rounding: G V and G^T U are rounding noise of G's size, full-rank, so
        # the Cholesky path takes them (exact to that rounding)
        "numerically orthogonal to the factors": ((A - P_U @ A) - (A - P_U @ A) @ P_V, "fast"),
        "inside their span": (U @ torch.randn(r, r, generator=g, dtype=F64) @ V.T, "both"),
        "rows in span(U)": (P_U @ A, "u"),  # W_u = 0, W_v of rank r
        "columns in span(V)": (torch.randn(m, n, generator=g, dtype=F64) @ P_V, "v"),  # W_v = 0, W_u of rank r
        "generic": (decaying_matrix(m, n, g), "fast"),
        "rows in span(U), rank 1": (U[:, :1] @ torch.randn(1, n, generator=g, dtype=F64), "fallback"),  # W_v rank 1
    }


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_gradients_without_new_directions_take_an_exact_cheap_path(dtype, monkeypatch):
    """A zero gradient, one inside the factors' span, or one that adds new directions on one side
    only: beta M + G_hat has rank <= r and its SVD comes from an r x r, r x 2r or 2r x r problem
    (_umf_within_bases), not the per-matrix Householder fallback (which the speedrun's zero head and
    projections sent every hidden matrix to at step 1). Each entry of one batch equals its dense
    fp64 rank-r truncation; a one-sided rank-1 gradient still falls back."""
    import mofasgd.factors as impl

    m, n, r, beta = 30, 20, 3, 0.9
    g = gen(71)
    U0, S0, V0 = dense_svd_r(decaying_matrix(m, n, g, scale=2.0), r)
    cases = _no_new_direction_gradients(m, n, U0, V0, g)
    grads = [G for G, _ in cases.values()]
    U, S, V = (t.expand(len(grads), *t.shape).to(dtype) for t in (U0, S0, V0))
    sketches = [torch.stack(t).to(dtype) for t in zip(*(gradient_sketches(G, U0, V0) for G in grads))]
    paths = ["fast"] * len(grads)
    real_within, real_householder = impl._umf_within_bases, impl._umf_householder

    def took(C, path):  # the entry is known by its C = U^T G V, distinct per case
        paths[next(i for i, c in enumerate(sketches[2]) if torch.equal(c, C))] = path

    def within(U, S, V, C, beta, side, Q=None, R=None):
        for c in C:
            took(c, side)
        return real_within(U, S, V, C, beta, side, Q, R)

    def householder(U, S, V, GV, GtU, C, beta):
        took(C, "fallback")
        return real_householder(U, S, V, GV, GtU, C, beta)

    monkeypatch.setattr(impl, "_umf_within_bases", within)
    monkeypatch.setattr(impl, "_umf_householder", householder)
    U_new, S_new, V_new, fast = _update_momentum_factors_impl(U, S, V, *sketches, beta, "sum", "auto")
    assert paths == [path for _, path in cases.values()]
    assert fast.tolist() == [path != "fallback" for path in paths]
    M = product(U0, S0, V0)
    tolerance = TOL if dtype == F64 else 1e-5
    for i, (name, (G, _)) in enumerate(cases.items()):
        expected = product(*dense_svd_r(beta * M + dense_tangent(G, U0, V0), r))
        got = product(U_new[i].double(), S_new[i].double(), V_new[i].double())
        assert max_abs(got - expected) / max_abs(expected) < tolerance, name
        eye = torch.eye(r, dtype=dtype)
        for Q in (U_new[i], V_new[i]):
            assert max_abs(Q.T @ Q - eye) < 10 * tolerance, name
        assert bool((S_new[i][:-1] >= S_new[i][1:]).all()), name
    # zero momentum and zero gradient (a zero-initialised matrix at its first step): all ties at 0
    zero = [torch.zeros(1, *t.shape[1:], dtype=dtype) for t in (S, *sketches)]
    U1, S1, V1, fast = _update_momentum_factors_impl(U[:1], zero[0], V[:1], *zero[1:], beta, "sum", "cholesky")
    assert bool(fast[0]) and not S1.any() and max_abs(U1[0].T @ U1[0] - torch.eye(r, dtype=dtype)) < 1e-6


@pytest.mark.parametrize("memory_mode", ["full", "sketch"])
def test_init_state_before_the_first_backward_changes_nothing(memory_mode):
    """init_state_() (what the worker calls before the first backward of a sketch-mode FSDP2 run, so
    no row-sharded matrix is initialised inside FSDP's reduce-scatter hook) makes the factors the
    first step would make: the same weights and state after two steps, bit for bit."""
    from mofasgd import MoFaSGD

    results = []
    for eager in (False, True):
        torch.manual_seed(0)
        layer = torch.nn.Linear(12, 9, bias=False).double()
        opt = MoFaSGD([layer.weight], lr=0.1, rank=3, memory_mode=memory_mode)
        if eager:
            opt.init_state_()
            assert set(opt.state[layer.weight]) == {"U", "S", "V", "step"}
        for step in range(2):
            layer(torch.randn(4, 12, dtype=torch.float64)).square().sum().backward()
            opt.step()
            opt.zero_grad()
        results.append((layer.weight.detach().clone(), {k: v.clone() for k, v in opt.state[layer.weight].items()}))
    (w0, s0), (w1, s1) = results
    assert torch.equal(w0, w1) and all(torch.equal(s0[k], s1[k]) for k in s0)
