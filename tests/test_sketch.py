"""MoFaSGD's gradient-free memory mode and exact low-rank communication (sketches of G)."""


import pytest
import torch

from helpers import (end_spawned_rank, launch, read_metrics, tiny_double_model, tiny_overrides, train_in_process,
                     write_run_config, write_tiny_corpus)
from optimizers import MoFaSGD, split_parameters


def train_hidden(memory_mode, steps=10, accum=2, **kw):
    model = tiny_double_model()
    hidden = [p for _, p in split_parameters(model)["hidden"]]
    opt = MoFaSGD(hidden, lr=0.05, rank=4, beta=0.9, eta1=0.25, max_value=5, memory_mode=memory_mode, **kw)
    gen = torch.Generator().manual_seed(1)
    surviving = []
    for _ in range(steps):
        for _ in range(accum):
            x = torch.randint(0, 64, (4, 16), generator=gen)
            _, loss = model(x[:, :-1], x[:, 1:])
            (loss / accum).backward()
        surviving.append(sum(p.grad is not None for p in hidden))
        opt.step()
        model.zero_grad(set_to_none=True)
        opt.zero_grad()
    return model, opt, surviving


@pytest.mark.parametrize("init", ["weight_svd", "zero"])
def test_sketch_mode_equals_full_gradients(init):
    full, _, kept_full = train_hidden("full", init=init)
    sketch, opt, kept_sketch = train_hidden("sketch", init=init)
    assert all(k == 8 for k in kept_full) and all(k == 0 for k in kept_sketch)  # no m x n gradient survives
    diff = max((a - b).abs().max().item() for a, b in zip(full.parameters(), sketch.parameters()))
    assert diff <= 1e-12, diff
    assert opt.sketch_bytes() == 0  # consumed by the steps


def test_sketch_mode_rejects_full_gradient_features():
    p = torch.nn.Parameter(torch.randn(8, 6))
    for kw in ({"eta2": 0.1}, {"nesterov": True}):
        with pytest.raises(ValueError, match="memory_mode='sketch' needs eta2 == 0 and nesterov=False"):
            MoFaSGD([p], rank=2, memory_mode="sketch", **kw)
    with pytest.raises(ValueError, match="memory_mode must be one of"):
        MoFaSGD([p], memory_mode="tiny")


def test_sketches_are_never_state():
    model, opt, _ = train_hidden("sketch", steps=3)
    state = opt.state_dict()
    assert set(state["state"][0]) == {"U", "S", "V", "step"}  # sketches are never state


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


def test_config_errors_for_sketch_modes():
    from configs import ConfigError, resolve_config

    with pytest.raises(ConfigError, match="optimizer.eta2 must be 0 and optimizer.nesterov false with memory_mode sketch"):
        resolve_config("mfsgd", {"memory_mode": "sketch", "eta2": 0.5})
    with pytest.raises(ConfigError, match="train.grad_clip must be 0 with optimizer.comm sketch"):
        resolve_config("mfsgd", {"comm": "sketch", "train": {"grad_clip": 1.0}})
    with pytest.raises(ConfigError, match="needs optimizer.comm sketch"):
        resolve_config("mfsgd", {"memory_mode": "sketch"}, launch={"world_size": 2, "nproc": 2})


