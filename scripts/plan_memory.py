"""Memory planner: what one GPU (or CPU worker) holds to train a model with each optimizer.

    python -m scripts.plan_memory --preset nanogpt-paper --optimizer mfsgd --rank 32 --world 8
    python -m scripts.plan_memory --config '{"model": {"preset": "gpt2-small"}}' --optimizer adamw
    python -m scripts.plan_memory --hf-config configs/hf/llama-3.1-8b.json --param-dtype bf16 \\
        --micro-batch 1 --seq-len 1024 --optimizer mfsgd --memory-mode sketch
    python -m scripts.plan_memory --shapes '{"hidden": ["768x768*48"], "embed": ["50304x768"]}' --json

The model is one of: a harness config (configs/base.yaml + --preset + --config JSON, resolved and
validated as run.py does; the model is built on the meta device, so its parameters, their routing
and dtypes are the harness's own), a Hugging Face LLaMA-style config.json (--hf-config), or explicit
matrix shapes (--shapes). Per GPU it prints parameters, gradients, optimizer state (hidden matrices
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


def hf_model(path: str) -> tuple[ModelDesc, str | None]:
    """A LLaMA-style Hugging Face config.json (LLaMA, Mistral, Qwen2 without biases...): embeddings,
    per layer q/k/v/o and gate/up/down projections and two RMSNorm gains, a final norm, an lm_head
    unless tie_word_embeddings. Returns the description and the config's torch_dtype (or None)."""
    if not os.path.isfile(path):
        raise PlanError(f"--hf-config file not found: {path} (give a Hugging Face config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PlanError(f"--hf-config {path} is not a JSON file: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"--hf-config {path} must hold a JSON object, got {type(cfg).__name__}")
    missing = [k for k in HF_REQUIRED if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool) or cfg[k] <= 0]
    if missing:
        raise PlanError(f"--hf-config {path} lacks positive integer {', '.join(missing)}; a LLaMA-style config needs "
                        f"{', '.join(HF_REQUIRED)} (optional: num_key_value_heads, head_dim, tie_word_embeddings)")
    h, f, L, a, V = (cfg[k] for k in HF_REQUIRED)
    kv_heads = cfg.get("num_key_value_heads") or a
    hd = cfg.get("head_dim") or h // a
    if a % kv_heads:
        raise PlanError(f"--hf-config {path}: num_attention_heads ({a}) must be a multiple of num_key_value_heads ({kv_heads})")
    dt = cfg.get("torch_dtype") or cfg.get("dtype")
    dtype = dtype_name(dt, "the config's torch_dtype") if dt else "fp32"
    params = [Param("model.embed_tokens.weight", (V, h), "embed", dtype)]
    for i in range(L):
        pre = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (a * hd, h)), ("self_attn.k_proj", (kv_heads * hd, h)),
                            ("self_attn.v_proj", (kv_heads * hd, h)), ("self_attn.o_proj", (h, a * hd)),
                            ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)), ("mlp.down_proj", (h, f))):
            params.append(Param(pre + name + ".weight", shape, "hidden", dtype, i))
        if cfg.get("attention_bias"):
            for name, n in (("q_proj", a * hd), ("k_proj", kv_heads * hd), ("v_proj", kv_heads * hd)):
                params.append(Param(pre + f"self_attn.{name}.bias", (n,), "scalar", dtype, i))
        params += [Param(pre + "input_layernorm.weight", (h,), "scalar", dtype, i),
                   Param(pre + "post_attention_layernorm.weight", (h,), "scalar", dtype, i)]
    params.append(Param("model.norm.weight", (h,), "scalar", dtype))
    if not cfg.get("tie_word_embeddings", False):
        params.append(Param("lm_head.weight", (V, h), "head", dtype))
    name = cfg.get("_name_or_path") or os.path.basename(path)
    desc = ModelDesc(name=f"{name} ({L}L, d {h}, ffn {f}, {a} heads / {kv_heads} KV, vocab {V})", params=params,
                     arch="llama", n_layer=L, d_model=h, n_head=a, n_kv_head=kv_heads, head_dim=hd, d_ff=f,
                     vocab_size=V, source={"kind": "hf", "path": path})
    return desc, (dtype if dt else None)


SHAPE = re.compile(r"\s*(\d+)\s*x\s*(\d+)\s*(?:\*\s*(\d+))?\s*$")


