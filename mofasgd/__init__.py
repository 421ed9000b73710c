"""MoFaSGD: Momentum Factorized SGD (Mahdavinia & Mahdavi, TMLR 2025, arXiv 2507.08091).

    from mofasgd import MoFaSGD, BetaWarmup
    opt = MoFaSGD([p for p in model.parameters() if p.ndim == 2])   # the paper's NanoGPT values
    beta = BetaWarmup(opt)                                           # 0.65 -> 0.85 over 300 steps

Needs only torch. The algorithm and implementation notes: mofasgd/optimizer.py.
"""

from mofasgd import optimizer
from mofasgd.optimizer import (
    MoFaSGD,
    ShardedState,
    assign_owners,
    gradient_sketches,
    orthogonal_complement_term,
    spectral_scales,
    state_bytes,
    tangent_projection,
    update_momentum_factors,
)
from mofasgd.schedule import BetaWarmup, linear_warmup

__version__ = "0.1.0"

__all__ = [*optimizer.__all__, "BetaWarmup", "linear_warmup"]
