"""Baseline optimizers (galore, muon, adafactor next to adamw and mfsgd): routing, state bytes
against each optimizer's formula, config keys and validation, Muon's momentum schedule, GaLore's
weights_only checkpoint round trip, lazy imports, and one 2-rank run each through the launcher."""

import io
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from configs import ConfigError, resolve_config
from helpers import ROOT, launch, read_metrics, tiny_overrides, write_tiny_corpus
from model import GPT, GPTConfig
from optimizers import OPTIMIZERS, MoFaSGD, build_optimizers, split_parameters, state_bytes

F32 = 4  # bytes per fp32 element
STEP = 4  # a float32 scalar `step` tensor (AdamW fused, MoFaSGD, Adafactor); GaLore's step is a Python int


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))


def default_config(name, **overrides):
    return resolve_config(name, overrides).optimizer


def hidden_class(name):
    if name == "galore":
        from optimizers.galore import galore_adamw_class

        return galore_adamw_class()
    return {"adamw": torch.optim.AdamW, "mfsgd": MoFaSGD, "muon": torch.optim.Muon,
            "adafactor": torch.optim.Adafactor}.get(name)


# ---------------------------------------------------------------------------------------------
# Imports and routing


@pytest.mark.slow
def test_importing_optimizers_and_configs_imports_no_heavy_dependency():
    code = ("import sys, optimizers, configs; configs.resolve_config('galore', {}); "
            "print(','.join(m for m in ('galore_torch', 'transformers', 'bitsandbytes', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported at `import optimizers`: {out.stdout.strip()}"


def test_new_optimizers_are_registered():
    assert {"adamw", "mfsgd", "galore", "muon", "adafactor"} <= set(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_hidden_matrices_and_only_they_go_to_the_chosen_optimizer(name):
    from configs import AdamConfig

    model = tiny_gpt()
    hidden_opt, adam_opt = build_optimizers(model, name, default_config(name), AdamConfig())
    expected_class = hidden_class(name)
    if expected_class is not None:  # optimizers registered later are checked for routing only
        assert isinstance(hidden_opt, expected_class), type(hidden_opt)
    assert isinstance(adam_opt, torch.optim.AdamW)

    names = {id(p): n for n, p in model.named_parameters()}
    hidden = [names[id(p)] for g in hidden_opt.param_groups for p in g["params"]]
    other = [names[id(p)] for g in adam_opt.param_groups for p in g["params"]]
    blocks = [f"transformer.h.{i}.{m}.weight" for i in range(2)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert sorted(hidden) == sorted(blocks)
    assert len(hidden) == len(set(hidden)) and len(other) == len(set(other)) and not set(hidden) & set(other)
    assert set(hidden) | set(other) == set(names.values())
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.bias"} <= set(other)
    if name == "galore":
        (group,) = hidden_opt.param_groups
        assert (group["rank"], group["update_proj_gap"], group["scale"], group["proj_type"]) == (32, 75, 0.25, "std")


# ---------------------------------------------------------------------------------------------
# State bytes after one step, against each optimizer's formula


SHAPES = [(48, 20), (20, 64)]  # one tall, one wide matrix
RANK = 4


def one_step(name, **overrides):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(m, n) * 0.1) for m, n in SHAPES]
    opt = OPTIMIZERS[name].build(params, default_config(name, **overrides), "cpu")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def test_fused_adamw_takes_the_same_steps_as_the_foreach_kernel():
    """`fused: true` (the default, and the kernel of every non-hidden group) is only a faster
    kernel: five steps of it match the foreach kernel's parameters and moments to fp32 rounding."""
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(m, n) * 0.1) for m, n in SHAPES]
        opt = OPTIMIZERS["adamw"].build(params, default_config("adamw", fused=fused, weight_decay=0.1), "cpu")
        assert opt.defaults["fused"] is (True if fused else None) and opt.defaults["foreach"] is (None if fused else True)
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
        runs[fused] = (params, opt)
    (fused_params, fused_opt), (plain_params, plain_opt) = runs[True], runs[False]
    for a, b in zip(fused_params, plain_params):
        assert (a - b).abs().max() < 1e-6 and (a - b).abs().max() <= 1e-5 * b.abs().max()
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(fused_opt.state[a][key], plain_opt.state[b][key], rtol=1e-5, atol=1e-8), key
    torch.manual_seed(0)
    initial = torch.randn(SHAPES[0]) * 0.1
    assert (fused_params[0] - initial).abs().max() > 1e-3  # the steps really moved the weights


