"""Run configuration: typed sections, YAML loading, JSON overrides, validation.

A run's configuration is resolved in layers, each deep-merged over the last:
    configs/base.yaml -> configs/optimizers/NAME.yaml -> configs/presets/PRESET.yaml -> --config JSON
The optimizer YAML holds flat keys (as in the paper's harness: lr, rank, beta, ...). In the JSON
overrides, a top-level key that names a section (model, data, train, adam, logging, optimizer)
merges into that section; any other key is an optimizer key, so `{"lr": 0.05, "rank": 32}` works
as in the paper's README.

The resolved config is plain data (`RunConfig.to_dict()`), written to results/RUN/config.json and
read back by the worker with `RunConfig.from_dict`.
"""

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import yaml

from optimizers import OPTIMIZERS, check_adam, optimizer_config_class

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(CONFIG_DIR)


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key, file or value."""


@dataclass
class ModelConfig:
    arch: str = "gpt2"  # model family (model.py): gpt2, or speedrun (modded-nanogpt's, the paper's NanoGPT)
    preset: str | None = "cpu-small"  # a size from model.PRESETS; the fields below override it
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None  # maximum context length
    vocab_size: int = 50304
    dropout: float = 0.0  # gpt2 only (the speedrun model has no dropout)
    loss_chunk_tokens: int = 256  # the head's loss in chunks of this many tokens, no full logits held; 0: all at once
    num_value_embeds: int | None = None  # speedrun only: value-embedding tables, each used by one early and one late layer (null: 3)
    logit_softcap: float | None = None  # speedrun only: logits = c * tanh(logits / c) (null: 15)
    skip_attn_layers: list[int] | None = None  # speedrun only: layers with no attention (null: [7] at 12 layers, else none)
    bf16: bool | None = None  # speedrun only: bf16 embeddings, residual stream and matmuls, as the paper's harness (null: false)

    SPEEDRUN_ONLY = ("num_value_embeds", "logit_softcap", "skip_attn_layers", "bf16")

    def validate(self):
        from model import ARCHS, PRESETS

        if self.arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}; got {self.arch!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        if self.preset is None and None in (self.n_layer, self.n_head, self.n_embd, self.block_size):
            raise ValueError("model.preset is null, so model.n_layer, n_head, n_embd and block_size must all be set")
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            _positive(f"model.{key}", getattr(self, key), allow_none=True)
        resolved = self.resolved()
        if resolved["n_embd"] % resolved["n_head"]:
            raise ValueError(f"model.n_embd ({resolved['n_embd']}) must be divisible by model.n_head ({resolved['n_head']})")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"model.loss_chunk_tokens must be >= 0 (0: off), got {self.loss_chunk_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.arch == "gpt2":
            for key in self.SPEEDRUN_ONLY:
                if getattr(self, key) is not None:
                    raise ValueError(f"model.{key} applies only to model.arch speedrun (arch is gpt2); remove it or set arch: speedrun")
            return
        # speedrun
        if self.dropout:
            raise ValueError(f"model.dropout must be 0 for model.arch speedrun (the speedrun model has no dropout), got {self.dropout}")
        head_dim = resolved["n_embd"] // resolved["n_head"]
        if head_dim % 4:
            raise ValueError(f"model.arch speedrun needs a head dimension divisible by 4 for its half-truncated rotary "
                             f"embeddings: n_embd / n_head = {resolved['n_embd']} / {resolved['n_head']} = {head_dim}")
        n_layer, nve = resolved["n_layer"], resolved["num_value_embeds"]
        if not 0 <= nve <= n_layer // 2:
            raise ValueError(f"model.num_value_embeds ({nve}) must be between 0 and n_layer // 2 = {n_layer // 2} (each table "
                             f"feeds one of the first and one of the last layers); set it, or use preset speedrun-tiny or speedrun")
        if resolved["logit_softcap"] <= 0:
            raise ValueError(f"model.logit_softcap must be > 0, got {resolved['logit_softcap']}")
        from model import SpeedrunConfig, SpeedrunGPT

        with torch.device("meta"):  # the model's own checks (skip_attn_layers), without allocating it
            SpeedrunGPT(SpeedrunConfig(**resolved))

    def resolved(self) -> dict:
        """The model config fields (GPTConfig or SpeedrunConfig) this section describes: preset values,
        then explicit overrides, then the architecture's defaults for fields left null."""
        from model import PRESETS, SpeedrunConfig

        fields = dict(PRESETS[self.preset]) if self.preset else {}
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, key) is not None:
                fields[key] = getattr(self, key)
        fields["vocab_size"] = self.vocab_size
        fields["loss_chunk_tokens"] = self.loss_chunk_tokens
        if self.arch == "speedrun":
            for key in self.SPEEDRUN_ONLY:
                value = getattr(self, key)
                fields[key] = getattr(SpeedrunConfig, key) if value is None else value
            if fields["skip_attn_layers"] is not None:
                fields["skip_attn_layers"] = tuple(fields["skip_attn_layers"])
        else:
            fields["dropout"] = self.dropout
        return fields