def shapes_model(text: str) -> ModelDesc:
    """--shapes: {"hidden": [...], "embed": [...], "head": [...], "scalar": [...]} (each entry "MxN",
    "MxN*COUNT", [M, N] or [M, N, COUNT]; scalar entries are element counts), optional "dtype" and
    "transformer": {"n_layer", "d_model", "n_head", "d_ff", "vocab_size", optional "n_kv_head",
    "mlp": "gelu" (default) or "swiglu"} for the activation estimate; inline JSON or @file."""
    source = "--shapes"
    if text.startswith("@"):
        source = text[1:]
        if not os.path.isfile(source):
            raise PlanError(f"--shapes file not found: {source}")
        with open(source, encoding="utf-8") as f:
            text = f.read()
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise PlanError(f"{source} is not valid JSON: {e}") from None
    kinds = ("hidden", "embed", "head", "scalar")
    if not isinstance(spec, dict) or not set(spec) <= set(kinds) | {"dtype", "transformer", "name"}:
        raise PlanError(f"{source} must be a JSON object with keys among {', '.join(kinds)}, dtype, transformer, name")
    dtype = dtype_name(spec.get("dtype", "fp32"), f"{source} dtype")
    params = []
    for kind in kinds:
        entries = spec.get(kind, [])
        if not isinstance(entries, list):
            raise PlanError(f"{source}: {kind} must be a list of shapes")
        for j, entry in enumerate(entries):
            if kind == "scalar":
                if not isinstance(entry, int) or isinstance(entry, bool) or entry <= 0:
                    raise PlanError(f"{source}: scalar entries are element counts (positive integers), got {entry!r}")
                params.append(Param(f"scalar.{j}", (entry,), kind, dtype))
                continue
            if isinstance(entry, str) and SHAPE.match(entry):
                m, n, count = SHAPE.match(entry).groups()
                m, n, count = int(m), int(n), int(count or 1)
            elif isinstance(entry, list) and len(entry) in (2, 3) and all(isinstance(v, int) and v > 0 for v in entry):
                m, n, count = entry[0], entry[1], entry[2] if len(entry) == 3 else 1
            else:
                raise PlanError(f"{source}: {kind} entry {entry!r} is not a shape; write \"MxN\", \"MxN*COUNT\", [M, N] "
                                "or [M, N, COUNT]")
            if min(m, n, count) <= 0:
                raise PlanError(f"{source}: {kind} entry {entry!r} has a zero size")
            params += [Param(f"{kind}.{j}.{c}", (m, n), kind, dtype) for c in range(count)]
    if not params:
        raise PlanError(f"{source} lists no parameters")
    desc = ModelDesc(name=spec.get("name", "explicit shapes"), params=params, arch="shapes", source={"kind": "shapes"})
    tr = spec.get("transformer")
    if tr is not None:
        need = ("n_layer", "d_model", "n_head", "d_ff", "vocab_size")
        if not isinstance(tr, dict) or any(not isinstance(tr.get(k), int) or tr[k] <= 0 for k in need):
            raise PlanError(f"{source}: transformer needs positive integers {', '.join(need)} (optional n_kv_head, "
                            "mlp gelu or swiglu)")
        mlp = tr.get("mlp", "gelu")
        if mlp not in ("gelu", "swiglu"):
            raise PlanError(f"{source}: transformer.mlp must be gelu or swiglu, got {mlp!r}")
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

    @property
    def label(self) -> str:
        if self.name == "mfsgd":
            return f"mfsgd r={self.rank}" + (" sketch" if self.memory_mode == "sketch" else "")
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
        return OptChoice(name, rank=cfg.rank, memory_mode=cfg.memory_mode, comm=cfg.comm, shard=cfg.shard)
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
        per_rank_hidden = [sum(b for b, o in zip(per_hidden, owners) if o == r) for r in range(W)]
        state_hidden = max(per_rank_hidden)
    else:
        state_hidden = sum(per_hidden)
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
    if W > 1 and not fsdp and opt.shard and opt.name in ("mfsgd", "muon") and hidden:
        owners = assign_owners([p.numel for p in hidden], W)
        if opt.name == "muon":
            loads = [sum(p.numel for p, o in zip(hidden, owners) if o == r) for r in range(W)]
            gathered = (W + 1) * max(loads) * DTYPE_BYTES[pdt(hidden[0])]
        else:
            loads = [sum((sum(p.shape) * min(opt.rank, *p.shape) + min(opt.rank, *p.shape)) for p, o in zip(hidden, owners)
                         if o == r) for r in range(W)]
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
    src.add_argument("--config", help="JSON overrides or @file.json, as run.py --config (flat keys are optimizer keys)")
    src.add_argument("--hf-config", help="a Hugging Face LLaMA-style config.json")
    src.add_argument("--shapes", help="explicit shapes, JSON or @file (see the module docstring)")
    p.add_argument("--optimizer", default="mfsgd", help=f"the optimizer planned in detail: {', '.join(OPTIMIZER_NAMES)}")
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
    p.add_argument("--world", type=int, default=1, help="data-parallel world size (GPUs)")
    p.add_argument("--distributed", action="store_true", help="DDP even with one rank (run.py --distributed)")
    p.add_argument("--checkpointing", default="none", help="activation checkpointing: none or block")
    p.add_argument("--loss-chunk-tokens", type=int, help="the head's loss chunk (default: model.loss_chunk_tokens; 0: off)")
    p.add_argument("--attention", default="flash", help="flash (no T^2 tensors saved) or math (softmax saved)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu: CPU kernels' saved tensors and the "
                                                     "process's own memory")
    p.add_argument("--runtime-mib", default="auto",
                   help="CPU only: the process's own memory in MiB, or auto (measured: a Python that imported the worker)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p.parse_args(argv)


def choice(value, accepted, what):
    if value not in accepted:
        raise PlanError(f"unknown {what} {value!r}; choose one of {', '.join(accepted)}")
    return value


def positive(value, what):
    if value is not None and value < 1:
        raise PlanError(f"{what} must be >= 1, got {value}")
    return value


def build(args):
    """(model, primary OptChoice, Setup, comparison OptChoices, description of the setup)."""
    choice(args.optimizer, OPTIMIZER_NAMES, "optimizer")
    if args.parallel is not None:
        choice(args.parallel, ("ddp", "fsdp"), "--parallel")
    choice(args.checkpointing, ("none", "block"), "--checkpointing")
    choice(args.attention, ("flash", "math"), "--attention")
    choice(args.device, ("cuda", "cpu"), "--device")
    if args.memory_mode is not None:
        choice(args.memory_mode, ("full", "sketch"), "--memory-mode")
    for key in ("rank", "micro_batch", "seq_len", "world"):
        positive(getattr(args, key), "--" + key.replace("_", "-"))
    if args.loss_chunk_tokens is not None and args.loss_chunk_tokens < 0:
        raise PlanError(f"--loss-chunk-tokens must be >= 0 (0: off), got {args.loss_chunk_tokens}")
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
    layered = split_overrides(overrides)
    opt_overrides = layered.get("optimizer", {})
    sections = {k: v for k, v in layered.items() if k != "optimizer"}
    if args.parallel is not None and not (args.hf_config or args.shapes):  # the harness config validates it
        sections = {**sections, "train": {**sections.get("train", {}), "parallel": args.parallel}}
    if args.rank is not None and args.optimizer == "galore":
        opt_overrides = {**opt_overrides, "group_params": {**opt_overrides.get("group_params", {}), "rank": args.rank}}
    elif args.rank is not None and args.optimizer == "mfsgd":
        opt_overrides = {**opt_overrides, "rank": args.rank}
    if args.memory_mode is not None:
        if args.optimizer != "mfsgd":
            raise PlanError("--memory-mode applies to --optimizer mfsgd")
        opt_overrides = {**opt_overrides, "memory_mode": args.memory_mode}
    launch = {"nproc": args.world, "world_size": args.world, "device": args.device if args.device == "cpu" else "cuda",
              "backend": "gloo" if args.device == "cpu" else "nccl", "distributed": args.distributed}
    if sources and sections:
        raise PlanError(f"--config sections {', '.join(sorted(sections))} describe a harness model; with --hf-config or "
                        "--shapes give only optimizer keys")
    harness_cfg = None
    try:
        if sources:  # the optimizer's YAML and the optimizer keys alone (no harness model to check them against)
            yaml_keys = load_yaml(os.path.join(CONFIG_DIR, "optimizers", f"{args.optimizer}.yaml"))
            opt_cfg = build_dataclass(optimizer_config_class(args.optimizer), deep_merge(yaml_keys, opt_overrides),
                                      "optimizer")
            try:
                check_numbers(opt_cfg, "optimizer")
                opt_cfg.validate()
            except ValueError as e:
                raise ConfigError(str(e)) from None
            parallel = args.parallel or "ddp"
        else:
            cfg = resolve_config(args.optimizer, {**sections, "optimizer": opt_overrides}, preset=args.preset,
                                 name="plan", launch=launch)
            harness_cfg, opt_cfg = cfg, cfg.optimizer
            parallel = cfg.train.parallel
    except ConfigError as e:
        raise PlanError(str(e)) from None
    primary = opt_choice(args.optimizer, opt_cfg)
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
        model = harness_model(harness_cfg)
        micro = args.micro_batch or harness_cfg.train.micro_batch_size
        seq = args.seq_len or harness_cfg.data.seq_len
        autocast = harness_cfg.train.autocast
    runtime = 0
    if args.device == "cpu":
        if args.runtime_mib == "auto":
            runtime = measure_runtime_bytes()
        else:
            try:
                runtime = int(float(args.runtime_mib) * 2**20)
            except ValueError:
                raise PlanError(f"--runtime-mib must be a number of MiB or auto, got {args.runtime_mib!r}") from None
    setup = Setup(micro_batch=micro, seq_len=seq, parallel=parallel, world=args.world,
                  distributed=args.distributed, param_dtype=dtypes["param_dtype"], grad_dtype=dtypes["grad_dtype"],
                  state_dtype=dtypes["state_dtype"], master_weights=args.master_weights,
                  checkpointing=args.checkpointing, loss_chunk_tokens=args.loss_chunk_tokens, attention=args.attention,
                  device=args.device, autocast=autocast, runtime_bytes=runtime,
                  allocator_bytes=CPU_ALLOCATOR_SLACK if args.device == "cpu" else 0)

    compared = []
    for name in COMPARED:
        if name == args.optimizer:
            compared.append(primary if name != "mfsgd" else OptChoice(**{**primary.__dict__, "memory_mode": "full"}))
        elif name.startswith("mfsgd"):
            mf = primary if args.optimizer == "mfsgd" else OptChoice("mfsgd", rank=rank)
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
        + (f"max over ranks {n['opt_state_bytes_hidden_per_rank']}" if n["opt_state_bytes_hidden_per_rank"] else
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
