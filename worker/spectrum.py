"""Spectral diagnostics of the hidden matrices' momentum (logging.spectrum_every, logging.spectrum_shadow).

Every `spectrum_every` steps rank 0 appends one line to RUN/spectrum.jsonl:
    {"step": N, "matrices": {PARAM_NAME: {...}}, "shadow_bytes": B[, "shadow_since": S]}
per hidden matrix, for MoFaSGD (U, V: the factors the step's gradient G was projected on; G: the
reduced gradient the optimizer used; all energies are shares of ||G||_F^2, and the squared norms
behind them are logged too: grad_sq, left_sq, right_sq, twosided_sq, tangent_sq):
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
shadow_error ||M_full - U diag(S) V^T||_F / ||M_full||_F, shadow_energy_top and shadow_since (the
step the shadow started from: 0, or the step of a resume that turned it on). Its bytes (this
rank's) are reported as `shadow_bytes`, never in the optimizer's state bytes. At rank = min(m, n)
the factors are the full momentum and shadow_error is at rounding level (tested). The shadow is
checkpointed with the run (worker/checkpoint.py), so a resume continues it exactly.

Where the matrices live (docs/spectrum.md, "Under DDP, FSDP and shard"):
- DDP: the replicas are equal; only rank 0 runs the monitor, on whole matrices. No collective.
- FSDP2 (train.parallel fsdp): each rank holds its rows of W, G, U, the momentum and the shadow (V
  and S are replicated). Every rank runs the monitor. Every quantity above is a sum over rows, so
  each rank computes its rows' part and one all-reduce per logged step sums them all
  (`_row_sums`: 2 + r n + r^2 + r^2 [+ 2] numbers per matrix). The singular values of a full
  momentum or of the shadow need the whole matrix: it is gathered to rank 0 alone (m n numbers per
  matrix per logged step), one matrix at a time.
- optimizer.shard (MoFaSGD's or Muon's state on one owner rank per matrix): every rank runs the
  monitor for the matrices it owns (it holds the whole reduced G and their state; the shadow of a
  matrix lives on its owner), and rank 0 gathers the finished lines (a few floats per matrix).
Sketch memory mode and sketch comm hold no m x n reduced gradient: the monitor reads the sketches the
step will use (MoFaSGD.pending_sketches: G V, G^T U, U^T G V, reduced; FSDP: row partials). They give
left_sq, right_sq, twosided_sq, tangent_sq, the truncation energy, overlaps and S exactly; grad_sq and
the shares of it are None (||G||^2 is not a function of the sketches); the shadow, whose update needs
G, is refused by the config.
"""

import json

import torch
import torch.distributed as dist

from worker.fileio import append_json_line, start_json_log
from mofasgd import MoFaSGD

TOP_KS = (8, 16, 32, 64)


# ---------------------------------------------------------------------------------------------
# The quantities, as pure functions. Each one that needs the whole gradient is split into a part
# that sums over rows (computed on the rows a rank holds; the ranks' parts add up to the whole
# matrix's) and a finishing function of those sums.


