"""MoFaSGD on FSDP2's row-sharded weights (mofasgd.row_sharded) equals the unsharded optimizer:
2 gloo ranks, a fp64 GPT wrapped per block with fully_shard, against one process on the whole batch."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from helpers import tiny_double_model
from optimizers import MoFaSGD, split_parameters

STEPS, ACCUM, ROWS = 3, 2, 4  # ROWS sequences per micro-batch in all, split over the ranks

CASES = {
    "zero init, ema, eta2 with the old projection": dict(rank=4, init="zero", momentum="ema", eta2=0.3,
                                                         use_current_projection=False),
    "weight_svd init, nesterov, eta2 with the current projection": dict(rank=4, nesterov=True, eta2=0.2),
    "rank 12: m < 2r, the gathered thin Householder form": dict(rank=12),
}
HYPER = dict(lr=0.05, beta=0.9, eta1=0.25, max_value=5.0)


def batches(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 64, (ROWS, 17), generator=gen) for _ in range(ACCUM)] for _ in range(STEPS)]


def train(model, hidden, others, keys, rows):
    """STEPS steps of ACCUM micro-batches; `rows` picks this process's sequences."""
    opt = MoFaSGD(hidden, **HYPER, **keys)
    other = torch.optim.SGD(others, lr=0.1)
    for step_batches in batches():
        for x in step_batches:
            x = x[rows]
            _, loss = model(x[:, :-1], x[:, 1:])
            (loss / ACCUM).backward()
        opt.step()
        other.step()
        opt.zero_grad()
        other.zero_grad()
    return opt


def fsdp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for case, keys in CASES.items():
        model = tiny_double_model()
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        hidden = [p for _, p in split_parameters(model)["hidden"]]
        others = [p for p in model.parameters() if all(p is not h for h in hidden)]
        per_rank = ROWS // world
        opt = train(model, hidden, others, keys, slice(rank * per_rank, (rank + 1) * per_rank))
        results[case] = {
            "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
            "U": [opt.state[p]["U"].full_tensor().detach().clone() for p in hidden],
            "S": [opt.state[p]["S"].clone() for p in hidden],
            "local_U_rows": [opt.state[p]["U"].to_local().shape[0] for p in hidden],
            "householder": opt.householder_updates,
        }
    out[rank] = results
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results():
    from test_multinode import free_port

    out = mp.Manager().dict()
    mp.start_processes(fsdp_worker, args=(2, free_port(), out), nprocs=2, start_method="spawn")
    return out[0], out[1]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_row_sharded_mofasgd_equals_unsharded(fsdp_results, case):
    model = tiny_double_model()
    hidden = [p for _, p in split_parameters(model)["hidden"]]
    others = [p for p in model.parameters() if all(p is not h for h in hidden)]
    ref = train(model, hidden, others, CASES[case], slice(None))
    ref_params = dict(model.named_parameters())
    for rank, results in enumerate(fsdp_results):
        got = results[case]
        for name, value in got["params"].items():
            assert (value - ref_params[name].detach()).abs().max().item() < 1e-10, (rank, name)
        for p, U, S, rows in zip(hidden, got["U"], got["S"], got["local_U_rows"]):
            torch.testing.assert_close(U, ref.state[p]["U"], rtol=0, atol=1e-10)
            torch.testing.assert_close(S, ref.state[p]["S"], rtol=0, atol=1e-10)
            assert rows < p.shape[0]  # each rank holds only its rows of U
    moved = max((v - tiny_double_model().state_dict()[k]).abs().max().item()
                for k, v in fsdp_results[0][case]["params"].items())
    assert moved > 1e-3  # the steps did something
    if "Householder" in case:
        assert fsdp_results[0][case]["householder"] > 0


def test_row_sharded_rejects_what_it_cannot_do():
    """Only FSDP2's row split, without shard (checked before any step)."""
    from mofasgd.optimizer import _check_row_sharded

    class FakeMesh:
        ndim = 1

    class FakeDTensor:
        placements = ("Replicate()",)
        device_mesh = FakeMesh()

    with pytest.raises(ValueError, match="split by rows on a 1-D mesh"):
        _check_row_sharded(FakeDTensor(), False)
