"""The speedrun model is the paper harness's model: a dense fp64 reference of its semantics
(document-causal attention, block sliding window, half-truncated rotary, layer 7 without attention,
value mixing in every attention layer), its state_dict keys, the flex_attention block mask, and the
window schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import (EOT_TOKEN, WINDOW_BLOCK, create_model, dense_attention_mask, document_ids, flex_block_mask,
                   window_blocks_at)

VOCAB = 50304
EOT = 63  # the small-vocabulary tests' document separator (GPT-2's, 50256, in the full-vocabulary ones)
# the paper's 12-layer arrangement at a CPU width: head_dim 16, 3 value-embedding tables
SMALL = dict(n_layer=12, n_head=2, n_embd=32, vocab_size=64, eot_token=EOT, block_size=512)


def small_model(**kw):
    torch.manual_seed(0)
    model = create_model("speedrun", **{**SMALL, **kw})
    with torch.no_grad():  # non-zero everywhere, so every term of the forward pass shows in the loss
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def stream(T=512, seed=0, eots=(100, 200, 301, 450), eot=EOT):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, EOT, (1, T + 1), generator=g)
    for pos in eots:  # documents start at these tokens; several cross a 128-token block edge
        idx[0, pos] = eot
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def reference_loss(state: dict, idx, targets, window_blocks, n_head, eot=EOT, softcap=15.0, no_attn=(7,), nve=3):
    """The paper harness's forward pass written out densely in fp64, from its rules alone."""
    w = {k: v.double() for k, v in state.items()}
    B, T = idx.shape
    L = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    C = w["embed.weight"].shape[1]
    hd = C // n_head

    def norm(x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)

    freq = torch.cat([(1 / 1024) ** torch.linspace(0, 1, hd // 4, dtype=torch.float64), torch.zeros(hd // 4, dtype=torch.float64)])
    theta = torch.arange(T, dtype=torch.float64)[:, None] * freq  # (T, hd / 2)
    cos, sin = theta.cos()[None, :, None], theta.sin()[None, :, None]

    def rotate(x):  # (B, T, H, hd)
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([a * cos + b * sin, -a * sin + b * cos], dim=-1)

    # query t sees key s: s <= t, no EOT in (s, t] (same document), and t // 128 - s // 128 < W
    eots_up_to = torch.cat([torch.zeros(B, 1, dtype=torch.float64), (idx == eot).double().cumsum(1)], dim=1)
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    eots_between = eots_up_to[:, 1:][:, :, None] - eots_up_to[:, 1:][:, None, :]  # EOTs in (s, t]
    allowed = (s <= t) & (eots_between == 0)
    if window_blocks is not None:
        allowed &= t // 128 - s // 128 < window_blocks

    ve_layers = list(range(nve)) + [None] * (L - 2 * nve) + list(range(nve))
    x0 = norm(F.embedding(idx, w["embed.weight"]))
    x = x0
    skips = []
    for i in range(L):
        if i >= L // 2:
            x = x + w["skip_weights"][i - L // 2] * skips.pop()
        p = f"blocks.{i}."
        x = w[p + "lambdas"][0] * x + w[p + "lambdas"][1] * x0
        if i not in no_attn:
            h = norm(x)
            q, k, v = (h @ w[p + f"attn.{m}.weight"].T for m in ("c_q", "c_k", "c_v"))
            q, k, v = (t.view(B, T, n_head, hd) for t in (q, k, v))
            lam = w[p + "attn.lambdas"]
            if ve_layers[i] is not None:
                ve = F.embedding(idx, w[f"value_embeds.embed.{ve_layers[i]}.weight"]).view(B, T, n_head, hd)
                v = lam[0] * v + lam[1] * ve
            else:
                v = lam[0] * v
            q, k = rotate(norm(q)), rotate(norm(k))
            scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
            y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, C)
            x = x + y @ w[p + "attn.c_proj.weight"].T
        h = torch.relu(norm(x) @ w[p + "mlp.c_fc.weight"].T).square()
        x = x + h @ w[p + "mlp.c_proj.weight"].T
        if i < L // 2:
            skips.append(x)
    logits = norm(x) @ w["lm_head.weight"].T
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


@pytest.mark.slow
@pytest.mark.parametrize("eots", [(100, 200, 301, 450), ()], ids=["documents", "one-document"])
def test_model_equals_the_dense_reference(eots):
    model = small_model()
    idx, targets = stream(eots=eots)
    for W in (None, 1, 2, 4):
        _, loss = model(idx, targets, window_blocks=W)
        ref = reference_loss(model.state_dict(), idx, targets, W, n_head=2)
        assert abs(loss.item() - ref.item()) < 1e-5, (W, loss.item(), ref.item())
    # the window and the documents change the loss (so the comparison above could fail)
    losses = {W: model(idx, targets, window_blocks=W)[1].item() for W in (None, 1, 2)}
    assert abs(losses[None] - losses[1]) > 1e-3
    if not eots:  # one long document: every window size matters
        assert abs(losses[None] - losses[2]) > 1e-3
    if eots:
        plain = reference_loss(model.state_dict(), idx.clamp(max=EOT - 1), targets, None, n_head=2)
        assert abs(model(idx.clamp(max=EOT - 1), targets)[1].item() - plain.item()) < 1e-5
        assert abs(plain.item() - losses[None]) > 1e-3


def test_gpt2_vocabulary_and_end_of_text_token():
    """At the paper's vocabulary, documents are separated by GPT-2's <|endoftext|> (50256) by default."""
    model = small_model(vocab_size=VOCAB, eot_token=EOT_TOKEN)
    idx, targets = stream(eot=EOT_TOKEN, T=256, eots=(60, 190))
    _, loss = model(idx, targets, window_blocks=1)
    ref = reference_loss(model.state_dict(), idx, targets, 1, n_head=2, eot=EOT_TOKEN)
    assert abs(loss.item() - ref.item()) < 1e-5
    assert create_model("speedrun", n_layer=2, n_head=1, n_embd=8, num_value_embeds=0).config.eot_token == 50256


@pytest.mark.slow
def test_a_0d_tensor_window_and_batches_of_streams_give_the_per_stream_losses():
    """A 0-d tensor window (what the training loop passes) and B > 1 streams, each with its own
    documents, give the per-stream results, eagerly on CPU (dense mask). That a compiled model does
    not retrace as the tensor grows: tests/test_gpu_path.py (CPU), and with flex_attention on CUDA."""
    model = small_model()
    a, ta = stream(seed=1)
    b, tb = stream(seed=2, eots=(5, 130, 131, 400))
    both = model(torch.cat([a, b]), torch.cat([ta, tb]), window_blocks=torch.tensor(2))[1]
    each = (model(a, ta, window_blocks=2)[1] + model(b, tb, window_blocks=2)[1]) / 2
    assert abs(both.item() - each.item()) < 1e-5


def test_state_dict_keys_are_the_paper_harness_keys():
    with torch.device("meta"):
        model = create_model("speedrun", n_layer=12, n_head=6, n_embd=768, vocab_size=VOCAB, block_size=1024)
    expected = {"embed.weight", "lm_head.weight", "skip_weights"}
    expected |= {f"value_embeds.embed.{j}.weight" for j in range(3)}
    for i in range(12):
        expected |= {f"blocks.{i}.lambdas", f"blocks.{i}.mlp.c_fc.weight", f"blocks.{i}.mlp.c_proj.weight"}
        if i != 7:
            expected |= {f"blocks.{i}.attn.{m}.weight" for m in ("c_q", "c_k", "c_v", "c_proj")}
            expected.add(f"blocks.{i}.attn.lambdas")
    assert set(model.state_dict()) == expected
    assert model.num_params() == 275_742_772
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["blocks.0.attn.lambdas"] == (2,) and shapes["skip_weights"] == (6,)


@pytest.mark.slow
def test_an_official_checkpoint_loads_strictly_and_evaluates():
    """A checkpoint saved by a compiled model (keys prefixed `_orig_mod.`) loads after stripping the
    prefix, into a fresh model, and gives the saved model's loss."""
    source = small_model()
    saved = {"_orig_mod." + k: v.clone() for k, v in source.state_dict().items()}
    target = create_model("speedrun", **SMALL)
    target.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved.items()}, strict=True)
    idx, targets = stream()
    assert target(idx, targets, window_blocks=2)[1].item() == source(idx, targets, window_blocks=2)[1].item()


def test_initialisation_is_the_paper_harness_one():
    torch.manual_seed(0)
    model = create_model("speedrun", **SMALL)
    fan_in = 32
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert not p.any(), name
        elif name.endswith(("c_q.weight", "c_k.weight", "c_v.weight", "c_fc.weight")):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound, name
        elif name.endswith("attn.lambdas"):
            assert p.tolist() == [0.5, 0.5]
        elif name.endswith("lambdas"):
            assert p.tolist() == [1.0, 0.0]
    assert sum(b.attn is None for b in model.blocks) == 1 and model.blocks[7].attn is None


@pytest.mark.slow
def test_bf16_keeps_embeddings_and_the_residual_stream_in_bf16():
    model = small_model(bf16=True)
    assert model.embed.weight.dtype == torch.bfloat16
    assert all(t.weight.dtype == torch.bfloat16 for t in model.value_embeds.embed)
    assert model.blocks[0].attn.c_q.weight.dtype == torch.float32  # fp32 master weights
    seen = []
    model.blocks[3].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    idx, targets = stream()
    _, loss = model(idx, targets, window_blocks=2)
    loss.backward()
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32
    assert model.blocks[0].attn.c_q.weight.grad.dtype == torch.float32
    fp32 = small_model()
    assert abs(loss.item() - fp32(idx, targets, window_blocks=2)[1].item()) < 0.05


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")  # eager flex on purpose: the mask function alone
@pytest.mark.parametrize("W", [None, 1, 3])
def test_flex_block_mask_is_exact(W):
    """The BlockMask flex_attention uses on CUDA: every block pair holding an allowed query-key pair
    is visited, every "full" pair is wholly allowed (there the mask function is skipped), and eager
    flex_attention with it equals SDPA with the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    idx = torch.cat([stream(seed=0)[0], stream(seed=3, eots=(0, 127, 128, 255, 384))[0], stream(seed=4, eots=(200,))[0]])
    docs = document_ids(idx, EOT)
    dense = dense_attention_mask(docs, W)[:, 0]  # (B, T, T)
    block_mask = flex_block_mask(docs, W)
    nb = idx.size(1) // WINDOW_BLOCK
    per_block = dense.view(3, nb, WINDOW_BLOCK, nb, WINDOW_BLOCK)
    some = per_block.any(dim=(2, 4))
    every = per_block.all(dim=(2, 4))
    visited = block_mask.to_dense()[:, 0].bool()  # partial + full blocks
    assert torch.equal(visited | some, visited)  # nothing allowed is skipped
    full = torch.zeros_like(visited)
    counts, indices = block_mask.full_kv_num_blocks[:, 0], block_mask.full_kv_indices[:, 0]
    for b in range(3):
        for q in range(nb):
            full[b, q, indices[b, q, : counts[b, q]].long()] = True
    assert torch.equal(full & every, full) and full.any() == (W != 1)  # W = 1: only diagonal blocks
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, idx.size(1), 16) for _ in range(3))
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None]), atol=1e-5, rtol=1e-5)


def test_window_schedule_equals_the_formula_at_every_step():
    steps = 1390
    got = [window_blocks_at(s, steps, (128, 1856)) for s in range(steps + 1)]
    for s in range(steps + 1):
        x = s / steps
        assert got[s] == int(((1 - x) * 128 + x * 1856) // 128)
    assert got[0] == 1 and got[-1] == 14 and got == sorted(got)
    assert window_blocks_at(5, 10, None) is None