def galore_expected_bytes(m, n, rank, proj_type):
    """Bytes GaLoreAdamW holds for an fp32 m x n matrix, read off galore_projector.py: the SVD
    U (m x k), Vh (k x n), k = min(m, n), is sliced to r' = min(rank, k) directions, and the slice
    kept as ortho_matrix pins its factor's whole storage; exp_avg and exp_avg_sq have the projected
    gradient's shape."""
    k = min(m, n)
    r = min(rank, k)
    projected, pinned = {
        "std": (max(m, n) * r, k * k),  # tall: G Vh_r^T (m x r), pins Vh; wide: U_r^T G (r x n), pins U
        "reverse_std": (k * r, m * n),  # tall: U_r^T G (r x n), pins U (m x n); wide: G Vh_r^T, pins Vh
        "right": (m * r, k * n),
        "left": (r * n, m * k),
        "full": (r * r, m * k + k * n),
    }[proj_type]
    return F32 * (2 * projected + pinned)


def test_state_bytes_match_each_formula_after_one_step():
    expected = {
        "adamw": sum(F32 * 2 * m * n + STEP for m, n in SHAPES),
        "muon": sum(F32 * m * n for m, n in SHAPES),
        "mfsgd": sum(F32 * ((m + n) * RANK + RANK) + STEP for m, n in SHAPES),
        "adafactor": sum(F32 * (m + n) + STEP for m, n in SHAPES),
        "galore": sum(galore_expected_bytes(m, n, RANK, "std") for m, n in SHAPES),
    }
    overrides = {"mfsgd": {"rank": RANK}, "galore": {"group_params": {"rank": RANK}}, "adamw": {"fused": True}}
    for name, want in expected.items():
        assert state_bytes(one_step(name, **overrides.get(name, {}))) == want, name
    # (48, 20) numbers, for the docs: AdamW 7684, Muon 3840, MoFaSGD r=4 1108, Adafactor 276,
    # GaLore r=4 std 3136 (of which 1600 is the 20 x 20 Vh the projector pins)
    assert galore_expected_bytes(48, 20, 4, "std") == 3136


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "right", "left", "full"])
@pytest.mark.parametrize("rank", [RANK, 32])  # 32 > min(m, n): galore-torch silently uses min(m, n)
def test_galore_state_bytes_count_the_storage_its_projector_pins(proj_type, rank):
    if proj_type == "reverse_std" and rank >= 20:  # the wide 20 x 64 matrix: galore-torch would crash
        with pytest.raises(ValueError, match="reverse_std fails on a wide 20x64 matrix"):
            one_step("galore", group_params={"rank": rank, "proj_type": proj_type})
        return
    opt = one_step("galore", group_params={"rank": rank, "proj_type": proj_type})
    assert state_bytes(opt) == sum(galore_expected_bytes(m, n, rank, proj_type) for m, n in SHAPES)
    numel = sum(F32 * t.numel() for s in opt.state.values()
                for t in [s["exp_avg"], s["exp_avg_sq"], *([s["projector"].ortho_matrix]
                                                          if proj_type != "full" else s["projector"].ortho_matrix)])
    if rank < min(min(s) for s in SHAPES):
        assert state_bytes(opt) > numel  # counting numel would miss the pinned factor


# ---------------------------------------------------------------------------------------------
# Configs


