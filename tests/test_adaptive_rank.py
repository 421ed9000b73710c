"""MoFaSGD's rank_policy "energy" (mofasgd/rank_policy.py, docs/optimizers.md "Adaptive rank"):
the allocation rule against exhaustive search, the budget at every step, the state at a
re-allocation against the dense fp64 truncation of beta M + G_hat, the fixed policy untouched,
checkpoints, sketch mode, the harness's refusals, logs and replica check, and the planner."""

import itertools
import json
import os
import random

import pytest
import torch

from mofasgd import MoFaSGD
from mofasgd.factors import expanded_momentum_factors, gradient_sketches
from mofasgd.rank_policy import allocate_ranks, factor_numbers, kept_share, uniform_budget

from helpers import end_spawned_rank, tiny_overrides, train_in_process, write_run_config, write_tiny_corpus

SHAPES = [(24, 16), (16, 40), (24, 16), (32, 32)]
GRADIENT_RANKS = [1, 2, 12, 16]  # what each matrix's gradients span: the ranks worth keeping differ


def value(energies, ranks):
    return sum(kept_share(e, r) for e, r in zip(energies, ranks))


def random_case(rng: random.Random, most_directions=12):
    shapes = [(rng.randint(2, 12), rng.randint(2, 12)) for _ in range(rng.randint(1, 4))]
    energies = []
    for m, n in shapes:
        k = rng.randint(1, min(m, n, most_directions))  # available directions
        e = sorted((rng.random() ** 3 for _ in range(k)), reverse=True)
        energies.append(torch.tensor(e, dtype=torch.float64) * rng.uniform(0.01, 100))
    return shapes, energies


# --------------------------------------------------------------------------------------------
# The rule alone


def test_allocation_keeps_the_budget_and_the_bounds():
    rng = random.Random(0)
    for _ in range(300):
        shapes, energies = random_case(rng)
        min_rank = 1
        max_rank = rng.choice([None, 2, 5])
        budget = sum(factor_numbers(m, n, 1) for m, n in shapes) + rng.randint(0, 200)
        ranks = allocate_ranks(energies, shapes, budget, min_rank, max_rank)
        assert sum(factor_numbers(m, n, r) for (m, n), r in zip(shapes, ranks)) <= budget
        for (m, n), e, r in zip(shapes, energies, ranks):
            assert 1 <= r <= min(m, n, len(e), max_rank or len(e))


def test_allocation_equals_exhaustive_search_for_equal_costs_and_is_within_one_direction_otherwise():
    """Equal costs: the greedy choice is the optimum. Any costs: it is within the largest share of
    one direction per matrix of the optimum (the rule's stated guarantee), and never above it."""
    rng = random.Random(1)
    for trial in range(150):
        shapes, energies = random_case(rng, most_directions=6)  # small enough to search exhaustively
        if trial % 2 == 0:  # equal costs: every matrix the same shape
            shapes = [shapes[0]] * len(shapes)
            energies = [e[: min(shapes[0])] for e in energies]
        budget = sum(factor_numbers(m, n, 1) for m, n in shapes) + rng.randint(0, 120)
        greedy = allocate_ranks(energies, shapes, budget, 1)
        best = max(
            (value(energies, ranks) for ranks in itertools.product(*[range(1, len(e) + 1) for e in energies])
             if sum(factor_numbers(m, n, r) for (m, n), r in zip(shapes, ranks)) <= budget),
        )
        got = value(energies, greedy)
        assert got <= best + 1e-12
        if trial % 2 == 0:
            assert got == pytest.approx(best, abs=1e-12), (shapes, budget, greedy)
        else:
            slack = sum(float(e.max() / e.sum()) for e in energies)
            assert got >= best - slack


def test_allocation_adds_no_empty_direction_and_refuses_an_impossible_budget():
    shapes = [(8, 8), (8, 8)]
    energies = [torch.tensor([1.0, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.0, 0.0])]
    assert allocate_ranks(energies, shapes, 10_000, 1) == [2, 1]  # room to spare, nothing to keep
    with pytest.raises(ValueError, match="rank_budget 20 numbers is below the 34 that min_rank 1 needs"):
        allocate_ranks(energies, shapes, 20, 1)


