"""MoFaSGD for the harness: the optimizer of the installable package `mofasgd` (mofasgd/optimizer.py
and mofasgd/factors.py, the one source), re-exported so `from optimizers.mofasgd import ...` keeps
working."""

from mofasgd import factors as _factors
from mofasgd import optimizer as _impl
from mofasgd.optimizer import *  # noqa: F401,F403
from mofasgd.optimizer import __all__  # noqa: F401


def __getattr__(name):  # the implementation's private helpers (tests, benchmarks)
    return getattr(_impl, name) if hasattr(_impl, name) else getattr(_factors, name)
