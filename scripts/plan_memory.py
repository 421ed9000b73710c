"""Memory planner: what one GPU (or CPU worker) holds to train a model with each optimizer.

    python -m scripts.plan_memory --preset nanogpt-paper --optimizer mfsgd --rank 32 --world 8
    python -m scripts.plan_memory --config '{"model": {"preset": "gpt2-small"}}' --optimizer adamw
    python -m scripts.plan_memory --hf-config configs/hf/llama-3.1-8b.json --param-dtype bf16 \\
        --micro-batch 1 --seq-len 1024 --optimizer mfsgd --memory-mode sketch
    python -m scripts.plan_memory --shapes '{"hidden": ["768x768*48"], "embed": ["50304x768"]}' --json
    python -m scripts.plan_memory --config @results/RUN/config.json      # a run as it ran

The model is one of: a harness config (configs/base.yaml + --preset + --config JSON, resolved and
validated as run.py does, or a run's own resolved config.json; the model is built on the meta
device, so its parameters, their routing and dtypes are the harness's own), a Hugging Face
LLaMA-style config.json (--hf-config), or explicit matrix shapes (--shapes). What it does not model
(MoE, cross-attention, other architectures' keys) is refused naming the keys, and every size is
checked and bounded (LIMITS), so a bad input is one line and exit code 2, never a wrong answer. Per GPU it prints parameters, gradients, optimizer state (hidden matrices
and the AdamW of the rest), activations, the LM head's loss buffers, communication buffers and the
total, for the chosen optimizer, then one table of AdamW, MoFaSGD (full gradients and sketch mode),
GaLore, Muon and Adafactor side by side. --json prints the same as one JSON object.

Parameters, gradients and optimizer state follow the harness's accounting exactly
(memory.memory_parts: bytes of distinct storages; tests/test_plan_memory.py compares them byte
for byte with real optimizers after a step). Activations and the head are estimates from the
tensors a forward saves for backward, per layer and token; the formulas are printed with the
numbers and written out in docs/memory-planner.md.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_ALIASES = {"float64": "fp64", "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
                 "half": "fp16", "double": "fp64"}
OPTIMIZER_NAMES = ("adafactor", "adamw", "galore", "mfsgd", "muon")
COMPARED = ("adamw", "mfsgd", "mfsgd-sketch", "galore", "muon", "adafactor")
STEP_BYTES = 4  # a float32 0-d `step` tensor (fused AdamW, MoFaSGD, Adafactor); GaLore's is an int, Muon has none
DDP_BUCKET_CAP = 25 * 2**20  # torch DDP's default bucket_cap_mb (the harness keeps it)
DDP_FIRST_BUCKET = 2**20  # DDP's first bucket (dist._DEFAULT_FIRST_BUCKET_BYTES)
# glibc's malloc keeps freed heap memory resident until the free top of the heap exceeds its trim
# threshold, which the dynamic mmap threshold raises to at most 2 x 32 MiB (DEFAULT_MMAP_THRESHOLD_MAX):
# a CPU process's resident peak runs up to this much above its live tensors
CPU_ALLOCATOR_SLACK = 64 * 2**20
BLOCK_NAME = re.compile(r"(?:^|\.)(?:h|blocks|layers)\.(\d+)\.")


class PlanError(ValueError):
    """Bad planner input; the message is one line naming what is accepted."""


# Bounds on every size and count the planner reads: generous for any real model (LLaMA-3.1-405B has
# 126 layers, width 16,384 and a 128,256 vocabulary; the largest data-parallel jobs run on tens of
# thousands of GPUs), and small enough that a plan finishes in seconds instead of running out of memory.
LIMITS = {
    "layers": 10_000,
    # a harness model is built (on the meta device, ~2.5 ms per block): GPT-2 XL has 48 blocks
    "harness_layers": 1_024,
    "size": 2**24,  # a matrix side, model or MLP width, vocabulary, head dimension
    "heads": 2**16,
    "tensors": 100_000,  # parameter tensors listed in all
    "world": 2**16,
    "micro_batch": 2**20,
    "seq_len": 2**24,
    "rank": 2**24,
    "loss_chunk_tokens": 2**40,
    "runtime_mib": 2**30,  # 1 PiB
}


def _show(value, limit: int = 60) -> str:
    """A value for a one-line message (JSON where it can be), cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def bounded_int(value, what: str, limit: int, low: int = 1) -> int:
    """`value` if it is an integer in [low, limit] (not a bool), else a one-line PlanError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{what} must be an integer in [{low}, {limit:,}], got {_show(value)}")
    if value < low:
        raise PlanError(f"{what} must be >= {low}, got {value}")
    if value > limit:
        raise PlanError(f"{what} must be <= {limit:,} (the planner's bound), got {value:,}")
    return value


def read_input(path: str, what: str) -> str:
    """The text of a file the planner reads, or a one-line PlanError (missing, unreadable, not
    UTF-8, too large): the harness's own reader."""
    from configs import ConfigError, read_text

    try:
        return read_text(path, what)
    except ConfigError as e:
        raise PlanError(str(e)) from None


def parse_input(text: str, source: str):
    """JSON text, or a one-line PlanError (also for nesting too deep for the parser)."""
    from configs import ConfigError, parse_json

    try:
        return parse_json(text, source)
    except ConfigError as e:
        raise PlanError(str(e)) from None


def dtype_name(value: str, what: str) -> str:
    """A dtype name as given on the command line or in a config ('bf16', 'bfloat16', 'torch.bfloat16')."""
    key = str(value).lower().removeprefix("torch.")
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise PlanError(f"{what} {value!r} is not a dtype; choose one of {', '.join(DTYPE_BYTES)}")
    return key


def torch_dtype_name(dtype) -> str:
    return dtype_name(str(dtype), "parameter dtype")


# ---------------------------------------------------------------------------------------------
# Model description: every parameter (name, shape, routing kind, dtype), plus what the activation
# formulas need.


@dataclass
class Param:
    name: str
    shape: tuple
    kind: str  # hidden (the chosen optimizer), embed, head, scalar (AdamW): optimizers.split_parameters
    dtype: str
    block: int | None = None  # transformer block index, None for embeddings / head / final norm

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelDesc:
    name: str
    params: list
    arch: str  # gpt2, speedrun, llama, or shapes (no activation formula)
    n_layer: int = 0
    d_model: int = 0
    n_head: int = 0
    n_kv_head: int = 0
    head_dim: int = 0
    d_ff: int = 0
    vocab_size: int = 0
    block_size: int = 0
    loss_chunk_tokens: int = 0
    softcap: bool = False
    bf16_stream: bool = False  # speedrun model.bf16: bf16 residual stream, CastedLinear casts
    attention_free_layers: tuple = ()
    num_value_embeds: int = 0
    buffer_bytes: int = 0  # non-parameter buffers (the speedrun's rotary tables)
    source: dict = field(default_factory=dict)  # how it was described (for the report)

    def of_kind(self, kind):
        return [p for p in self.params if p.kind == kind]


def harness_model(cfg) -> ModelDesc:
    """The harness's model of a resolved RunConfig, built on the meta device (no memory): its
    parameters, routing (optimizers.split_parameters) and dtypes are exactly the run's."""
    import torch

    from model import SpeedrunConfig, create_model
    from optimizers import split_parameters

    fields = cfg.model.resolved()
    with torch.device("meta"):
        model = create_model(cfg.model.arch, **fields)
    params = []
    for kind, named in split_parameters(model).items():
        for name, p in named:
            match = BLOCK_NAME.search(name)
            params.append(Param(name, tuple(p.shape), kind, torch_dtype_name(p.dtype),
                                int(match.group(1)) if match else None))
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    params.sort(key=lambda p: order[p.name])
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    desc = ModelDesc(
        name=f"{cfg.model.arch} {cfg.model.preset or 'custom'} ({fields['n_layer']}L, d {fields['n_embd']}, "
             f"{fields['n_head']} heads, vocab {fields['vocab_size']})",
        params=params, arch=cfg.model.arch, n_layer=fields["n_layer"], d_model=fields["n_embd"],
        n_head=fields["n_head"], n_kv_head=fields["n_head"], head_dim=fields["n_embd"] // fields["n_head"],
        d_ff=4 * fields["n_embd"], vocab_size=fields["vocab_size"], block_size=fields["block_size"],
        loss_chunk_tokens=fields["loss_chunk_tokens"], buffer_bytes=buffers, source={"kind": "harness"})
    if cfg.model.arch == "speedrun":
        sc = SpeedrunConfig(**fields)
        desc.softcap = True
        desc.bf16_stream = bool(sc.bf16)
        desc.attention_free_layers = tuple(sc.attention_free_layers)
        desc.num_value_embeds = sc.num_value_embeds
    return desc


HF_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
HF_LIMITS = {"hidden_size": "size", "intermediate_size": "size", "num_hidden_layers": "layers",
             "num_attention_heads": "heads", "vocab_size": "size", "num_key_value_heads": "heads", "head_dim": "size"}