@pytest.mark.parametrize("momentum", ["sum", "ema"])
def test_expansion_is_all_of_beta_m_plus_the_tangent_projection(momentum):
    g = torch.Generator().manual_seed(3)
    m, n, r, beta = 30, 20, 4, 0.9
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    S = torch.rand(r, generator=g, dtype=torch.float64) + 0.5
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    U2, S2, V2 = expanded_momentum_factors(U, S, V, *gradient_sketches(G, U, V), beta, momentum)
    P_u, P_v = U @ U.T, V @ V.T
    tangent = P_u @ G + G @ P_v - P_u @ G @ P_v
    dense = beta * (U * S) @ V.T + (tangent if momentum == "sum" else (1 - beta) * tangent)
    assert U2.shape == (m, 2 * r) and S2.shape == (2 * r,)
    assert torch.allclose((U2 * S2) @ V2.T, dense, atol=1e-12)
    assert torch.allclose(U2.T @ U2, torch.eye(2 * r, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(V2.T @ V2, torch.eye(2 * r, dtype=torch.float64), atol=1e-12)
    assert torch.all(S2[:-1] >= S2[1:])
    assert torch.allclose(S2, torch.linalg.svdvals(dense)[: 2 * r], atol=1e-12)


# --------------------------------------------------------------------------------------------
# The optimizer


def make_params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(m, n, generator=g, dtype=dtype)) for m, n in SHAPES]


def set_gradients(params, step, fixed_directions=True):
    """Gradients spanning GRADIENT_RANKS[i] fixed directions (random weights per step), so the rank
    each momentum needs differs between the matrices."""
    for i, p in enumerate(params):
        m, n = p.shape
        k = GRADIENT_RANKS[i]
        g = torch.Generator().manual_seed(i if fixed_directions else 1000 * step + i)
        A, B = torch.randn(m, k, generator=g, dtype=p.dtype), torch.randn(k, n, generator=g, dtype=p.dtype)
        weights = torch.rand(k, generator=torch.Generator().manual_seed(7 * step + i), dtype=p.dtype) + 0.5
        p.grad = (A * weights) @ B


def test_a_reallocation_step_stores_the_dense_truncation_and_ranks_change():
    params = make_params()
    beta = 0.9
    opt = MoFaSGD(params, rank=4, beta=beta, lr=0.01, init="zero", rank_policy="energy", rank_every=3)
    seen = set()
    for step in range(9):
        set_gradients(params, step)
        before = [{k: v.clone() for k, v in opt.state[p].items()} if opt.state.get(p) else None for p in params]
        opt.step()
        seen.add(tuple(opt.ranks()))
        for p, b in zip(params, before):
            if b is None:
                continue
            U, S, V, G = b["U"], b["S"], b["V"], p.grad
            P_u, P_v = U @ U.T, V @ V.T
            dense = beta * (U * S) @ V.T + P_u @ G + G @ P_v - P_u @ G @ P_v
            r = opt.state[p]["U"].shape[1]
            u, s, vh = torch.linalg.svd(dense)
            truncation = (u[:, :r] * s[:r]) @ vh[:r]
            got = (opt.state[p]["U"] * opt.state[p]["S"]) @ opt.state[p]["V"].T
            assert (got - truncation).norm() <= 1e-10 * truncation.norm(), step
        assert opt.factor_numbers_held() <= opt.rank_budget_numbers()
    assert len(seen) > 1, "the test needs the ranks to change"
    assert opt.last_allocation["step"] == 9 and sum(r is not None for r in opt.last_allocation["kept_share"]) == 4


@pytest.mark.parametrize("budget, min_rank, max_rank", [(None, 1, None), (1500, 2, 7), (700, 1, 5)])
def test_the_budget_holds_at_every_step(budget, min_rank, max_rank):
    params = make_params(torch.float32, seed=1)
    opt = MoFaSGD(params, rank=3, init="zero", rank_policy="energy", rank_every=2, rank_budget=budget,
                  min_rank=min_rank, max_rank=max_rank)
    limit = budget or uniform_budget(SHAPES, 3)
    assert opt.rank_budget_numbers() == limit
    ranks_seen = set()
    for step in range(12):
        set_gradients(params, step, fixed_directions=step % 3 != 0)
        opt.step()
        held = sum(factor_numbers(m, n, r) for (m, n), r in zip(SHAPES, opt.ranks()))
        assert held == opt.factor_numbers_held() <= limit
        assert all(min_rank <= r <= (max_rank or 99) for r in opt.ranks())
        ranks_seen.add(tuple(opt.ranks()))
    assert len(ranks_seen) > 1


