"""The chunked language-model head loss (model.head_cross_entropy, model key loss_chunk_tokens):
the plain head's loss and gradients exactly (fp64 to 1e-12, fp32 and bf16 autocast to rounding),
for tied (gpt2) and untied, soft-capped (speedrun) heads, and no (tokens x vocab) tensor."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import create_model, head_cross_entropy

ROWS, WIDTH, VOCAB = 37, 8, 50


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, WIDTH, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (2 * torch.randn(VOCAB, WIDTH, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (ROWS,), generator=g)
    return x, w, targets


def loss_and_grads(chunk, softcap, dtype, scale=1.0):
    x, w, targets = inputs(dtype)
    loss = head_cross_entropy(x, w, targets, softcap=softcap, chunk=chunk)
    (scale * loss).backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 64])
def test_chunked_equals_plain_in_fp64(softcap, chunk):
    plain = loss_and_grads(0, softcap, torch.float64, scale=2.5)
    chunked = loss_and_grads(chunk, softcap, torch.float64, scale=2.5)  # an upstream gradient scale
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert plain[1].abs().max() > 1e-3 and plain[2].abs().max() > 1e-3


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_equals_plain_in_fp32_and_under_bf16_autocast(softcap):
    plain, chunked = loss_and_grads(0, softcap, torch.float32), loss_and_grads(7, softcap, torch.float32)
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, chunked = loss_and_grads(0, softcap, torch.float32), loss_and_grads(7, softcap, torch.float32)
    for a, b in zip(chunked, plain):  # bf16 matmuls: equal to bf16 rounding
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_loss_only_path_without_gradients():
    x, w, targets = inputs(torch.float64)
    with torch.no_grad():
        chunked = head_cross_entropy(x, w, targets, softcap=3.0, chunk=8)
        plain = head_cross_entropy(x, w, targets, softcap=3.0, chunk=0)
    assert abs(chunked.item() - plain.item()) < 1e-12


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("arch", ["gpt2", "speedrun"])
def test_models_with_chunked_loss_equal_the_plain_ones_and_hold_no_full_logits(arch):
    """Tied head (gpt2), untied soft-capped head (speedrun): loss and every parameter's gradient
    equal in fp64; and with chunking no op of forward or backward makes a (tokens x vocab) tensor."""
    sizes = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=500)
    if arch == "speedrun":
        sizes["num_value_embeds"] = 1
    B, T = 2, 32
    idx = torch.randint(0, 500, (B, T + 1), generator=torch.Generator().manual_seed(0))
    results, largest = {}, {}
    for chunk in (0, 24):
        torch.manual_seed(0)
        model = create_model(arch, **sizes, loss_chunk_tokens=chunk).double()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        recorder = LargestTensor()
        with recorder:
            _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
        largest[chunk] = recorder.largest
        results[chunk] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results[24][0], results[0][0], rtol=0, atol=1e-12)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[24][1][name], grad, rtol=0, atol=1e-12, msg=name)
    assert largest[0] >= B * T * 500  # the plain head makes the full logits...
    assert largest[24] < B * T * 500  # ...the chunked one never does (at most 24 x 500 at a time)