@dataclass
class DataConfig:
    train_files: str = "data/shakespeare/train_*.bin"  # glob of training shards (relative to the repo root or absolute)
    val_files: str = "data/shakespeare/val_*.bin"
    seq_len: int = 128  # tokens per training sequence
    shuffle: bool = True  # shuffle the training windows each epoch (seeded)
    val_tokens: int = 8192  # tokens evaluated at each validation
    # windows: independent seq_len-token windows (shuffled with `shuffle`); stream: each step reads
    # the next batch_size x seq_len tokens of the shards in order, one seq_len-token stream per
    # sequence, as the paper's harness (data/loader.py StreamLoader)
    layout: Literal["windows", "stream"] = "windows"

    def validate(self):
        _positive("data.seq_len", self.seq_len)
        _positive("data.val_tokens", self.val_tokens)
        if self.layout == "stream" and self.shuffle:
            raise ValueError("data.shuffle must be false with data.layout stream (the stream is read in order)")
        if self.val_tokens < self.seq_len:
            raise ValueError(f"data.val_tokens ({self.val_tokens}) must be at least data.seq_len ({self.seq_len})")


MAX_COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600  # seconds


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # sequences per optimizer step, over all ranks and accumulation steps
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    seed: int = 1337
    val_every: int = 25  # evaluate every this many steps (and at step 0 and the last step); 0: only at the end
    val_batch_size: int = 32  # sequences per validation forward on one rank
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: what the launcher runs on (--num-gpus: cuda, --nproc: cpu); cpu or cuda: insist on it
    autocast: Literal["none", "bf16"] = "none"  # autocast of the forward pass (GPU)
    compile: bool = False  # torch.compile the model (slow to compile on CPU)
    # ddp: a whole replica per rank, gradients all-reduced; fsdp: FSDP2 (fully_shard per block), each rank
    # holds 1/world of the parameters, gradients and optimizer state, checkpoints through torch DCP
    parallel: Literal["ddp", "fsdp"] = "ddp"
    grad_clip: float = 0.0  # clip the global gradient norm to this value; 0: off
    ckpt_every: int = 0  # write a checkpoint every this many steps; 0: only at the end
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep
    debug_crash_at_step: int = 0  # testing aid: raise at this step in the first attempt (not after a restart)
    # a collective (DDP's all-reduce, validation's, a checkpoint's gather) that does not complete in this
    # many seconds fails the run on every rank that waits: a rank stopped or died; long enough for the
    # first step's torch.compile on a GPU, which the other ranks wait out in their first all-reduce
    collective_timeout_s: float = 600.0
    debug_hang_at_step: int = 0  # testing aid: the last rank stops itself (SIGSTOP) after logging this step
    # the gradient of a step is grad_scale x the gradient of the batch-mean loss (the logged loss stays
    # the mean); the paper's harness sums its micro-batches per GPU: grad_scale = micro-batches per GPU
    grad_scale: float = 1.0
    # speedrun only: sliding attention window growing linearly from [start, end] tokens over the run,
    # in whole 128-token blocks (the paper's [128, 1856]); null: attention over the whole sequence
    window_tokens: list[int] | None = None

    def validate(self):
        for key in ("steps", "batch_size", "micro_batch_size", "val_batch_size", "keep_checkpoints"):
            _positive(f"train.{key}", getattr(self, key))
        for key in ("seed", "val_every", "ckpt_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.micro_batch_size ({self.micro_batch_size})"
            )
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0, got {self.grad_clip}")
        if not 0 < self.collective_timeout_s <= MAX_COLLECTIVE_TIMEOUT_S:
            raise ValueError(f"train.collective_timeout_s must be > 0 and at most {MAX_COLLECTIVE_TIMEOUT_S} (a week), "
                             f"got {self.collective_timeout_s}")
        if self.debug_hang_at_step < 0:
            raise ValueError(f"train.debug_hang_at_step must be >= 0, got {self.debug_hang_at_step}")
        if not 0 < self.grad_scale < float("inf"):
            raise ValueError(f"train.grad_scale must be a finite number > 0, got {self.grad_scale}")
        if self.window_tokens is not None and (len(self.window_tokens) != 2 or min(self.window_tokens) < 128):
            raise ValueError(f"train.window_tokens must be [start, end] with both >= 128 (one 128-token block), "
                             f"or null; got {self.window_tokens}")


