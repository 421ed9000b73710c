"""Small-sample statistics for comparing runs over seeds: mean, sample standard deviation, the
t-based 95% confidence interval of a mean, and paired differences.

Student's t quantiles come from a table (df 1..30, exact to 9 digits) and, above 30 degrees of
freedom, Hill's (1970) expansion around the normal quantile (error below 1e-6 there), so nothing
beyond the standard library is needed.
"""

import math
from dataclasses import dataclass

# t_{0.975, df}: the two-sided 95% quantile of Student's t for df = 1..30
T975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252, 2.306004135,
        2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688, 2.131449546, 2.119905299,
        2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
        2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456)
Z975 = 1.959963984540054  # the normal 0.975 quantile


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z, v = Z975, float(df)  # Hill's expansion (Abramowitz & Stegun 26.7.5)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


@dataclass(frozen=True)
class Estimate:
    """The mean of n values with its sample standard deviation and t-based 95% CI (std and CI are
    None for n < 2: one value says nothing about the spread)."""

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None

    @property
    def ci_half_width(self) -> float | None:
        return None if self.ci_high is None else (self.ci_high - self.ci_low) / 2


def estimate(values: list[float]) -> Estimate:
    """Mean, sample standard deviation (n - 1) and the 95% CI mean +- t_{0.975, n-1} std / sqrt(n)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to estimate from")
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(n, mean, None, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return Estimate(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class PairedDifference:
    """A candidate minus a baseline, paired by seed: the estimate of the mean difference and how
    many pairs the candidate was lower (better, for a loss), higher or equal in."""

    diff: Estimate
    lower: int
    higher: int
    ties: int
    seeds: tuple


def paired_difference(candidate: dict, baseline: dict) -> PairedDifference | None:
    """`candidate` and `baseline` map seed -> value; pairs are the seeds both have (a seed fixes the
    init and the data order, so a pair differs only in what is compared). None without a pair."""
    seeds = tuple(sorted(set(candidate) & set(baseline)))
    if not seeds:
        return None
    diffs = [candidate[s] - baseline[s] for s in seeds]
    return PairedDifference(estimate(diffs), sum(d < 0 for d in diffs), sum(d > 0 for d in diffs),
                            sum(d == 0 for d in diffs), seeds)