def test_paper_galore_command_config_is_accepted():
    cfg = resolve_config("galore", {"lr": 0.008, "group_params": {"rank": 16, "update_proj_gap": 150, "scale": 0.25,
                                                                  "proj_type": "std"}})
    o = cfg.optimizer
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.cooldown_frac) == (0.008, [0.9, 0.95], 1e-8, 0.0, 0.4)
    assert (o.group_params.rank, o.group_params.update_proj_gap, o.group_params.scale, o.group_params.proj_type) == \
        (16, 150, 0.25, "std")
    assert o.rank == 16  # what summary.json reports as the run's rank
    assert cfg.to_dict()["optimizer"]["group_params"]["rank"] == 16


def test_yaml_defaults_are_the_papers():
    g = default_config("galore")
    assert (g.lr, g.betas, g.weight_decay, g.eps, g.cooldown_frac) == (0.008, [0.9, 0.95], 0.0, 1e-8, 0.4)
    assert (g.group_params.rank, g.group_params.update_proj_gap, g.group_params.scale, g.group_params.proj_type) == \
        (32, 75, 0.25, "std")
    m = default_config("muon")
    assert (m.lr, m.momentum, m.nesterov, m.ns_steps, m.weight_decay) == (0.05, 0.95, True, 5, 0.0)
    assert (m.momentum_warmup_steps, m.momentum_start, m.cooldown_frac) == (300, 0.85, 0.4)
    a = default_config("adafactor")
    assert (a.lr, a.beta2_decay, a.eps, a.d, a.weight_decay, a.maximize) == (0.01, -0.8, [None, 1e-3], 1.0, 0.0, False)


def test_partial_group_params_override_keeps_the_yaml_values():
    gp = default_config("galore", group_params={"rank": 8}).group_params
    assert (gp.rank, gp.update_proj_gap, gp.scale, gp.proj_type) == (8, 75, 0.25, "std")


@pytest.mark.parametrize(
    "name,overrides,needle",
    [
        ("galore", {"group_params": {"rnk": 16}}, "unknown config key 'optimizer.group_params.rnk' (did you mean optimizer.group_params.rank?); valid keys: rank"),
        ("galore", {"rank": 16}, "unknown config key 'optimizer.rank' (did you mean optimizer.group_params.rank? write {\"group_params\": {\"rank\": ...}})"),
        ("galore", {"group_params": {"rank": 0}}, "optimizer.group_params.rank must be >= 1, got 0"),
        ("galore", {"group_params": {"update_proj_gap": 0}}, "optimizer.group_params.update_proj_gap must be >= 1"),
        ("galore", {"group_params": {"scale": 0}}, "optimizer.group_params.scale must be > 0"),
        ("galore", {"group_params": {"proj_type": "diag"}}, "optimizer.group_params.proj_type must be one of std, "),
        ("galore", {"group_params": {"rank": 2.5}}, "optimizer.group_params.rank must be an integer"),
        ("galore", {"group_params": 16}, "optimizer.group_params must be a mapping"),
        ("galore", {"betas": [0.9, 1.0]}, "optimizer.betas must be two numbers in [0, 1)"),
        ("muon", {"momentum": 1.0}, "optimizer.momentum must be in [0, 1), got 1.0"),
        ("muon", {"momentum_start": -0.1}, "optimizer.momentum_start must be in [0, 1)"),
        ("muon", {"ns_steps": 0}, "optimizer.ns_steps must be >= 1"),
        ("muon", {"momentum_warmup_steps": -1}, "optimizer.momentum_warmup_steps must be >= 0"),
        ("muon", {"adjust_lr_fn": "none"}, "optimizer.adjust_lr_fn must be original or match_rms_adamw"),
        ("adafactor", {"beta2_decay": 0.5}, "optimizer.beta2_decay must be <= 0"),
        ("adafactor", {"eps": [None]}, "optimizer.eps must be [eps1 or null, eps2]"),
        ("adafactor", {"d": 0.5}, "optimizer.d must be >= 1"),
        ("adafactor", {"eps": ["x", 1e-3]}, "optimizer.eps[0] must be a number"),
    ],
)
def test_bad_baseline_config_values(name, overrides, needle):
    with pytest.raises(ConfigError) as e:
        resolve_config(name, overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_muon_momentum_warmup_schedule():
    from optimizers import apply_group_schedules

    schedules = OPTIMIZERS["muon"].schedules(default_config("muon"))
    assert set(schedules) == {"momentum"}
    fn = schedules["momentum"]
    assert fn(0) == 0.85
    assert math.isclose(fn(150), 0.90, abs_tol=1e-12)
    assert fn(300) == fn(301) == fn(10_000) == 0.95
    assert OPTIMIZERS["muon"].schedules(default_config("muon", momentum_warmup_steps=0)) == {}
    opt = OPTIMIZERS["muon"].build([torch.nn.Parameter(torch.zeros(4, 3))], default_config("muon"), "cpu")
    assert apply_group_schedules(opt, schedules, 0) == {"momentum": 0.85}
    assert opt.param_groups[0]["momentum"] == 0.85


# ---------------------------------------------------------------------------------------------
# GaLore checkpoints: weights_only round trip, bit-exact continuation


GAP = 3
CKPT_SHAPES = [(24, 10), (10, 30), (12, 12), (7, 3)]  # tall, wide, square, and one with rank 4 > min(m, n)


def make_galore(proj_type):
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
              for i, s in enumerate(CKPT_SHAPES)]
    cfg = default_config("galore", group_params={"rank": 4, "update_proj_gap": GAP, "proj_type": proj_type},
                         weight_decay=0.01)
    return params, OPTIMIZERS["galore"].build(params, cfg, "cpu")


