"""The models mofa trains, in one readable module.

- `GPT` (arch `gpt2`): GPT-2. Pre-LayerNorm transformer with learned positions, GELU MLP and a
  head tied to the token embedding.
- `SpeedrunGPT` (arch `speedrun`): the modded-nanogpt speedrun architecture the MoFaSGD paper
  pre-trained (RMSNorm, rotary, QK-norm, ReLU^2, value embeddings, U-net skips, soft-capped
  logits); see docs/paper-preset.md.

Attention uses torch's `F.scaled_dot_product_attention`, which runs (forward and backward) on CPU
and GPU alike. Model sizes are plain data: `PRESETS` maps a name to the size fields it sets
(n_layer, n_head, n_embd, block_size), for either architecture. `create_model(arch, **fields)`
builds a model from an architecture name and its config fields (what the launcher does).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 128 for fast matmuls
    block_size: int = 1024  # maximum context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


# Presets: the GPT-2 sizes and two sizes that train in minutes on a laptop CPU.
PRESETS = {
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "cpu-small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "cpu-tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=256),
    # the speedrun architecture: the paper's NanoGPT (6 heads of 128) and a CPU size for tests
    "speedrun": dict(n_layer=12, n_head=6, n_embd=768, block_size=1024),  # 278M with value embeddings
    "speedrun-tiny": dict(n_layer=6, n_head=2, n_embd=64, block_size=256),
}


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


class GPT(nn.Module):
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

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Returns logits (B, T, vocab) and, when targets are given, the mean cross-entropy."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


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
# The modded-nanogpt speedrun architecture (arch "speedrun"): the model behind the MoFaSGD paper's
# NanoGPT pre-training curves. Every block matrix is a separate bias-free n_embd-wide nn.Linear, so
# the optimizers under comparison see the same 768 x 768 and 768 x 3072 matrices as in the paper.

ROPE_BASE = 10000.0  # rotary base frequency, as in the speedrun records the paper's harness forked


@dataclass
class SpeedrunConfig:
    vocab_size: int = 50304
    block_size: int = 1024  # maximum context length (the rotary tables are precomputed to it)
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 768  # head_dim = n_embd // n_head (128 at the paper size)
    num_value_embeds: int = 3  # tables mixed into the values of the first and the last this-many layers
    logit_softcap: float = 15.0  # logits = c * tanh(logits / c)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim without a learned gain (the speedrun uses no norm weights)."""
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary position embeddings: rotates pairs of channels of q and k by position-dependent angles,
    so attention scores depend on relative positions; no learned position table."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, head_dim / 2)
        # not persistent: recomputed from the config, so checkpoints hold only learned weights
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, n_head, head_dim)
        T = x.size(1)
        cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        # the rotation runs in fp32 (the tables' dtype), the result goes back to x's dtype
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


class SpeedrunAttention(nn.Module):
    def __init__(self, config: SpeedrunConfig, has_value_embed: bool):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        # separate q, k, v matrices (not one fused 3C x C) so each is its own hidden matrix
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.rotary = Rotary(config.head_dim, config.block_size)
        if has_value_embed:
            # v <- a * v + b * value_embed(idx): learned mix, starting half and half
            self.v_lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, self.head_dim) for lin in (self.c_q, self.c_k, self.c_v))
        # QK-norm: unit-RMS q and k per head keep the attention logits bounded, which lets the
        # hidden matrices take large steps without the softmax saturating
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))
        if ve is not None:
            v = self.v_lambdas[0] * v + self.v_lambdas[1] * ve.view_as(v)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class ReluSquaredMLP(nn.Module):
    def __init__(self, config: SpeedrunConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2: trained faster than GELU in the speedrun


class SpeedrunBlock(nn.Module):
    def __init__(self, config: SpeedrunConfig, has_value_embed: bool):
        super().__init__()
        self.attn = SpeedrunAttention(config, has_value_embed)
        self.mlp = ReluSquaredMLP(config)
        # the block's input is a learned mix of the residual stream x and the initial embedding x0;
        # [1, 0] starts as a plain residual block
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x: torch.Tensor, x0: torch.Tensor, ve: torch.Tensor | None) -> torch.Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.attn(rms_norm(x), ve)
        return x + self.mlp(rms_norm(x))


class SpeedrunGPT(nn.Module):
    def __init__(self, config: SpeedrunConfig):
        super().__init__()
        if config.n_embd % config.n_head or config.head_dim % 2:
            raise ValueError(f"n_embd ({config.n_embd}) / n_head ({config.n_head}) must be an even integer head_dim")
        if not 0 <= config.num_value_embeds <= config.n_layer // 2:
            raise ValueError(f"num_value_embeds ({config.num_value_embeds}) must be in [0, n_layer // 2 = {config.n_layer // 2}]")
        self.config = config
        L, nve = config.n_layer, config.num_value_embeds
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.value_embeds = nn.ModuleList([nn.Embedding(config.vocab_size, config.n_embd) for _ in range(nve)])
        # U-net symmetric use of the value embeddings: table j feeds layer j and layer L - nve + j
        # (12 layers, 3 tables: layers 0, 1, 2 and 9, 10, 11); the middle layers get none
        self.ve_index = [i if i < nve else i - (L - nve) if i >= L - nve else None for i in range(L)]
        self.blocks = nn.ModuleList([SpeedrunBlock(config, self.ve_index[i] is not None) for i in range(L)])
        # U-net skips: the outputs of the first half (encoder) are added, last in first out, into
        # the inputs of the second half (decoder), each scaled by a learned weight
        self.n_encoder = L // 2
        self.skip_weights = nn.Parameter(torch.ones(self.n_encoder))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from the embedding
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # embeddings keep nn.Embedding's N(0, 1): the token embedding is RMS-normed right away and the
        # value embeddings start at the unit scale the speedrun used
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                # uniform with std 0.5 / sqrt(fan_in), the speedrun's init for its linear layers
                bound = math.sqrt(3) * 0.5 / math.sqrt(lin.in_features)
                lin.weight.uniform_(-bound, bound)
            # zero output projections: every block starts as the identity on the residual stream
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        # zero head: the initial prediction is uniform, loss exactly log(vocab_size)
        self.lm_head.weight.zero_()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Returns logits (B, T, vocab), fp32 and soft-capped, and, when targets are given, the mean cross-entropy."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = x0 = rms_norm(self.embed(idx))
        ves = [ve(idx) for ve in self.value_embeds]
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= self.n_encoder and skips:
                x = x + self.skip_weights[i - self.n_encoder] * skips.pop()
            j = self.ve_index[i]
            x = block(x, x0, ves[j] if j is not None else None)
            if i < self.n_encoder:
                skips.append(x)
        logits = self.lm_head(rms_norm(x)).float()
        # tanh soft-cap: logits stay in (-c, c), which keeps the early, large-lr steps stable
        c = self.config.logit_softcap
        logits = c * torch.tanh(logits / c)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


# ---------------------------------------------------------------------------------------------
# Factory: what the launcher calls with model.arch and ModelConfig.resolved()

ARCHS = {"gpt2": (GPT, GPTConfig), "speedrun": (SpeedrunGPT, SpeedrunConfig)}


def create_model(arch: str, **fields) -> nn.Module:
    """The model of architecture `arch` ("gpt2" or "speedrun") built from its config fields."""
    if arch not in ARCHS:
        raise ValueError(f"unknown model arch {arch!r}; choose one of {', '.join(ARCHS)}")
    model_cls, config_cls = ARCHS[arch]
    return model_cls(config_cls(**fields))
