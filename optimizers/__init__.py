"""Optimizer registry and parameter routing.

Every optimizer the harness compares is trained on the same split of the model:
- hidden matrices: the 2-D weights inside the transformer blocks get the chosen optimizer;
- embeddings, the head and every 1-D parameter (biases, norm gains) get AdamW with their own
  learning rates (the `adam` config section), whatever the chosen optimizer.

`OPTIMIZERS` maps a name (`run.py --optimizer NAME`) to an `OptimizerSpec`: the dataclass of its
config keys (the keys of configs/optimizers/NAME.yaml), a builder for the hidden matrices, and
the per-step hyperparameter schedules it needs besides the learning rate (e.g. MoFaSGD's beta
warmup, Muon's momentum warmup). Heavy or optional dependencies (galore-torch, which pulls in
transformers and bitsandbytes; wandb) are imported only when used.

    name       hidden-matrix optimizer            state per m x n fp32 matrix, in floats
    adamw      torch.optim.AdamW                  2 m n (+ step)
    mfsgd      MoFaSGD (mofasgd.py)               (m + n) r + r (+ step)
    galore     galore_torch.GaLoreAdamW (galore.py)  2 max(m, n) r' + min(m, n)^2, r' = min(r, m, n) (std)
    muon       torch.optim.Muon (muon.py: sharded)  m n (momentum buffer; 1/world of them per rank)
    adafactor  torch.optim.Adafactor              m + n (+ step): factored second moment
See docs/optimizers.md for the keys, defaults and formulas.
"""

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn as nn

from mofasgd import BetaWarmup, MoFaSGD, linear_warmup
from mofasgd import hyperparameters as mofasgd_rules
from mofasgd.hyperparameters import Init, MemoryMode, Momentum, RankPolicy, needs_full_gradient
from mofasgd.optimizer import ShardedState, state_bytes

__all__ = ["MoFaSGD", "OPTIMIZERS", "OptimizerSpec", "RunOptimizers", "split_parameters", "build_optimizers",
           "state_bytes", "lr_multiplier", "apply_group_schedules"]


# ---------------------------------------------------------------------------------------------
# Config dataclasses: one per optimizer, fields = the YAML keys


