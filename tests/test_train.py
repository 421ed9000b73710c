"""End-to-end runs through run.py and torchrun on a tiny model and corpus (gloo, CPU)."""

import json
import os

import pytest

from helpers import launch, read_metrics, tiny_overrides, train_in_process, write_run_config, write_tiny_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,extra", [("adamw", {}), ("mfsgd", {"rank": 4, "lr": 0.02})])
def test_two_ranks_equal_one_rank_with_accumulation(tmp_path, corpus, optimizer, extra):
    """A 2-rank run (1 micro step each) and a 1-rank run with 2 accumulation steps see the same
    sequences and average the same gradients: same losses to float tolerance. (The worker in spawned
    processes; test_resume launches 2-rank runs through run.py.)"""
    cfg = tiny_overrides(corpus, steps=4, batch_size=8, micro_batch_size=4, **extra)
    one, two = write_run_config(tmp_path, "one", optimizer, cfg, 1), write_run_config(tmp_path, "two", optimizer, cfg, 2)
    train_in_process([one], 1)
    train_in_process([two], 2)
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [0, 1, 2, 3, 4]
    for a, b in zip(m1, m2):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5, (key, a["step"], a[key], b[key])
    assert m1[1]["comm_bytes"] == 0 < m2[1]["comm_bytes"]  # the runs really differ: accumulation vs data parallelism


