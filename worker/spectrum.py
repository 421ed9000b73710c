"""Spectral diagnostics of the hidden matrices' momentum (logging.spectrum_every, logging.spectrum_shadow).

Every `spectrum_every` steps rank 0 appends one line to RUN/spectrum.jsonl:
    {"step": N, "matrices": {PARAM_NAME: {...}}, "shadow_bytes": B}
per hidden matrix, for MoFaSGD (U, V: the factors the step's gradient G was projected on; G: the
reduced gradient the optimizer used; all energies are shares of ||G||_F^2):
- left_energy ||U^T G||^2, right_energy ||G V||^2, twosided_energy ||U^T G V||^2 and tangent_energy
  ||G_hat||^2, G_hat = UU^T G + G VV^T - UU^T G VV^T (the paper's tangent projection, eq. 4). Since
  the two terms UU^T G and (I - UU^T) G VV^T are orthogonal, ||G_hat||^2 = ||U^T G||^2 + ||G V||^2 -
  ||U^T G V||^2: no m x n matrix is formed.
- truncation_energy: the share of the 2r x 2r middle matrix's squared singular values that the
  rank-r truncation keeps, sum(S_new^2) / ||beta M + c G_hat||^2 (c = 1 for momentum "sum", 1 - beta
  for "ema"), the denominator from the factors: beta^2 ||S||^2 + 2 beta c sum_i S_i (U^T G V)_ii +
  c^2 ||G_hat||^2 (M = U diag(S) V^T lies in the tangent space, so <M, G_hat> = <M, G>).
- overlap_u, overlap_v: ||U_new^T U_old||_F^2 / r (1: the subspace did not move).
- singular_values: S after the step.
For optimizers that hold a full momentum (AdamW's exp_avg, Muon's momentum_buffer):
momentum_energy_top = {k: share of the momentum's squared singular values in its top k} for k in
8, 16, 32, 64 (capped at min(m, n)) and at "1/4" and "1/2" of min(m, n).

With spectrum_shadow (MoFaSGD, full memory mode) a full-rank momentum M_full is kept beside the
factors by the same rule (sum or ema, the step's beta, the same initial M_0) and each line adds
shadow_error ||M_full - U diag(S) V^T||_F / ||M_full||_F and shadow_energy_top. Its bytes are
reported as `shadow_bytes`, never in the optimizer's state bytes. At rank = min(m, n) the factors
are the full momentum and shadow_error is at rounding level (tested).

Under DDP the values are rank 0's (the replicas are equal); only rank 0 computes and writes. FSDP,
MoFaSGD's `shard` and sketch memory mode are refused by the config (docs/optimizers.md).
"""

import json
import os

import torch

from worker.fileio import append_json_line
from mofasgd import MoFaSGD

TOP_KS = (8, 16, 32, 64)


# ---------------------------------------------------------------------------------------------
# The quantities, as pure functions