def projection_partials(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> dict:
    """The row sums behind the projection energies, over the rows G and U hold (all rows, or one
    rank's rows under FSDP; V whole): grad_sq = ||G||^2, right_sq = ||G V||^2 (each row's
    contribution is its own), UtG = U^T G (r x n) and core = U^T G V (r x r) (sums of one outer
    product per row). Summed over the ranks' row blocks, each entry is the whole matrix's."""
    G = G.to(U.dtype)
    GV = G @ V
    return {"grad_sq": G.square().sum(), "right_sq": GV.square().sum(), "UtG": U.mT @ G, "core": U.mT @ GV}


def sketch_partials(GV: torch.Tensor, GtU: torch.Tensor, C: torch.Tensor) -> dict:
    """projection_partials from the sketches (G V, G^T U, U^T G V) instead of G (sketch modes):
    the same row sums but grad_sq, which no sketch holds (||G||^2 is not a function of them)."""
    return {"right_sq": GV.square().sum(), "UtG": GtU.mT, "core": C}


def energies_from_sums(sums: dict) -> dict:
    """From projection_partials (or sketch_partials) summed over all rows, in fp64: the squared
    norms left_sq ||U^T G||^2, right_sq ||G V||^2, twosided_sq ||U^T G V||^2 and tangent_sq
    ||G_hat||^2 = left + right - two-sided (the orthogonal split G_hat = UU^T G + (I - UU^T) G VV^T),
    grad_sq ||G||^2, and the *_energy shares of ||G||^2 (None without grad_sq: sketch modes); with
    'core' (U^T G V), which the truncation energy needs."""
    core = sums["core"].double()
    left, right, both = sums["UtG"].double().square().sum(), sums["right_sq"].double(), core.square().sum()
    tangent_sq = left + right - both
    norms = {"left": float(left), "right": float(right), "twosided": float(both), "tangent": float(tangent_sq)}
    grad_sq = float(sums["grad_sq"].double()) if "grad_sq" in sums else None
    if grad_sq is None:
        shares = dict.fromkeys(norms)
    else:
        shares = {k: v / grad_sq if grad_sq > 0 else float("nan") for k, v in norms.items()}
    return {**{f"{k}_energy": v for k, v in shares.items()}, "grad_sq": grad_sq,
            **{f"{k}_sq": v for k, v in norms.items()}, "core": core}


def projection_energies(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> dict:
    """energies_from_sums of a whole matrix (its one row block)."""
    return energies_from_sums(projection_partials(G, U, V))


def truncation_energy(S_old: torch.Tensor, S_new: torch.Tensor, core: torch.Tensor, tangent_sq: torch.Tensor,
                      beta: float, scale: float) -> float:
    """sum(S_new^2) / ||beta U diag(S_old) V^T + scale G_hat||_F^2, from the factors alone."""
    S_old, S_new = S_old.double(), S_new.double()
    total = beta ** 2 * S_old.square().sum() + 2 * beta * scale * (S_old * core.double().diagonal()).sum() \
        + scale ** 2 * tangent_sq
    return float(S_new.square().sum() / total) if total > 0 else float("nan")


def overlap_partial(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new^T old over the rows held: summed over the ranks' row blocks, the whole product."""
    return new.mT @ old.to(new.dtype)


def overlap_from_sum(product: torch.Tensor) -> float:
    """||new^T old||_F^2 / r from the summed product (r: the smaller of the two ranks)."""
    return float(product.double().square().sum() / min(product.shape))


def subspace_overlap(new: torch.Tensor, old: torch.Tensor) -> float:
    """||new^T old||_F^2 / r for two orthonormal m x r bases: 1 when they span the same subspace."""
    return overlap_from_sum(overlap_partial(new, old))


def shadow_partials(M: torch.Tensor, factors: torch.Tensor) -> dict:
    """The row sums of shadow_error: ||M - U diag(S) V^T||^2 and ||M||^2 over the rows held."""
    return {"shadow_diff_sq": (M - factors.to(M.dtype)).square().sum(), "shadow_sq": M.square().sum()}


def shadow_error_from_sums(sums: dict) -> float:
    """||M_full - U diag(S) V^T||_F / ||M_full||_F from shadow_partials summed over all rows."""
    norm_sq = sums["shadow_sq"].double()
    return float((sums["shadow_diff_sq"].double() / norm_sq).sqrt()) if norm_sq > 0 else float("nan")


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
# Collectives (FSDP's row shards, shard's owners)


def all_reduce_row_sums(entries: list[dict], group) -> list[dict]:
    """Every tensor of every dict summed over the group's ranks in one flat all-reduce (in their
    promoted dtype: the factors', fp32 or fp64); the same structure back. Every rank passes dicts
    of the same keys and shapes."""
    tensors = [t for entry in entries for t in entry.values()]
    if not tensors:
        return entries
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, group=group)
    out, offset = [], 0
    for entry in entries:
        summed = {}
        for key, t in entry.items():
            summed[key] = flat[offset: offset + t.numel()].view(t.shape)
            offset += t.numel()
        out.append(summed)
    return out


def gather_rows_on_first(local: torch.Tensor, rows: int, group) -> torch.Tensor | None:
    """The whole matrix of a row-split one (Shard(0): torch.chunk's split of `rows`) on the group's
    first rank alone, None elsewhere: each rank sends its rows, padded to the longest share."""
    from mofasgd.row_sharded import row_counts

    counts = row_counts(rows, dist.get_world_size(group))
    padded = local.new_zeros(max(counts), *local.shape[1:])
    padded[: local.shape[0]] = local
    first = dist.get_rank(group) == 0
    parts = [torch.empty_like(padded) for _ in counts] if first else None
    dist.gather(padded, parts, group=group, group_dst=0)
    return torch.cat([part[:c] for part, c in zip(parts, counts)]) if first else None


def whole_on_first(t: torch.Tensor) -> torch.Tensor | None:
    """A momentum buffer whole on rank 0 (None on the other ranks of an FSDP2 run): a plain tensor
    itself, a row-split DTensor gathered there (gather_rows_on_first), another DTensor layout by
    full_tensor() (every rank)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t
    if t.device_mesh.ndim == 1 and tuple(t.placements) == (Shard(0),):
        return gather_rows_on_first(t.to_local(), t.shape[0], t.device_mesh.get_group())
    whole = t.full_tensor()
    return whole if dist.get_rank() == 0 else None


def merge_on_first(matrices: dict, order: list[str]) -> dict:
    """shard: each rank's finished matrices (those it owns) merged on rank 0, in `order` (a
    collective; the other ranks get theirs back)."""
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(matrices, parts, dst=0)
    if parts is None:
        return matrices
    merged = {name: m for part in parts for name, m in part.items()}
    return {name: merged[name] for name in order if name in merged}


# ---------------------------------------------------------------------------------------------
# The monitor the worker calls around the optimizer step


class SpectrumMonitor:
    """Collects the quantities around the hidden optimizer's step (before_step, after_step) and
    writes them every `every` steps (to `path`: rank 0's; None elsewhere); keeps the shadow
    momentum when asked. Under FSDP and shard every rank runs one (runs_on_every_rank); under DDP
    rank 0 alone."""

    def __init__(self, named_hidden: list, optimizer, every: int, shadow: bool, path: str | None):
        self.named = named_hidden  # [(name, parameter)]
        self.optimizer, self.every, self.shadow, self.path = optimizer, every, shadow, path
        self.kind = "factors" if isinstance(optimizer, MoFaSGD) else "momentum"
        self.row_group = _row_group(named_hidden)  # FSDP2: the group the rows are split over; else None
        self.owners = getattr(optimizer, "_owner_of", None) is not None  # shard: one owner rank per matrix
        self.shadows: dict = {}  # parameter -> M_full (this rank's rows under FSDP; the owner's under shard)
        self.shadow_since: int | None = None  # the step the shadow started from (its M_0: the factors then)
        self.before: dict = {}  # parameter -> what the step starts from (on logged steps)

    @property
    def shadow_bytes(self) -> int:
        """Bytes of the shadow this rank holds."""
        return sum(m.numel() * m.element_size() for m in self.shadows.values())

    def due(self, step: int) -> bool:
        """Whether step `step` (counting from 0; logged as step + 1) is logged."""
        return (step + 1) % self.every == 0

    def prepare_file(self, start_step: int) -> None:
        """spectrum.jsonl at the run's start: a resume keeps the lines up to its checkpoint (the
        later ones are logged again), a fresh start begins a new file."""
        if self.path is not None:
            start_json_log(self.path, start_step)

    def _mine(self, p) -> bool:
        """Whether this rank computes p's entry: always, but under shard only p's owner."""
        return not self.owners or self.optimizer._owns(p)

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        if self.kind != "factors" or not (self.shadow or self.due(step)):
            return
        self.before = {}
        for _, p in self.named:
            if not self._mine(p):
                continue
            # sketch modes: the sketches of the reduced gradient the step will use, instead of G
            sketches = self.optimizer.pending_sketches(p)
            if p.grad is None and sketches is None:
                continue
            if self.shadow and sketches is not None:
                raise ValueError("spectrum_shadow needs the reduced m x n gradient, which MoFaSGD's sketch memory "
                                 "mode and sketch comm never hold: turn one of them off")
            group = _group_of(self.optimizer, p)
            state = self.optimizer.state.get(p) or {}
            if self.shadow and p not in self.shadows:
                # the factors' momentum (a resume that turned the shadow on), or the M_0 the
                # optimizer's own init rule gives them (weight_svd: the weight's rank-r truncated
                # SVD; zero: 0) before its first step. Under FSDP that init is a collective (the
                # weight gathered once): every rank comes here for the same matrices in one order.
                self.shadows[p] = _factor_momentum(state or self.optimizer._initial_state(p, group))
                self.shadow_since = step if self.shadow_since is None else self.shadow_since
            seen = {"beta": group["beta"], "momentum": group["momentum"], "sketches": sketches,
                    "G": _local(p.grad) if sketches is None else None}
            if state and self.due(step):
                seen.update({k: _local(state[k]).clone() for k in ("U", "S", "V")})
            self.before[p] = seen

    @torch.no_grad()
    def after_step(self, step: int) -> dict | None:
        """Updates the shadow; on a logged step returns (and, on rank 0, appends) its line. Under
        FSDP and shard it holds collectives: every rank calls it at every step."""
        for p, seen in self.before.items():
            if p in self.shadows:  # the factors' rule on the full momentum (this rank's rows)
                M = self.shadows[p]
                M.mul_(seen["beta"]).add_(seen["G"].to(M.dtype), alpha=momentum_scale(seen["momentum"], seen["beta"]))
        if not self.due(step):
            self.before = {}
            return None
        named = [(name, p) for name, p in self.named if self._mine(p)]
        sums = [self._row_sums(p) for _, p in named]
        if self.row_group is not None:  # FSDP: the ranks' row sums added up, one all-reduce
            sums = all_reduce_row_sums(sums, self.row_group)
        matrices = {name: self._matrix(p, s) for (name, p), s in zip(named, sums)}
        if self.owners:  # shard: each owner's matrices to rank 0
            matrices = merge_on_first(matrices, [name for name, _ in self.named])
        self.before = {}
        line = {"step": step + 1, "matrices": {k: v for k, v in matrices.items() if v},
                "shadow_bytes": self.shadow_bytes}
        if self.shadow:
            line["shadow_since"] = self.shadow_since
        if self.path is not None:
            append_json_line(self.path, line)
        return line

    def _row_sums(self, p) -> dict:
        """p's quantities that sum over rows, on the rows this rank holds (empty for a full
        momentum, whose spectrum needs the whole matrix). The keys depend only on what every rank
        knows alike (the state's presence, the shadow), so the all-reduce lines up."""
        seen, state = self.before.get(p), self.optimizer.state.get(p) or {}
        if self.kind != "factors" or seen is None or "U" not in state:
            return {}
        sums = {}
        if "U" in seen:
            sketches = seen["sketches"]
            sums.update(projection_partials(seen["G"], seen["U"], seen["V"]) if sketches is None
                        else sketch_partials(*sketches))
            sums["overlap_u"] = overlap_partial(_local(state["U"]), seen["U"])
        if p in self.shadows:
            sums.update(shadow_partials(self.shadows[p], _factor_momentum(state)))
        return sums

    def _matrix(self, p, sums: dict) -> dict:
        """p's entry of the line from its summed row sums; the spectra of whole matrices are
        computed where the matrix is whole (rank 0 under FSDP, after a gather: a collective)."""
        state = self.optimizer.state.get(p) or {}
        if self.kind == "momentum":
            buffer = state.get("exp_avg", state.get("momentum_buffer"))
            whole = whole_on_first(buffer) if buffer is not None else None
            return {"momentum_energy_top": energy_top(whole)} if whole is not None else {}
        seen = self.before.get(p)
        if seen is None or "U" not in state:
            return {}
        out = {"singular_values": [float(s) for s in state["S"]],
               "overlap_u": overlap_from_sum(sums["overlap_u"]) if "U" in seen else None,
               "overlap_v": subspace_overlap(state["V"], seen["V"]) if "V" in seen else None}  # V: replicated
        if "U" in seen:  # the step projected G on the factors it started from
            energies = energies_from_sums(sums)
            out["truncation_energy"] = truncation_energy(
                seen["S"], state["S"], energies.pop("core"), energies["tangent_sq"], seen["beta"],
                momentum_scale(seen["momentum"], seen["beta"]))
            out.update(energies)
        if p in self.shadows:
            out["shadow_error"] = shadow_error_from_sums(sums)
            M = self.shadows[p]
            whole = gather_rows_on_first(M, p.shape[0], self.row_group) if self.row_group is not None else M
            if whole is not None:
                out["shadow_energy_top"] = energy_top(whole)
        return out

    # -- the shadow in checkpoints (worker/checkpoint.py) -----------------------------------------
    # Rule: a checkpoint holds the shadow when logging.spectrum_shadow was on. A resume with the
    # shadow on continues the saved one exactly; one from a checkpoint without it starts a new
    # shadow from the factors at the resume step (shadow_since says which); one with it off ignores
    # the saved shadow, and its checkpoints hold none.

    def shadow_state(self) -> dict | None:
        """{"since": step, "matrices": {name: M}} to checkpoint, or None (shadow off or not started).
        Under FSDP each M is a Shard(0) DTensor of this rank's rows (a DCP checkpoint reshards it);
        under shard the owners' shadows are gathered to rank 0 (a collective: every rank calls
        this; None on the other ranks); under DDP rank 0's whole ones."""
        if not self.shadow:
            return None
        names = {p: name for name, p in self.named}
        if self.row_group is not None:
            matrices = {names[p]: _row_dtensor(M, p) for p, M in self.shadows.items()}
        else:
            matrices = {names[p]: M for p, M in self.shadows.items()}
        if self.owners:
            parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object({name: M.cpu() for name, M in matrices.items()}, parts, dst=0)
            if parts is None:
                return None
            matrices = {name: M for part in parts for name, M in part.items()}
        return {"since": self.shadow_since, "matrices": matrices} if matrices else None

    def shadow_template(self) -> dict | None:
        """FSDP: zero Shard(0) DTensors, one per hidden matrix, for a DCP load to fill (None when
        the shadow is off)."""
        if not self.shadow or self.row_group is None:
            return None
        return {name: _row_dtensor(_local(p).new_zeros(_local(p).shape, dtype=_factor_dtype(p)), p)
                for name, p in self.named}

    def load_shadow(self, saved: dict | None) -> None:
        """Restores a checkpoint's shadow_state (None: the checkpoint holds none, and the shadow
        starts at the resume step); ignored with the shadow off. Each rank keeps its rows (FSDP)
        or the matrices it owns (shard)."""
        if not self.shadow or not saved:
            return
        matrices = saved["matrices"]
        for name, p in self.named:
            if name in matrices and self._mine(p):
                M = _local(matrices[name])
                expected = tuple(_local(p).shape)
                if tuple(M.shape) != expected:
                    raise ValueError(f"its spectrum shadow of {name} has shape {list(M.shape)}, not {list(expected)}")
                self.shadows[p] = M.to(device=_local(p).device, dtype=_factor_dtype(p)).clone()
        self.shadow_since = int(saved["since"])


def runs_on_every_rank(named_hidden: list, optimizer) -> bool:
    """Whether every rank runs a monitor (its collectives): FSDP2's row-split matrices, or the
    optimizer's shard (each matrix's state on its owner); under DDP rank 0 alone does."""
    return _row_group(named_hidden) is not None or getattr(optimizer, "_owner_of", None) is not None


def _group_of(optimizer, p) -> dict:
    return next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))


def _local(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of t: a DTensor's local rows, any other tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _row_group(named_hidden: list):
    """The process group FSDP2 splits the hidden matrices' rows over, or None (whole matrices)."""
    from mofasgd.row_sharded import is_row_sharded

    sharded = [p for _, p in named_hidden if is_row_sharded(p)]
    return sharded[0].device_mesh.get_group() if sharded else None


def _row_dtensor(local: torch.Tensor, p):
    """`local` (this rank's rows of a matrix shaped like p) as a Shard(0) DTensor on p's mesh."""
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(local, p.device_mesh, [Shard(0)], run_check=False, shape=p.shape,
                              stride=(p.shape[1], 1))


def _factor_dtype(p) -> torch.dtype:
    from mofasgd.factors import factor_dtype

    return factor_dtype(p.dtype)


def _factor_momentum(state: dict) -> torch.Tensor:
    """U diag(S) V^T on the rows this rank holds of U (V and S are whole)."""
    return (_local(state["U"]) * state["S"]) @ state["V"].mT