@pytest.mark.slow
def test_outputs_and_refusal_to_overwrite(tmp_path, corpus):
    cfg = tiny_overrides(corpus, steps=3)
    args = ["--optimizer", "adamw", "--name", "run", "--config", json.dumps(cfg)]
    r = launch(args, tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "run"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    step = metrics[1]
    for key in ("train_loss", "lr", "tokens", "elapsed_s", "tokens_per_s", "peak_mem_bytes", "param_bytes",
                "grad_bytes", "opt_state_bytes_hidden", "opt_state_bytes_other"):
        assert key in step, key
    assert step["tokens"] == 8 * 32
    assert "val_loss" in metrics[2] and "val_loss" in metrics[3] and "val_loss" not in metrics[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_val_loss"] == metrics[-1]["val_loss"]
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] and env["world_size"] == 1
    # every distribution the run imported, by importlib.metadata; the tree's state
    import importlib.metadata as md

    for dist in ("torch", "numpy", "PyYAML"):
        assert env["packages"][dist] == md.version(dist), dist
    assert "galore-torch" not in env["packages"]  # imported only by GaLore runs
    assert isinstance(env["git_dirty"], bool) and env["git_commit"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["optimizer"]["lr"] == 0.002 and config["optimizer"]["betas"] == [0.8, 0.95]
    # AdamW holds two moments per hidden weight: 2 * 4 bytes per element (+ step counters)
    hidden_numel = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)
    assert 8 * hidden_numel <= step["opt_state_bytes_hidden"] <= 8 * hidden_numel + 64 * 8

    before = (run_dir / "metrics.jsonl").read_bytes()
    again = launch(args, tmp_path)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert (run_dir / "metrics.jsonl").read_bytes() == before

    replaced = launch(args + ["--overwrite"], tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_compiled_gpt2_fp32_under_fsdp_on_cpu_trains_like_the_eager_one(tmp_path, corpus, monkeypatch):
    """train.compile changes how the model computes, not what: the same GPT-2 run in fp32 on CPU,
    compiled (inductor's C++ kernels) and eager, gives the same losses to float tolerance. Both run
    under FSDP2 on 2 gloo ranks (the compiled forward all-gathers and frees each block's shards).
    Not the paper preset's GPU path (speedrun model, bf16, flex_attention, Triton kernels): that is
    tests/test_gpu_path.py's CUDA check. The CPU compile, on both ranks at once, is most of this test."""
    kernels = tmp_path / "inductor"  # where the compiled run's generated kernels land
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(kernels))  # inherited by the spawned workers
    runs = {}
    for compiled in (False, True):
        cfg = tiny_overrides(corpus, steps=3, micro_batch_size=4, rank=4, lr=0.02)
        cfg["train"].update(compile=compiled, parallel="fsdp")
        runs[compiled] = write_run_config(tmp_path, f"compile={compiled}", "mfsgd", cfg, 2)
    train_in_process([runs[False]], 2)
    assert not kernels.exists() or not list(kernels.rglob("*.py"))  # eager compiled nothing
    train_in_process([runs[True]], 2)
    assert list(kernels.rglob("*.py"))  # the flag really compiled
    losses = {compiled: [(m["step"], m.get("train_loss"), m.get("val_loss")) for m in read_metrics(run_dir)]
              for compiled, run_dir in runs.items()}
    assert [s for s, _, _ in losses[True]] == [0, 1, 2, 3]
    for (step, train_e, val_e), (_, train_c, val_c) in zip(losses[False], losses[True]):
        for eager, compiled in ((train_e, train_c), (val_e, val_c)):
            assert (eager is None) == (compiled is None)
            if eager is not None:
                assert abs(eager - compiled) < 1e-4, (step, eager, compiled)


@pytest.mark.slow
def test_excluded_parameters_leave_ddp_also_for_a_compiled_model(tmp_path):
    """comm sketch takes the hidden matrices out of DDP's all-reduce. DDP matches names in the
    module it wraps, which for a compiled model carry an "_orig_mod." prefix: the exclusion must
    find them there (torch.compile is lazy, so nothing is compiled here)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from model import GPT, GPTConfig
    from optimizers import split_parameters
    from worker.parallel import exclude_from_ddp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for compiled in (False, True):
            raw = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
            model = torch.compile(raw) if compiled else raw
            hidden = [p for _, p in split_parameters(raw)["hidden"]]
            exclude_from_ddp(model, hidden)
            ddp = DDP(model)
            managed = {id(p) for p in ddp._module_parameters}  # what DDP's reducer all-reduces
            assert managed == {id(p) for p in raw.parameters()} - {id(p) for p in hidden}, compiled
    finally:
        dist.destroy_process_group()


def test_the_ddp_wrapper_is_freed_before_the_process_group(tmp_path, monkeypatch):
    """DDP's C++ reducer must not outlive the process group's registration: freed after
    destroy_process_group, it would destroy the gloo group with the GIL held, which deadlocks when
    a gloo worker thread still needs the GIL (seen as a hang between runs in one process, 2 times
    in 3 over 30 short 2-rank runs before this order; 0 in 8 after)."""
    import types
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import train_gpt
    from model import GPT, GPTConfig

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    raw = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    run = types.SimpleNamespace(model=DDP(raw), raw_model=raw)
    wrapper = weakref.ref(run.model)
    seen = []
    real_shutdown = train_gpt.shutdown_distributed

    def shutdown():
        seen.append((wrapper() is None, dist.is_initialized()))
        real_shutdown()

    monkeypatch.setattr(train_gpt, "shutdown_distributed", shutdown)
    train_gpt.leave_process_group(run)
    assert seen == [(True, True)]  # the wrapper gone while the group was still there
    assert run.model is raw and not dist.is_initialized()


def test_checkpoints_are_ordered_by_step_number(tmp_path):
    from worker.checkpoint import list_checkpoints

    (tmp_path / "checkpoints").mkdir()
    for step in (9_999_999, 10_000_000, 200):  # past the 7-digit padding, text order would be wrong
        (tmp_path / "checkpoints" / f"step_{step:07d}.pt").write_bytes(b"")
    assert [p.rsplit("/", 1)[1] for p in list_checkpoints(str(tmp_path))] == [
        "step_0000200.pt", "step_9999999.pt", "step_10000000.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,extra", [("mfsgd", {"rank": 4, "shard": True, "comm": "sketch", "memory_mode": "sketch"}),
                                             ("muon", {})])
def test_one_gloo_worker_with_a_process_group_trains_like_one_without(tmp_path, corpus, optimizer, extra):
    """launch.distributed (run.py --distributed, as gpu_check.sh launches) on one CPU worker: it
    still builds the gloo process group, DDP, the overlapped sketch all-reduces and the shard
    all-gathers, with the results of the plain one-worker run; the collectives' bytes are counted.
    gloo has no CUDA streams: the NCCL version is tests/test_gpu_path.py's CUDA check."""
    cfg = tiny_overrides(corpus, steps=3, **extra)
    dirs = {name: write_run_config(tmp_path, name, optimizer, cfg, 1, distributed=name == "distributed")
            for name in ("plain", "distributed")}
    train_in_process(list(dirs.values()), 1)
    runs = {name: [m for m in read_metrics(d) if "train_loss" in m] for name, d in dirs.items()}
    assert all(len(r) == 3 for r in runs.values())
    for a, b in zip(runs["plain"], runs["distributed"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert all(m["comm_bytes"] == 0 for m in runs["plain"]) and all(m["comm_bytes"] > 0 for m in runs["distributed"])
    config = json.loads((tmp_path / "distributed" / "config.json").read_text())
    assert config["launch"]["distributed"] is True and config["launch"]["world_size"] == 1