@dataclass
class ScheduleConfig:
    """Keys every optimizer config has: the learning rate and its schedule."""

    lr: float = 0.01
    cooldown_frac: float = 0.4  # linear decay to 0 over this last fraction of the steps
    lr_warmup_steps: int = 0  # linear learning-rate warmup from 0 over this many first steps
    scheduler_name: Literal["original"] = "original"  # the paper harness's name for flat + linear cooldown; the only one

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise ValueError(f"optimizer.cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"optimizer.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")


@dataclass
class AdamKeys(ScheduleConfig):
    """The keys and rules of an Adam (AdamW, GaLore's AdamW); each sets its own lr and betas."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0

    def validate(self):
        super().validate()
        check_adam("optimizer", self)


@dataclass
class AdamWConfig(AdamKeys):
    lr: float = 0.002
    betas: list[float] = field(default_factory=lambda: [0.8, 0.95])
    fused: bool = True  # torch's fused kernel (CPU and CUDA); false: the foreach kernel


@dataclass
class MoFaSGDConfig(ScheduleConfig):
    lr: float = 0.05
    rank: int = 32
    beta: float = 0.95  # momentum decay when warmup_steps is 0
    eta1: float = 0.25  # weight of the low-rank (momentum) step
    eta2: float = 0.0  # weight of the gradient's component outside the momentum subspace
    use_current_projection: bool = True
    use_ones_for_nonzero_s: bool = False
    eps: float = 1e-10
    max_value: float = 5.0
    warmup_steps: int = 300  # beta warmup steps
    beta_start: float = 0.65
    beta_end: float = 0.85
    nesterov: bool = False
    init: Init = "weight_svd"
    momentum: Momentum = "sum"
    memory_mode: MemoryMode = "full"  # full, or sketch: no m x n gradient of a hidden matrix survives backward
    comm: Literal["full", "sketch"] = "full"  # full (DDP all-reduces the gradients), or sketch: all-reduce (m + n) r + r^2 sketch numbers per matrix
    shard: bool = False  # each data-parallel rank updates only the matrices it owns; step factors are all-gathered
    check_orthonormal: float = 0.0  # > 0: fail when a factor update leaves max |U^T U - I| (or V's) above this; 0: off
    rank_policy: RankPolicy = "fixed"  # fixed: every matrix at `rank`; energy: ranks re-allocated under rank_budget (docs/optimizers.md)
    rank_budget: int | None = None  # energy: most factor numbers, sum of (m + n + 1) r_i (null: what uniform `rank` holds)
    min_rank: int | None = None  # energy: lowest rank of a matrix (null: 1)
    max_rank: int | None = None  # energy: highest rank of a matrix (null: min(m, n))
    rank_every: int | None = None  # energy: steps between re-allocations (null: 100)

    def validate(self):
        super().validate()
        # the package's rules (mofasgd/hyperparameters.py), as the constructor checks them; the warmup's
        # beta_start and beta_end obey beta's, as BetaWarmup checks them
        for key in ("rank", "beta", "beta_start", "beta_end", "warmup_steps", "eta1", "eta2", "eps", "max_value",
                    "check_orthonormal"):
            rule = {"beta_start": "beta", "beta_end": "beta"}.get(key, key)
            condition = mofasgd_rules.broken_rule(rule, getattr(self, key))
            if condition:
                raise ValueError(f"optimizer.{key} must be {condition}, got {getattr(self, key)}")
        mofasgd_rules.check_rank_policy(self.rank_policy, {k: getattr(self, k) for k in mofasgd_rules.ENERGY_KEYS},
                                        label=lambda key: f"optimizer.{key}")
        if self.rank_policy == "energy" and self.shard:
            raise ValueError("optimizer.shard must be false with optimizer.rank_policy energy: re-allocating ranks "
                             "needs every matrix's spectrum on every rank")
        for key in ("memory_mode", "comm"):
            if getattr(self, key) == "sketch" and needs_full_gradient(self.eta2, self.nesterov):
                raise ValueError(f"optimizer.eta2 must be 0 and optimizer.nesterov false with {key} sketch: "
                                 f"both need the full gradient, which sketch mode never holds")


@dataclass
class GaLoreGroupParams:
    """The GaLore keys of the hidden-matrix param group (galore_torch reads them from the group)."""

    rank: int = 32  # dimension of the gradient subspace (galore-torch uses min(rank, m, n))
    update_proj_gap: int = 75  # steps between SVD refreshes of the projector
    scale: float = 0.25  # the projected-back update is multiplied by this
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"  # galore_projector.py's

    def validate(self, path="optimizer.group_params"):
        for key in ("rank", "update_proj_gap"):
            if getattr(self, key) < 1:
                raise ValueError(f"{path}.{key} must be >= 1, got {getattr(self, key)}")
        if self.scale <= 0:
            raise ValueError(f"{path}.scale must be > 0, got {self.scale}")


@dataclass
class GaLoreConfig(AdamKeys):
    lr: float = 0.008
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    group_params: GaLoreGroupParams = field(default_factory=GaLoreGroupParams)

    @property
    def rank(self) -> int:
        """The subspace rank (for run summaries; the config key is group_params.rank)."""
        return self.group_params.rank

    def validate(self):
        super().validate()
        self.group_params.validate()


@dataclass
class MuonConfig(ScheduleConfig):
    lr: float = 0.05
    momentum: float = 0.95  # momentum after the warmup (torch's Muon: B <- m B + (1 - m) G)
    nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations
    weight_decay: float = 0.0  # torch.optim.Muon's own default is 0.1; the paper's harness used none
    adjust_lr_fn: Literal["original", "match_rms_adamw"] = "original"  # original: lr * sqrt(max(1, m/n)) (Keller Jordan's)
    momentum_warmup_steps: int = 300  # momentum goes linearly momentum_start -> momentum; 0: constant
    momentum_start: float = 0.85
    shard: bool = True  # on several ranks, each orthogonalises its share of the matrices (optimizers/muon.py)

    def validate(self):
        super().validate()
        for key in ("momentum", "momentum_start"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"optimizer.{key} must be in [0, 1), got {getattr(self, key)}")
        if not 1 <= self.ns_steps < 100:
            raise ValueError(f"optimizer.ns_steps must be >= 1 (and < 100, torch's limit), got {self.ns_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if mofasgd_rules.broken_rule("warmup_steps", self.momentum_warmup_steps):  # linear_warmup's rule
            raise ValueError(f"optimizer.momentum_warmup_steps must be >= 0, got {self.momentum_warmup_steps}")


@dataclass
class AdafactorConfig(ScheduleConfig):
    lr: float = 0.01  # torch's Adafactor: the maximum *relative* step size (see docs/optimizers.md)
    beta2_decay: float = -0.8  # second-moment decay 1 - t^beta2_decay
    eps: list[float | None] = field(default_factory=lambda: [None, 1e-3])  # [eps1 (None: dtype eps), eps2]
    d: float = 1.0  # update clipping threshold (RMS of the update capped at d)
    weight_decay: float = 0.0
    maximize: bool = False

    def validate(self):
        super().validate()
        if self.beta2_decay > 0:
            raise ValueError(f"optimizer.beta2_decay must be <= 0, got {self.beta2_decay}")
        if len(self.eps) != 2 or self.eps[1] is None or any(e is not None and e < 0 for e in self.eps):
            raise ValueError(f"optimizer.eps must be [eps1 or null, eps2] with values >= 0, got {self.eps}")
        if self.d < 1.0:
            raise ValueError(f"optimizer.d must be >= 1, got {self.d}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")


def check_adam(section: str, cfg) -> None:
    """Adam's rules, for every Adam of a run (AdamW's and GaLore's config, the `adam` section): betas
    two numbers in [0, 1), eps and weight_decay >= 0."""
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ValueError(f"{section}.betas must be two numbers in [0, 1), got {cfg.betas}")
    for key in ("eps", "weight_decay"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{section}.{key} must be >= 0, got {getattr(cfg, key)}")


# ---------------------------------------------------------------------------------------------
# Builders and schedules


def _build_adamw(params, cfg: AdamWConfig, device: str):
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=cfg.fused or None, foreach=None if cfg.fused else True)


def _build_mofasgd(params, cfg: MoFaSGDConfig, device: str):
    return MoFaSGD(params, lr=cfg.lr, rank=cfg.rank, beta=cfg.beta, eta1=cfg.eta1, eta2=cfg.eta2,
                   use_current_projection=cfg.use_current_projection,
                   use_ones_for_nonzero_s=cfg.use_ones_for_nonzero_s, nesterov=cfg.nesterov, eps=cfg.eps,
                   max_value=cfg.max_value, init=cfg.init, momentum=cfg.momentum, memory_mode=cfg.memory_mode,
                   shard=cfg.shard, check_orthonormal=cfg.check_orthonormal, rank_policy=cfg.rank_policy,
                   rank_budget=cfg.rank_budget, min_rank=cfg.min_rank, max_rank=cfg.max_rank, rank_every=cfg.rank_every)


def _mofasgd_schedules(cfg: MoFaSGDConfig):
    if cfg.warmup_steps == 0:
        return {}
    return {"beta": BetaWarmup(start=cfg.beta_start, end=cfg.beta_end, steps=cfg.warmup_steps)}


def _build_galore(params, cfg: GaLoreConfig, device: str):
    from optimizers.galore import build_galore  # imports galore_torch (transformers, bitsandbytes)

    return build_galore(params, cfg)


def _build_muon(params, cfg: MuonConfig, device: str):
    from optimizers.muon import ShardedMuon

    return ShardedMuon(params, shard=cfg.shard, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                       nesterov=cfg.nesterov, ns_steps=cfg.ns_steps, adjust_lr_fn=cfg.adjust_lr_fn)


def _muon_schedules(cfg: MuonConfig):
    if cfg.momentum_warmup_steps == 0:
        return {}
    return {"momentum": linear_warmup(cfg.momentum_start, cfg.momentum, cfg.momentum_warmup_steps)}


def _build_adafactor(params, cfg: AdafactorConfig, device: str):
    return torch.optim.Adafactor(params, lr=cfg.lr, beta2_decay=cfg.beta2_decay, eps=tuple(cfg.eps), d=cfg.d,
                                 weight_decay=cfg.weight_decay, maximize=cfg.maximize)


@dataclass(frozen=True)
class OptimizerSpec:
    config: type  # dataclass of the config keys
    build: Callable  # (hidden params, config, device) -> torch.optim.Optimizer
    schedules: Callable = lambda cfg: {}  # config -> {param-group key: fn(step) -> value}
    package: tuple[str, str] | None = None  # (module, pip name) of an optional package it needs


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(AdamWConfig, _build_adamw),
    "mfsgd": OptimizerSpec(MoFaSGDConfig, _build_mofasgd, _mofasgd_schedules),
    "galore": OptimizerSpec(GaLoreConfig, _build_galore, package=("galore_torch", "galore-torch")),
    "muon": OptimizerSpec(MuonConfig, _build_muon, _muon_schedules),
    "adafactor": OptimizerSpec(AdafactorConfig, _build_adafactor),
}


def optimizer_config_class(name: str) -> type:
    return OPTIMIZERS[name].config


# ---------------------------------------------------------------------------------------------
# Parameter routing


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Splits the model's parameters into hidden / embed / head / scalar groups.

    hidden: 2-D (or higher) weights of modules other than embeddings and the head;
    embed: weights of nn.Embedding modules; head: the output layer `lm_head` unless tied to an
    embedding; scalar: every parameter with fewer than 2 dims. Tied parameters count once.
    Every parameter lands in exactly one group (asserted).
    """
    groups = {"hidden": [], "embed": [], "head": [], "scalar": []}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    seen = set()
    for name, p in model.named_parameters():  # named_parameters skips tied duplicates
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            kind = "scalar"
        elif id(p) in embedding_ids:
            kind = "embed"
        elif id(p) in head_ids:
            kind = "head"
        else:
            kind = "hidden"
        groups[kind].append((name, p))
        seen.add(id(p))
    routed = [id(p) for ps in groups.values() for _, p in ps]
    assert len(routed) == len(set(routed)), "a parameter was routed to two groups"
    assert set(routed) == {id(p) for p in model.parameters() if p.requires_grad}, "a parameter was not routed"
    return groups


def build_optimizers(model: nn.Module, name: str, cfg, adam_cfg, device: str = "cpu"):
    """The chosen optimizer on the hidden matrices, AdamW on the rest; returns (hidden_opt, adam_opt)."""
    groups = split_parameters(model)
    hidden = [p for _, p in groups["hidden"]]
    hidden_opt = OPTIMIZERS[name].build(hidden, cfg, device)
    adam_groups = [
        dict(params=[p for _, p in groups[kind]], lr=lr, kind=kind)
        for kind, lr in (("embed", adam_cfg.embed_lr), ("head", adam_cfg.head_lr), ("scalar", adam_cfg.scalar_lr))
        if groups[kind]
    ]
    adam_opt = torch.optim.AdamW(adam_groups, betas=tuple(adam_cfg.betas), eps=adam_cfg.eps,
                                 weight_decay=adam_cfg.weight_decay, fused=True)
    return hidden_opt, adam_opt


# ---------------------------------------------------------------------------------------------
# Schedules and the run's optimizers


def lr_multiplier(step: int, total: int, warmup: int, cooldown_frac: float) -> float:
    """Optional linear warmup, flat, then linear decay to 0 over the last cooldown_frac of steps
    (the paper harness's 'original' schedule)."""
    factor = 1.0
    if step < warmup:
        factor = (step + 1) / warmup
    if cooldown_frac > 0 and step >= total * (1 - cooldown_frac):
        # min: when the warmup reaches into the cooldown, the lr follows the lower of the two lines
        factor = min(factor, max(0.0, (total - step) / (total * cooldown_frac)))
    return factor


def apply_group_schedules(optimizer, schedules: dict, step: int) -> dict:
    """Writes scheduled hyperparameters (e.g. MoFaSGD's beta) into every param group."""
    values = {key: fn(step) for key, fn in schedules.items()}
    for group in optimizer.param_groups:
        group.update(values)
    return values


def full_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict() with every parameter's state: a sharded optimizer's is gathered
    to rank 0 (a collective, ShardedState.consolidated_state_dict), any other's is its own."""
    if isinstance(optimizer, ShardedState):
        return optimizer.consolidated_state_dict(dst=0)
    return optimizer.state_dict()


class RunOptimizers:
    """A run's optimizers: the chosen one on the hidden matrices, AdamW on the rest, their
    learning-rate schedules (LambdaLR) and the per-step hyperparameter schedules of the hidden
    optimizer (MoFaSGD's beta warmup, Muon's momentum warmup). What the training loop steps and a
    checkpoint saves."""

    def __init__(self, hidden, adam, lr_schedule: Callable[[int], float], group_schedules: dict | None = None):
        self.hidden, self.adam = hidden, adam
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule) for opt in (hidden, adam)]
        self.group_schedules = group_schedules or {}

    @classmethod
    def for_run(cls, model: nn.Module, cfg, device: str = "cpu") -> "RunOptimizers":
        """The optimizers of a RunConfig: routing, builders and schedules from its sections."""
        hidden, adam = build_optimizers(model, cfg.optimizer_name, cfg.optimizer, cfg.adam, device)
        steps, warmup, cooldown = cfg.train.steps, cfg.optimizer.lr_warmup_steps, cfg.optimizer.cooldown_frac
        return cls(hidden, adam, lambda step: lr_multiplier(step, steps, warmup, cooldown),
                   OPTIMIZERS[cfg.optimizer_name].schedules(cfg.optimizer))

    @property
    def lr(self) -> float:
        """The hidden optimizer's learning rate (the one metrics.jsonl logs)."""
        return self.hidden.param_groups[0]["lr"]

    @property
    def exchanged_bytes(self) -> int:
        """Bytes this rank contributed to the sharded hidden optimizer's exchange at the last step."""
        return self.hidden.exchanged_bytes if isinstance(self.hidden, ShardedState) else 0

    def apply_schedules(self, step: int) -> dict:
        """Writes step `step`'s scheduled hyperparameters into the hidden optimizer; returns them."""
        return apply_group_schedules(self.hidden, self.group_schedules, step)

    def step(self) -> None:
        """Both optimizers' steps, then the learning-rate schedules' (a collective when sharded)."""
        for opt in self.all:
            opt.step()
        for scheduler in self.schedulers:
            scheduler.step()

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    @property
    def all(self) -> list:
        """[hidden, adam]: what torch.distributed.checkpoint's get/set_state_dict take."""
        return [self.hidden, self.adam]

    def state_dict(self) -> dict:
        """{"optimizers": [hidden, adam], "schedulers": [...]} with every parameter's state on rank
        0 (a collective: every rank calls it)."""
        return {"optimizers": [full_state_dict(opt) for opt in self.all], "schedulers": self.scheduler_states()}

    def load_state_dict(self, state: dict) -> None:
        for opt, saved in zip(self.all, state["optimizers"]):
            opt.load_state_dict(saved)
        self.load_scheduler_states(state["schedulers"])

    def scheduler_states(self) -> list[dict]:
        return [s.state_dict() for s in self.schedulers]

    def load_scheduler_states(self, states: list[dict]) -> None:
        for scheduler, saved in zip(self.schedulers, states):
            scheduler.load_state_dict(saved)