@dataclass
class AdamConfig:
    """AdamW for everything that is not a hidden matrix: embeddings, the head and 1-D params."""

    embed_lr: float = 0.003
    head_lr: float = 0.003  # only used when the head is not tied to the embedding
    scalar_lr: float = 0.003  # biases, norm gains
    betas: list[float] = field(default_factory=lambda: [0.8, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0

    def validate(self):
        for key in ("embed_lr", "head_lr", "scalar_lr"):
            _positive(f"adam.{key}", getattr(self, key))
        check_adam("adam", self)


@dataclass
class LoggingConfig:
    wandb: Literal["off", "offline", "online"] = "off"  # offline: local files, sync later
    wandb_project: str = "mofa"
    progress: bool = True  # tqdm progress bar on rank 0
    # every this many steps, rank 0 appends the hidden matrices' spectral diagnostics to
    # RUN/spectrum.jsonl (worker/spectrum.py); 0: off, no extra work or memory
    spectrum_every: int = 0
    # MoFaSGD: a full-rank momentum kept beside the factors, to log how far the factors are from it
    # (an m x n matrix per hidden matrix, reported as spectrum_shadow_bytes)
    spectrum_shadow: bool = False

    def validate(self):
        """wandb's choices are its Literal's."""
        if self.spectrum_every < 0:
            raise ValueError(f"logging.spectrum_every must be >= 0 (0: off), got {self.spectrum_every}")
        if self.spectrum_shadow and not self.spectrum_every:
            raise ValueError("logging.spectrum_shadow needs logging.spectrum_every > 0 (the steps it is logged at)")


@dataclass
class LaunchConfig:
    """Filled in by run.py, not by the user."""

    nproc: int = 1  # processes per node
    nnodes: int = 1
    world_size: int = 1
    device: Literal["cpu", "cuda"] = "cpu"  # what the workers run on
    backend: Literal["gloo", "nccl"] = "gloo"  # gloo on CPU, nccl on GPU
    distributed: bool = False  # a process group and DDP even at world size 1 (run.py --distributed)


# Under train.parallel fsdp, why an optimizer or mode cannot run (docs/fsdp.md): name -> reason
FSDP_UNSUPPORTED = {
    "galore": "galore-torch computes an SVD of each whole gradient and keeps projectors of the whole matrix; "
              "on FSDP's row shards it would need the full gradient gathered on every rank",
    "adafactor": "torch.optim.Adafactor's factored second moment reduces over the sharded rows with in-place "
                 "operations that DTensor cannot run (aten.pow_ on a partial norm)",
}


def check_fsdp_support(name: str, optimizer_cfg) -> None:
    """Raises ValueError for an optimizer or optimizer mode that train.parallel fsdp cannot run."""
    if name in FSDP_UNSUPPORTED:
        raise ValueError(f"optimizer {name} does not run under train.parallel fsdp: {FSDP_UNSUPPORTED[name]}; "
                         f"use train.parallel ddp, or one of {sorted(set(OPTIMIZERS) - set(FSDP_UNSUPPORTED))}")
    if getattr(optimizer_cfg, "rank_policy", "fixed") == "energy":
        raise ValueError("optimizer.rank_policy must be fixed under train.parallel fsdp: re-allocating ranks is not "
                         "implemented for row-sharded factors (train.parallel ddp runs it)")
    if getattr(optimizer_cfg, "shard", False):
        raise ValueError("optimizer.shard must be false under train.parallel fsdp: FSDP already splits the "
                         "parameters and their optimizer state over the ranks")
    if getattr(optimizer_cfg, "comm", "full") == "sketch":
        raise ValueError("optimizer.comm must be full under train.parallel fsdp: FSDP reduce-scatters the "
                         "gradients itself (memory_mode sketch still works: it sketches each reduced shard)")


def check_spectrum_support(cfg) -> None:
    """Raises ValueError where logging.spectrum_every / spectrum_shadow cannot run. The shadow adds
    the reduced gradient the step used to its full momentum, and the sketch modes never hold it
    (the spectrum itself then comes from the sketches: worker/spectrum.py, docs/spectrum.md)."""
    if not cfg.logging.spectrum_every:
        return
    sketched = [k for k in ("memory_mode", "comm") if getattr(cfg.optimizer, k, "full") == "sketch"]
    if cfg.logging.spectrum_shadow and sketched:
        raise ValueError(f"logging.spectrum_shadow does not run with optimizer.{sketched[0]} sketch: the shadow adds "
                         "the reduced m x n gradient, which sketch modes never hold; use memory_mode full and comm "
                         "full, or spectrum_shadow false (spectrum_every alone runs, from the sketches)")
    if cfg.logging.spectrum_shadow and cfg.optimizer_name != "mfsgd":
        raise ValueError(f"logging.spectrum_shadow is for MoFaSGD (optimizer mfsgd): {cfg.optimizer_name} keeps "
                         "its full momentum already (logging.spectrum_every logs its spectrum)")


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "adam": AdamConfig,
    "logging": LoggingConfig,
}


@dataclass
class RunConfig:
    name: str
    optimizer_name: str
    optimizer: Any  # the optimizer's own config dataclass (optimizers.OPTIMIZERS[name].config)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adam: AdamConfig = field(default_factory=AdamConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a run config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        for key in ("name", "optimizer_name"):
            if not isinstance(d.get(key), str):
                raise ConfigError(f"{key} must be a string, got {_show(d.get(key))}")
        name, opt_name = d.pop("name"), d.pop("optimizer_name")
        if opt_name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {opt_name!r}; choose one of {sorted(OPTIMIZERS)}")
        sections = {key: build_dataclass(SECTIONS[key], d.get(key, {}), key) for key in SECTIONS}
        launch = build_dataclass(LaunchConfig, d.get("launch", {}), "launch")
        optimizer = build_dataclass(optimizer_config_class(opt_name), d.get("optimizer", {}), "optimizer")
        unknown = set(d) - set(SECTIONS) - {"optimizer", "launch"}
        if unknown:
            raise ConfigError(f"unknown config section {sorted(unknown)[0]!r}; valid sections: {sorted(SECTIONS) + ['optimizer']}")
        cfg = cls(name=name, optimizer_name=opt_name, optimizer=optimizer, launch=launch, **sections)
        cfg.validate()
        return cfg

    def validate(self):
        try:
            for key in list(SECTIONS) + ["optimizer"]:
                check_numbers(getattr(self, key), key)
            for key in SECTIONS:
                getattr(self, key).validate()
            self.optimizer.validate()
            if self.train.window_tokens is not None and self.model.arch != "speedrun":
                raise ValueError("train.window_tokens needs model.arch speedrun (the gpt2 model has no sliding window)")
            block_size = self.model.resolved()["block_size"]
            if self.data.seq_len > block_size:
                raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds the model's context model.block_size ({block_size})")
            rank = getattr(self.optimizer, "rank", None)  # GaLore's config exposes group_params.rank as .rank
            largest = 4 * self.model.resolved()["n_embd"]  # GPT-2's largest hidden matrix: the MLP's n_embd x 4 n_embd
            if rank is not None and rank > largest:
                raise ValueError(f"optimizer rank {rank} exceeds every side of every hidden matrix (at most 4 x model.n_embd "
                                 f"= {largest}); ranks above min(m, n) are clipped per matrix, so use at most {largest // 4}")
            n_embd = self.model.resolved()["n_embd"]
            group_params = getattr(self.optimizer, "group_params", None)
            if group_params is not None and group_params.proj_type == "reverse_std" and rank >= n_embd:
                # the MLP's n_embd x 4 n_embd output matrix is wide with m = n_embd (optimizers/galore.py)
                raise ValueError(f"optimizer.group_params.rank ({rank}) must be below model.n_embd ({n_embd}) with "
                                 "proj_type reverse_std: galore-torch projects back on the wrong side of a wide matrix "
                                 "then; use a smaller rank or proj_type std")
            sketched = [k for k in ("memory_mode", "comm") if getattr(self.optimizer, k, "full") == "sketch"]
            if sketched and self.train.grad_clip > 0:
                raise ValueError(f"train.grad_clip must be 0 with optimizer.{sketched[0]} sketch: the global gradient "
                                 "norm needs the full (averaged) gradients, which sketch mode never holds")
            check_spectrum_support(self)
            if self.train.parallel == "fsdp":
                check_fsdp_support(self.optimizer_name, self.optimizer)
            elif getattr(self.optimizer, "memory_mode", "full") == "sketch" and \
                    (self.launch.world_size > 1 or self.launch.distributed) \
                    and self.optimizer.comm != "sketch":
                raise ValueError("optimizer.memory_mode sketch on several ranks needs optimizer.comm sketch: "
                                 "the gradients are sketched before DDP could average them")
            if self.train.device not in ("auto", self.launch.device):
                how = "--num-gpus N" if self.train.device == "cuda" else "--nproc N"
                raise ValueError(f"train.device is {self.train.device!r} but the workers run on {self.launch.device}: "
                                 f"launch with {how}, or set train.device to auto")
            per_step = self.launch.world_size * self.train.micro_batch_size
            if self.train.batch_size % per_step:
                fits = [m for m in range(self.train.micro_batch_size, 0, -1)
                        if self.train.batch_size % (self.launch.world_size * m) == 0]
                hint = (f"; e.g. train.micro_batch_size {fits[0]}" if fits
                        else f"; make train.batch_size a multiple of {per_step}")
                raise ValueError(
                    f"train.batch_size ({self.train.batch_size}) must be a multiple of world size x train.micro_batch_size "
                    f"({self.launch.world_size} x {self.train.micro_batch_size}){hint}"
                )
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def warnings(self) -> list[str]:
        """Legal but probably unintended settings, reported by the launcher."""
        out = []
        rank = getattr(self.optimizer, "rank", None)  # GaLore's config exposes group_params.rank as .rank
        width = self.model.resolved()["n_embd"]
        if rank is not None and rank > width:
            out.append(f"optimizer rank {rank} > min(m, n) = {width} of every hidden matrix: clipped to {width} per matrix")
        return out

    def estimate_worker_bytes(self) -> tuple[int, int]:
        """A lower bound on one worker's memory: (bytes, parameters). Parameters x 16 bytes (fp32
        weight, gradient and up to two optimizer moments) plus one fp32 copy of the logits of the
        larger of a training micro-batch and a validation batch. Activations are left out, so this
        rejects only sizes no machine of the given memory could hold."""
        m = self.model.resolved()
        n_layer, n_embd, vocab, block = m["n_layer"], m["n_embd"], m["vocab_size"], m["block_size"]
        params = n_layer * 12 * n_embd * n_embd + vocab * n_embd + block * n_embd
        if self.model.arch == "speedrun":  # untied head and value-embedding tables
            params += vocab * n_embd * (1 + m["num_value_embeds"])
        logits = max(self.train.micro_batch_size, self.train.val_batch_size) * self.data.seq_len * vocab
        return 16 * params + 4 * logits, params

    @property
    def grad_accum(self) -> int:
        return self.train.batch_size // (self.launch.world_size * self.train.micro_batch_size)


# ---------------------------------------------------------------------------------------------
# Typed construction from plain data


def build_dataclass(cls, data: dict, path: str):
    """Builds dataclass `cls` from a dict, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            raise ConfigError(f"unknown config key '{path}.{key}'{key_suggestion(cls, path, key, data[key])}; "
                              f"valid keys: {', '.join(names)}")
    values = {key: _coerce(data[key], hints[key], f"{path}.{key}") for key in data}
    return cls(**values)


def key_suggestion(cls, path: str, key, value) -> str:
    """' (did you mean ...?)' for an unknown key: the same key one level down (GaLore's flat `rank`
    is group_params.rank), a section name misspelt as an optimizer key (trian -> train), or the
    closest valid key (difflib); '' when nothing is close."""
    key = str(key)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) and key in {g.name for g in dataclasses.fields(f.type)}:
            return f" (did you mean {path}.{f.name}.{key}? write {{\"{f.name}\": {{\"{key}\": ...}}}})"
    # a key of the section the user is in first ({"ranks": 8} means rank, not train); then, for an
    # optimizer key, a misspelt section name ({"trian": {...}})
    candidates = [f.name for f in dataclasses.fields(cls)]
    own = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    section = difflib.get_close_matches(key, list(SECTIONS), n=1, cutoff=0.6) if path == "optimizer" else []
    if section and (not own or isinstance(value, dict) or
                    difflib.SequenceMatcher(None, key, section[0]).ratio() > difflib.SequenceMatcher(None, key, own[0]).ratio()):
        inner = f".{next(iter(value))}" if isinstance(value, dict) and value else ""
        return f" (did you mean {section[0]}{inner}? {section[0]} is a section)"
    return f" (did you mean {path}.{own[0]}?)" if own else ""


def _coerce(value, hint, path: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, path)
    if origin is Literal:  # a choice: the schema names them
        if not isinstance(value, str) or value not in args:
            raise ConfigError(f"{path} must be {_choices(args)}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {_show(value)}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path} must be a finite integer, got {_show(value)}")
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{path} must be an integer, got {_show(value)}")
        if not -MAX_INT <= int(value) <= MAX_INT:
            raise ConfigError(f"{path} must be an integer of at most 64 bits (|value| <= {MAX_INT}), got {_show(value)}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {_show(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{path} must be a finite number, got {_show(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {_show(value)}")
        if any(ord(c) < 32 or ord(c) == 127 for c in value) or len(value) > 4096:
            raise ConfigError(f"{path} must be a string of printable characters (at most 4096), got {_show(value)}")
        return value
    if hint is Any:
        return value
    raise TypeError(f"unsupported config type {hint} at {path}")


MAX_INT = 2**63 - 1  # torch's int64: every integer a worker hands to torch must fit


def _show(value, limit=80) -> str:
    """A config value for a one-line message: JSON (NaN and Infinity as JSON writes them), cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_numbers(obj, path: str) -> None:
    """Every number of a config section (nested dataclasses and lists included) is finite and fits
    64 bits, whoever built it: what a worker or torch would reject is rejected here."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            check_numbers(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{path} must be a finite number, got {_show(obj)}")
    elif isinstance(obj, int) and not isinstance(obj, bool) and not -MAX_INT <= obj <= MAX_INT:
        raise ValueError(f"{path} must be an integer of at most 64 bits (|value| <= {MAX_INT}), got {_show(obj)}")


def _positive(key, value, allow_none=False):
    if value is None and allow_none:
        return
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value}")


def _choices(choices) -> str:
    """A Literal type's choices as an error names them: "a or b", "one of a, b, c"."""
    if len(choices) <= 2:
        return " or ".join(choices)
    return f"one of {', '.join(choices)}"


# ---------------------------------------------------------------------------------------------
# Layered loading


MAX_CONFIG_BYTES = 16 * 2**20  # a config or sweep file larger than this is not a config
MAX_YAML_NODES = 100_000  # nodes of a YAML document with its aliases expanded (an alias bomb has billions)


def read_text(path: str, what: str = "") -> str:
    """A UTF-8 text file the harness reads, or a one-line ConfigError naming it and the problem."""
    label = f"{what} {path}".strip()
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{label} not found") from None
    except OSError as e:
        raise ConfigError(f"cannot read {label}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{label} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; not a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def parse_json(text: str, source: str):
    """JSON text -> data, or a one-line ConfigError (also for numbers too long to convert and nesting
    too deep for the parser)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source} is not valid JSON: {e}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{source} is not valid JSON: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{source} is not valid JSON: nested too deeply") from None


def read_json_file(path: str, what: str = "") -> dict:
    """A JSON object from a file (config.json, summary.json, --config @file), or a one-line ConfigError."""
    label = f"{what} {path}".strip()
    data = parse_json(read_text(path, what), label)
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must hold a JSON object, got {type(data).__name__}")
    return data


def _yaml_size(node, memo: dict, limit: int) -> int:
    """Nodes of a composed YAML document with every alias expanded (aliases share node objects)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once (safe_load then rejects or builds it)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            total += _yaml_size(child, memo, limit)
            if total > limit:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            total += _yaml_size(k, memo, limit) + _yaml_size(v, memo, limit)
            if total > limit:
                break
    memo[key] = total
    return total


def safe_yaml(text: str, source: str):
    """yaml.safe_load with limits: no alias bombs (expanded size), no nesting deep enough to
    exhaust the parser, one-line errors naming `source`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _yaml_size(node, {}, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ConfigError(f"{source} expands to more than {MAX_YAML_NODES} YAML nodes (aliases included); "
                              "not a config file")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    except RecursionError:
        raise ConfigError(f"{source} is not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    data = safe_yaml(read_text(path, "config file"), path)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values")
    return data


def parse_overrides(text: str | None) -> dict:
    """The --config argument: a JSON object, or @path to a JSON file."""
    if not text:
        return {}
    source = "--config"
    if text.startswith("@"):
        source = text[1:]
        if not os.path.isfile(source):
            raise ConfigError(f"--config file not found: {source}")
        text = read_text(source, "--config file")
    data = parse_json(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a JSON object, got {type(data).__name__}")
    return data


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def split_overrides(overrides: dict) -> dict:
    """Sorts override keys into sections: section names merge into sections, the rest are optimizer keys."""
    layered = {}
    for key, value in overrides.items():
        if key in SECTIONS or key == "optimizer":
            layered = deep_merge(layered, {key: value})
        else:
            layered = deep_merge(layered, {"optimizer": {key: value}})
    return layered


def resolve_config(optimizer: str, overrides: dict | None = None, preset: str | None = None, name: str = "run",
                   launch: dict | None = None) -> RunConfig:
    """Builds the validated RunConfig from the YAML layers and the JSON overrides."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(sorted(OPTIMIZERS))}")
    data = load_yaml(os.path.join(CONFIG_DIR, "base.yaml"))
    data["optimizer"] = load_yaml(os.path.join(CONFIG_DIR, "optimizers", f"{optimizer}.yaml"))
    if preset:
        preset_path = preset_file(preset)
        if not os.path.isfile(preset_path):
            presets_dir = os.path.join(CONFIG_DIR, "presets")
            names = os.listdir(presets_dir) if os.path.isdir(presets_dir) else []
            available = sorted(p[:-5] for p in names if p.endswith(".yaml"))
            from model import PRESETS

            size = (f"; {preset} is a model size: --config '{{\"model\": {{\"preset\": \"{preset}\"}}}}'"
                    if preset in PRESETS else "")
            raise ConfigError(f"unknown preset {preset!r}; available presets: {', '.join(available) or 'none'}{size}")
        data = deep_merge(data, split_overrides(load_yaml(preset_path)))
    data = deep_merge(data, split_overrides(overrides or {}))
    data.update(name=name, optimizer_name=optimizer, launch=launch or {})
    return RunConfig.from_dict(data)


def partial_nested_overrides(optimizer: str, overrides: dict) -> list[str]:
    """Warnings for --config overrides that give a nested optimizer mapping (GaLore's group_params)
    only in part. mofa merges them key by key; the paper harness merges --config shallowly, so
    there the mapping replaces the YAML's whole, and the keys left out take the harness's code
    defaults: the same command would train another run."""
    if optimizer not in OPTIMIZERS:
        return []
    yaml_keys = load_yaml(os.path.join(CONFIG_DIR, "optimizers", f"{optimizer}.yaml"))
    given = split_overrides(overrides).get("optimizer", {})
    out = []
    for key, value in given.items():
        base = yaml_keys.get(key)
        if isinstance(value, dict) and isinstance(base, dict) and set(base) - set(value):
            kept = ", ".join(f"{k} {json.dumps(base[k])}" for k in sorted(set(base) - set(value)))
            out.append(f"--config gives {key} in part: here its other keys keep configs/optimizers/{optimizer}.yaml's "
                       f"values ({kept}); the paper harness merges --config shallowly, so there they take its code "
                       f"defaults (for GaLore, update_proj_gap 200). Give every {key} key to train the same run in both")
    return out


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]*")  # run, preset and sweep names: one path component