# Keys of Hugging Face configs that describe parameters or activations the LLaMA-style enumeration
# does not have; planned as a dense LLaMA such a model would get a wrong answer (Mixtral's 46.7B
# parameters as 7.2B), so a config that sets any of them (to anything but null, false, 0 or empty)
# is refused. Keys that change nothing here (rope_scaling, sliding_window, bos_token_id,
# architectures, torch_dtype, ...) are fine.
HF_UNMODELLED = {
    "mixture-of-experts layers": (
        "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
        "n_shared_experts", "shared_expert_intermediate_size", "moe_layer_freq", "first_k_dense_replace",
        "decoder_sparse_step", "mlp_only_layers", "moe_num_experts", "router_aux_loss_coef", "num_moe_experts"),
    "cross-attention or an encoder": (
        "cross_attention_layers", "add_cross_attention", "is_encoder_decoder", "encoder_layers",
        "num_encoder_layers", "encoder_config"),
    "low-rank (latent) attention projections": (
        "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"),
    "sub-models (a multimodal or composite config)": ("text_config", "vision_config", "audio_config"),
    "extra norms or soft-capped logits": (
        "attn_logit_softcapping", "final_logit_softcapping", "use_qk_norm", "qk_layernorm", "use_post_norm"),
    "a parallel attention-MLP block": ("parallel_attn", "use_parallel_residual", "parallel_residual"),
}
# model_type values whose parameters are exactly the enumeration below (Qwen2: biases on q, k, v)
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _set(value) -> bool:
    return value not in (None, False, 0, "", [], {})


def hf_model(path: str) -> tuple[ModelDesc, str | None]:
    """A LLaMA-style Hugging Face config.json (LLaMA, Mistral, Qwen2): embeddings, per layer q/k/v/o
    and gate/up/down projections (with biases under attention_bias / mlp_bias, and Qwen2's q/k/v
    biases) and two RMSNorm gains, a final norm, an lm_head unless tie_word_embeddings. Returns the
    description and the config's torch_dtype (or None). Anything else is refused in one line."""
    if not os.path.isfile(path):
        raise PlanError(f"--hf-config file not found: {path} (give a Hugging Face config.json)")
    cfg = parse_input(read_input(path, "--hf-config"), f"--hf-config {path}")
    if not isinstance(cfg, dict):
        raise PlanError(f"--hf-config {path} must hold a JSON object, got {type(cfg).__name__}")
    unmodelled = [(what, [k for k in keys if _set(cfg.get(k))]) for what, keys in HF_UNMODELLED.items()]
    unmodelled = [(what, keys) for what, keys in unmodelled if keys]
    if unmodelled:
        found = "; ".join(f"{', '.join(keys)} ({what})" for what, keys in unmodelled)
        raise PlanError(f"--hf-config {path} sets {found}, which the planner does not model: it plans dense "
                        "LLaMA-style decoders only; describe other models with --shapes")
    model_type = cfg.get("model_type")
    if model_type is not None and model_type not in HF_MODEL_TYPES:
        raise PlanError(f"--hf-config {path}: model_type {_show(model_type)} is not modelled (the planner enumerates "
                        f"{', '.join(HF_MODEL_TYPES)}); describe other models with --shapes")
    missing = [k for k in HF_REQUIRED if k not in cfg]
    if missing:
        raise PlanError(f"--hf-config {path} lacks {', '.join(missing)}; a LLaMA-style config needs positive integers "
                        f"{', '.join(HF_REQUIRED)} (optional: num_key_value_heads, head_dim, tie_word_embeddings)")
    for key, limit in HF_LIMITS.items():
        if key in HF_REQUIRED or cfg.get(key) is not None:
            bounded_int(cfg[key], f"--hf-config {path}: {key}", LIMITS[limit])
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise PlanError(f"--hf-config {path}: {key} must be true or false, got {_show(cfg[key])}")
    h, f, L, a, V = (cfg[k] for k in HF_REQUIRED)
    kv_heads = cfg.get("num_key_value_heads") or a
    hd = cfg.get("head_dim") or h // a
    if hd < 1:
        raise PlanError(f"--hf-config {path}: num_attention_heads ({a}) exceeds hidden_size ({h}); give head_dim")
    if a % kv_heads:
        raise PlanError(f"--hf-config {path}: num_attention_heads ({a}) must be a multiple of num_key_value_heads ({kv_heads})")
    dt = cfg.get("torch_dtype") or cfg.get("dtype")
    if dt is not None and not isinstance(dt, str):
        raise PlanError(f"--hf-config {path}: torch_dtype must be a dtype name, got {_show(dt)}")
    dtype = dtype_name(dt, "the config's torch_dtype") if dt else "fp32"
    # transformers' own rules: LLaMA puts attention_bias on q, k, v and o and mlp_bias on the MLP;
    # Qwen2 always has q, k, v biases and Mistral none (both ignore the two keys)
    if model_type == "qwen2":
        attention_biases, mlp_bias = ("q_proj", "k_proj", "v_proj"), False
    elif model_type == "mistral":
        attention_biases, mlp_bias = (), False
    else:
        attention_biases = ("q_proj", "k_proj", "v_proj", "o_proj") if cfg.get("attention_bias", False) else ()
        mlp_bias = cfg.get("mlp_bias", False)
    bias_size = {"q_proj": a * hd, "k_proj": kv_heads * hd, "v_proj": kv_heads * hd, "o_proj": h}
    params = [Param("model.embed_tokens.weight", (V, h), "embed", dtype)]
    for i in range(L):
        pre = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (a * hd, h)), ("self_attn.k_proj", (kv_heads * hd, h)),
                            ("self_attn.v_proj", (kv_heads * hd, h)), ("self_attn.o_proj", (h, a * hd)),
                            ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)), ("mlp.down_proj", (h, f))):
            params.append(Param(pre + name + ".weight", shape, "hidden", dtype, i))
        for name in attention_biases:
            params.append(Param(pre + f"self_attn.{name}.bias", (bias_size[name],), "scalar", dtype, i))
        if mlp_bias:
            for name, n in (("gate_proj", f), ("up_proj", f), ("down_proj", h)):
                params.append(Param(pre + f"mlp.{name}.bias", (n,), "scalar", dtype, i))
        params += [Param(pre + "input_layernorm.weight", (h,), "scalar", dtype, i),
                   Param(pre + "post_attention_layernorm.weight", (h,), "scalar", dtype, i)]
    params.append(Param("model.norm.weight", (h,), "scalar", dtype))
    if not cfg.get("tie_word_embeddings", False):
        params.append(Param("lm_head.weight", (V, h), "head", dtype))
    name = cfg.get("_name_or_path") if isinstance(cfg.get("_name_or_path"), str) and cfg["_name_or_path"] else None
    name = (name or os.path.basename(path))[:200]
    desc = ModelDesc(name=f"{name} ({L}L, d {h}, ffn {f}, {a} heads / {kv_heads} KV, vocab {V})", params=params,
                     arch="llama", n_layer=L, d_model=h, n_head=a, n_kv_head=kv_heads, head_dim=hd, d_ff=f,
                     vocab_size=V, source={"kind": "hf", "path": path})
    return desc, (dtype if dt else None)


SHAPE = re.compile(r"\s*(\d+)\s*x\s*(\d+)\s*(?:\*\s*(\d+))?\s*$")


