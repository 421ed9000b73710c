"""The installable optimizer package `mofasgd`: one source for the harness, the paper's defaults,
the beta warmup object, caller-pointing warnings, actionable shape errors, the examples, env.json's
git state. (The wheel itself is built and installed into a torch-only venv by `make package-check`.)"""

import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

import mofasgd
import optimizers
import optimizers.mofasgd
from helpers import ROOT
from mofasgd import BetaWarmup, MoFaSGD
from optimizers import OPTIMIZERS, MoFaSGDConfig

SHARED_KEYS = ("lr", "rank", "beta", "eta1", "eta2", "use_current_projection", "use_ones_for_nonzero_s",
               "nesterov", "eps", "max_value", "init", "momentum")


def test_harness_uses_the_package_class():
    assert optimizers.MoFaSGD is mofasgd.MoFaSGD
    assert optimizers.mofasgd.MoFaSGD is mofasgd.MoFaSGD
    assert optimizers.mofasgd._umf_householder is mofasgd.factors._umf_householder  # private helpers too
    assert mofasgd.__file__.startswith(os.path.join(ROOT, "mofasgd"))


def test_constructor_defaults_are_mfsgd_yaml():
    with open(os.path.join(ROOT, "configs", "optimizers", "mfsgd.yaml")) as f:
        paper = yaml.safe_load(f)
    signature = inspect.signature(MoFaSGD).parameters
    for key in SHARED_KEYS:
        assert signature[key].default == paper[key], key
        assert getattr(MoFaSGDConfig(), key) == paper[key], key
    warmup = inspect.signature(BetaWarmup).parameters
    assert (warmup["start"].default, warmup["end"].default, warmup["steps"].default) == (
        paper["beta_start"], paper["beta_end"], paper["warmup_steps"])
    p = torch.nn.Parameter(torch.zeros(4, 4))
    group = MoFaSGD([p]).param_groups[0]
    assert (group["lr"], group["eta1"], group["max_value"]) == (0.05, 0.25, 5.0)


def test_beta_warmup_rule_and_loop_match_the_harness():
    from optimizers import apply_group_schedules

    rule = BetaWarmup(start=0.65, end=0.85, steps=300)
    assert rule(0) == 0.65 and rule(150) == pytest.approx(0.75) and rule(300) == 0.85 and rule(10_000) == 0.85
    assert BetaWarmup(steps=0)(0) == 0.85
    harness = OPTIMIZERS["mfsgd"].schedules(MoFaSGDConfig())["beta"]
    assert isinstance(harness, BetaWarmup)  # the harness's warmup is this object, not a copy of the rule

    a, b = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(8, 6))
    opt_loop, opt_harness = MoFaSGD([a], rank=2), MoFaSGD([b], rank=2)
    warmup = BetaWarmup(opt_loop)
    seen_loop, seen_harness = [], []
    for step in range(305):
        apply_group_schedules(opt_harness, {"beta": harness}, step)
        seen_loop.append(opt_loop.param_groups[0]["beta"])
        seen_harness.append(opt_harness.param_groups[0]["beta"])
        warmup.step()
    assert seen_loop == seen_harness
    assert seen_loop[0] == 0.65 and seen_loop[-1] == 0.85 and len(set(seen_loop)) == 301

    resumed = BetaWarmup(MoFaSGD([torch.nn.Parameter(torch.randn(8, 6))], rank=2))
    resumed.load_state_dict(warmup.state_dict())
    assert resumed.optimizer.param_groups[0]["beta"] == warmup.get_last_value() == 0.85
    with pytest.raises(ValueError, match="end"):
        BetaWarmup(end=1.0)


@pytest.mark.parametrize("memory_mode", ["full", "sketch"])
def test_rank_warning_points_at_the_callers_line(memory_mode):
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = MoFaSGD([p], rank=8, memory_mode=memory_mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        (p * p).sum().backward(); opt.step()  # noqa: E702 (one line: the warning names it either way)
    [w] = [w for w in caught if "rank 8" in str(w.message)]
    assert (w.filename, w.lineno) == (__file__, line)


@pytest.mark.parametrize("shape,needles", [
    ((7,), ["(7,)", "AdamW", "p.ndim == 2"]),
    ((), ["()", "AdamW"]),
    ((16, 3, 3, 3), ["(16, 3, 3, 3)", "(out, in*kh*kw)", "view"]),
])
def test_unsupported_shapes_say_what_to_do(shape, needles):
    with pytest.raises(ValueError) as error:
        MoFaSGD([torch.nn.Parameter(torch.zeros(shape))])
    for needle in needles:
        assert needle in str(error.value), needle


def run_example(name, tmp_path, *args):
    # Run from outside the repo; the package comes from the installed environment or, in a bare
    # checkout, the repo root.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_plain_loop_example(tmp_path):
    r = run_example("plain_loop.py", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    first, final = map(float, r.stdout.strip().splitlines()[-1].split()[1::2])
    assert final < first / 20
    assert "beta 0.650" in r.stdout and "beta 0.849" in r.stdout
    assert "Warning" not in r.stderr


@pytest.mark.slow
def test_hf_trainer_example(tmp_path):
    r = run_example("hf_trainer.py", tmp_path, "--steps", "60", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MoFaSGD updated 8 matrices, 60 steps each" in r.stdout  # 4 per GPT-2 block: MoFaSGD did train
    assert "beta now 0.850" in r.stdout


@pytest.mark.slow
def test_git_state_reports_local_changes(tmp_path):
    from worker.metrics import git_state

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    assert git_state(str(tmp_path)) == (None, None)  # not a checkout
    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-qm", "one")
    commit, dirty = git_state(str(tmp_path))
    assert len(commit) == 40 and dirty is False
    (tmp_path / "a.txt").write_text("2")
    assert git_state(str(tmp_path)) == (commit, True)
    git("checkout", "-q", "a.txt")
    (tmp_path / "new.txt").write_text("untracked")
    assert git_state(str(tmp_path))[1] is True