def galore_step(params, opt, step):
    """A deterministic gradient depending on the weights and the step: a quadratic pull plus noise."""
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = 0.5 * p.detach() + torch.randn(p.shape, generator=g)
    opt.step()
    opt.zero_grad(set_to_none=True)


def round_trip(params, opt, proj_type):
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    new_params, new_opt = make_galore(proj_type)
    with torch.no_grad():
        for p, s in zip(new_params, saved["params"]):
            p.copy_(s)
    new_opt.load_state_dict(saved["optimizer"])
    return new_params, new_opt


@pytest.mark.parametrize("proj_type", ["std", "full", "reverse_std"])
def test_galore_checkpoint_round_trip_is_bit_exact(proj_type):
    from galore_torch.galore_projector import GaLoreProjector

    steps = 2 * GAP
    ref_params, ref_opt = make_galore(proj_type)
    reference = []
    for step in range(steps):
        galore_step(ref_params, ref_opt, step)
        reference.append([p.detach().clone() for p in ref_params])

    params, opt = make_galore(proj_type)
    for step in range(steps):
        galore_step(params, opt, step)
        for p, want in zip(params, reference[step]):
            assert torch.equal(p, want), (proj_type, step)
        if step < steps - 1:  # reload after every step: before, at and after the refresh at GAP
            before = state_bytes(opt)
            params, opt = round_trip(params, opt, proj_type)
            assert state_bytes(opt) == before  # the loaded projector pins what the live one did
    for a, b in zip(ref_opt.state.values(), opt.state.values()):
        assert isinstance(b["projector"], GaLoreProjector) and b["projector"].proj_type == proj_type
        assert a["step"] == b["step"] == steps
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        ortho_a, ortho_b = a["projector"].ortho_matrix, b["projector"].ortho_matrix
        for x, y in zip(*(o if isinstance(o, list) else [o] for o in (ortho_a, ortho_b))):
            assert torch.equal(x, y) and x.stride() == y.stride()


