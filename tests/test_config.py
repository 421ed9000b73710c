"""Config layering, flat optimizer keys, validation, and launcher errors (one line, exit 2)."""

import json
import re

import pytest

from configs import ConfigError, deep_merge, resolve_config, split_overrides
from helpers import launch, tiny_overrides, write_tiny_corpus


def test_flat_keys_are_optimizer_keys_and_sections_merge():
    cfg = resolve_config("mfsgd", {"lr": 0.0009, "rank": 16, "train": {"steps": 7}})
    assert cfg.optimizer.lr == 0.0009 and cfg.optimizer.rank == 16
    assert cfg.optimizer.eta1 == 0.25 and cfg.optimizer.max_value == 5.0  # from mfsgd.yaml
    assert cfg.train.steps == 7 and cfg.train.batch_size == 8  # from base.yaml


def test_paper_readme_command_config_is_accepted():
    paper = {"lr": 0.0009, "rank": 16, "beta": 0.95, "eta1": 0.25, "eta2": 0, "use_current_projection": True,
             "use_ones_for_nonzero_s": False, "nesterov": False, "eps": 1e-6, "max_value": 1000,
             "warmup_steps": 300, "beta_start": 0.75, "beta_end": 0.95, "cooldown_frac": 0.4}
    cfg = resolve_config("mfsgd", paper)
    assert cfg.optimizer.eps == 1e-6 and cfg.optimizer.max_value == 1000.0 and cfg.optimizer.beta_start == 0.75


def test_deep_merge_and_split():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    assert split_overrides({"lr": 1, "train": {"steps": 2}}) == {"optimizer": {"lr": 1}, "train": {"steps": 2}}


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"lrr": 0.1}, "unknown config key 'optimizer.lrr'"),
        ({"train": {"stepz": 3}}, "unknown config key 'train.stepz' (did you mean train.steps?); valid keys: steps"),
        ({"train": {"steps": "ten"}}, "train.steps must be an integer"),
        ({"train": {"steps": 0}}, "train.steps must be > 0"),
        ({"lr": -1}, "optimizer.lr must be > 0"),
        ({"rank": 0}, "optimizer.rank must be >= 1"),
        ({"rank": 2.5}, "optimizer.rank must be an integer"),
        ({"beta": 1.0}, "optimizer.beta must be in [0, 1)"),
        ({"nesterov": "yes"}, "optimizer.nesterov must be true or false"),
        ({"model": {"preset": "gpt5"}}, "model.preset 'gpt5' is unknown"),
        ({"data": {"seq_len": 4096}}, "exceeds the model's context"),
        ({"train": {"batch_size": 10, "micro_batch_size": 4}}, "must be a multiple of train.micro_batch_size"),
        ({"init": "random"}, "optimizer.init must be weight_svd or zero"),
    ],
)
def test_bad_config_values(overrides, needle):
    with pytest.raises(ConfigError) as e:
        resolve_config("mfsgd", overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_optimizer():
    with pytest.raises(ConfigError, match="unknown optimizer 'sgdd'; choose one of"):
        resolve_config("sgdd", {})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.mark.slow
def test_dry_run_prints_config_and_command(tmp_path, corpus):
    r = launch(["--optimizer", "mfsgd", "--dry-run", "--nproc", "2", "--config",
                json.dumps(tiny_overrides(corpus, micro_batch_size=4, rank=8))], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "torch.distributed.run" in r.stdout and "--nproc-per-node=2" in r.stdout
    import run

    # time for the stop checkpoint after a signal, where this torch's torchrun has the option
    assert ("--shutdown-timeout=900" in r.stdout) == run.torchrun_accepts("--shutdown-timeout")
    assert '"rank": 8' in r.stdout
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_dry_run_of_a_resume_launches_nothing(tmp_path, corpus):
    """--resume RUN --dry-run prints the saved config and the resume command, and neither starts the
    workers nor touches the run."""
    run_dir = tmp_path / "half"
    run_dir.mkdir()
    cfg = resolve_config("mfsgd", tiny_overrides(corpus, rank=8), name="half",
                         launch={"nproc": 1, "nnodes": 1, "world_size": 1, "device": "cpu", "backend": "gloo"})
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    r = launch(["--resume", "half", "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "torch.distributed.run" in r.stdout and "--resume" in r.stdout and '"rank": 8' in r.stdout
    assert [p.name for p in run_dir.iterdir()] == ["config.json"]  # no metrics, no checkpoints: nothing ran


def test_train_device_must_match_the_launch():
    cfg = {"train": {"device": "cuda"}}
    with pytest.raises(ConfigError, match=r"train.device is 'cuda' but the workers run on cpu: launch with --num-gpus N"):
        resolve_config("mfsgd", cfg, launch={"device": "cpu", "backend": "gloo"})
    assert resolve_config("mfsgd", {"train": {"device": "cpu"}}).train.device == "cpu"  # agrees: fine


def test_batch_not_divisible_by_ranks_suggests_a_micro_batch():
    with pytest.raises(ConfigError, match=r"\(2 x 8\); e.g. train.micro_batch_size 4$"):
        resolve_config("mfsgd", {}, launch={"nproc": 2, "world_size": 2})
    with pytest.raises(ConfigError, match=r"\(3 x 8\); make train.batch_size a multiple of 24$"):
        resolve_config("mfsgd", {"train": {"batch_size": 8, "micro_batch_size": 8}}, launch={"nproc": 3, "world_size": 3})


@pytest.mark.parametrize("optimizer,overrides,needle", [
    ("mfsgd", {"train": {"seed": -1}}, "train.seed must be >= 0, got -1"),
    ("mfsgd", {"adam": {"eps": -1.0}}, "adam.eps must be >= 0, got -1.0"),
    ("mfsgd", {"adam": {"weight_decay": -0.1}}, "adam.weight_decay must be >= 0, got -0.1"),
    ("adamw", {"eps": -1e-8}, "optimizer.eps must be >= 0, got -1e-08"),
    ("galore", {"group_params": {"rank": 128, "proj_type": "reverse_std"}},
     "optimizer.group_params.rank (128) must be below model.n_embd (128) with proj_type reverse_std"),
])
def test_values_the_worker_would_crash_on_are_config_errors(optimizer, overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        resolve_config(optimizer, overrides)


def test_torchrun_options_follow_the_installed_torch(monkeypatch):
    """--shutdown-timeout goes to torchrun only where torchrun has it (torch 2.11's rejects it)."""
    import argparse

    import torch.distributed.run as torchrun

    import run

    args = argparse.Namespace(max_restarts=0, node_rank=0, master_addr=None, master_port=29500)
    launch = dict(nproc=1, nnodes=1)

    def parser_of(with_shutdown_timeout):  # torchrun 2.12+ has the option, 2.11 and older do not
        def parser():
            p = argparse.ArgumentParser()
            p.add_argument("--nproc-per-node")
            if with_shutdown_timeout:
                p.add_argument("--shutdown-timeout")
            p.add_argument("training_script")
            p.add_argument("training_script_args", nargs=argparse.REMAINDER)
            return p
        return parser

    for has_option in (True, False):
        monkeypatch.setattr(torchrun, "get_args_parser", parser_of(has_option))
        cmd = run.torchrun_command(args, launch, "/r", False)
        assert any(a.startswith("--shutdown-timeout=") for a in cmd) == has_option and "--standalone" in cmd
