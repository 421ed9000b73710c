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
}
INTEGERS = ("rank", "warmup_steps")


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


def needs_full_gradient(eta2: float, nesterov: bool) -> bool:
    """Whether a step reads the full m x n gradient: the eta2 term (I - P_U) G (I - P_V), or
    nesterov's second factor update against G. Sketch mode never holds that gradient."""
    return eta2 != 0 or bool(nesterov)