def test_galore_state_dict_leaves_live_state_alone():
    from galore_torch.galore_projector import GaLoreProjector

    params, opt = make_galore("std")
    galore_step(params, opt, 0)
    sd = opt.state_dict()
    assert all(isinstance(s["projector"], dict) for s in sd["state"].values())
    assert all(isinstance(s["projector"], GaLoreProjector) for s in opt.state.values())


def test_galore_projector_moved_to_another_device_keeps_its_layout():
    """Loading a CPU checkpoint onto another device (here meta: no GPU in the tests) moves the
    whole pinned factor and keeps the slice's offset and strides."""
    from optimizers.galore import _to_device_keeping_layout

    _, _, vh = torch.linalg.svd(torch.randn(24, 10), full_matrices=False)
    ortho = vh[2:6]
    moved = _to_device_keeping_layout(ortho, torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == ortho.shape
    assert (moved.stride(), moved.storage_offset()) == (ortho.stride(), ortho.storage_offset())
    assert moved.untyped_storage().nbytes() == ortho.untyped_storage().nbytes() == F32 * 10 * 10
    assert _to_device_keeping_layout(ortho, torch.device("cpu")) is ortho


# ---------------------------------------------------------------------------------------------
# End to end: 2 ranks, gloo, through run.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


def tiny_hidden_shapes():
    cfg = tiny_overrides({})["model"]
    model = GPT(GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"]))
    return [tuple(p.shape) for _, p in split_parameters(model)["hidden"]]


E2E = {
    # name: (optimizer overrides, state bytes of one m x n matrix)
    "galore": ({"group_params": {"rank": 4, "update_proj_gap": 2}}, lambda m, n: galore_expected_bytes(m, n, 4, "std")),
    "muon": ({}, lambda m, n: F32 * m * n),
    "adafactor": ({}, lambda m, n: F32 * (m + n) + STEP),
}


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory, corpus):
    """One 4-step, 2-rank run per new optimizer, launched side by side (each run spends most of
    its time starting processes, so three at once take little longer than one)."""
    results = tmp_path_factory.mktemp("e2e")

    def run(name):
        cfg = tiny_overrides(corpus, steps=4, batch_size=8, micro_batch_size=4, **E2E[name][0])
        return launch(["--optimizer", name, "--name", name, "--nproc", "2", "--config", json.dumps(cfg)], results)

    with ThreadPoolExecutor(max_workers=len(E2E)) as pool:
        done = dict(zip(sorted(E2E), pool.map(run, sorted(E2E))))
    return results, done


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(E2E))
def test_two_rank_run_through_the_launcher(e2e_runs, name):
    results, done = e2e_runs
    r, run_dir = done[name], results / name
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(m["train_loss"]) for m in metrics[1:])
    assert all(math.isfinite(m["val_loss"]) for m in metrics if "val_loss" in m)
    shapes = tiny_hidden_shapes()
    assert sorted(shapes) == sorted([(96, 32), (32, 32), (128, 32), (32, 128)] * 2)
    want = sum(E2E[name][1](m, n) for m, n in shapes)
    if name == "muon":  # sharded over the 2 ranks: rank 0 (which logs) holds its own matrices' buffers
        from optimizers.mofasgd import assign_owners

        owners = assign_owners([m * n for m, n in shapes], 2)
        want = sum(E2E[name][1](m, n) for (m, n), owner in zip(shapes, owners) if owner == 0)
        assert 0 < want < sum(E2E[name][1](m, n) for m, n in shapes)
    assert all(m["opt_state_bytes_hidden"] == want for m in metrics[1:]), (want, metrics[1]["opt_state_bytes_hidden"])
    if name == "muon":
        assert metrics[1]["momentum"] == 0.85 and metrics[2]["momentum"] > 0.85
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rank"] == (4 if name == "galore" else None)
    (ckpt,) = (run_dir / "checkpoints").glob("step_*.pt")
    torch.load(ckpt, map_location="cpu", weights_only=True)  # GaLore's projector is plain data
