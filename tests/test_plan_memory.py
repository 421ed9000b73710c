"""scripts/plan_memory.py against the harness: parameters, gradients and optimizer state byte for
byte (real models and optimizers built with the harness's own builders, one step taken, counted by
memory.memory_parts); activations against the tensors a real forward saves for backward; the
LLaMA fixture against transformers' own model; the CLI's errors and outputs; and the total against
the peak memory of real runs through run.py on 1 and 2 CPU ranks."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from configs import resolve_config
from helpers import ROOT, launch, read_metrics, train_in_process, write_run_config, write_tiny_corpus
from model import create_model
from optimizers import build_optimizers
from scripts import plan_memory as pm
from worker.memory import memory_parts

LLAMA = os.path.join(ROOT, "configs", "hf", "llama-3.1-8b.json")
VOCAB = 256
GPT2_TINY = {"preset": "cpu-tiny", "vocab_size": VOCAB}  # 2 layers, 64 wide, head tied to the embedding
SPEEDRUN_BF16 = {"arch": "speedrun", "preset": "speedrun-tiny", "vocab_size": VOCAB, "bf16": True}  # bf16 tables, untied head

OPTIMIZER_CASES = [
    ("adamw", {}),
    ("adamw", {"fused": False}),
    ("mfsgd", {"rank": 4}),
    ("mfsgd", {"rank": 16}),
    ("mfsgd", {"rank": 100}),  # above min(m, n) = 64: clipped per matrix
    ("mfsgd", {"rank": 8, "memory_mode": "sketch"}),
    ("mfsgd", {"rank": 8, "comm": "sketch"}),
    ("galore", {"group_params": {"rank": 8}}),
    ("galore", {"group_params": {"rank": 8, "proj_type": "full"}}),
    ("galore", {"group_params": {"rank": 8, "proj_type": "right"}}),
    ("muon", {}),
    ("adafactor", {}),
]


def step_once(name, overrides, micro_batch=2, seq_len=32):
    """The harness's model and optimizers (its own builders), one forward/backward/step; returns the
    config, memory_parts at the step (gradients held then) and after it (state exists)."""
    cfg = resolve_config(name, overrides)
    torch.manual_seed(0)
    model = create_model(cfg.model.arch, **cfg.model.resolved())
    hidden_opt, adam_opt = build_optimizers(model, name, cfg.optimizer, cfg.adam)
    x = torch.randint(0, VOCAB, (micro_batch, seq_len + 1))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    if getattr(cfg.optimizer, "comm", "full") == "sketch":  # as train_gpt does before the step
        hidden_opt.sketch_gradients_()
    at_step = memory_parts(model, hidden_opt, adam_opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MoFaSGD's rank-clipping warning
        hidden_opt.step()
    adam_opt.step()
    return cfg, at_step, memory_parts(model, hidden_opt, adam_opt)


@pytest.mark.parametrize("model_cfg", [GPT2_TINY, SPEEDRUN_BF16], ids=["gpt2-tied", "speedrun-bf16"])
@pytest.mark.parametrize("name, opt", OPTIMIZER_CASES, ids=[f"{n}-{json.dumps(o)}" for n, o in OPTIMIZER_CASES])
def test_parameters_gradients_and_state_match_the_harness_byte_for_byte(model_cfg, name, opt):
    if name == "galore":
        pytest.importorskip("galore_torch")
    cfg, at_step, after = step_once(name, {"model": model_cfg, **opt})
    plan = pm.plan(pm.harness_model(cfg), pm.opt_choice(name, cfg.optimizer), pm.Setup(micro_batch=2, seq_len=32))
    assert plan["param_bytes"] == at_step["param_bytes"]
    assert plan["grad_bytes"] == at_step["grad_bytes"]
    assert plan["opt_state_bytes_hidden"] == after["opt_state_bytes_hidden"] > 0
    assert plan["opt_state_bytes_other"] == after["opt_state_bytes_other"] > 0


def test_state_dtype_and_master_weights_options():
    """--state-dtype fp32 with bf16 parameters: AdamW's moments are 4 bytes; master weights add an
    fp32 copy of every bf16 parameter (counted independently from the model's tensors)."""
    cfg = resolve_config("adamw", {"model": GPT2_TINY})
    model = pm.harness_model(cfg)
    numel = sum(p.numel for p in model.params)
    tensors = len(model.params)
    base = pm.Setup(micro_batch=1, seq_len=8, param_dtype="bf16")
    bf16 = pm.plan(model, pm.OptChoice("adamw"), base)
    assert bf16["param_bytes"] == 2 * numel
    assert bf16["opt_state_bytes_hidden"] + bf16["opt_state_bytes_other"] == 2 * 2 * numel + 4 * tensors
    fp32 = pm.plan(model, pm.OptChoice("adamw"), pm.Setup(**{**base.__dict__, "state_dtype": "fp32", "master_weights": True}))
    assert fp32["opt_state_bytes_hidden"] + fp32["opt_state_bytes_other"] == (2 * 4 + 4) * numel + 4 * tensors


def saved_tensor_bytes(model, x, y):
    """Bytes of the distinct storages a forward saves for backward, parameters and buffers excepted."""
    persistent = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in persistent:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    return sum(saved.values())


@pytest.mark.parametrize("model_cfg", [
    {"preset": "cpu-tiny", "vocab_size": VOCAB},
    {"preset": None, "n_layer": 3, "n_head": 4, "n_embd": 64, "block_size": 64, "vocab_size": VOCAB, "loss_chunk_tokens": 0},
    {"arch": "speedrun", "preset": "speedrun-tiny", "vocab_size": VOCAB},
    SPEEDRUN_BF16,
], ids=["gpt2", "gpt2-unchunked", "speedrun", "speedrun-bf16"])
def test_activation_estimate_equals_the_tensors_a_forward_saves(model_cfg):
    """On CPU the planner's per-layer formula plus the head's saved buffers is exactly what autograd
    keeps (the speedrun's bool attention mask lives through the forward but is not saved)."""
    cfg = resolve_config("adamw", {"model": model_cfg, "data": {"seq_len": 48}})
    torch.manual_seed(0)
    model = create_model(cfg.model.arch, **cfg.model.resolved())
    B, T = 2, 48
    x, y = torch.randint(0, VOCAB, (B, T)), torch.randint(0, VOCAB, (B, T))
    measured = saved_tensor_bytes(model, x, y)
    plan = pm.plan(pm.harness_model(cfg), pm.OptChoice("adamw"), pm.Setup(micro_batch=B, seq_len=T, device="cpu"))
    bool_mask = B * T * T if cfg.model.arch == "speedrun" else 0
    assert plan["activation_bytes"] + plan["head_saved_bytes"] - bool_mask == measured


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_activation_estimate_equals_what_transformers_saves(tmp_path, dtype):
    """A small LlamaForCausalLM from a config.json (GQA, untied head): the planner's LLaMA formula plus
    the plain head's saved buffers is exactly what its forward with labels saves for backward."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=VOCAB, tie_word_embeddings=False, torch_dtype=dtype, max_position_embeddings=128)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(getattr(torch, dtype)).train()
    B, T = 2, 48
    x = torch.randint(0, VOCAB, (B, T))
    persistent = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in persistent:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x)
    desc, _ = pm.hf_model(str(path))
    plan = pm.plan(desc, pm.OptChoice("adamw"), pm.Setup(micro_batch=B, seq_len=T, device="cpu"))
    assert plan["activation_bytes"] + plan["head_saved_bytes"] == sum(saved.values())


def test_llama_fixture_matches_transformers_model():
    """The fixture's LLaMA-3.1-8B: the planner's parameter list equals the parameters of
    transformers' LlamaForCausalLM built from the same config.json (on the meta device)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig.from_json_file(LLAMA)
    with torch.device("meta"):
        reference = transformers.LlamaForCausalLM(config)
    expected = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    model, dtype = pm.hf_model(LLAMA)
    assert {p.name: p.shape for p in model.params} == expected
    assert dtype == "bf16"
    assert sum(p.numel for p in model.params) == sum(p.numel() for p in reference.parameters())
    hidden = [p for p in model.params if p.kind == "hidden"]
    assert len(hidden) == 7 * config.num_hidden_layers
    assert {p.kind for p in model.params if p.name in ("model.embed_tokens.weight", "lm_head.weight")} == {"embed", "head"}


def test_fsdp_shards_every_tensor_and_gathers_one_unit():
    model, _ = pm.hf_model(LLAMA)
    one = pm.plan(model, pm.OptChoice("adamw"), pm.Setup(micro_batch=1, seq_len=16))
    four = pm.plan(model, pm.OptChoice("adamw"), pm.Setup(micro_batch=1, seq_len=16, parallel="fsdp", world=4))
    # every dim 0 of LLaMA-8B divides by 4: exactly a quarter
    for key in ("param_bytes", "grad_bytes"):
        assert four[key] * 4 == one[key]
    steps = pm.STEP_BYTES * one["hidden_matrices"]  # each matrix's step counter is whole on every rank
    assert four["opt_state_bytes_hidden"] == (one["opt_state_bytes_hidden"] - steps) // 4 + steps
    embed = next(p for p in model.params if p.kind == "embed")
    assert four["comm_bytes"] == embed.numel * 2  # the largest unit: the 128256 x 4096 bf16 embedding
    assert one["activation_bytes"] == four["activation_bytes"]


# FSDP on 2 ranks with rows that do not split evenly (rank 0 holds ceil(m / 2) of each tensor's rows):
# the planner against what rank 0 of a real run logged
ODD_MODEL = {"preset": None, "n_layer": 2, "n_head": 3, "n_embd": 15, "block_size": 33, "vocab_size": 257}
FSDP_CASES = [("adamw", {}), ("mfsgd", {"rank": 4}), ("mfsgd", {"rank": 4, "memory_mode": "sketch"}),
              ("muon", {"shard": False})]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-bytes")
    data = write_tiny_corpus(root / "data")
    data.update(seq_len=32)
    dirs = []
    for i, (name, keys) in enumerate(FSDP_CASES):
        overrides = {"model": ODD_MODEL, "data": data, "optimizer": keys, "logging": {"progress": False},
                     "train": {"steps": 1, "batch_size": 4, "micro_batch_size": 2, "val_every": 0, "parallel": "fsdp"}}
        dirs.append(write_run_config(root, f"{i}-{name}", name, overrides, world=2))
    train_in_process(dirs, 2)
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(FSDP_CASES)), ids=[f"{n}-{json.dumps(o)}" for n, o in FSDP_CASES])
def test_fsdp_parameters_gradients_and_state_match_rank_zero_byte_for_byte(fsdp_runs, case):
    from configs import RunConfig

    with open(os.path.join(fsdp_runs[case], "config.json")) as f:
        cfg = RunConfig.from_dict(json.load(f))
    name = FSDP_CASES[case][0]
    plan = pm.plan(pm.harness_model(cfg), pm.opt_choice(name, cfg.optimizer),
                   pm.Setup(micro_batch=2, seq_len=32, parallel="fsdp", world=2))
    logged = next(r for r in read_metrics(fsdp_runs[case]) if "train_loss" in r)
    for key in ("param_bytes", "grad_bytes", "opt_state_bytes_hidden", "opt_state_bytes_other"):
        assert plan[key] == logged[key], key
    unsharded = pm.plan(pm.harness_model(cfg), pm.opt_choice(name, cfg.optimizer), pm.Setup(micro_batch=2, seq_len=32))
    assert unsharded["param_bytes"] / 2 < plan["param_bytes"] < 0.52 * unsharded["param_bytes"]  # ceil: a bit over half