def test_between_reallocations_the_step_is_the_fixed_policys_bit_for_bit():
    a, b = make_params(torch.float32), make_params(torch.float32)
    fixed = MoFaSGD(a, rank=4, lr=0.02)
    energy = MoFaSGD(b, rank=4, lr=0.02, rank_policy="energy", rank_every=1000)
    for step in range(6):
        set_gradients(a, step, fixed_directions=False)
        set_gradients(b, step, fixed_directions=False)
        fixed.step()
        energy.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert all(torch.equal(fixed.state[p][k], energy.state[q][k]) for k in "USV")


def test_checkpoint_holds_the_ranks_and_resumes_bit_exact():
    params = make_params(torch.float32)
    opt = MoFaSGD(params, rank=4, lr=0.02, init="zero", rank_policy="energy", rank_every=3)
    for step in range(7):
        set_gradients(params, step)
        opt.step()
    assert opt.ranks() != [4, 4, 4, 4]
    saved = torch.nn.ParameterList([torch.nn.Parameter(p.detach().clone()) for p in params])
    copy = MoFaSGD(list(saved), rank=4, lr=0.02, init="zero", rank_policy="energy", rank_every=3)
    copy.load_state_dict(opt.state_dict())
    assert copy.ranks() == opt.ranks()
    for step in range(7, 13):
        set_gradients(params, step)
        set_gradients(saved, step)
        opt.step()
        copy.step()
    assert copy.ranks() == opt.ranks()
    assert all(torch.equal(p, q) for p, q in zip(params, saved))


def test_load_state_dict_refuses_ranks_outside_the_policy():
    params = make_params(torch.float32)
    wide = MoFaSGD(params, rank=8)
    set_gradients(params, 0)
    wide.step()
    over_budget = MoFaSGD(make_params(torch.float32), rank=4, rank_policy="energy")
    with pytest.raises(ValueError, match="hold 1632 numbers, over this optimizer's rank_budget of 816"):
        over_budget.load_state_dict(wide.state_dict())
    capped = MoFaSGD(make_params(torch.float32), rank=4, rank_policy="energy", max_rank=6, rank_budget=5000)
    with pytest.raises(ValueError, match=r"U of .* has rank 8, outside \[1, 6\]"):
        capped.load_state_dict(wide.state_dict())


def test_constructor_refusals_are_one_line():
    p = [torch.nn.Parameter(torch.zeros(8, 8))]
    for kwargs, needle in [
        (dict(rank_budget=100), "rank_budget applies only with rank_policy 'energy'"),
        (dict(min_rank=2, rank_every=5), "min_rank, rank_every apply only with rank_policy 'energy'"),
        (dict(rank_policy="energy", shard=True), "rank_policy='energy' needs shard=False"),
        (dict(rank_policy="energy", rank=4, rank_budget=10), "rank_budget 10 numbers is below the 68 the starting rank"),
        (dict(rank_policy="energy", min_rank=3, max_rank=2), r"max_rank \(2\) must be >= min_rank \(3\)"),
        (dict(rank_policy="adaptive"), "rank_policy must be one of"),
    ]:
        with pytest.raises(ValueError, match=needle) as info:
            MoFaSGD(p, **kwargs)
        assert "\n" not in str(info.value)


def test_sketch_memory_mode_reallocates_as_the_full_gradient_does():
    a, b = make_params(), make_params()
    full = MoFaSGD(a, rank=3, rank_policy="energy", rank_every=2)
    sketch = MoFaSGD(b, rank=3, rank_policy="energy", rank_every=2, memory_mode="sketch")
    for step in range(6):
        set_gradients(a, step)
        full.step()
        for i, q in enumerate(b):  # the gradients arrive through backward, where the hook folds them
            G = a[i].grad.detach()
            (q * G).sum().backward()
        sketch.step()
        sketch.zero_grad()
        assert sketch.ranks() == full.ranks()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-10)


def test_nesterov_and_the_complement_term_run_under_the_policy():
    params = make_params()
    opt = MoFaSGD(params, rank=3, rank_policy="energy", rank_every=2, nesterov=True, eta2=0.1,
                  use_current_projection=False, check_orthonormal=1e-8)
    for step in range(6):
        set_gradients(params, step)
        opt.step()
        assert opt.factor_numbers_held() <= opt.rank_budget_numbers()
    assert all(torch.isfinite(p).all() for p in params)


