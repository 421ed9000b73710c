"""The models mofa trains, in one readable module.

- `GPT` (arch `gpt2`): GPT-2. Pre-LayerNorm transformer with learned positions, GELU MLP and a
  head tied to the token embedding.
- `SpeedrunGPT` (arch `speedrun`): the MoFaSGD paper's NanoGPT, a modded-nanogpt speedrun model
  (RMSNorm, half-truncated rotary, QK-norm, ReLU^2, value embeddings, U-net skips, soft-capped
  logits, document-causal sliding-window attention); see docs/paper-preset.md.

GPT-2 attends causally with torch's `F.scaled_dot_product_attention`. The speedrun model attends
within documents and a sliding window: through flex_attention's block-sparse kernel on CUDA, and
SDPA with the same mask written out densely elsewhere. Model sizes are plain data: `PRESETS` maps a name to the size fields it sets
(n_layer, n_head, n_embd, block_size), for either architecture. `create_model(arch, **fields)`
builds a model from an architecture name and its config fields (what the launcher does).
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.tokenizer import EOT_TOKEN  # GPT-2's <|endoftext|>: it starts each document of the token stream


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 128 for fast matmuls
    block_size: int = 1024  # maximum context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    loss_chunk_tokens: int = 0  # the head's loss in chunks of this many tokens (head_cross_entropy); 0: all at once


# Presets: the GPT-2 sizes and two sizes that train in minutes on a laptop CPU.
PRESETS = {
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "cpu-small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "cpu-tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=256),
    # the speedrun architecture: the paper's NanoGPT (6 heads of 128) and a CPU size for tests
    "speedrun": dict(n_layer=12, n_head=6, n_embd=768, block_size=1024),  # 275,742,772 parameters
    "speedrun-tiny": dict(n_layer=6, n_head=2, n_embd=64, block_size=256),
}


# ---------------------------------------------------------------------------------------------
# The language-model head's loss, optionally in chunks of tokens: the (tokens x vocab) logits are
# the largest tensors of a small model's step (64K tokens x 50304 is 13 GB in fp32). Chunked, each
# chunk's logits live only while its loss and gradients are computed (model key loss_chunk_tokens).


def _head_logits(x: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap(x W^T) in x's dtype (the weight cast to it, as CastedLinear; autocast applies as usual)."""
    logits = F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype))
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _loss_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softcap(x W^T) over the rows of x, `chunk` rows at a time.

    Each chunk's gradients are formed in the forward pass right after its loss, while its logits
    exist, so no logits are kept for backward and the head's matmul runs once: with
    l = x W^T, z = c tanh(l / c), p = softmax(z),
        dL/dl = (p - onehot(target)) (1 - (z / c)^2)     [the last factor 1 without a soft-cap]
        dL/dx = dL/dl W,   dL/dW = sum over chunks of (dL/dl)^T x      (then / rows)
    backward scales them by the incoming gradient. The softmax runs in fp32 (fp64 for fp64 input),
    the matmuls in x's dtype, as the plain head does."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, chunk):
        w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        dtype = _loss_dtype(x)
        loss_sum = torch.zeros((), dtype=dtype, device=x.device)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, dtype), device=x.device)
        for start in range(0, x.size(0), chunk):
            xc, tc = x[start:start + chunk], targets[start:start + chunk]
            logits = _head_logits(xc, w, softcap)
            z = logits.to(dtype)
            dz = torch.log_softmax(z, dim=-1)
            loss_sum -= dz.gather(1, tc[:, None]).sum()
            dz.exp_()  # the softmax, in place
            dz[torch.arange(len(tc), device=x.device), tc] -= 1
            if softcap is not None:  # d/dl of c tanh(l / c) = 1 - (z / c)^2
                dz.mul_(z.div(softcap).square_().neg_().add_(1))
            dl = dz.to(logits.dtype)
            grad_x[start:start + chunk] = dl @ w
            grad_w += dl.T @ xc
        ctx.save_for_backward(grad_x, grad_w)
        ctx.rows, ctx.weight_dtype = x.size(0), weight.dtype
        return loss_sum / x.size(0)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.rows
        return (grad_x * scale).to(grad_x.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None


def head_cross_entropy(x, weight, targets, softcap=None, chunk=0) -> torch.Tensor:
    """Mean cross-entropy of the head's logits softcap(x W^T), x (..., C), targets (...). chunk > 0:
    `chunk` tokens at a time, no (tokens x vocab) tensor held (ChunkedHeadCrossEntropy when a
    gradient is needed, a loss-only loop otherwise); 0: the plain way, all logits at once."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if chunk <= 0:
        return F.cross_entropy(_head_logits(x, weight, softcap).to(_loss_dtype(x)), targets)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return ChunkedHeadCrossEntropy.apply(x, weight, targets, softcap, chunk)
    total = torch.zeros((), dtype=_loss_dtype(x), device=x.device)
    for start in range(0, x.size(0), chunk):
        logits = _head_logits(x[start:start + chunk], weight, softcap).to(total.dtype)
        total += F.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
    return total / x.size(0)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        # q, k and v projections in one matrix, as GPT-2 stores them
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LanguageModel(nn.Module):
    """What both models share: forward(idx, targets) -> (logits, None) or (None, loss) over at most
    config.block_size tokens."""

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def transformer_blocks(self) -> list[nn.Module]:
        """The repeated blocks, in order: the units FSDP shards and gathers one at a time."""
        raise NotImplementedError

    def check_length(self, idx: torch.Tensor) -> int:
        """The sequence length of a (B, T) batch, which must fit the context."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        return T


class GPT(LanguageModel):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def transformer_blocks(self) -> list[nn.Module]:
        return list(self.transformer.h)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Returns (logits (B, T, vocab), None) without targets, (None, mean cross-entropy) with them."""
        pos = torch.arange(self.check_length(idx), device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        h = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(h), None
        # the (B, T, vocab) logits are not returned with the loss, so they are not kept alive
        return None, head_cross_entropy(h, self.lm_head.weight, targets, chunk=self.config.loss_chunk_tokens)


def build_model(preset: str | None = None, **overrides) -> GPT:
    """A GPT from a preset name plus explicit field overrides (None values are ignored)."""
    fields = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
        fields.update(PRESETS[preset])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return GPT(GPTConfig(**fields))


# ---------------------------------------------------------------------------------------------
# The modded-nanogpt speedrun architecture (arch "speedrun"): the model the MoFaSGD paper pre-trained
# (its harness's train_gpt.py, the record records/010425_SoftCap). Module and parameter names are the
# paper harness's, so its checkpoints load strictly (docs/paper-preset.md lists every choice).

WINDOW_BLOCK = 128  # tokens per block of the sliding window (the paper harness's flex_attention block size)


def window_blocks_at(step: int, total: int, window_tokens) -> int | None:
    """The sliding window, in 128-token blocks, at `step` of `total`: grows linearly from
    window_tokens[0] to window_tokens[1] tokens, floored to whole blocks (the paper harness's schedule,
    128 -> 1856 tokens: 1 block at step 0, 14 at the end). None: no window."""
    if window_tokens is None:
        return None
    x = step / total
    return int(((1 - x) * window_tokens[0] + x * window_tokens[1]) // WINDOW_BLOCK)


@dataclass
class SpeedrunConfig:
    vocab_size: int = 50304
    block_size: int = 1024  # maximum sequence length (the rotary tables are precomputed to it)
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 768  # head_dim = n_embd // n_head (128 at the paper size)
    num_value_embeds: int = 3  # tables mixed into the values of the first and the last this-many layers
    logit_softcap: float = 15.0  # logits = c * tanh(logits / c)
    # layers that have no attention, only the MLP; None: layer 7 at the paper's 12 layers, none otherwise
    skip_attn_layers: tuple[int, ...] | None = None
    bf16: bool = False  # the paper harness's precision: bf16 embeddings, residual stream and matmuls
    eot_token: int = EOT_TOKEN  # the token that starts a document (attention never crosses documents)
    loss_chunk_tokens: int = 0  # the head's loss in chunks of this many tokens (head_cross_entropy); 0: all at once

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attention_free_layers(self) -> tuple[int, ...]:
        if self.skip_attn_layers is None:
            return (7,) if self.n_layer == 12 else ()
        return tuple(self.skip_attn_layers)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim without a learned gain (the speedrun uses no norm weights)."""
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """A bias-free linear layer that runs in its input's dtype: fp32 master weights, bf16 matmuls
    when the residual stream is bf16 (model key `bf16`); a plain nn.Linear in fp32."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)  # nn.Linear's init: U(+-1/sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.type_as(x))


class Rotary(nn.Module):
    """Half-truncated rotary embeddings: of the head_dim / 2 channel pairs, the first head_dim / 4
    rotate with angular frequencies from 1 down to 1/1024 (geometric), the other head_dim / 4 not at
    all (frequency 0), so part of every head is position-free. One table serves every layer."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        quarter = head_dim // 4
        freq = (1 / 1024) ** torch.linspace(0, 1, steps=quarter, dtype=torch.float32)
        freq = torch.cat([freq, freq.new_zeros(head_dim // 2 - quarter)])
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freq)  # (T, head_dim / 2)
        # not persistent: rebuilt from the config, so checkpoints hold only learned weights
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, n_head, head_dim)
        T = x.size(1)
        cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)  # the rotation runs in fp32, the result goes back to x's dtype
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


# -- attention masks ----------------------------------------------------------------------------
# Query t sees key s iff s <= t (causal), both lie in the same document (documents start at each
# EOT token), and, with a sliding window of W blocks, block(t) - block(s) < W, block(i) = i // 128.


def document_ids(idx: torch.Tensor, eot_token: int) -> torch.Tensor:
    """(B, T) document number of every token: the count of EOT tokens up to and including it."""
    return (idx == eot_token).cumsum(dim=1)


def dense_attention_mask(docs: torch.Tensor, window_blocks=None) -> torch.Tensor:
    """(B, 1, T, T) bool mask for F.scaled_dot_product_attention (True: attend); exact on any device,
    T^2 memory, so for CPU-sized sequences."""
    pos = torch.arange(docs.size(1), device=docs.device)
    mask = (pos[:, None] >= pos[None, :]) & (docs[:, :, None] == docs[:, None, :])
    if window_blocks is not None:
        block = pos // WINDOW_BLOCK
        mask = mask & ((block[:, None] - block[None, :]) < window_blocks)
    return mask[:, None]


def flex_block_mask(docs: torch.Tensor, window_blocks=None):
    """The same mask as a flex_attention BlockMask (T a multiple of 128). Block pairs no query-key
    pair of which may attend are skipped; "full" pairs (every pair attends: the key block lies wholly
    before the query block, inside the window, in one document with it) skip the mask function;
    partial pairs evaluate it. The mask function holds the whole rule, window included, so eager
    flex_attention (which applies it alone) is exact too."""
    from torch.nn.attention.flex_attention import BlockMask

    B, T = docs.shape
    if T % WINDOW_BLOCK:
        raise ValueError(f"flex_block_mask needs a sequence length divisible by {WINDOW_BLOCK}, got {T}")
    blocks = docs.view(B, T // WINDOW_BLOCK, WINDOW_BLOCK)
    first, last = blocks[:, :, 0], blocks[:, :, -1]  # documents are numbered in stream order
    q = torch.arange(T // WINDOW_BLOCK, device=docs.device)[:, None]
    kv = q.T
    in_window = torch.ones_like(q >= kv) if window_blocks is None else (q - kv) < window_blocks
    # some pair can attend: causal at block level, in the window, the blocks' document ranges overlap
    some = (q >= kv) & in_window & (first[:, :, None] <= last[:, None, :]) & (first[:, None, :] <= last[:, :, None])
    # every pair attends: the key block is strictly before and the two blocks lie in one document
    full = (q > kv) & in_window & (first[:, None, :] == last[:, :, None])

    def ordered(blockmask):  # (B, nq, nkv) bool -> counts (B, 1, nq), block indices (B, 1, nq, nkv)
        counts = blockmask.sum(dim=-1, dtype=torch.int32)
        indices = blockmask.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[:, None].contiguous(), indices[:, None].contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])
        if window_blocks is not None:
            allowed = allowed & ((q_idx // WINDOW_BLOCK - kv_idx // WINDOW_BLOCK) < window_blocks)
        return allowed

    partial_counts, partial_indices = ordered(some & ~full)
    full_counts, full_indices = ordered(full)
    return BlockMask.from_kv_blocks(partial_counts, partial_indices, full_counts, full_indices,
                                    BLOCK_SIZE=WINDOW_BLOCK, mask_mod=mask_mod)


@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled once: uncompiled it materialises the whole score matrix."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def use_flex_attention(idx: torch.Tensor) -> bool:
    """flex_attention (block-sparse, fast) on CUDA for whole 128-token blocks; SDPA with the dense
    mask elsewhere (on CPU torch's eager flex_attention ignores the block sparsity, and the dense
    mask is exact and small at CPU sequence lengths)."""
    return idx.is_cuda and idx.size(1) % WINDOW_BLOCK == 0


def attention(q, k, v, mask) -> torch.Tensor:
    """q, k, v (B, n_head, T, head_dim); mask a BlockMask (flex_attention) or a dense bool mask."""
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _compiled_flex_attention()(q, k, v, block_mask=mask)


# -- the model ----------------------------------------------------------------------------------


class SpeedrunAttention(nn.Module):
    def __init__(self, config: SpeedrunConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        # separate q, k, v matrices (not one fused 3C x C) so each is its own hidden matrix
        self.c_q = CastedLinear(config.n_embd, config.n_embd)
        self.c_k = CastedLinear(config.n_embd, config.n_embd)
        self.c_v = CastedLinear(config.n_embd, config.n_embd)
        # v <- l0 v + l1 ve (layers with a value embedding), v <- l0 v (the others); learned, from 0.5
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))
        self.c_proj = CastedLinear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, mask, rotary: Rotary) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, self.head_dim) for lin in (self.c_q, self.c_k, self.c_v))
        v = self.lambdas[0] * v + self.lambdas[1] * ve.view_as(v) if ve is not None else self.lambdas[0] * v
        # QK-norm: unit-RMS q and k per head keep the attention logits bounded, which lets the
        # hidden matrices take large steps without the softmax saturating
        q, k = rotary(rms_norm(q)), rotary(rms_norm(k))
        y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class ReluSquaredMLP(nn.Module):
    def __init__(self, config: SpeedrunConfig):
        super().__init__()
        self.c_fc = CastedLinear(config.n_embd, 4 * config.n_embd)
        self.c_proj = CastedLinear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2: trained faster than GELU in the speedrun