def test_planner_refuses_what_fsdp_cannot_run():
    model = pm.harness_model(resolve_config("adamw", {"model": GPT2_TINY}))
    with pytest.raises(pm.PlanError, match="galore does not run under train.parallel fsdp"):
        pm.plan(model, pm.OptChoice("galore", rank=4), pm.Setup(micro_batch=1, seq_len=8, parallel="fsdp", world=2))
    with pytest.raises(pm.PlanError, match="optimizer.shard must be false"):
        pm.plan(model, pm.OptChoice("muon", shard=True), pm.Setup(micro_batch=1, seq_len=8, parallel="fsdp", world=2))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "scripts.plan_memory", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow  # the CLI in a subprocess
@pytest.mark.parametrize("args, needle", [
    (["--optimizer", "sgdx"], "unknown optimizer 'sgdx'; choose one of adafactor, adamw, galore, mfsgd, muon"),
    (["--hf-config", "/nonexistent/config.json"], "--hf-config file not found: /nonexistent/config.json"),
    (["--param-dtype", "int7"], "--param-dtype 'int7' is not a dtype; choose one of fp64, fp32, bf16, fp16"),
    (["--state-dtype", "fp8"], "--state-dtype 'fp8' is not a dtype; choose one of"),
    (["--parallel", "zero3"], "unknown --parallel 'zero3'; choose one of ddp, fsdp"),
    (["--preset", "nope"], "unknown preset 'nope'; available presets: nanogpt-paper"),
    (["--config", '{"train": {"stepz": 1}}'], "unknown config key 'train.stepz'"),
    (["--shapes", '{"hidden": ["12by3"]}'], "is not a shape; write \"MxN\""),
    (["--world", "0"], "--world must be >= 1, got 0"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_naming_what_is_accepted(args, needle):
    out = run_cli(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr


@pytest.mark.slow  # the CLI in a subprocess
def test_table_and_json_for_the_llama_fixture():
    args = ["--hf-config", LLAMA, "--micro-batch", "1", "--seq-len", "1024", "--rank", "32"]
    table = run_cli(*args)
    assert table.returncode == 0, table.stderr
    assert "| **total** |" in table.stdout and "## Optimizers side by side" in table.stdout
    for label in ("adamw", "mfsgd r=32", "mfsgd r=32 sketch", "galore r=32", "muon", "adafactor"):
        assert f"| {label} |" in table.stdout
    out = run_cli(*args, "--json")
    data = json.loads(out.stdout)
    rows = {r["optimizer"]: r for r in data["compare"]}
    assert set(rows) == {"adamw", "mfsgd r=32", "mfsgd r=32 sketch", "galore r=32", "muon", "adafactor"}
    # the totals add up as stated: persistent + the larger of the two phases
    for r in rows.values():
        backward = r["grad_peak_bytes"] + r["activation_bytes"] + r["head_bytes"] + r["comm_bytes"]
        step = r["grad_bytes"] + r["step_temp_bytes"]
        assert r["total_bytes"] == (r["param_bytes"] + r["buffer_bytes"] + r["opt_state_bytes_hidden"]
                                    + r["opt_state_bytes_other"] + max(backward, step))
    assert rows["mfsgd r=32 sketch"]["total_bytes"] < rows["mfsgd r=32"]["total_bytes"] < rows["adamw"]["total_bytes"]


@pytest.mark.slow  # the CLI in a subprocess
def test_shapes_input():
    out = run_cli("--shapes", '{"hidden": ["96x32*3", [32, 96]], "embed": ["100x32"], "scalar": [32]}', "--json",
                  "--optimizer", "adamw")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["plan"]
    assert plan["param_count"] == 4 * 96 * 32 + 100 * 32 + 32
    assert plan["opt_state_bytes_hidden"] == 4 * (2 * 96 * 32 * 4 + 4)
    assert plan["activation_bytes"] == 0  # no transformer dims given: not estimated


# ---------------------------------------------------------------------------------------------
# The total against real runs: peak resident memory of the training steps on 1 and 2 CPU ranks


PEAK_RUNS = [
    # (optimizer, ranks, optimizer keys, train.parallel)
    ("adamw", 1, {}, "ddp"),
    ("mfsgd", 2, {"rank": 16, "shard": True}, "ddp"),
    ("mfsgd", 2, {"rank": 16, "memory_mode": "sketch"}, "fsdp"),
]
# A 4-layer GPT-2, 192 wide, with the 50k vocabulary: its tensors are most of the process's memory, and
# its vocabulary-sized transients (50304 x 192 x 4 = 38.6 MB) are above glibc's 32 MiB mmap ceiling, so
# freed ones go back to the OS and the resident peak is steady from step to step. (At 128 wide they are
# 25.8 MB heap blocks that glibc keeps resident: peaks then wander by tens of MB between steps and runs;
# docs/memory-planner.md.)
PEAK_MODEL = {"preset": None, "n_layer": 4, "n_head": 4, "n_embd": 192, "block_size": 256, "vocab_size": 50304}


@pytest.mark.slow
@pytest.mark.parametrize("name, ranks, opt, parallel", PEAK_RUNS, ids=[f"{n}-{r}rank-{p}" for n, r, _, p in PEAK_RUNS])
def test_total_within_ten_percent_of_a_real_runs_peak(tmp_path, name, ranks, opt, parallel):
    data = write_tiny_corpus(tmp_path / "data", train_tokens=60_000)
    data.update(seq_len=128, val_tokens=512)
    overrides = {"model": PEAK_MODEL,
                 "train": {"steps": 4, "batch_size": 8, "micro_batch_size": 8 // ranks, "val_every": 0,
                           "val_batch_size": 4, "parallel": parallel},
                 "data": data, "logging": {"progress": False}, **opt}
    out = launch(["--optimizer", name, "--nproc", str(ranks), "--name", "run", "--config", json.dumps(overrides)],
                 tmp_path / "results")
    assert out.returncode == 0, out.stderr[-2000:]
    records = [r for r in read_metrics(tmp_path / "results" / "run") if "train_loss" in r]
    with open(tmp_path / "results" / "run" / "summary.json") as f:
        measured = json.load(f)["peak_mem_bytes"]
    plan_out = run_cli("--optimizer", name, "--world", str(ranks), "--device", "cpu", "--config", json.dumps(overrides),
                       "--json")
    assert plan_out.returncode == 0, plan_out.stderr
    plan = json.loads(plan_out.stdout)["plan"]
    # exact: what rank 0 logged (a sharded MoFaSGD holds only its own matrices' factors)
    first = records[0]
    assert plan["param_bytes"] == first["param_bytes"]
    assert plan["grad_bytes"] == first["grad_bytes"]
    rank0_state = (plan["opt_state_bytes_hidden_per_rank"] or [plan["opt_state_bytes_hidden"]])[0]
    assert rank0_state == first["opt_state_bytes_hidden"]
    assert plan["opt_state_bytes_other"] == first["opt_state_bytes_other"]
    # the estimate: within 10% of the run's peak (the largest training step's resident peak)
    error = plan["total_bytes"] / measured - 1
    print(f"{name} on {ranks} rank(s), {parallel}: planned {plan['total_bytes']:,} B, measured {measured:,} B, error {error:+.1%}")
    assert abs(error) <= 0.10, (plan["total_bytes"], measured, [r["peak_mem_bytes"] for r in records])
