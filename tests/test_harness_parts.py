"""The worker's parts on their own, in-process: RunOptimizers, the summary's running values, the step clock."""

import copy
import time

import torch

from configs import resolve_config
from worker.metrics import RunSummary, StepClock
from model import create_model
from optimizers import RunOptimizers


def test_run_optimizers_state_dict_round_trip_is_bit_exact():
    cfg = resolve_config("mfsgd", {"model": {"preset": None, "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8,
                                             "vocab_size": 32}, "data": {"seq_len": 8, "val_tokens": 8}, "train": {"steps": 8},
                              "rank": 2, "warmup_steps": 4})

    def model_and_optimizers():
        torch.manual_seed(0)
        model = create_model("gpt2", **cfg.model.resolved())
        return model, RunOptimizers.for_run(model, cfg)

    def step(model, opts, s):
        opts.apply_schedules(s)
        x = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(s))
        model(x[:, :-1], x[:, 1:])[1].backward()
        opts.step()
        opts.zero_grad()

    model, opts = model_and_optimizers()
    for s in range(3):
        step(model, opts, s)
    saved = copy.deepcopy(opts.state_dict())  # state_dict() holds the live tensors, which later steps change
    weights = copy.deepcopy(model.state_dict())
    assert list(saved) == ["optimizers", "schedulers"] and len(saved["optimizers"]) == 2
    for s in range(3, 6):
        step(model, opts, s)
    resumed, resumed_opts = model_and_optimizers()
    resumed.load_state_dict(weights)
    resumed_opts.load_state_dict(saved)
    assert resumed_opts.lr == 0.05 and resumed_opts.exchanged_bytes == 0  # flat before the cooldown
    for s in range(3, 6):
        step(resumed, resumed_opts, s)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert resumed_opts.lr == opts.lr < 0.05  # the cooldown moved on with the steps


def test_run_summary_folds_the_records_in_order():
    summary = RunSummary([{"step": 0, "val_loss": 5.0, "val_peak_mem_bytes": 10},
                          {"step": 1, "train_loss": 4.0, "peak_mem_bytes": 7, "param_bytes": 3, "grad_bytes": 3}])
    summary.add({"step": 2, "train_loss": 3.5, "val_loss": 5.5, "peak_mem_bytes": 6, "param_bytes": 3, "grad_bytes": 1})
    assert (summary.val_loss, summary.best_val_loss, summary.train_loss) == (5.5, 5.0, 3.5)
    assert summary.peaks["peak_mem_bytes"] == 7 and summary.peaks["val_peak_mem_bytes"] == 10
    assert summary.memory == {"param_bytes": 3, "grad_bytes": 1}


def test_step_clock_leaves_pauses_out():
    clock = StepClock(elapsed=100.0)
    with clock.paused():
        time.sleep(0.05)
    first = clock.lap()
    assert first < 0.04 and clock.elapsed == 100.0 + first
