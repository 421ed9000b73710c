"""Sharded MoFaSGD (shard=True): each data-parallel rank runs the factor update only for the
matrices it owns, the step factors are all-gathered, and the parameters equal the unsharded path's."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import (end_spawned_rank, read_metrics, tiny_double_model, tiny_overrides, train_in_process,
                     write_run_config, write_tiny_corpus)
from optimizers import MoFaSGD, split_parameters
from optimizers.mofasgd import assign_owners
from optimizers.muon import ShardedMuon

STEPS = 6


def test_assign_owners_is_balanced_and_deterministic():
    sizes = [5, 9, 9, 1, 7, 3, 3, 8]
    owners = assign_owners(sizes, 3)
    assert owners == assign_owners(list(sizes), 3)
    loads = [sum(s for s, o in zip(sizes, owners) if o == k) for k in range(3)]
    assert sum(loads) == sum(sizes) and max(loads) - min(loads) <= max(sizes)
    assert owners[1] == 0 and owners[2] == 1  # largest first, ties to the lower index and rank
    assert assign_owners([4] * 8, 2).count(0) == 4  # equal shapes split evenly
    assert assign_owners([4, 4], 4) == [0, 1]  # more ranks than matrices: some own nothing


def train(opt_kwargs, shard, steps=STEPS, resume_at=None, all_reduce=False):
    """MoFaSGD on the hidden matrices of a tiny fp64 GPT; every rank sees the same batches, so the
    only difference between ranks and between sharded and unsharded runs is the optimizer's own
    work split. With resume_at, the optimizer is rebuilt from a consolidated state dict mid-run."""
    model = tiny_double_model()
    hidden = [p for _, p in split_parameters(model)["hidden"]]
    make = lambda: MoFaSGD(hidden, lr=0.05, rank=4, beta=0.9, eta1=0.25, max_value=5, shard=shard, **opt_kwargs)
    opt = make()
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == resume_at:
            saved = opt.consolidated_state_dict()
            opt = make()
            opt.load_state_dict(saved)
        x = torch.randint(0, 64, (4, 16), generator=gen)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        if all_reduce:  # comm="sketch" in the worker: sketch, then average the sketches
            opt.sketch_gradients_()
            opt.all_reduce_sketches()
        opt.step()
        opt.zero_grad()
    return model, opt


MUON = dict(lr=0.02, momentum=0.9, weight_decay=0.01, adjust_lr_fn="original")


def train_muon(make_optimizer, steps=STEPS, resume_at=None):
    """Muon on the hidden matrices of the tiny fp64 GPT, every rank seeing the same batches; with
    resume_at, the optimizer is rebuilt from its (consolidated) state dict mid-run."""
    model = tiny_double_model()
    hidden = [p for _, p in split_parameters(model)["hidden"]]
    opt = make_optimizer(hidden)
    gen = torch.Generator().manual_seed(2)
    for step in range(steps):
        if step == resume_at:
            saved = opt.consolidated_state_dict() if hasattr(opt, "consolidated_state_dict") else opt.state_dict()
            opt = make_optimizer(hidden)
            opt.load_state_dict(saved)
        x = torch.randint(0, 64, (4, 16), generator=gen)
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def train_sketch_comm(rank, overlap, shard, steps=4, accum=2):
    """memory_mode="sketch" with the sketches all-reduced over 2 ranks that see different data:
    after backward in one flat buffer, or per matrix while backward runs (overlap)."""
    model = tiny_double_model()
    hidden = [p for _, p in split_parameters(model)["hidden"]]
    opt = MoFaSGD(hidden, lr=0.05, rank=4, beta=0.9, eta1=0.25, max_value=5, memory_mode="sketch", shard=shard)
    gen = torch.Generator().manual_seed(100 + rank)
    launch_order = []
    for _ in range(steps):
        for micro in range(accum):
            x = torch.randint(0, 64, (4, 16), generator=gen)
            _, loss = model(x[:, :-1], x[:, 1:])
            if overlap and micro == accum - 1:
                opt.all_reduce_sketches_during_backward()
            (loss / accum).backward()
        if overlap:
            index = {id(p): i for i, p in enumerate(hidden)}
            launch_order.append([index[id(p)] for p, _, _ in opt._overlap["pending"]])
        if dist.is_initialized():
            opt.all_reduce_sketches()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()], launch_order


CASES = {
    "default": {},
    "zero-init": {"init": "zero"},
    "eta2-old-projection": {"eta2": 0.1, "use_current_projection": False},
    "nesterov": {"nesterov": True},
    "sketch-memory": {"memory_mode": "sketch"},
}


def shard_worker(rank, world, port, out_dir):
    """Every case on one pair of processes (process start-up dominates the time of these runs)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        runs = {case: (kwargs, None) for case, kwargs in CASES.items()} | {"resumed": ({}, 3)}
        for case, (kwargs, resume_at) in runs.items():
            model, opt = train(kwargs, shard=True, resume_at=resume_at, all_reduce=case == "sketch-memory")
            results[case] = {"params": [p.detach() for p in model.parameters()],
                             "owned": [i for i, p in enumerate(opt.param_groups[0]["params"]) if opt.state.get(p)],
                             "state_bytes": opt.state_bytes(), "exchanged_bytes": opt.exchanged_bytes,
                             "consolidated": opt.consolidated_state_dict()}
        for name, resume_at in (("muon", None), ("muon-resumed", 3)):
            model, opt = train_muon(lambda ps: ShardedMuon(ps, **MUON), resume_at=resume_at)
            results[name] = {"params": [p.detach() for p in model.parameters()], "exchanged_bytes": opt.exchanged_bytes,
                             "owned": [i for i, p in enumerate(opt.param_groups[0]["params"]) if opt.state.get(p)],
                             "consolidated": opt.consolidated_state_dict()}
        for name, overlap, shard in (("flat", False, False), ("overlap", True, False), ("overlap-shard", True, True)):
            params, order = train_sketch_comm(rank, overlap, shard)
            results[name] = {"params": params, "launch_order": order}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    end_spawned_rank()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Per rank of a 2-rank gloo group: the results of every case of CASES, and of "resumed"."""
    out = tmp_path_factory.mktemp("shard")
    world = 2
    mp.spawn(shard_worker, args=(world, free_port(), str(out)), nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_equals_unsharded(sharded_runs, case):
    ref_model, ref_opt = train(CASES[case], shard=False)
    ranks = [runs[case] for runs in sharded_runs]
    ref_params = [p.detach() for p in ref_model.parameters()]
    for r, out in enumerate(ranks):
        # every rank applies every step from the same all-gathered factors: replicas are identical
        for a, b in zip(out["params"], ranks[0]["params"]):
            assert torch.equal(a, b), f"rank {r} diverged from rank 0"
        for a, b in zip(out["params"], ref_params):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the consolidated checkpoint state equals the unsharded optimizer's state
    ref_state = ref_opt.state_dict()["state"]
    got_state = ranks[0]["consolidated"]["state"]
    assert sorted(got_state) == sorted(ref_state)
    for i in ref_state:
        for key in ("U", "S", "V", "step"):
            torch.testing.assert_close(got_state[i][key], ref_state[i][key], rtol=0, atol=1e-12)
    owned = [set(out["owned"]) for out in ranks]
    if case == "sketch-memory":  # sketching needs the factors on every rank
        assert owned[0] == owned[1] == set(ref_state)
    else:  # factor memory is split: each matrix on exactly one rank, about half the bytes each
        assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(ref_state)
        assert all(out["state_bytes"] <= 0.6 * ref_opt.state_bytes() for out in ranks)
    assert all(out["exchanged_bytes"] > 0 for out in ranks)


@pytest.mark.slow
def test_sharded_resume_from_consolidated_state(sharded_runs):
    ref_model, _ = train({}, shard=False)
    for a, b in zip(sharded_runs[0]["resumed"]["params"], ref_model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_sketch_all_reduce_during_backward_equals_after(sharded_runs):
    """Sketch all-reduces launched from the backward hooks give the parameters of the one flat
    all-reduce after backward (2 ranks with different data), also combined with shard=True."""
    flat = sharded_runs[0]["flat"]["params"]
    for name in ("overlap", "overlap-shard"):
        for runs in sharded_runs:
            for a, b in zip(runs[name]["params"], flat):
                assert torch.equal(a, b), name
    # launched during backward, in the fixed order (reverse parameter order) on every rank
    orders = [runs["overlap"]["launch_order"] for runs in sharded_runs]
    assert orders[0] == orders[1]
    assert all(order == sorted(order, reverse=True) and len(order) == 8 for order in orders[0])
    # the two ranks' data differ, so the all-reduce mattered: one rank alone ends elsewhere
    alone = train_sketch_comm(0, overlap=False, shard=False)[0]
    assert any(not torch.equal(a, b) for a, b in zip(flat, alone))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["muon", "muon-resumed"])
def test_sharded_muon_equals_torch_muon(sharded_runs, case):
    """Each of 2 gloo ranks orthogonalises its share of the matrices: the parameters equal
    torch.optim.Muon's on one process bit for bit, on both ranks, also after a resume from the
    consolidated state; the momentum buffers are split between the ranks."""
    ref_model, ref_opt = train_muon(lambda ps: torch.optim.Muon(ps, **MUON))
    ranks = [runs[case] for runs in sharded_runs]
    for out in ranks:
        for a, b in zip(out["params"], ref_model.parameters()):
            assert torch.equal(a, b.detach())
        assert out["exchanged_bytes"] > 0
    owned = [set(out["owned"]) for out in ranks]
    ref_state = ref_opt.state_dict()["state"]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(ref_state) and all(owned)
    got = ranks[0]["consolidated"]["state"]
    assert sorted(got) == sorted(ref_state)
    for i in ref_state:
        assert torch.equal(got[i]["momentum_buffer"], ref_state[i]["momentum_buffer"])


def test_sharded_muon_without_process_group_is_torch_muon():
    a, _ = train_muon(lambda ps: torch.optim.Muon(ps, **MUON), steps=3)
    b, opt = train_muon(lambda ps: ShardedMuon(ps, **MUON), steps=3)
    assert opt.exchanged_bytes == 0 and opt.consolidated_state_dict().keys() == opt.state_dict().keys()
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_shard_without_process_group_is_plain_mofasgd():
    a, _ = train({}, shard=False, steps=3)
    b, opt = train({}, shard=True, steps=3)
    assert opt.exchanged_bytes == 0
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.mark.slow
def test_worker_shard_matches_unsharded_with_two_ranks(tmp_path, corpus):
    """The worker on 2 gloo ranks: shard=true gives the unsharded run's losses and halves the
    hidden optimizer state per rank; composes with comm sketch. (test_resume launches shard runs
    through run.py.)"""
    cases = {"plain": {}, "shard": {"shard": True}, "shard-sketch": {"shard": True, "comm": "sketch"}}
    dirs = {name: write_run_config(tmp_path, name, "mfsgd", tiny_overrides(corpus, steps=4, micro_batch_size=4,
                                                                           rank=4, **extra), 2)
            for name, extra in cases.items()}
    train_in_process(list(dirs.values()), 2)
    runs = {name: [r for r in read_metrics(d) if "train_loss" in r] for name, d in dirs.items()}
    assert all(len(r) == 4 for r in runs.values())
    plain, shard, sketch = runs["plain"], runs["shard"], runs["shard-sketch"]
    for a, b, c in zip(plain, shard, sketch):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["train_loss"] == pytest.approx(c["train_loss"], rel=1e-5)
    assert shard[0]["opt_state_bytes_hidden"] < 0.6 * plain[0]["opt_state_bytes_hidden"]
    assert shard[0]["comm_bytes_hidden"] > plain[0]["comm_bytes_hidden"]  # gradients + step factors
    assert sketch[0]["comm_bytes_hidden"] < plain[0]["comm_bytes_hidden"]