def projection_energies(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> dict:
    """Squared norms of G's projections on the factors' subspaces, over ||G||^2, and the two
    norms the truncation energy needs ('grad_sq', 'tangent_sq' and 'core': U^T G V)."""
    G = G.to(U.dtype)
    UtG, GV = U.mT @ G, G @ V
    core = UtG @ V
    left, right, both = UtG.square().sum(), GV.square().sum(), core.square().sum()
    grad_sq = G.square().sum()
    tangent_sq = left + right - both
    scale = 1.0 / grad_sq if grad_sq > 0 else float("nan")
    return {"left_energy": float(left * scale), "right_energy": float(right * scale),
            "twosided_energy": float(both * scale), "tangent_energy": float(tangent_sq * scale),
            "grad_sq": grad_sq, "tangent_sq": tangent_sq, "core": core}


def truncation_energy(S_old: torch.Tensor, S_new: torch.Tensor, core: torch.Tensor, tangent_sq: torch.Tensor,
                      beta: float, scale: float) -> float:
    """sum(S_new^2) / ||beta U diag(S_old) V^T + scale G_hat||_F^2, from the factors alone."""
    total = beta ** 2 * S_old.square().sum() + 2 * beta * scale * (S_old * core.diagonal()).sum() \
        + scale ** 2 * tangent_sq
    return float(S_new.square().sum() / total) if total > 0 else float("nan")


def subspace_overlap(new: torch.Tensor, old: torch.Tensor) -> float:
    """||new^T old||_F^2 / r for two orthonormal m x r bases: 1 when they span the same subspace."""
    return float((new.mT @ old.to(new.dtype)).square().sum() / new.shape[-1])


def energy_top(M: torch.Tensor) -> dict:
    """{k: share of M's squared singular values in its top k} for k in TOP_KS (capped at min(m, n))
    and at '1/4' and '1/2' of min(m, n)."""
    s2 = torch.linalg.svdvals(M.double()).square()
    total = s2.sum()
    side = min(M.shape)
    ks = {str(k): min(k, side) for k in TOP_KS}
    ks.update({"1/4": max(1, side // 4), "1/2": max(1, side // 2)})
    return {name: float(s2[:k].sum() / total) if total > 0 else float("nan") for name, k in ks.items()}


def momentum_scale(momentum: str, beta: float) -> float:
    """The weight of the new gradient in MoFaSGD's momentum rule: sum: M = beta M + G_hat; ema: M =
    beta M + (1 - beta) G_hat."""
    return 1.0 if momentum == "sum" else 1.0 - beta


# ---------------------------------------------------------------------------------------------
# The monitor the worker calls around the optimizer step


class SpectrumMonitor:
    """Collects the quantities around the hidden optimizer's step (before_step, after_step) and
    writes them every `every` steps (rank 0); keeps the shadow momentum when asked."""

    def __init__(self, named_hidden: list, optimizer, every: int, shadow: bool, path: str | None):
        self.named = named_hidden  # [(name, parameter)]
        self.optimizer, self.every, self.shadow, self.path = optimizer, every, shadow, path
        self.kind = "factors" if isinstance(optimizer, MoFaSGD) else "momentum"
        self.shadows: dict = {}  # parameter -> M_full
        self.before: dict = {}  # parameter -> what the step starts from (on logged steps)

    @property
    def shadow_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.shadows.values())

    def due(self, step: int) -> bool:
        """Whether step `step` (counting from 0; logged as step + 1) is logged."""
        return (step + 1) % self.every == 0

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        if self.kind != "factors" or not (self.shadow or self.due(step)):
            return
        self.before = {}
        for _, p in self.named:
            if p.grad is None:
                continue
            group = _group_of(self.optimizer, p)
            state = self.optimizer.state[p]
            if self.shadow and p not in self.shadows:
                # the factors' momentum (a resume), or the M_0 the optimizer's own init rule gives
                # them (weight_svd: the weight's rank-r truncated SVD; zero: 0) before its first step
                self.shadows[p] = _factor_momentum(state or self.optimizer._initial_state(p, group))
            self.before[p] = {"beta": group["beta"], "momentum": group["momentum"], "G": p.grad,
                              **({k: state[k].clone() for k in ("U", "S", "V")} if state and self.due(step) else {})}

    @torch.no_grad()
    def after_step(self, step: int) -> dict | None:
        """Updates the shadow; on a logged step returns (and, on rank 0, appends) its line."""
        for p, seen in self.before.items():
            if p in self.shadows:
                M = self.shadows[p]
                M.mul_(seen["beta"]).add_(seen["G"].to(M.dtype), alpha=momentum_scale(seen["momentum"], seen["beta"]))
        if not self.due(step):
            self.before = {}
            return None
        matrices = {name: self._matrix(p) for name, p in self.named}
        self.before = {}
        line = {"step": step + 1, "matrices": {k: v for k, v in matrices.items() if v},
                "shadow_bytes": self.shadow_bytes}
        if self.path is not None:
            append_json_line(self.path, line)
        return line

    def _matrix(self, p) -> dict:
        state = self.optimizer.state.get(p, {})
        if self.kind == "momentum":
            buffer = state.get("exp_avg", state.get("momentum_buffer"))
            return {"momentum_energy_top": energy_top(buffer)} if buffer is not None else {}
        seen = self.before.get(p)
        if seen is None or "U" not in state:
            return {}
        out = {"singular_values": [float(s) for s in state["S"]],
               "overlap_u": subspace_overlap(state["U"], seen["U"]) if "U" in seen else None,
               "overlap_v": subspace_overlap(state["V"], seen["V"]) if "V" in seen else None}
        if "U" in seen:  # the step projected G on the factors it started from
            energies = projection_energies(seen["G"], seen["U"], seen["V"])
            out["truncation_energy"] = truncation_energy(
                seen["S"], state["S"], energies.pop("core"), energies.pop("tangent_sq"), seen["beta"],
                momentum_scale(seen["momentum"], seen["beta"]))
            energies.pop("grad_sq")
            out.update(energies)
        if p in self.shadows:
            M, factors = self.shadows[p], _factor_momentum(state)
            norm = M.norm()
            out["shadow_error"] = float((M - factors).norm() / norm) if norm > 0 else float("nan")
            out["shadow_energy_top"] = energy_top(M)
        return out


def keep_lines_up_to(path: str, step: int) -> None:
    """A resume's spectrum.jsonl: the lines up to the checkpoint's step (later ones are redone)."""
    if not os.path.exists(path):
        return
    from worker.fileio import write_text_atomic

    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line a kill cut short
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    write_text_atomic(path, "".join(kept))


def _group_of(optimizer, p) -> dict:
    return next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))


def _factor_momentum(state: dict) -> torch.Tensor:
    return (state["U"] * state["S"]) @ state["V"].mT