class SpeedrunBlock(nn.Module):
    def __init__(self, config: SpeedrunConfig, has_attention: bool):
        super().__init__()
        self.attn = SpeedrunAttention(config) if has_attention else None
        self.mlp = ReluSquaredMLP(config)
        # the block's input is a learned mix of the residual stream x and the initial embedding x0;
        # [1, 0] starts as a plain residual block
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x, x0, ve, mask, rotary) -> torch.Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(rms_norm(x), ve, mask, rotary)
        return x + self.mlp(rms_norm(x))


class ValueEmbeddings(nn.Module):
    """Extra embedding tables of the input tokens, mixed into the attention values."""

    def __init__(self, config: SpeedrunConfig):
        super().__init__()
        self.embed = nn.ModuleList([nn.Embedding(config.vocab_size, config.n_embd)
                                    for _ in range(config.num_value_embeds)])


class SpeedrunGPT(LanguageModel):
    def __init__(self, config: SpeedrunConfig):
        super().__init__()
        if config.n_embd % config.n_head or config.head_dim % 4:
            raise ValueError(f"n_embd ({config.n_embd}) / n_head ({config.n_head}) must be an integer head_dim "
                             "divisible by 4 (half-truncated rotary)")
        if not 0 <= config.num_value_embeds <= config.n_layer // 2:
            raise ValueError(f"num_value_embeds ({config.num_value_embeds}) must be in [0, n_layer // 2 = {config.n_layer // 2}]")
        L, nve = config.n_layer, config.num_value_embeds
        # U-net symmetric use of the value embeddings: table j feeds layer j and layer L - nve + j
        # (12 layers, 3 tables: layers 0, 1, 2 and 9, 10, 11); the middle layers get none
        self.ve_index = [i if i < nve else i - (L - nve) if i >= L - nve else None for i in range(L)]
        no_attn = config.attention_free_layers
        bad = [i for i in no_attn if not 0 <= i < L or self.ve_index[i] is not None]
        if bad:
            raise ValueError(f"skip_attn_layers {list(no_attn)}: layer {bad[0]} is not a layer in [0, {L}) without "
                             f"a value embedding (those are {[i for i in range(L) if self.ve_index[i] is None]})")
        self.config = config
        # built in the paper harness's order, so one seed gives its initial weights
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)  # N(0, 1); RMS-normed right away
        self.blocks = nn.ModuleList([SpeedrunBlock(config, i not in no_attn) for i in range(L)])
        self.value_embeds = ValueEmbeddings(config)
        self.lm_head = CastedLinear(config.n_embd, config.vocab_size)  # untied from the embedding
        # U-net skips: the outputs of the first half (encoder) are added, last in first out, into
        # the inputs of the second half (decoder), each scaled by a learned weight
        self.n_encoder = L // 2
        self.skip_weights = nn.Parameter(torch.ones(self.n_encoder))
        self.rotary = Rotary(config.head_dim, config.block_size)
        with torch.no_grad():
            # zero output projections: every block starts as the identity on the residual stream;
            # zero head: the first prediction is uniform, loss exactly log(vocab_size)
            for block in self.blocks:
                if block.attn is not None:
                    block.attn.c_proj.weight.zero_()
                block.mlp.c_proj.weight.zero_()
            self.lm_head.weight.zero_()
        if config.bf16:  # the paper harness keeps the embedding tables (and their Adam state) in bf16
            self.embed.bfloat16()
            self.value_embeds.bfloat16()

    def attention_mask(self, idx: torch.Tensor, window_blocks=None):
        """The document-causal (sliding-window) mask of a batch, shared by every layer."""
        docs = document_ids(idx, self.config.eot_token)
        if use_flex_attention(idx):
            return flex_block_mask(docs, window_blocks)
        return dense_attention_mask(docs, window_blocks)

    def transformer_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, window_blocks=None):
        """idx, targets (B, T) int64; window_blocks: the sliding window in 128-token blocks (an int
        or a 0-d integer tensor; None: the whole causal context). Returns (logits, None) without
        targets, (None, mean cross-entropy) with them: the (B, T, vocab) logits are not kept."""
        self.check_length(idx)
        mask = self.attention_mask(idx, window_blocks)
        dtype = torch.bfloat16 if self.config.bf16 else self.embed.weight.dtype
        x = x0 = rms_norm(self.embed(idx).to(dtype))
        ves = [table(idx).to(dtype) for table in self.value_embeds.embed]
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= self.n_encoder and skips:
                x = x + self.skip_weights[i - self.n_encoder] * skips.pop()
            j = self.ve_index[i]
            x = block(x, x0, ves[j] if j is not None else None, mask, self.rotary)
            if i < self.n_encoder:
                skips.append(x)
        # the head's logits are tanh soft-capped: they stay in (-c, c), which keeps the early, large-lr
        # steps stable; computed in the stream's dtype, the loss in fp32
        h, c = rms_norm(x), self.config.logit_softcap
        if targets is None:
            return _head_logits(h, self.lm_head.weight, c).float(), None
        return None, head_cross_entropy(h, self.lm_head.weight, targets, softcap=c, chunk=self.config.loss_chunk_tokens)


# ---------------------------------------------------------------------------------------------
# Factory: what the launcher calls with model.arch and ModelConfig.resolved()

ARCHS = {"gpt2": (GPT, GPTConfig), "speedrun": (SpeedrunGPT, SpeedrunConfig)}


def create_model(arch: str, **fields) -> nn.Module:
    """The model of architecture `arch` ("gpt2" or "speedrun") built from its config fields."""
    if arch not in ARCHS:
        raise ValueError(f"unknown model arch {arch!r}; choose one of {', '.join(ARCHS)}")
    model_cls, config_cls = ARCHS[arch]
    return model_cls(config_cls(**fields))