def shapes_model(text: str) -> ModelDesc:
    """--shapes: {"hidden": [...], "embed": [...], "head": [...], "scalar": [...]} (each entry "MxN",
    "MxN*COUNT", [M, N] or [M, N, COUNT]; scalar entries are element counts), optional "dtype", "name"
    and "transformer": {"n_layer", "d_model", "n_head", "d_ff", "vocab_size", optional "n_kv_head",
    "mlp": "gelu" (default) or "swiglu"} for the activation estimate; inline JSON or @file."""
    source = "--shapes"
    if text.startswith("@"):
        source = text[1:]
        if not os.path.isfile(source):
            raise PlanError(f"--shapes file not found: {source}")
        text = read_input(source, "--shapes file")
    spec = parse_input(text, source)
    kinds = ("hidden", "embed", "head", "scalar")
    if not isinstance(spec, dict) or not set(spec) <= set(kinds) | {"dtype", "transformer", "name"}:
        raise PlanError(f"{source} must be a JSON object with keys among {', '.join(kinds)}, dtype, transformer, name")
    if not isinstance(spec.get("dtype", "fp32"), str):
        raise PlanError(f"{source}: dtype must be a dtype name, got {_show(spec['dtype'])}")
    dtype = dtype_name(spec.get("dtype", "fp32"), f"{source} dtype")
    name = spec.get("name", "explicit shapes")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise PlanError(f"{source}: name must be a non-empty string of at most 200 characters, got {_show(name)}")
    size, tensors = LIMITS["size"], LIMITS["tensors"]
    entries_of = []  # (kind, j, m, n, count): everything checked before any Param exists
    total = 0
    for kind in kinds:
        entries = spec.get(kind, [])
        if not isinstance(entries, list):
            raise PlanError(f"{source}: {kind} must be a list of shapes")
        for j, entry in enumerate(entries):
            if kind == "scalar":
                bounded_int(entry, f"{source}: a scalar entry (an element count)", size * size)
                entries_of.append((kind, j, entry, None, 1))
                total += 1
                continue
            if isinstance(entry, str) and SHAPE.match(entry):
                m, n, count = SHAPE.match(entry).groups()
                m, n, count = int(m), int(n), int(count or 1)
            elif isinstance(entry, list) and len(entry) in (2, 3) and \
                    all(isinstance(v, int) and not isinstance(v, bool) for v in entry):
                m, n, count = entry[0], entry[1], entry[2] if len(entry) == 3 else 1
            else:
                raise PlanError(f"{source}: {kind} entry {_show(entry)} is not a shape; write \"MxN\", \"MxN*COUNT\", "
                                "[M, N] or [M, N, COUNT]")
            if min(m, n, count) <= 0:
                raise PlanError(f"{source}: {kind} entry {_show(entry)} has a zero or negative size")
            bounded_int(m, f"{source}: {kind} entry {_show(entry)}: M", size)
            bounded_int(n, f"{source}: {kind} entry {_show(entry)}: N", size)
            bounded_int(count, f"{source}: {kind} entry {_show(entry)}: COUNT", tensors)
            entries_of.append((kind, j, m, n, count))
            total += count
        if total > tensors:
            raise PlanError(f"{source} lists more than {tensors:,} parameter tensors (the planner's bound), got {total:,}")
    params = []
    for kind, j, m, n, count in entries_of:
        if n is None:
            params.append(Param(f"scalar.{j}", (m,), kind, dtype))
        else:
            params += [Param(f"{kind}.{j}.{c}", (m, n), kind, dtype) for c in range(count)]
    if not params:
        raise PlanError(f"{source} lists no parameters")
    desc = ModelDesc(name=name, params=params, arch="shapes", source={"kind": "shapes"})
    tr = spec.get("transformer")
    if tr is not None:
        need = {"n_layer": "layers", "d_model": "size", "n_head": "heads", "d_ff": "size", "vocab_size": "size"}
        if not isinstance(tr, dict) or any(k not in tr for k in need):
            raise PlanError(f"{source}: transformer needs positive integers {', '.join(need)} (optional n_kv_head, "
                            "mlp gelu or swiglu)")
        unknown = sorted(set(tr) - set(need) - {"n_kv_head", "mlp"})
        if unknown:
            raise PlanError(f"{source}: transformer has unknown keys {', '.join(map(str, unknown))}; it takes "
                            f"{', '.join(need)}, n_kv_head and mlp")
        for key, limit in need.items():
            bounded_int(tr[key], f"{source}: transformer.{key}", LIMITS[limit])
        if "n_kv_head" in tr and (bounded_int(tr["n_kv_head"], f"{source}: transformer.n_kv_head", LIMITS["heads"])
                                  > tr["n_head"] or tr["n_head"] % tr["n_kv_head"]):
            raise PlanError(f"{source}: transformer.n_head ({tr['n_head']}) must be a multiple of n_kv_head "
                            f"({tr['n_kv_head']})")
        mlp = tr.get("mlp", "gelu")
        if mlp not in ("gelu", "swiglu"):
            raise PlanError(f"{source}: transformer.mlp must be gelu or swiglu, got {_show(mlp)}")
        if tr["n_head"] > tr["d_model"]:
            raise PlanError(f"{source}: transformer.n_head ({tr['n_head']}) exceeds d_model ({tr['d_model']})")
        desc.arch = "gpt2" if mlp == "gelu" else "llama"
        desc.n_layer, desc.d_model, desc.n_head, desc.d_ff, desc.vocab_size = (tr[k] for k in need)
        desc.n_kv_head = tr.get("n_kv_head", tr["n_head"])
        desc.head_dim = desc.d_model // desc.n_head
        desc.source["transformer"] = mlp
        blocks = desc.n_layer
        hidden = desc.of_kind("hidden")
        if hidden and len(hidden) % blocks == 0:  # spread the hidden matrices over the blocks, in order
            per = len(hidden) // blocks
            for i, p in enumerate(hidden):
                p.block = i // per
    return desc


# ---------------------------------------------------------------------------------------------
# Optimizer state, per parameter, exactly as the harness's optimizers hold it


@dataclass
class OptChoice:
    name: str  # adamw, mfsgd, galore, muon, adafactor
    rank: int | None = None
    memory_mode: str = "full"  # MoFaSGD: full or sketch
    comm: str = "full"  # MoFaSGD: full or sketch
    shard: bool = False  # MoFaSGD / Muon: each data-parallel rank keeps the state of the matrices it owns
    proj_type: str = "std"  # GaLore
    fused: bool = True  # AdamW on the hidden matrices
    rank_policy: str = "fixed"  # MoFaSGD: fixed, or energy (ranks re-allocated under rank_budget)
    rank_budget: int | None = None  # MoFaSGD energy: factor numbers (None: what uniform `rank` holds)

    @property
    def label(self) -> str:
        if self.name == "mfsgd":
            policy = "" if self.rank_policy == "fixed" else \
                f" energy budget={self.rank_budget}" if self.rank_budget else " energy (budget of uniform r)"
            return f"mfsgd r={self.rank}" + policy + (" sketch" if self.memory_mode == "sketch" else "")
        if self.name == "galore":
            return f"galore r={self.rank}" + ("" if self.proj_type == "std" else f" {self.proj_type}")
        return self.name


def fsdp_refusal(opt: OptChoice) -> str | None:
    """Why the harness refuses this optimizer under train.parallel fsdp (configs.check_fsdp_support's
    words), or None: the planner plans only what the harness runs."""
    from configs import check_fsdp_support

    try:
        check_fsdp_support(opt.name, opt)
    except ValueError as e:
        return str(e)
    return None


def opt_choice(name: str, cfg) -> OptChoice:
    """The planner's view of an optimizer config dataclass (optimizers.OPTIMIZERS[name].config)."""
    if name == "mfsgd":
        return OptChoice(name, rank=cfg.rank, memory_mode=cfg.memory_mode, comm=cfg.comm, shard=cfg.shard,
                         rank_policy=cfg.rank_policy, rank_budget=cfg.rank_budget)
    if name == "galore":
        return OptChoice(name, rank=cfg.group_params.rank, proj_type=cfg.group_params.proj_type)
    if name == "muon":
        return OptChoice(name, shard=cfg.shard)
    if name == "adamw":
        return OptChoice(name, fused=cfg.fused)
    return OptChoice(name)


def mofasgd_dtype(param_dtype: str) -> str:
    """MoFaSGD keeps its factors in the compute dtype: fp64 for fp64 parameters, else fp32."""
    return "fp64" if param_dtype == "fp64" else "fp32"


def hidden_state_bytes(p: Param, opt: OptChoice, param_dtype: str, grad_dtype: str, state_dtype: str | None,
                       rows: int | None = None) -> int:
    """Bytes of the hidden-matrix optimizer's state for one m x n matrix (state_dtype None: the
    harness's own dtypes) held by a rank that holds `rows` of its rows (FSDP; None: all m). Under
    FSDP the state tensors shaped like the weight are split like it (U's rows too), while V, S and
    the step counter are whole on every rank."""
    m, n = p.shape[0], math.prod(p.shape[1:])
    rows = m if rows is None else rows
    if opt.name == "adamw":  # exp_avg, exp_avg_sq like the parameter, and a float32 step
        return 2 * rows * n * DTYPE_BYTES[state_dtype or param_dtype] + STEP_BYTES
    if opt.name == "mfsgd":  # U (m x r'), S (r'), V (n x r') in the compute dtype, and a float32 step
        r = min(opt.rank, m, n)
        return ((rows + n) * r + r) * DTYPE_BYTES[state_dtype or mofasgd_dtype(param_dtype)] + STEP_BYTES
    if opt.name == "muon":  # momentum_buffer like the gradient
        return rows * n * DTYPE_BYTES[state_dtype or grad_dtype]
    if opt.name == "adafactor":  # row_var (m x 1) and col_var (1 x n) like the gradient, and a float32 step
        return (m + n) * DTYPE_BYTES[state_dtype or grad_dtype] + STEP_BYTES
    if opt.name == "galore":
        return galore_state_bytes(m, n, opt.rank, opt.proj_type, grad_dtype, state_dtype)
    raise PlanError(f"unknown optimizer {opt.name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")


def galore_state_bytes(m, n, rank, proj_type, grad_dtype, state_dtype=None) -> int:
    """galore-torch 1.0: exp_avg and exp_avg_sq of the projected gradient (its dtype), and the
    projector's ortho_matrix: for fp32 gradients a slice of the SVD factor, which pins the whole
    factor (U: m x k, Vh: k x n, k = min(m, n)); for other dtypes a cast copy of the slice alone.
    The step is a Python int. r' = min(rank, k)."""
    k = min(m, n)
    r = min(rank, k)
    tall = m >= n
    # (projected gradient shape, ortho matrices as (sliced shape, pinned fp32 factor shape))
    right = ((r, n), (k, n))  # Vh[:r]
    left = ((m, r), (m, k))  # U[:, :r]
    if proj_type == "std":
        projected, orthos = ((m, r), [right]) if tall else ((r, n), [left])
    elif proj_type == "reverse_std":
        projected, orthos = ((r, n), [left]) if tall else ((m, r), [right])
    elif proj_type == "right":
        projected, orthos = (m, r), [right]
    elif proj_type == "left":
        projected, orthos = (r, n), [left]
    elif proj_type == "full":
        projected, orthos = (r, r), [left, right]
    else:
        raise PlanError(f"unknown GaLore proj_type {proj_type!r}; choose one of std, reverse_std, right, left, full")
    moments = 2 * math.prod(projected) * DTYPE_BYTES[state_dtype or grad_dtype]
    if grad_dtype == "fp32":
        ortho = sum(math.prod(pinned) for _, pinned in orthos) * 4
    else:
        ortho = sum(math.prod(sliced) for sliced, _ in orthos) * DTYPE_BYTES[grad_dtype]
    return moments + ortho


