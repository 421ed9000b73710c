"""Adaptive rank for MoFaSGD (rank_policy="energy"): how a fixed budget of factor numbers is shared
among the matrices. Pure functions; MoFaSGD.step calls them every `rank_every` steps.

A rank-r factorisation of an m x n momentum holds (m + n) r + r numbers (U, V and S). The budget
bounds their sum over all matrices at every step. At a re-allocation step each matrix's factor
update is computed untruncated (mofasgd.factors.expanded_momentum_factors): beta M + G_hat has
rank <= 2r, so its singular values s_1 >= ... >= s_2r are all of its energy, and a rank r'
truncation keeps the share  sum_{j <= r'} s_j^2 / sum_j s_j^2  of it (the truncation energy).

The rule (docs/optimizers.md, "Adaptive rank"): choose the ranks r'_i maximising the sum over
matrices of the kept shares, subject to  sum_i (m_i + n_i + 1) r'_i <= budget  and
min_rank <= r'_i <= min(max_rank, m_i, n_i, 2 r_i). Each matrix counts equally (shares, not raw
energies): MoFaSGD's step scales every kept direction to about unit size (d_i = 1 / S_i), so a
matrix's gradient scale says nothing about how much its directions are worth. The shares of one
matrix decrease along j, so the greedy choice of the direction with the largest share per number,
until none fits, solves the continuous relaxation exactly and the integer problem to within one
direction per matrix. 2 r_i bounds growth: the expansion holds no information beyond it, so a
rank at most doubles per interval.
"""

from __future__ import annotations

import heapq

import torch


def factor_numbers(m: int, n: int, rank: int) -> int:
    """Numbers held by a rank-r factorisation of an m x n momentum: U (m r), V (n r), S (r)."""
    return (m + n + 1) * rank


def uniform_budget(shapes, rank: int) -> int:
    """The factor numbers of every matrix at rank min(rank, m, n): rank_budget's default, so the
    energy policy at rank R holds no more memory than the fixed policy at rank R."""
    return sum(factor_numbers(m, n, min(rank, m, n)) for m, n in shapes)


def rank_bounds(m: int, n: int, min_rank: int, max_rank: int | None, available: int) -> tuple[int, int]:
    """(lowest, highest) rank a matrix may get at a re-allocation: at least min_rank (capped by
    min(m, n)), at most max_rank, min(m, n) and the `available` directions of its expansion."""
    high = min(m, n, available, max_rank if max_rank else available)
    return min(min_rank, m, n, high), high


def allocate_ranks(energies, shapes, budget: int, min_rank: int, max_rank: int | None = None) -> list[int]:
    """New ranks for matrices whose expansions have squared singular values `energies[i]` (1-D,
    descending; its length is the most directions matrix i can keep), under `budget` numbers.

    Greedy by kept share per number (module docstring). Ties go to the earlier matrix, so every
    data-parallel replica allocates the same ranks. Directions holding no energy are never added.
    Raises ValueError when even the lowest ranks exceed the budget."""
    ranks, costs, shares = [], [], []
    for e, (m, n) in zip(energies, shapes):
        e = torch.as_tensor(e, dtype=torch.float64).cpu()
        low, _ = rank_bounds(m, n, min_rank, max_rank, len(e))
        total = float(e.sum())
        shares.append((e / total).tolist() if total > 0 else [0.0] * len(e))
        ranks.append(low)
        costs.append(m + n + 1)
    used = sum(c * r for c, r in zip(costs, ranks))
    if used > budget:
        raise ValueError(f"MoFaSGD: rank_budget {budget} numbers is below the {used} that min_rank {min_rank} "
                         "needs for these matrices; lower min_rank or raise rank_budget")
    left = budget - used
    # (-share per number of the next direction, matrix index): heapq pops the best, earlier on ties
    heap = []
    for i, (m, n) in enumerate(shapes):
        _, high = rank_bounds(m, n, min_rank, max_rank, len(shares[i]))
        if ranks[i] < high and shares[i][ranks[i]] > 0:
            heap.append((-shares[i][ranks[i]] / costs[i], i, high))
    heapq.heapify(heap)
    while heap:
        _, i, high = heapq.heappop(heap)
        if costs[i] > left:
            continue  # this matrix's next direction no longer fits; nor will any later one of it
        ranks[i] += 1
        left -= costs[i]
        if ranks[i] < high and shares[i][ranks[i]] > 0:
            heapq.heappush(heap, (-shares[i][ranks[i]] / costs[i], i, high))
    return ranks


def kept_share(energies, rank: int) -> float:
    """The share of a matrix's expansion energy its first `rank` directions keep (1 if it has none)."""
    e = torch.as_tensor(energies, dtype=torch.float64).cpu()
    total = float(e.sum())
    return float(e[:rank].sum()) / total if total > 0 else 1.0