@pytest.mark.slow
def test_sketch_communication_equals_full_and_one_rank(tmp_path, corpus):
    """2 ranks with comm sketch (+ memory sketch) == 2 ranks with DDP's full all-reduce == 1 rank
    with 2 accumulation steps, over 10 steps; the sketch all-reduce moves far fewer bytes. (The
    training loop in spawned workers: test_resume and test_train cover the launcher.)"""
    def run_dir(name, nproc, **keys):
        cfg = tiny_overrides(corpus, steps=10, batch_size=8, micro_batch_size=4, rank=4, lr=0.02, **keys)
        return write_run_config(tmp_path, name, "mfsgd", cfg, nproc)

    one = run_dir("one", 1)
    two = [run_dir("full", 2), run_dir("sketch", 2, comm="sketch"), run_dir("both", 2, comm="sketch", memory_mode="sketch")]
    train_in_process([one], 1)
    train_in_process(two, 2)
    one, full, sketch, both = (read_metrics(d) for d in [one, *two])
    for other in (full, sketch, both):
        assert [m["step"] for m in other] == [m["step"] for m in one] == list(range(11))
        for a, b in zip(one, other):
            for key in ("train_loss", "val_loss"):
                if key in a:
                    assert abs(a[key] - b[key]) < 1e-5, (key, a["step"], a[key], b[key])
    hidden_shapes = [(32, 96), (32, 32), (32, 128), (128, 32)] * 2
    expected = sum(4 * ((m + n) * 4 + 4 * 4) for m, n in hidden_shapes)  # fp32, (m + n) r + r^2, r = 4
    assert sketch[1]["comm_bytes_hidden"] == both[1]["comm_bytes_hidden"] == expected
    assert full[1]["comm_bytes_hidden"] == 4 * sum(m * n for m, n in hidden_shapes)
    assert one[1]["comm_bytes"] == 0
    assert both[1]["grad_bytes"] < full[1]["grad_bytes"]  # hidden gradients never held


def _collective_order_worker(rank, world, port, out):
    """One rank of a 2-rank gloo group: DDP over a tiny GPT's other parameters, MoFaSGD's sketches
    all-reduced during backward; logs every collective it issues, DDP's and the sketches'."""
    import os

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from optimizers import MoFaSGD as Optimizer
    from worker.parallel import wrap_data_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = tiny_double_model()
    hidden = [p for _, p in split_parameters(model)["hidden"]]
    others = [p for p in model.parameters() if all(p is not h for h in hidden)]
    opt = Optimizer(hidden, lr=0.05, rank=4, beta=0.9, eta1=0.25, max_value=5, memory_mode="sketch")
    ddp = wrap_data_parallel(model, hidden, torch.device("cpu"))
    log = []

    def logged_ddp_hook(state, bucket):
        log.append(("ddp", bucket.index()))
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, logged_ddp_hook)
    launch = Optimizer._launch_all_reduce

    def logged_launch(self, p):
        assert self._overlap["group"] is None  # DDP's (the default) group
        log.append(("sketch", tuple(p.shape)))
        launch(self, p)

    Optimizer._launch_all_reduce = logged_launch
    adam = torch.optim.SGD(others, lr=0.01)
    gen = torch.Generator().manual_seed(1 + rank)
    for _ in range(3):
        x = torch.randint(0, 64, (4, 16), generator=gen)
        opt.all_reduce_sketches_during_backward()
        _, loss = ddp(x[:, :-1], x[:, 1:])
        loss.backward()
        log.append(("wait", opt.all_reduce_sketches()))
        opt.step()
        adam.step()
        opt.zero_grad()
        adam.zero_grad()
    out[rank] = (log, [p.detach().clone() for p in model.parameters()])
    dist.destroy_process_group()
    end_spawned_rank()


@pytest.mark.slow
@pytest.mark.slow
def test_sketch_and_ddp_collectives_share_one_group_in_one_order():
    """Overlapped sketch all-reduces and DDP's bucket all-reduces go to one (the default) group,
    issued in the same order on every rank, so NCCL's single stream cannot deadlock; the replicas
    stay identical."""
    import torch.multiprocessing as mp

    from test_multinode import free_port

    out = mp.Manager().dict()
    mp.start_processes(_collective_order_worker, args=(2, free_port(), out), nprocs=2, start_method="spawn")
    (log0, params0), (log1, params1) = out[0], out[1]
    assert log0 == log1
    assert {kind for kind, _ in log0} == {"ddp", "sketch", "wait"}
    assert sum(kind == "sketch" for kind, _ in log0) == 3 * 8  # 8 hidden matrices, 3 steps
    for a, b in zip(params0, params1):
        assert torch.equal(a, b)
