"""The GPT module, parameter routing and the schedules."""

import pytest
import torch

from model import GPT, GPTConfig, PRESETS, build_model
from optimizers import build_optimizers, split_parameters
from optimizers import AdamWConfig, MoFaSGDConfig
from configs import AdamConfig
from optimizers import apply_group_schedules, linear_warmup, lr_multiplier


def tiny_model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, **kw))


def test_forward_shapes_loss_and_tied_head():
    model = tiny_model()
    idx = torch.randint(0, 64, (3, 16))
    none, loss = model(idx, idx)
    assert none is None  # with targets the (B, T, vocab) logits are not returned (nor kept)
    assert model(idx)[0].shape == (3, 16, 64)
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5
    assert model.lm_head.weight is model.transformer.wte.weight
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_attention_is_causal():
    model = tiny_model().eval()
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 64
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:], atol=1e-6)


def test_presets():
    assert PRESETS["gpt2-small"] == dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    model = build_model("cpu-tiny", vocab_size=128)
    assert model.config.n_layer == 2 and model.config.vocab_size == 128
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("nope")


def test_routing_every_parameter_in_exactly_one_group():
    model = tiny_model()
    groups = split_parameters(model)
    names = {kind: [n for n, _ in ps] for kind, ps in groups.items()}
    assert all(p.ndim == 2 for _, p in groups["hidden"])
    assert len(names["hidden"]) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert set(names["embed"]) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert names["head"] == []  # tied to wte
    assert all(p.ndim == 1 for _, p in groups["scalar"])
    all_ids = [id(p) for ps in groups.values() for _, p in ps]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())

    hidden_opt, adam_opt = build_optimizers(model, "mfsgd", MoFaSGDConfig(rank=4), AdamConfig())
    assert {id(p) for g in hidden_opt.param_groups for p in g["params"]} == {id(p) for _, p in groups["hidden"]}
    assert type(hidden_opt).__name__ == "MoFaSGD"
    kinds = {g["kind"]: g["lr"] for g in adam_opt.param_groups}
    assert set(kinds) == {"embed", "scalar"}
    hidden_opt, _ = build_optimizers(model, "adamw", AdamWConfig(), AdamConfig())
    assert isinstance(hidden_opt, torch.optim.AdamW)


def test_untied_head_is_routed_to_head_group():
    model = tiny_model()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    groups = split_parameters(model)
    assert [n for n, _ in groups["head"]] == ["lm_head.weight"]


def test_lr_schedule_flat_then_linear_cooldown():
    total = 100
    assert lr_multiplier(0, total, 0, 0.4) == 1.0
    assert lr_multiplier(59, total, 0, 0.4) == 1.0
    assert lr_multiplier(60, total, 0, 0.4) == pytest.approx(1.0)
    assert lr_multiplier(80, total, 0, 0.4) == pytest.approx(0.5)
    assert lr_multiplier(99, total, 0, 0.4) == pytest.approx(1 / 40)
    assert lr_multiplier(4, total, 10, 0.4) == pytest.approx(0.5)
    assert lr_multiplier(50, total, 0, 0.0) == 1.0


def test_lr_schedule_takes_the_lower_line_where_warmup_meets_cooldown():
    """10 steps, warmup 8, cooldown over the last 4: the lr never jumps up out of the warmup."""
    factors = [lr_multiplier(s, 10, 8, 0.4) for s in range(10)]
    assert factors[:6] == pytest.approx([(s + 1) / 8 for s in range(6)])
    assert factors[6:] == pytest.approx([min((s + 1) / 8, (10 - s) / 4) for s in range(6, 10)])  # 0.875, 0.75, 0.5, 0.25
    assert all(b <= a for a, b in zip(factors[6:], factors[7:]))


def test_beta_warmup_schedule_writes_param_groups():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = {"beta": linear_warmup(0.65, 0.85, 300)}
    assert apply_group_schedules(opt, sched, 0) == {"beta": 0.65}
    assert opt.param_groups[0]["beta"] == 0.65
    apply_group_schedules(opt, sched, 150)
    assert opt.param_groups[0]["beta"] == pytest.approx(0.75)
    apply_group_schedules(opt, sched, 1000)
    assert opt.param_groups[0]["beta"] == 0.85