# --------------------------------------------------------------------------------------------
# The harness


def test_config_refusals_name_the_key():
    from configs import ConfigError, resolve_config

    for overrides, needle in [
        ({"rank_policy": "energy", "train": {"parallel": "fsdp"}}, "optimizer.rank_policy must be fixed under train.parallel fsdp"),
        ({"rank_policy": "energy", "shard": True}, "optimizer.shard must be false with optimizer.rank_policy energy"),
        ({"rank_every": 10}, "optimizer.rank_every applies only with optimizer.rank_policy 'energy'"),
        ({"rank_policy": "energy", "min_rank": 0}, "optimizer.min_rank must be an int >= 1"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            resolve_config("mfsgd", overrides)


def test_the_planner_counts_the_budget():
    import scripts.plan_memory as pm

    model = {"model": {"preset": "cpu-tiny"}}

    fixed = plan_json(pm, {**model, "rank": 8})
    energy = plan_json(pm, {**model, "rank": 8, "rank_policy": "energy"})
    assert energy["opt_state_bytes_hidden"] == fixed["opt_state_bytes_hidden"]
    assert energy["rank_budget_numbers"] == uniform_budget([(64, 192), (64, 64), (64, 256), (256, 64)] * 2, 8)
    explicit = plan_json(pm, {**model, "rank": 8, "rank_policy": "energy", "rank_budget": 50_000})
    assert explicit["opt_state_bytes_hidden"] == 50_000 * 4 + 4 * 8


def plan_json(pm, config):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert pm.main(["--config", json.dumps(config), "--optimizer", "mfsgd", "--json"]) == 0  # cuda: no process to measure
    data = json.loads(out.getvalue())
    return data["plan"] if "plan" in data else data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


def test_a_run_logs_its_allocations(tmp_path, corpus):
    overrides = tiny_overrides(corpus, steps=6, rank=4, rank_policy="energy", rank_every=2)
    run = write_run_config(tmp_path, "energy", "mfsgd", overrides)
    train_in_process([run], 1)
    lines = [json.loads(line) for line in open(os.path.join(run, "ranks.jsonl"))]
    assert [line["step"] for line in lines] == [0, 2, 4, 6]
    names = set(lines[0]["ranks"])
    assert len(names) == 8 and all(name.endswith(".weight") and ".h." in name for name in names)
    assert all(line["held"] <= line["budget"] for line in lines) and lines[0]["held"] == lines[0]["budget"]
    assert all(0 < share <= 1 for line in lines[1:] for share in line["kept_share"].values())
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert all(m["factor_numbers"] <= lines[0]["budget"] for m in metrics if "factor_numbers" in m)
    # the allocation figure and table (scripts/spectrum.py), from ranks.jsonl alone
    from scripts import spectrum as report

    out = tmp_path / "report"
    assert report.main([run, "--out", str(out)]) == 0
    assert (out / "allocation.png").stat().st_size > 0 and not (out / "energy.png").exists()
    table = (out / "spectrum.md").read_text()
    assert "## Rank allocation (rank_policy energy)" in table and "| energy | 6 | mlp in | 2 |" in table


def _disagreeing_replica(rank, world, port):
    from types import SimpleNamespace

    import torch.distributed as dist

    import train_gpt
    from worker.outcome import RunFailed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for ranks, should_fail in (([4, 4], False), ([4, 4 + rank], True)):
            hidden = SimpleNamespace(last_allocation={"step": 5, "ranks": ranks})
            run = SimpleNamespace(world_size=world, device=torch.device("cpu"),
                                  optimizers=SimpleNamespace(hidden=hidden))
            try:
                train_gpt.check_replicas_allocate_alike(run, 4)
                assert not should_fail, f"rank {rank}: disagreeing replicas passed"
            except RunFailed as e:
                assert should_fail and "re-allocated MoFaSGD's ranks differently at step 5" in str(e)
    finally:
        dist.destroy_process_group()
    end_spawned_rank()


def test_replicas_that_allocate_differently_fail_on_every_rank():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_disagreeing_replica, args=(2, port), nprocs=2, start_method="spawn")