def adamw_state_bytes(numel: int, param_dtype: str, state_dtype: str | None) -> int:
    """The AdamW of the embeddings, head and 1-D parameters (fused): two moments like the parameter
    and a float32 step."""
    return 2 * numel * DTYPE_BYTES[state_dtype or param_dtype] + STEP_BYTES


def sketch_bytes(p: Param, rank: int, rows: int | None = None) -> int:
    """MoFaSGD's pending sketches of one matrix: G V (m x r'), G^T U (n x r'), U^T G V (r' x r') in
    the compute dtype; under FSDP (`rows` of the m rows held) G V has this rank's rows and the other
    two are this rank's partial sums (whole size)."""
    m, n = p.shape
    r = min(rank, m, n)
    rows = m if rows is None else rows
    return ((rows + n) * r + r * r) * DTYPE_BYTES[mofasgd_dtype(p.dtype)]


def assign_owners(sizes, world):
    from mofasgd.optimizer import assign_owners as harness_assign_owners  # the harness's own rule

    return harness_assign_owners(sizes, world)


# ---------------------------------------------------------------------------------------------
# Activations: bytes saved for backward per layer and token (formulas checked against the tensors
# a real forward saves, tests/test_plan_memory.py; derivation in docs/memory-planner.md)


@dataclass
class Setup:
    micro_batch: int
    seq_len: int
    parallel: str = "ddp"  # ddp or fsdp
    world: int = 1
    distributed: bool = False  # DDP even at world 1 (run.py --distributed)
    param_dtype: str | None = None  # None: the model's own
    grad_dtype: str | None = None  # None: like the parameter
    state_dtype: str | None = None  # None: each optimizer's own rule
    master_weights: bool = False  # an fp32 copy of every non-fp32 parameter in the optimizer state
    checkpointing: str = "none"  # none or block
    loss_chunk_tokens: int | None = None  # None: the model's own
    attention: str = "flash"  # flash (no T^2 tensor saved) or math (softmax probabilities saved)
    device: str = "cuda"  # cuda or cpu (the CPU attention path and the process's own memory)
    autocast: str = "none"  # the harness's train.autocast (gpt2 only)
    runtime_bytes: int = 0  # the process itself (interpreter, libraries): CPU plans only
    allocator_bytes: int = 0  # freed memory the allocator keeps resident: CPU plans only (CPU_ALLOCATOR_SLACK)


