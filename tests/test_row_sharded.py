"""MoFaSGD on FSDP2's row-sharded weights (mofasgd.row_sharded) equals the unsharded optimizer:
2 gloo ranks, a fp64 GPT wrapped per block with fully_shard, against one process on the whole batch."""

import contextlib
import os

import pytest
import torch
import torch.multiprocessing as mp

from helpers import end_spawned_rank, tiny_double_model
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


def train(model, hidden, others, keys, rows, watch_step=None):
    """STEPS steps of ACCUM micro-batches; `rows` picks this process's sequences. `watch_step(opt,
    i)`: a context manager entered around step i's opt.step()."""
    opt = MoFaSGD(hidden, **HYPER, **keys)
    other = torch.optim.SGD(others, lr=0.1)
    for i, step_batches in enumerate(batches()):
        for x in step_batches:
            x = x[rows]
            _, loss = model(x[:, :-1], x[:, 1:])
            (loss / ACCUM).backward()
        with watch_step(opt, i) if watch_step else contextlib.nullcontext():
            opt.step()
        other.step()
        opt.zero_grad()
        other.zero_grad()
    return opt


@contextlib.contextmanager
def record_collectives(opt, step, sizes, counts):
    """From the second step on (the first may gather a weight for init weight_svd): appends
    (m, n, numbers sent) to `sizes` for each dist.all_reduce and dist.all_gather a matrix's step
    makes, and to `counts` (those calls, all collectives torch saw in the step): any other
    collective, such as a DTensor op gathering a matrix, would make the two differ."""
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode

    if step == 0:
        yield
        return
    current, before = [], len(sizes)  # the shape of the matrix being stepped
    step_matrix, all_reduce, all_gather = opt._row_sharded_step, dist.all_reduce, dist.all_gather

    def stepping(p, group):
        current.append(tuple(p.shape))
        return step_matrix(p, group)

    def sending(collective, tensor_arg):
        def call(*args, **kwargs):
            sizes.append((*current[-1], args[tensor_arg].numel()))
            return collective(*args, **kwargs)
        return call

    opt._row_sharded_step = stepping
    dist.all_reduce, dist.all_gather = sending(all_reduce, 0), sending(all_gather, 1)
    try:
        with CommDebugMode() as comm:
            yield
        counts.append((len(sizes) - before, comm.get_total_counts()))
    finally:
        del opt._row_sharded_step
        dist.all_reduce, dist.all_gather = all_reduce, all_gather


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
        sizes, counts = [], []
        opt = train(model, hidden, others, keys, slice(rank * per_rank, (rank + 1) * per_rank),
                    lambda opt, i: record_collectives(opt, i, sizes, counts))
        results[case] = {
            "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
            "U": [opt.state[p]["U"].full_tensor().detach().clone() for p in hidden],
            "S": [opt.state[p]["S"].clone() for p in hidden],
            "local_U_rows": [opt.state[p]["U"].to_local().shape[0] for p in hidden],
            "householder": opt.householder_updates,
            "collective_sizes": sizes,
            "collective_counts": counts,
        }
    out[rank] = results
    dist.destroy_process_group()
    end_spawned_rank()


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
    # a step sends thin blocks only, never an m x n matrix: the sketches G^T U and U^T G V ((n + r) r
    # numbers, all-reduced, and the r x r Grams of Cholesky-QR2), or, on the reference path, this
    # rank's rows of [U, G V] (ceil(m / 2) x 2r, all-gathered); torch saw no other collective
    r = CASES[case]["rank"]
    for results in fsdp_results:
        sizes = results[case]["collective_sizes"]
        assert len(sizes) >= 2 * len(hidden) * (STEPS - 1)  # at least the sketches and a QR's per matrix
        for m, n, sent in sizes:
            assert sent <= max((n + r) * r, -(-m // 2) * 2 * r), (m, n, sent)
            assert sent < m * n or 2 * r > n, (m, n, sent)  # thin wherever r is (rank 12 of 16 is not)
        assert all(ours == seen for ours, seen in results[case]["collective_counts"]), results[case]["collective_counts"]


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