def preset_file(preset: str) -> str:
    """--preset NAME is configs/presets/NAME.yaml; a file elsewhere must be named on purpose, as a
    path ending in .yaml or .yml (e.g. ./my-preset.yaml)."""
    if preset.endswith((".yaml", ".yml")):
        if not os.path.isfile(preset):
            raise ConfigError(f"preset file not found: {preset}")
        return preset
    if not NAME.fullmatch(preset) or len(preset) > 200:
        raise ConfigError(f"preset {preset!r} is not a preset name (letters, digits and . _ = , + -, in configs/presets); "
                          "give a file elsewhere as a path ending in .yaml")
    return os.path.join(CONFIG_DIR, "presets", f"{preset}.yaml")


def resolve_path(path: str) -> str:
    """Data paths in configs are relative to the repo root unless absolute."""
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


# ---------------------------------------------------------------------------------------------
# What a run's numbers depend on: fixed once the run starts (resume), compared by sweeps

# Entries of config.json that do not change what a run computes: its folder name, how it is
# launched (an FSDP run may resume on another number of ranks; run.py records each launch in
# launches.jsonl), logging, when checkpoints are written, testing aids and the collective timeout.
# A dotted entry covers that key and everything below it.
RUN_NEUTRAL_KEYS = ("name", "launch", "logging", "train.ckpt_every", "train.keep_checkpoints",
                    "train.debug_crash_at_step", "train.debug_hang_at_step", "train.collective_timeout_s")