def activation_terms(model: ModelDesc, setup: Setup) -> dict:
    """Per-token bytes of a layer's saved activations and the per-forward extras, with a formula."""
    h, f, a, T = model.d_model, model.d_ff, model.n_head, setup.seq_len
    pd = setup.param_dtype
    if model.arch == "gpt2":
        if setup.autocast == "bf16" and pd is None:
            # LayerNorm inputs stay fp32 (the residual stream); linear inputs saved as bf16 casts; the
            # attention output is the out-projection's input (flash layout)
            per_layer = 4 * 2 * h + 2 * (h + 3 * h + h + h + 4 * h + 4 * h) + 4 * (4 + a)
            formula = "8h (fp32 LN inputs) + 2 x 14h (bf16 casts, qkv, attention out, GELU in/out) + 4 (4 + heads)"
            e = 4
        else:
            e = DTYPE_BYTES[pd or model.params[0].dtype]
            per_layer = e * 16 * h + 4 * (4 + a)
            formula = (f"{e} x 16h + 4 x (4 + heads): LN inputs 2h, LN outputs 2h, qkv 3h, attention output h "
                       "(= the out-projection's input), MLP hidden 4h before and 4h after GELU; LN mean/rstd, "
                       "attention logsumexp in fp32")
        layers = [per_layer] * model.n_layer
        per_token_global = 8 + e * h + 8  # token ids; ln_f input and its stats
        return dict(e=e, layers=layers, per_layer_formula=formula, global_per_token=per_token_global,
                    global_formula=f"8 (token ids) + {e}h + 8 (final LayerNorm input and stats)",
                    per_forward=8 * T, per_forward_formula="position ids 8T")
    if model.arch == "speedrun":
        e = 2 if model.bf16_stream else DTYPE_BYTES[pd or "fp32"]
        # rms_norm on CPU upcasts a bf16 input and saves the fp32 copy; CUDA's fused kernel saves the input
        n = 4 if (e == 2 and setup.device == "cpu") else e
        attn_layer = e * (8 * h + 2 * f) + n * 4 * h + 4 * (2 + 2 * a) + 4 * a
        mlp_layer = e * (2 * h + 2 * f) + n * h + 4
        if setup.device == "cpu":  # SDPA's CPU kernel converts the bool mask to a float one per layer
            attn_layer += e * T
        layers = [mlp_layer if i in model.attention_free_layers else attn_layer for i in range(model.n_layer)]
        # U-net skips: encoder block i's output is block i + 1's saved input, except the last encoder
        # block's (the first decoder block adds it to itself): one extra tensor
        skips = 1 if model.n_layer // 2 >= 1 else 0
        per_token_global = 8 + n * h + 4 + e * h * (model.num_value_embeds + skips) + n * h + 4
        per_forward = 0
        per_forward_formula = ""
        if model.bf16_stream:  # CastedLinear saves a bf16 copy of each hidden matrix per forward
            per_forward = 2 * sum(p.numel for p in model.of_kind("hidden"))
            per_forward_formula = "bf16 copies of the hidden matrices (CastedLinear) 2 x hidden numel"
        if setup.device == "cpu":  # the dense bool mask (B, 1, T, T) of the forward
            per_forward += setup.micro_batch * T * T
            per_forward_formula += (" + " if per_forward_formula else "") + "bool mask B T^2"
        else:  # flex_attention's BlockMask: int32 counts and indices of (T / 128)^2 blocks
            per_forward += setup.micro_batch * 16 * (T // 128 + 1) ** 2
        formula = (f"attention layers {e} x (8h + 2f) + {n} x 4h + 4 x (2 + 3 heads)"
                   + (f" + {e}T (CPU float mask)" if setup.device == "cpu" else "")
                   + f"; MLP-only layers {e} x (2h + 2f) + {n}h + 4: block input mix h, norm inputs (x, q, k) "
                   "and outputs, v, rotated q and k, mixed v, attention output, ReLU output and its square 2f")
        return dict(e=e, layers=layers, per_layer_formula=formula, global_per_token=per_token_global,
                    global_formula=(f"8 (ids) + 2 x ({n}h + 4) (first and final norm inputs) + {e}h x "
                                    f"({model.num_value_embeds} value embeddings + {skips} U-net skip)"),
                    per_forward=per_forward, per_forward_formula=per_forward_formula)
    if model.arch == "llama":
        e = DTYPE_BYTES[pd or model.params[0].dtype]
        q_width, kv_width = a * model.head_dim, model.n_kv_head * model.head_dim
        # Hugging Face's eager RMSNorm: fp32 copy of the input (4h) and rsqrt (4), the normalised
        # value in the model dtype (saved by the gain's product) and the output (saved by the projections)
        norm = 4 * h + 4 + 2 * e * h
        # SDPA with native GQA (transformers 5 on torch >= 2.5): rotated q, k and v at their own widths,
        # the output (= o_proj's input) and the logsumexp
        attn = e * (2 * q_width + 2 * kv_width) + 4 * a
        mlp = e * 4 * f
        per_layer = 2 * norm + attn + mlp
        formula = (f"2 x (4h + 4 + {e} x 2h) (two RMSNorms: fp32 input copy, rsqrt, normalised and scaled values) "
                   f"+ {e} x (2 q_width + 2 kv_width) + 4 x heads (rotated q and k, v, attention output = o_proj "
                   f"input; logsumexp) + {e} x 4f (gate, SiLU(gate), up, their product)")
        per_token_global = 8 + 4 * h + 4 + e * h  # the final norm's output is the head's input (in the head)
        return dict(e=e, layers=[per_layer] * model.n_layer, per_layer_formula=formula,
                    global_per_token=per_token_global,
                    global_formula=f"8 (ids) + final RMSNorm 4h + 4 + {e}h",
                    per_forward=2 * T * model.head_dim * e, per_forward_formula="RoPE cos and sin 2 T head_dim")
    return dict(e=0, layers=[], per_layer_formula="not estimated: --shapes without a \"transformer\" entry",
                global_per_token=0, global_formula="", per_forward=0, per_forward_formula="")


def activations(model: ModelDesc, setup: Setup) -> dict:
    """Activation bytes of one forward: layers x tokens x per-layer bytes (+ extras); with block
    checkpointing each layer keeps only its input, and one layer is recomputed at a time."""
    terms = activation_terms(model, setup)
    tokens = setup.micro_batch * setup.seq_len
    layers = terms["layers"]
    math_extra = 0
    if setup.attention == "math" and layers:  # softmax probabilities (B, heads, T, T) per attention layer
        math_extra = terms["e"] * model.n_head * setup.seq_len
    attention_layers = len(layers) - len(model.attention_free_layers)
    saved = sum(layers) + math_extra * attention_layers
    if setup.checkpointing == "block" and layers:
        kept = len(layers) * tokens * terms["e"] * model.d_model + tokens * (max(layers) + math_extra)
    else:
        kept = tokens * saved
    total = kept + tokens * terms["global_per_token"] + terms["per_forward"]
    return dict(bytes=total, tokens=tokens, per_layer_per_token=max(layers) if layers else 0,
                per_layer_formula=terms["per_layer_formula"], global_per_token=terms["global_per_token"],
                global_formula=terms["global_formula"], per_forward=terms["per_forward"],
                per_forward_formula=terms["per_forward_formula"], math_attention_per_token=math_extra)


def head_bytes(model: ModelDesc, setup: Setup, chunk: int) -> dict:
    """The LM head's loss buffers for one forward + backward (the head's own gradient is counted under
    gradients). chunk > 0: the harness's ChunkedHeadCrossEntropy; 0: all logits at once."""
    if not model.vocab_size or not model.d_model:
        return dict(bytes=0, formula="not estimated", saved=0)
    tokens = setup.micro_batch * setup.seq_len
    V, h = model.vocab_size, model.d_model
    terms = activation_terms(model, setup)
    e = 2 if (model.arch == "gpt2" and setup.autocast == "bf16" and setup.param_dtype is None) else terms["e"]
    head = [p for p in model.params if p.kind == "head"] or [p for p in model.params if p.kind == "embed"]
    wdtype = setup.param_dtype or (head[0].dtype if head else model.params[0].dtype)
    cast = V * h * e if DTYPE_BYTES[wdtype] != e else 0  # the weight cast to the logits' dtype
    if chunk > 0:
        c = min(chunk, tokens)
        # per chunk: logits (e), fp32 log-softmax/probabilities (4), the fp32 copy of bf16 logits (4),
        # the soft-cap derivative (4), the gradient cast back (e); then dl^T x (V x h) and the saved
        # fp32 grad_w (V x h) and grad_x (tokens x h)
        per = e + 4 + (4 if e != 4 else 0) + (4 if model.softcap else 0) + (e if e != 4 else 0)
        total = c * V * per + V * h * e + V * h * 4 + tokens * h * e + cast
        saved = V * h * 4 + tokens * h * e  # what the autograd node keeps for backward: grad_w, grad_x
        formula = (f"chunk {c} x vocab {V} x {per} (logits, fp32 softmax" + (", fp32 copy" if e != 4 else "")
                   + (", soft-cap factor" if model.softcap else "") + (", bf16 gradient" if e != 4 else "")
                   + f") + vocab x d x ({e} + 4) (dl^T x, fp32 grad_w) + tokens x d x {e} (grad_x)"
                   + (f" + vocab x d x {e} (weight cast)" if cast else ""))
        return dict(bytes=total, formula=formula, chunk=c, saved=saved)
    per = e + (4 if e != 4 else 0) + 4 + 4 + (e if model.softcap else 0)
    # + the int64 targets and a float total weight nll_loss keeps
    total = tokens * V * per + tokens * h * e + cast + 8 * tokens + 4
    saved = tokens * V * (4 + (e if model.softcap else 0)) + tokens * h * e + 8 * tokens + 4  # + log-softmax, tanh, input
    formula = (f"tokens {tokens} x vocab {V} x {per} (logits" + (", fp32 copy" if e != 4 else "")
               + ", log-softmax output, its gradient" + (", tanh output" if model.softcap else "")
               + f") + tokens x d x {e} (the head's input) + 8 x tokens (targets)"
               + (f" + vocab x d x {e} (weight cast)" if cast else ""))
    return dict(bytes=total, formula=formula, chunk=0, saved=saved)


# ---------------------------------------------------------------------------------------------
# The plan


def shard_rows(p: Param, world: int) -> int:
    """FSDP2 (fully_shard) splits dim 0 of every tensor as torch.chunk does: ceil(m / world) rows on
    rank 0, which holds the most (the ranks after it as many or fewer)."""
    return math.ceil(p.shape[0] / world)


def shard_numel(p: Param, world: int) -> int:
    """Elements of p on FSDP2's rank 0 (shard_rows rows)."""
    return shard_rows(p, world) * math.prod(p.shape[1:])


def ddp_buckets(sizes: list[int], cap: int = DDP_BUCKET_CAP, first: int = DDP_FIRST_BUCKET) -> int:
    """How many buckets DDP makes of gradients of these byte sizes (in reverse parameter order, the
    first bucket capped at 1 MiB, the others at `cap`; a bucket closes once it reaches its cap)."""
    count, filled, limit = 0, 0, first
    for size in reversed(sizes):
        filled += size
        if filled >= limit:
            count, filled, limit = count + 1, 0, cap
    return count + (1 if filled else 0)


def plan(model: ModelDesc, opt: OptChoice, setup: Setup) -> dict:
    """Per-GPU bytes of the training step; see the module and docs/memory-planner.md."""
    W = setup.world
    fsdp = setup.parallel == "fsdp"
    ddp = not fsdp and (W > 1 or setup.distributed)
    if opt.name in ("mfsgd", "galore") and (opt.rank is None or opt.rank < 1):
        raise PlanError(f"{opt.name} needs a rank >= 1 (--rank)")
    if opt.name == "mfsgd" and opt.memory_mode == "sketch" and ddp and opt.comm != "sketch":
        opt = OptChoice(**{**opt.__dict__, "comm": "sketch"})  # the harness requires it on several ranks
    if fsdp:
        fsdp_problem = fsdp_refusal(opt)
        if fsdp_problem:
            raise PlanError(fsdp_problem)

    def pdt(p):
        return setup.param_dtype or p.dtype

    def gdt(p):
        return setup.grad_dtype or pdt(p)

    hidden = model.of_kind("hidden")
    other = [p for p in model.params if p.kind != "hidden"]

    def local(p):  # elements of p this rank holds
        return shard_numel(p, W) if fsdp else p.numel

    def rows(p):  # rows of p this rank holds
        return shard_rows(p, W) if fsdp else p.shape[0]

    param_bytes = sum(local(p) * DTYPE_BYTES[pdt(p)] for p in model.params)
    full_grads = sum(local(p) * DTYPE_BYTES[gdt(p)] for p in model.params)
    sketched = opt.name == "mfsgd" and (opt.memory_mode == "sketch" or opt.comm == "sketch")
    sketches = sum(sketch_bytes(p, opt.rank, rows(p)) for p in hidden) if sketched else 0
    other_grads = sum(local(p) * DTYPE_BYTES[gdt(p)] for p in other)
    if sketched:
        grad_at_step = other_grads + sketches
    else:
        grad_at_step = full_grads
    if opt.name == "mfsgd" and opt.memory_mode == "sketch":
        # no hidden gradient outlives backward: one in flight (the largest) while it is folded
        in_flight = max((local(p) * DTYPE_BYTES[gdt(p)] for p in hidden), default=0)
        grad_peak = other_grads + sketches + in_flight
        grad_note = "non-hidden gradients + sketches (m + n) r + r^2 per matrix + the largest hidden gradient in flight"
    elif sketched:  # comm sketch: full gradients, folded into sketches before the all-reduce
        grad_peak = full_grads + sketches
        grad_note = "full gradients, then folded into sketches (m + n) r + r^2 per matrix for the all-reduce"
    else:
        grad_peak = full_grads
        grad_note = "every parameter's gradient, in the gradient dtype"

    # optimizer state, per rank
    sd = setup.state_dtype
    master = lambda p: local(p) * 4 if setup.master_weights and pdt(p) != "fp32" else 0  # noqa: E731
    per_hidden = [hidden_state_bytes(p, opt, pdt(p), gdt(p), sd, rows(p)) + master(p) for p in hidden]
    per_rank_hidden = None
    if W > 1 and not fsdp and opt.shard and opt.name in ("mfsgd", "muon") and not sketched and hidden:
        owners = assign_owners([p.numel for p in hidden], W)
        per_rank_hidden = [0] * W
        for b, o in zip(per_hidden, owners):  # one pass, not one per rank: W may be tens of thousands
            per_rank_hidden[o] += b
        state_hidden = max(per_rank_hidden)
    else:
        state_hidden = sum(per_hidden)
    energy_budget = None
    if opt.name == "mfsgd" and opt.rank_policy == "energy" and hidden:
        # the ranks change, their factor numbers never exceed the budget (mofasgd/rank_policy.py)
        from mofasgd.rank_policy import uniform_budget

        energy_budget = opt.rank_budget or uniform_budget([(p.shape[0], math.prod(p.shape[1:])) for p in hidden],
                                                          opt.rank)
        factor_bytes = DTYPE_BYTES[sd or mofasgd_dtype(pdt(hidden[0]))]
        state_hidden = energy_budget * factor_bytes + STEP_BYTES * len(hidden)
    state_other = sum(adamw_state_bytes(local(p), pdt(p), sd) + master(p) for p in other)

    # activations and the head
    acts = activations(model, setup)
    chunk = model.loss_chunk_tokens if setup.loss_chunk_tokens is None else setup.loss_chunk_tokens
    head = head_bytes(model, setup, chunk)
    head_other = head_bytes(model, setup, 0 if chunk else 256) if model.arch in ("gpt2", "speedrun") else None

    # communication buffers
    comm, comm_note = 0, "none (one process, no DDP)"
    if fsdp:
        units = {}
        for p in model.params:
            unit = f"block {p.block}" if p.block is not None else p.kind
            units[unit] = units.get(unit, 0) + p.numel * DTYPE_BYTES[pdt(p)]
        if W > 1:
            largest = max(units, key=units.get)
            comm = units[largest]
            comm_note = (f"one FSDP unit all-gathered at a time: the largest, {largest} ({comm:,} bytes; the blocks, "
                         "embeddings and head are units)")
        else:
            comm_note = "none (FSDP on one rank gathers nothing)"
    elif ddp:
        reduced = [p for p in model.params if not (sketched and p.kind == "hidden")]
        sizes = [p.numel * DTYPE_BYTES[gdt(p)] for p in reduced]
        buckets = ddp_buckets(sizes)
        comm_note = (f"DDP buckets {sum(sizes):,} bytes in {buckets} buckets (25 MiB cap): the gradients themselves "
                     "(gradient_as_bucket_view), counted under gradients")
        if sketched:
            comm = sketches  # the flat sketch buffers of the all-reduce
            comm_note += f"; the sketch all-reduce's flat buffers {sketches:,} bytes"

    # optimizer step: temporaries of the largest matrix, and the sharded all-gathers
    step_temp, step_note = step_temporaries(model, opt, setup, hidden, gdt, pdt)
    if opt.name == "mfsgd" and hidden:
        # MoFaSGD's step is atomic: the new factors of every matrix it updates are held until it
        # commits them, one more copy of its factors (this rank's share under shard)
        factors = [hidden_state_bytes(p, opt, pdt(p), gdt(p), sd, rows(p)) - STEP_BYTES for p in hidden]
        if per_rank_hidden is not None:
            owned = [0] * W
            for b, o in zip(factors, owners):
                owned[o] += b
            pending = max(owned)
        else:
            pending = sum(factors)
        if energy_budget is not None:  # a re-allocation step holds every expansion: up to 2 r_i directions
            pending = 2 * energy_budget * factor_bytes
        step_temp += pending
        step_note += f"; the new factors of every matrix, held until the atomic step commits them ({pending:,} bytes)"
        if energy_budget is not None:
            step_note += " (rank_policy energy: each matrix's untruncated expansion at a re-allocation step, up to " \
                         "twice the budget)"
    if W > 1 and not fsdp and opt.shard and opt.name in ("mfsgd", "muon") and hidden:
        owners = assign_owners([p.numel for p in hidden], W)
        loads = [0] * W
        for p, o in zip(hidden, owners):
            r = min(opt.rank or 0, *p.shape)
            loads[o] += p.numel if opt.name == "muon" else sum(p.shape) * r + r
        if opt.name == "muon":
            gathered = (W + 1) * max(loads) * DTYPE_BYTES[pdt(hidden[0])]
        else:
            gathered = (W + 1) * max(loads) * DTYPE_BYTES[mofasgd_dtype(pdt(hidden[0]))]
        step_temp += gathered
        step_note += f"; the sharded step's all-gather: (world + 1) x the largest rank's share, {gathered:,} bytes"

    persistent = param_bytes + state_hidden + state_other + model.buffer_bytes
    during_backward = grad_peak + acts["bytes"] + head["bytes"] + comm
    during_step = grad_at_step + step_temp
    total = persistent + max(during_backward, during_step) + setup.runtime_bytes + setup.allocator_bytes
    n_hidden = sum(p.numel for p in hidden)
    return {
        "optimizer": opt.label,
        "optimizer_name": opt.name,
        "rank": opt.rank,
        "memory_mode": opt.memory_mode if opt.name == "mfsgd" else None,
        "rank_policy": opt.rank_policy if opt.name == "mfsgd" else None,
        "rank_budget_numbers": energy_budget,
        "param_count": sum(p.numel for p in model.params),
        "hidden_param_count": n_hidden,
        "hidden_matrices": len(hidden),
        "param_bytes": param_bytes,
        "buffer_bytes": model.buffer_bytes,
        "grad_bytes": grad_at_step,
        "grad_peak_bytes": grad_peak,
        "opt_state_bytes_hidden": state_hidden,
        "opt_state_bytes_other": state_other,
        "opt_state_bytes_hidden_per_rank": per_rank_hidden,
        "activation_bytes": acts["bytes"],
        "head_bytes": head["bytes"],
        "head_saved_bytes": head["saved"],
        "head_bytes_other_mode": head_other["bytes"] if head_other else None,
        "comm_bytes": comm,
        "step_temp_bytes": step_temp,
        "runtime_bytes": setup.runtime_bytes,
        "allocator_bytes": setup.allocator_bytes,
        "total_bytes": total,
        "peak_phase": "backward" if during_backward >= during_step else "optimizer step",
        "notes": {
            "gradients": grad_note,
            "activations": {k: acts[k] for k in ("tokens", "per_layer_per_token", "per_layer_formula", "global_per_token",
                                                  "global_formula", "per_forward", "per_forward_formula",
                                                  "math_attention_per_token")},
            "head": head["formula"],
            "head_other_mode": head_other["formula"] if head_other else None,
            "communication": comm_note,
            "step": step_note,
            "total": "parameters + buffers + optimizer state + max(gradients at their peak + activations + head + "
                     "communication, gradients at the step + step temporaries)"
                     + (" + the process's own memory and the allocator's allowance (CPU)"
                        if setup.runtime_bytes or setup.allocator_bytes else ""),
        },
    }


def step_temporaries(model, opt, setup, hidden, gdt, pdt):
    """Transient memory of the optimizer step (after backward, activations gone), for the largest
    hidden matrix: an estimate of the dominant temporaries of each optimizer."""
    if not hidden:
        return 0, "no hidden matrices"
    p = max(hidden, key=lambda q: q.numel)
    full_m, n = p.shape[0], math.prod(p.shape[1:])
    m = shard_rows(p, setup.world) if setup.parallel == "fsdp" else full_m  # the rows this rank steps
    k = min(m, n)
    g, w = DTYPE_BYTES[gdt(p)], DTYPE_BYTES[pdt(p)]
    if opt.name == "adamw":
        if opt.fused:
            return 0, "fused AdamW updates in place"
        total = sum(q.numel for q in hidden) * w
        return total, "foreach AdamW: one temporary list as large as the hidden matrices (the denominator)"
    if opt.name == "mfsgd":
        r = min(opt.rank, m, n)
        # first step, init weight_svd: fp32 copy, U, Vh of the whole weight (FSDP gathers it for this)
        full_k = min(full_m, n)
        svd = 4 * (full_m * n + full_m * full_k + full_k * n)
        apply = 4 * m * n if w != 4 else 0  # non-fp32 parameters get the update in fp32, rounded once
        # same-shape matrices are updated in batches of B <= 2^22 / ((m + n) r) (mofasgd/optimizer.py,
        # _MAX_BATCH_ELEMENTS); the batch holds about 8 (B, m + n, r) arrays (old and new factors,
        # sketches, the QR's work)
        same = sum(1 for q in hidden if q.shape == p.shape)
        batch = min(same, max(1, 2**22 // ((m + n) * r)))
        work = 8 * batch * (m + n) * r * 4
        return max(svd, apply + work), ("the first step's SVD of the largest weight (fp32 copy, U, Vh); later the "
                                        "batched factor update's work arrays" + (" and the fp32 update" if apply else ""))
    if opt.name == "galore":
        return (4 * (m * n + m * k + k * n) if g != 4 else 4 * (m * k + k * n)) + 2 * m * n * g, \
            "a projector refresh: SVD of the largest gradient (U, Vh), and the projected-back update twice (m x n)"
    if opt.name == "muon":
        return 4 * m * n + 2 * (2 * m * n + 3 * k * k), "the Nesterov update (m x n) and Newton-Schulz's bf16 iterates"
    if opt.name == "adafactor":
        return 2 * m * n * g, "the second-moment estimate row_var col_var and the update (m x n each)"
    return 0, ""


# ---------------------------------------------------------------------------------------------
# CPU runtime: the worker process's own memory before any tensor of the run

RUNTIME_PROBE = """
import torch, train_gpt
p = torch.nn.Parameter(torch.zeros(4))
torch.optim.AdamW([p], fused=True)  # an optimizer imports torch._dynamo, as the worker's do
(torch.ones(64, 64) @ torch.ones(64, 64)).sum()  # the BLAS / OpenMP thread pools
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]) * 1024)
"""


def measure_runtime_bytes() -> int:
    """Resident memory of a fresh Python that imported what a worker imports (torch, the harness,
    torch._dynamo through an optimizer) and ran one matmul: the CPU worker's memory before tensors."""
    out = subprocess.run([sys.executable, "-c", RUNTIME_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise PlanError(f"cannot measure the CPU runtime: {(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    return int(lines[-1])


# ---------------------------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0])
    src = p.add_argument_group("model (a harness config by default: configs/base.yaml + --preset + --config)")
    src.add_argument("--preset", help="configs/presets/NAME.yaml, as run.py --preset")
    src.add_argument("--config", help="JSON overrides or @file.json, as run.py --config (flat keys are optimizer keys), "
                                      "or a run's own @results/RUN/config.json (its optimizer, world size and device too)")
    src.add_argument("--hf-config", help="a Hugging Face LLaMA-style config.json")
    src.add_argument("--shapes", help="explicit shapes, JSON or @file (see the module docstring)")
    p.add_argument("--optimizer", help=f"the optimizer planned in detail: {', '.join(OPTIMIZER_NAMES)} (default: mfsgd, "
                                       "or a run config's optimizer_name)")
    p.add_argument("--rank", type=int, help="MoFaSGD and GaLore rank (default: the config's, 32)")
    p.add_argument("--memory-mode", help="MoFaSGD memory_mode: full or sketch (default: the config's)")
    p.add_argument("--param-dtype", default="auto", help="auto (the model's own), fp32, bf16, fp16 or fp64")
    p.add_argument("--grad-dtype", default="auto", help="auto (like the parameter), fp32, bf16, fp16 or fp64")
    p.add_argument("--state-dtype", default="auto",
                   help="auto (each optimizer's: moments like the parameter, MoFaSGD factors fp32), or one dtype for all")
    p.add_argument("--master-weights", action="store_true", help="an fp32 copy of every non-fp32 parameter")
    p.add_argument("--micro-batch", type=int, help="sequences per forward per GPU (default: train.micro_batch_size)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: data.seq_len)")
    p.add_argument("--parallel", help="ddp or fsdp (FSDP2: every tensor sharded over the world); default: the "
                                       "config's train.parallel (ddp)")
    p.add_argument("--world", type=int, help="data-parallel world size (GPUs; default 1, or a run config's "
                                              "launch.world_size)")
    p.add_argument("--distributed", action="store_true", help="DDP even with one rank (run.py --distributed)")
    p.add_argument("--checkpointing", default="none", help="activation checkpointing: none or block")
    p.add_argument("--loss-chunk-tokens", type=int, help="the head's loss chunk (default: model.loss_chunk_tokens; 0: off)")
    p.add_argument("--attention", default="flash", help="flash (no T^2 tensors saved) or math (softmax saved)")
    p.add_argument("--device", help="cuda (default, or a run config's launch.device) or cpu: CPU kernels' saved "
                                     "tensors and the process's own memory")
    p.add_argument("--runtime-mib", default="auto",
                   help="CPU only: the process's own memory in MiB, or auto (measured: a Python that imported the worker)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p.parse_args(argv)


def choice(value, accepted, what):
    if value not in accepted:
        raise PlanError(f"unknown {what} {value!r}; choose one of {', '.join(accepted)}")
    return value


def positive(value, what, limit):
    """A command-line count: None (not given) or an integer in [1, limit]."""
    return value if value is None else bounded_int(value, what, limit)


# The keys of a run's resolved config.json (results/RUN/config.json) that are no overrides: the run's
# name, its optimizer (the plan's) and its launch (world size, device), which the planner reads itself.
RUN_CONFIG_KEYS = ("name", "optimizer_name", "launch")
# Harness model sizes checked before resolve_config builds the model on the meta device (the speedrun
# model validates itself that way): a billion layers would run out of memory there.
HARNESS_MODEL_LIMITS = {"n_layer": "harness_layers", "n_head": "heads", "n_embd": "size", "block_size": "size",
                        "vocab_size": "size", "num_value_embeds": "harness_layers"}


def run_config_parts(cfg: dict, args) -> tuple[dict, str, dict]:
    """A run's resolved config.json given as --config: (its sections as overrides, its optimizer, its
    launch), refusing what contradicts it."""
    name = cfg["optimizer_name"]
    if not isinstance(name, str):
        raise PlanError(f"--config: optimizer_name must be a string, got {_show(name)}")
    choice(name, OPTIMIZER_NAMES, "optimizer_name")
    if args.optimizer is not None and args.optimizer != name:
        raise PlanError(f"--optimizer {args.optimizer} contradicts the run config's optimizer_name {name!r}: drop "
                        "--optimizer (the side-by-side table compares every optimizer)")
    if args.preset:
        raise PlanError("--preset with a run's config.json: the run config is complete; drop --preset")
    launch = cfg.get("launch") or {}
    if not isinstance(launch, dict):
        raise PlanError(f"--config: launch must be a mapping, got {_show(launch)}")
    return {k: v for k, v in cfg.items() if k not in RUN_CONFIG_KEYS}, name, launch


def check_harness_model_sizes(model_overrides) -> None:
    """Bounds on the model sizes a --config gives, checked before the harness builds the model."""
    if not isinstance(model_overrides, dict):
        return  # the harness's own error names it
    for key, limit in HARNESS_MODEL_LIMITS.items():
        value = model_overrides.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > LIMITS[limit]:
            bounded_int(value, f"model.{key}", LIMITS[limit])


def runtime_bytes(text: str) -> int:
    """--runtime-mib N: a finite number of MiB in [0, LIMITS['runtime_mib']], in bytes."""
    try:
        mib = float(text)
    except ValueError:
        mib = math.nan
    if not (math.isfinite(mib) and 0 <= mib <= LIMITS["runtime_mib"]):
        raise PlanError(f"--runtime-mib must be auto or a number of MiB in [0, {LIMITS['runtime_mib']:,}], got {text!r}")
    return int(mib * 2**20)


def build(args):
    """(model, primary OptChoice, Setup, comparison OptChoices, description of the setup)."""
    if args.optimizer is not None:
        choice(args.optimizer, OPTIMIZER_NAMES, "optimizer")
    if args.parallel is not None:
        choice(args.parallel, ("ddp", "fsdp"), "--parallel")
    choice(args.checkpointing, ("none", "block"), "--checkpointing")
    choice(args.attention, ("flash", "math"), "--attention")
    if args.device is not None:
        choice(args.device, ("cuda", "cpu"), "--device")
    if args.memory_mode is not None:
        choice(args.memory_mode, ("full", "sketch"), "--memory-mode")
    for key in ("rank", "micro_batch", "seq_len", "world"):
        positive(getattr(args, key), "--" + key.replace("_", "-"), LIMITS[key])
    if args.loss_chunk_tokens is not None:
        if args.loss_chunk_tokens < 0:
            raise PlanError(f"--loss-chunk-tokens must be >= 0 (0: off), got {args.loss_chunk_tokens}")
        bounded_int(args.loss_chunk_tokens, "--loss-chunk-tokens", LIMITS["loss_chunk_tokens"], low=0)
    dtypes = {}
    for key in ("param_dtype", "grad_dtype", "state_dtype"):
        value = getattr(args, key)
        dtypes[key] = None if value == "auto" else dtype_name(value, "--" + key.replace("_", "-"))
    sources = [s for s in ("hf_config", "shapes") if getattr(args, s)]
    if len(sources) > 1 or (sources and args.preset):
        raise PlanError("give one model: a harness config (--preset/--config), --hf-config or --shapes")

    from configs import (CONFIG_DIR, ConfigError, build_dataclass, check_numbers, deep_merge, load_yaml, parse_overrides,
                         resolve_config, split_overrides)
    from optimizers import optimizer_config_class

    try:
        overrides = parse_overrides(args.config)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    run_launch = {}
    optimizer = args.optimizer
    if "optimizer_name" in overrides:  # a run's own resolved config.json: plan that run
        overrides, optimizer, run_launch = run_config_parts(overrides, args)
    optimizer = optimizer or "mfsgd"
    world = args.world
    if world is None:
        world = bounded_int(run_launch.get("world_size", 1), "the run config's launch.world_size", LIMITS["world"])
    device = args.device or run_launch.get("device", "cuda")
    choice(device, ("cuda", "cpu"), "device (--device or the run config's launch.device)")
    distributed = args.distributed or run_launch.get("distributed", False) is True
    layered = split_overrides(overrides)
    opt_overrides = layered.get("optimizer", {})
    sections = {k: v for k, v in layered.items() if k != "optimizer"}
    check_harness_model_sizes(sections.get("model"))
    if args.parallel is not None and not (args.hf_config or args.shapes):  # the harness config validates it
        sections = {**sections, "train": {**sections.get("train", {}), "parallel": args.parallel}}
    if not isinstance(opt_overrides, dict):
        raise PlanError(f"--config: optimizer must be a mapping of keys to values, got {_show(opt_overrides)}")
    if args.rank is not None and optimizer == "galore":
        group_params = opt_overrides.get("group_params", {})
        opt_overrides = {**opt_overrides, "group_params": {**(group_params if isinstance(group_params, dict) else {}),
                                                           "rank": args.rank}}
    elif args.rank is not None and optimizer == "mfsgd":
        opt_overrides = {**opt_overrides, "rank": args.rank}
    if args.memory_mode is not None:
        if optimizer != "mfsgd":
            raise PlanError("--memory-mode applies to --optimizer mfsgd")
        opt_overrides = {**opt_overrides, "memory_mode": args.memory_mode}
    launch = {"nproc": world, "world_size": world, "device": device,
              "backend": "gloo" if device == "cpu" else "nccl", "distributed": distributed}
    if sources and sections:
        raise PlanError(f"--config sections {', '.join(sorted(sections))} describe a harness model; with --hf-config or "
                        "--shapes give only optimizer keys")
    harness_cfg = None
    try:
        if sources:  # the optimizer's YAML and the optimizer keys alone (no harness model to check them against)
            yaml_keys = load_yaml(os.path.join(CONFIG_DIR, "optimizers", f"{optimizer}.yaml"))
            opt_cfg = build_dataclass(optimizer_config_class(optimizer), deep_merge(yaml_keys, opt_overrides),
                                      "optimizer")
            try:
                check_numbers(opt_cfg, "optimizer")
                opt_cfg.validate()
            except ValueError as e:
                raise ConfigError(str(e)) from None
            parallel = args.parallel or "ddp"
        else:
            cfg = resolve_config(optimizer, {**sections, "optimizer": opt_overrides}, preset=args.preset,
                                 name="plan", launch=launch)
            harness_cfg, opt_cfg = cfg, cfg.optimizer
            parallel = cfg.train.parallel
    except ConfigError as e:
        raise PlanError(str(e)) from None
    primary = opt_choice(optimizer, opt_cfg)
    if primary.rank is not None:
        bounded_int(primary.rank, "the optimizer's rank", LIMITS["rank"])
    rank = primary.rank if primary.rank is not None else (args.rank or 32)

    if args.hf_config:
        model, hf_dtype = hf_model(args.hf_config)
        micro, seq = args.micro_batch or 1, args.seq_len or 1024
        autocast = "none"
    elif args.shapes:
        model = shapes_model(args.shapes)
        micro, seq = args.micro_batch or 1, args.seq_len or 1024
        autocast = "none"
    else:
        fields = harness_cfg.model.resolved()
        for key, limit in HARNESS_MODEL_LIMITS.items():
            if isinstance(fields.get(key), int):
                bounded_int(fields[key], f"model.{key}", LIMITS[limit], low=0 if key == "num_value_embeds" else 1)
        model = harness_model(harness_cfg)
        micro = bounded_int(args.micro_batch or harness_cfg.train.micro_batch_size, "train.micro_batch_size",
                            LIMITS["micro_batch"])
        seq = bounded_int(args.seq_len or harness_cfg.data.seq_len, "data.seq_len", LIMITS["seq_len"])
        bounded_int(model.loss_chunk_tokens, "model.loss_chunk_tokens", LIMITS["loss_chunk_tokens"], low=0)
        autocast = harness_cfg.train.autocast
    runtime = 0
    if device == "cpu":
        runtime = measure_runtime_bytes() if args.runtime_mib == "auto" else runtime_bytes(args.runtime_mib)
    setup = Setup(micro_batch=micro, seq_len=seq, parallel=parallel, world=world,
                  distributed=distributed, param_dtype=dtypes["param_dtype"], grad_dtype=dtypes["grad_dtype"],
                  state_dtype=dtypes["state_dtype"], master_weights=args.master_weights,
                  checkpointing=args.checkpointing, loss_chunk_tokens=args.loss_chunk_tokens, attention=args.attention,
                  device=device, autocast=autocast, runtime_bytes=runtime,
                  allocator_bytes=CPU_ALLOCATOR_SLACK if device == "cpu" else 0)

    compared = []
    for name in COMPARED:
        if name == optimizer:
            compared.append(primary if name != "mfsgd" else OptChoice(**{**primary.__dict__, "memory_mode": "full"}))
        elif name.startswith("mfsgd"):
            mf = primary if optimizer == "mfsgd" else OptChoice("mfsgd", rank=rank)
            compared.append(OptChoice(**{**mf.__dict__, "memory_mode": "sketch" if name == "mfsgd-sketch" else "full"}))
        elif name == "galore":
            compared.append(OptChoice("galore", rank=rank))
        elif name == "muon":
            compared.append(OptChoice("muon", shard=parallel == "ddp"))  # FSDP shards Muon's state itself
        else:
            compared.append(OptChoice(name))
    if parallel == "fsdp":  # what the harness cannot run under FSDP is left out of the comparison
        compared = [o for o in compared if fsdp_refusal(o) is None]
    return model, primary, setup, compared


def fmt(b: int | None) -> str:
    if b is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{b / size:,.2f} {unit}"
    return f"{b:,} B"


def setup_line(model: ModelDesc, setup: Setup) -> str:
    par = f"{setup.parallel} x {setup.world}" + (" (--distributed)" if setup.distributed and setup.world == 1 else "")
    dt = lambda v, d: v or d  # noqa: E731
    return (f"{setup.micro_batch} x {setup.seq_len} tokens per forward per GPU, {par}, param dtype "
            f"{dt(setup.param_dtype, 'as the model')}, grad dtype {dt(setup.grad_dtype, 'as the parameter')}, state dtype "
            f"{dt(setup.state_dtype, 'each optimizer' + chr(39) + 's own')}"
            + (", fp32 master weights" if setup.master_weights else "")
            + f", activation checkpointing {setup.checkpointing}, attention {setup.attention}, device {setup.device}"
            + (f", autocast {setup.autocast}" if setup.autocast != "none" else ""))


def per_rank_text(per_rank: list) -> str:
    """The sharded state per rank for the table: every rank's bytes up to 16 ranks, else the spread."""
    if len(per_rank) <= 16:
        return f"max over ranks {per_rank}"
    return f"max over {len(per_rank):,} ranks (min {min(per_rank):,})"


def render(model: ModelDesc, setup: Setup, primary: dict, rows: list[dict]) -> str:
    n = primary
    acts = n["notes"]["activations"]
    lines = [f"# Memory plan: {model.name}", "",
             f"- parameters: {n['param_count']:,} ({n['hidden_param_count']:,} in {n['hidden_matrices']} hidden matrices "
             "for the chosen optimizer; embeddings, head and 1-D parameters with AdamW)",
             f"- setup: {setup_line(model, setup)}",
             f"- optimizer: {n['optimizer']}", "",
             f"## Per GPU, {n['optimizer']}", "",
             "| part | bytes | size | how |", "|---|---|---|---|",
             f"| parameters | {n['param_bytes']:,} | {fmt(n['param_bytes'])} | numel x dtype"
             + (" / world (FSDP: dim 0 sharded)" if setup.parallel == "fsdp" else "") + " |"]
    if n["buffer_bytes"]:
        lines.append(f"| model buffers | {n['buffer_bytes']:,} | {fmt(n['buffer_bytes'])} | rotary tables |")
    lines += [
        f"| gradients (at the step) | {n['grad_bytes']:,} | {fmt(n['grad_bytes'])} | the harness's grad_bytes |",
        f"| gradients (at their peak) | {n['grad_peak_bytes']:,} | {fmt(n['grad_peak_bytes'])} | {n['notes']['gradients']} |",
        f"| optimizer state, hidden matrices | {n['opt_state_bytes_hidden']:,} | {fmt(n['opt_state_bytes_hidden'])} | "
        + (per_rank_text(n["opt_state_bytes_hidden_per_rank"]) if n["opt_state_bytes_hidden_per_rank"] else
           "docs/optimizers.md formulas") + " |",
        f"| optimizer state, the rest (AdamW) | {n['opt_state_bytes_other']:,} | {fmt(n['opt_state_bytes_other'])} | "
        "2 x numel x dtype + 4 per tensor |",
        f"| activations | {n['activation_bytes']:,} | {fmt(n['activation_bytes'])} | {acts['tokens']:,} tokens x per layer "
        f"(up to {acts['per_layer_per_token']:,} B/token: {acts['per_layer_formula']}) + per token {acts['global_per_token']:,} B "
        f"({acts['global_formula']})" + (f" + per forward {acts['per_forward']:,} B ({acts['per_forward_formula']})"
                                         if acts["per_forward"] else "")
        + (f"; checkpointing: block inputs + one block" if setup.checkpointing == "block" else "") + " |",
        f"| LM head loss | {n['head_bytes']:,} | {fmt(n['head_bytes'])} | {n['notes']['head']} |",
    ]
    if n["head_bytes_other_mode"] is not None:
        lines.append(f"| (head, the other mode) | {n['head_bytes_other_mode']:,} | {fmt(n['head_bytes_other_mode'])} | "
                     f"{n['notes']['head_other_mode']}; not in the total |")
    lines += [
        f"| communication buffers | {n['comm_bytes']:,} | {fmt(n['comm_bytes'])} | {n['notes']['communication']} |",
        f"| optimizer step temporaries | {n['step_temp_bytes']:,} | {fmt(n['step_temp_bytes'])} | {n['notes']['step']} |",
    ]
    if n["runtime_bytes"]:
        lines.append(f"| the process itself (CPU) | {n['runtime_bytes']:,} | {fmt(n['runtime_bytes'])} | interpreter, "
                     "torch and the harness imported, before any tensor |")
    if n["allocator_bytes"]:
        lines.append(f"| allocator allowance (CPU) | {n['allocator_bytes']:,} | {fmt(n['allocator_bytes'])} | freed memory "
                     "glibc keeps resident: up to its largest trim threshold, 2 x 32 MiB |")
    lines += [f"| **total** | **{n['total_bytes']:,}** | **{fmt(n['total_bytes'])}** | {n['notes']['total']}; "
              f"peak phase: {n['peak_phase']} |", "",
              "## Optimizers side by side", "",
              "| optimizer | parameters | gradients (peak) | state hidden | state rest | activations + head | "
              "communication | step temporaries | total | vs AdamW |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    base = next((r for r in rows if r["optimizer_name"] == "adamw"), None)
    for r in rows:
        ratio = f"{r['total_bytes'] / base['total_bytes']:.2f}" if base else "-"
        lines.append(f"| {r['optimizer']} | {fmt(r['param_bytes'])} | {fmt(r['grad_peak_bytes'])} | "
                     f"{fmt(r['opt_state_bytes_hidden'])} | {fmt(r['opt_state_bytes_other'])} | "
                     f"{fmt(r['activation_bytes'] + r['head_bytes'])} | {fmt(r['comm_bytes'])} | {fmt(r['step_temp_bytes'])} | "
                     f"**{fmt(r['total_bytes'])}** | {ratio} |")
    lines.append("")
    lines.append("GiB = 2^30 bytes. Formulas and assumptions: docs/memory-planner.md.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, primary, setup, compared = build(args)
        detail = plan(model, primary, setup)
        rows = [plan(model, o, setup) for o in compared]
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": model.name, "setup": setup.__dict__, "plan": detail, "compare": rows}, indent=2))
    else:
        print(render(model, setup, detail, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
