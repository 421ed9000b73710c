"""The rules MoFaSGD's hyperparameters obey, stated once.

MoFaSGD's constructor and BetaWarmup check them, and so does the mofa harness's config validation
(optimizers.MoFaSGDConfig); each names the value its own way: `lr must be a number > 0, got 0.0`
from the constructor, `optimizer.lr must be > 0, got 0.0` from a run's config. The choices are
typing.Literal types, so the harness's config schema enforces the very same sets.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

Init = Literal["weight_svd", "zero"]  # weight_svd: factors from the weight's top-r SVD (official); zero: M_0 = 0
Momentum = Literal["sum", "ema"]  # sum: M <- beta M + G_hat (official); ema: M <- beta M + (1 - beta) G_hat
MemoryMode = Literal["full", "sketch"]  # sketch: each hidden gradient folded into its sketches in backward
RankPolicy = Literal["fixed", "energy"]  # fixed: every matrix at `rank`; energy: ranks re-allocated under a budget

# name -> (the condition, as errors say it; whether a value meets it). Numbers only: the type
# checks (a bool is no number) come first, in each layer.
RULES = {
    "lr": ("> 0", lambda v: v > 0),
    "rank": (">= 1", lambda v: v >= 1),
    "beta": ("in [0, 1)", lambda v: 0 <= v < 1),  # also BetaWarmup's start and end
    "eta1": (">= 0 (a weight of the step)", lambda v: v >= 0),
    "eta2": (">= 0 (a weight of the step)", lambda v: v >= 0),
    "eps": (">= 0", lambda v: v >= 0),
    "max_value": ("> 0", lambda v: v > 0),
    "warmup_steps": (">= 0", lambda v: v >= 0),
    "check_orthonormal": (">= 0 (0: off)", lambda v: v >= 0),
    # rank_policy "energy" (mofasgd/rank_policy.py)
    "rank_budget": (">= 1 (factor numbers; unset: the memory of uniform `rank`)", lambda v: v >= 1),
    "min_rank": (">= 1", lambda v: v >= 1),
    "max_rank": (">= 1 (unset: no bound but min(m, n))", lambda v: v >= 1),
    "rank_every": (">= 1 (steps between re-allocations)", lambda v: v >= 1),
}
INTEGERS = ("rank", "warmup_steps", "rank_budget", "min_rank", "max_rank", "rank_every")
# The keys that only rank_policy "energy" reads, and their values when unset.
ENERGY_KEYS = ("rank_budget", "min_rank", "max_rank", "rank_every")
ENERGY_DEFAULTS = {"rank_budget": None, "min_rank": 1, "max_rank": None, "rank_every": 100}


def broken_rule(name: str, value) -> str | None:
    """The condition `value` fails as MoFaSGD's `name` (e.g. "> 0"), or None when it meets it."""
    condition, holds = RULES[name]
    return None if holds(value) else condition


def check(name: str, value, label: str | None = None) -> None:
    """Raises ValueError unless `value` is a finite number (an int for rank and warmup_steps) that
    meets the rule of `name`; the message calls it `label` (default: `name`)."""
    if name in INTEGERS:
        kind, typed = "an int", isinstance(value, int) and not isinstance(value, bool)
    else:
        kind = "a number"
        typed = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if isinstance(value, float) and not math.isfinite(value):
            kind = "a finite number"
    if not typed or broken_rule(name, value):
        raise ValueError(f"{label or name} must be {kind} {RULES[name][0]}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """Raises ValueError unless `value` is one of the Literal type `choices`."""
    if value not in get_args(choices):
        raise ValueError(f"{name} must be one of {get_args(choices)}, got {value!r}")


def check_rank_policy(rank_policy, settings: dict, label=lambda key: key) -> dict:
    """Checks rank_policy and its keys (`settings`: ENERGY_KEYS -> value or None when unset) and
    returns them resolved (ENERGY_DEFAULTS for the unset ones). The keys are refused with "fixed":
    a budget that nothing reads is a mistake, not a setting."""
    check_choice(label("rank_policy"), rank_policy, RankPolicy)
    given = [key for key in ENERGY_KEYS if settings.get(key) is not None]
    if rank_policy == "fixed":
        if given:
            raise ValueError(f"{', '.join(label(k) for k in given)} {'applies' if len(given) == 1 else 'apply'} only "
                             f"with {label('rank_policy')} 'energy' "
                             f"(got 'fixed', where every matrix keeps `rank`)")
        return {}
    resolved = {key: settings[key] if settings.get(key) is not None else ENERGY_DEFAULTS[key] for key in ENERGY_KEYS}
    for key, value in resolved.items():
        if value is not None:
            check(key, value, label(key))
    if resolved["max_rank"] is not None and resolved["max_rank"] < resolved["min_rank"]:
        raise ValueError(f"{label('max_rank')} ({resolved['max_rank']}) must be >= {label('min_rank')} "
                         f"({resolved['min_rank']})")
    return resolved


def needs_full_gradient(eta2: float, nesterov: bool) -> bool:
    """Whether a step reads the full m x n gradient: the eta2 term (I - P_U) G (I - P_V), or
    nesterov's second factor update against G. Sketch mode never holds that gradient."""
    return eta2 != 0 or bool(nesterov)