def flatten_config(config: dict, prefix: str = "") -> dict:
    """{'train.steps': 300, 'optimizer.group_params.rank': 8, ...}: a config dict with dotted keys
    (lists kept whole)."""
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, path + "."))
        else:
            out[path] = value
    return out


def fixed_entries(config: dict, ignore=RUN_NEUTRAL_KEYS) -> dict:
    """The flattened entries of a config dict (RunConfig.to_dict(), or config.json) other than the
    `ignore` ones: by default what a run's numbers depend on, fixed once it starts."""
    return {k: v for k, v in flatten_config(config).items()
            if not any(k == skip or k.startswith(skip + ".") for skip in ignore)}


def config_hash(config: dict, ignore=RUN_NEUTRAL_KEYS) -> str:
    """A canonical hash (sha256 of the sorted entries as JSON) of what a run's numbers depend on."""
    import hashlib

    text = json.dumps(fixed_entries(config, ignore), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def config_changes(old: dict, new: dict, ignore=RUN_NEUTRAL_KEYS) -> list[str]:
    """The entries that differ between two config dicts, as 'key old -> new' (sorted; a key on one
    side only shows <absent> on the other), leaving out the `ignore` ones."""
    a, b = fixed_entries(old, ignore), fixed_entries(new, ignore)
    absent = object()
    show = lambda v: "<absent>" if v is absent else json.dumps(v)  # noqa: E731
    return [f"{key} {show(a.get(key, absent))} -> {show(b.get(key, absent))}" for key in sorted(set(a) | set(b))
            if json.dumps(a.get(key, absent) if key in a else None) != json.dumps(b.get(key) if key in b else None)
            or (key in a) != (key in b)]
