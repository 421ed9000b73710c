"""scripts/plan_memory.py answers only what it knows: architectures it does not model are refused
naming their keys, every number is checked (positive, finite, bounded so a plan takes seconds),
every file it reads fails in one line, and a run's own resolved config.json is a valid input.
The CLI runs in-process (pm.main), so these stay fast; tests/test_plan_memory.py checks the numbers."""

import json
import os
import time

import pytest

from helpers import ROOT, write_run_config
from scripts import plan_memory as pm

LLAMA = os.path.join(ROOT, "configs", "hf", "llama-3.1-8b.json")
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "torch_dtype": "float32"}


def plan_cli(capsys, *args):
    """(exit code, stdout, stderr lines) of the planner's command line, in this process."""
    code = pm.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def refused(capsys, *args) -> str:
    start = time.perf_counter()
    code, out, err = plan_cli(capsys, *args)
    assert code == 2 and not out, (code, out, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert time.perf_counter() - start < 10  # bounds make even absurd sizes fail fast
    return err[0]


def hf_file(tmp_path, name="config.json", **keys):
    path = tmp_path / name
    path.write_text(json.dumps({**TINY_LLAMA, **keys}))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Architectures the planner does not model


@pytest.mark.parametrize("keys, needles", [
    ({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2},
     ["num_local_experts, num_experts_per_tok (mixture-of-experts layers)"]),
    ({"model_type": "qwen2_moe", "num_experts": 60, "moe_intermediate_size": 1408,
      "shared_expert_intermediate_size": 5632, "mlp_only_layers": []},
     ["num_experts, moe_intermediate_size, shared_expert_intermediate_size (mixture-of-experts"]),
    ({"model_type": "deepseek_v2", "kv_lora_rank": 512, "q_lora_rank": 1536, "n_routed_experts": 160},
     ["n_routed_experts (mixture-of-experts layers)", "q_lora_rank, kv_lora_rank (low-rank (latent) attention"]),
    ({"model_type": "mllama", "cross_attention_layers": [3, 8]}, ["cross_attention_layers (cross-attention"]),
    ({"model_type": "llava", "text_config": {"hidden_size": 64}, "vision_config": {"hidden_size": 32}}, ["text_config, vision_config"]),
    ({"model_type": "gemma2", "final_logit_softcapping": 30.0}, ["final_logit_softcapping (extra norms or soft-capped"]),
    ({"model_type": "gpt_neox", "use_parallel_residual": True}, ["use_parallel_residual (a parallel attention-MLP"]),
    ({"model_type": "t5", "is_encoder_decoder": True}, ["is_encoder_decoder"]),
    ({"model_type": "gemma"}, ["model_type \"gemma\" is not modelled", "llama, mistral, qwen2"]),
], ids=["mixtral", "qwen2-moe", "deepseek-v2", "mllama", "llava", "gemma2", "neox", "t5", "gemma"])
def test_unmodelled_architectures_are_refused_naming_their_keys(tmp_path, capsys, keys, needles):
    line = refused(capsys, "--hf-config", hf_file(tmp_path, **keys))
    for needle in needles:
        assert needle in line, line
    assert "describe other models with --shapes" in line


def test_harmless_keys_and_falsy_values_are_planned(tmp_path, capsys):
    """HF configs carry many keys that change nothing planned; dense configs that spell an MoE or
    encoder key as null, false or 0 are dense."""
    extra = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "rope_scaling": {"rope_type": "llama3"},
             "sliding_window": None, "use_cache": True, "is_encoder_decoder": False, "add_cross_attention": False,
             "num_experts": 0, "mlp_only_layers": [], "text_config": None}
    code, out, err = plan_cli(capsys, "--hf-config", hf_file(tmp_path, **extra), "--json")
    assert code == 0, err
    assert json.loads(out)["plan"]["hidden_matrices"] == 14


@pytest.mark.parametrize("model_type, keys", [
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", {}),
    ("mistral", {"attention_bias": True}),  # Mistral's layers have no biases whatever the key says
])
def test_hf_parameter_lists_equal_transformers_models(tmp_path, model_type, keys):
    transformers = pytest.importorskip("transformers")
    import torch

    path = hf_file(tmp_path, model_type=model_type, **keys)
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(config)
    model, _ = pm.hf_model(path)
    assert {p.name: p.shape for p in model.params} == {n: tuple(p.shape) for n, p in reference.named_parameters()}


# ---------------------------------------------------------------------------------------------
# Numbers: types, signs, bounds


@pytest.mark.parametrize("keys, needle", [
    ({"num_key_value_heads": -8}, "num_key_value_heads must be >= 1, got -8"),
    ({"head_dim": -64}, "head_dim must be >= 1, got -64"),
    ({"num_attention_heads": "32"}, "num_attention_heads must be an integer in [1, 65,536], got \"32\""),
    ({"num_key_value_heads": "8"}, "num_key_value_heads must be an integer"),
    ({"hidden_size": 64.0}, "hidden_size must be an integer"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be an integer"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers must be <= 10,000 (the planner's bound), got 1,000,000,000"),
    ({"vocab_size": 2**40}, "vocab_size must be <= 16,777,216"),
    ({"num_attention_heads": 128}, "num_attention_heads (128) exceeds hidden_size (64); give head_dim"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads (3)"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got \"false\""),
    ({"torch_dtype": 16}, "torch_dtype must be a dtype name, got 16"),
    ({"torch_dtype": "int8"}, "the config's torch_dtype 'int8' is not a dtype"),
], ids=["neg-kv", "neg-head-dim", "str-heads", "str-kv", "float-width", "bool-layers", "huge-layers", "huge-vocab",
        "heads-over-width", "kv-divides", "str-bool", "int-dtype", "int8"])
def test_hf_numbers_are_checked(tmp_path, capsys, keys, needle):
    line = refused(capsys, "--hf-config", hf_file(tmp_path, **keys))
    assert needle in line, line


def test_hf_required_keys(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({k: v for k, v in TINY_LLAMA.items() if k != "vocab_size"}))
    assert "lacks vocab_size" in refused(capsys, "--hf-config", str(path))


@pytest.mark.parametrize("shapes, needle", [
    ('{"hidden": ["768x768*1000000000"]}', "COUNT must be <= 100,000"),
    ('{"hidden": ["768x768*60000", "10x10*60000"]}', "more than 100,000 parameter tensors"),
    ('{"hidden": [[true, 5]]}', "is not a shape"),
    ('{"hidden": ["99999999x4"]}', "M must be <= 16,777,216"),
    ('{"hidden": [[4, -4]]}', "has a zero or negative size"),
    ('{"scalar": [-3]}', "a scalar entry (an element count) must be >= 1, got -3"),
    ('{"scalar": ["3"]}', "a scalar entry (an element count) must be an integer"),
    ('{"hidden": ["4x4"], "name": 7}', "name must be a non-empty string"),
    ('{"hidden": ["4x4"], "dtype": ["bf16"]}', "dtype must be a dtype name"),
    ('{"hidden": ["4x4"], "transformer": {"n_layer": "2", "d_model": 4, "n_head": 1, "d_ff": 8, "vocab_size": 9}}',
     "transformer.n_layer must be an integer"),
    ('{"hidden": ["4x4"], "transformer": {"n_layer": 2, "d_model": 4, "n_head": 2, "d_ff": 8, "vocab_size": 9, '
     '"n_kv_head": 3}}', "must be a multiple of n_kv_head (3)"),
    ('{"hidden": ["4x4"], "transformer": {"n_layer": 2, "d_model": 4, "n_head": 8, "d_ff": 8, "vocab_size": 9}}',
     "n_head (8) exceeds d_model (4)"),
    ('{"hidden": ["4x4"], "transformer": {"n_layer": 2, "d_model": 4, "n_head": 1, "d_ff": 8, "vocab_size": 9, '
     '"experts": 8}}', "transformer has unknown keys experts"),
    ("[" * 100_000, "is not valid JSON: nested too deeply"),
], ids=["huge-count", "too-many", "bool-dim", "huge-dim", "negative", "negative-scalar", "str-scalar", "name",
        "dtype-type", "str-layers", "kv", "heads", "unknown-key", "deep"])
def test_shapes_numbers_are_checked(capsys, shapes, needle):
    line = refused(capsys, "--shapes", shapes)
    assert needle in line, line


@pytest.mark.parametrize("args, needle", [
    (["--runtime-mib", "1e400"], "--runtime-mib must be auto or a number of MiB in [0, 1,073,741,824], got '1e400'"),
    (["--runtime-mib", "-5"], "got '-5'"),
    (["--runtime-mib", "nan"], "got 'nan'"),
    (["--runtime-mib", "lots"], "got 'lots'"),
    (["--world", "1000000000"], "--world must be <= 65,536"),
    (["--micro-batch", "-1"], "--micro-batch must be >= 1, got -1"),
    (["--seq-len", str(2**40)], "--seq-len must be <= 16,777,216"),
    (["--rank", str(2**40)], "--rank must be <= 16,777,216"),
    (["--loss-chunk-tokens", "-1"], "--loss-chunk-tokens must be >= 0 (0: off), got -1"),
    (["--config", '{"model": {"n_layer": 1000000000}}'], "model.n_layer must be <= 1,024"),
    (["--config", '{"train": {"micro_batch_size": 1073741824, "batch_size": 1073741824}}'],
     "train.micro_batch_size must be <= 1,048,576"),
    (["--config", '{"model": {"n_layer": "12"}}'], "model.n_layer must be an integer"),  # the harness's own words
    (["--config", "[" * 100_000], "is not valid JSON: nested too deeply"),
], ids=["inf", "negative", "nan", "word", "world", "micro", "seq", "rank", "chunk", "layers", "batch", "str-layers",
        "deep"])
def test_command_line_numbers_are_checked(capsys, args, needle):
    shapes = [] if args[0] == "--config" else ["--shapes", '{"hidden": ["8x8"]}']
    line = refused(capsys, "--device", "cpu", *shapes, *args)
    assert needle in line, line


def test_a_bounded_worst_case_plans_in_seconds(tmp_path, capsys):
    """The largest model and world the bounds allow (10,000 layers, 65,536 ranks with sharded state)
    still plan in seconds: owners are assigned by a heap, per-rank sums in one pass."""
    path = hf_file(tmp_path, hidden_size=16384, intermediate_size=53248, num_hidden_layers=10_000,
                   num_attention_heads=128, num_key_value_heads=8, vocab_size=128256)
    start = time.perf_counter()
    code, out, err = plan_cli(capsys, "--hf-config", path, "--world", "65536", "--config", '{"shard": true}')
    assert code == 0, err
    assert time.perf_counter() - start < 20
    assert "max over 65,536 ranks" in out
    start = time.perf_counter()  # a harness model is built (on the meta device): its own bound
    code, out, err = plan_cli(capsys, "--optimizer", "adamw", "--config", json.dumps(
        {"model": {"preset": None, "n_layer": 1024, "n_head": 1, "n_embd": 64, "block_size": 64}, "data": {"seq_len": 64}}))
    assert code == 0, err
    assert time.perf_counter() - start < 20


# ---------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("option", ["--hf-config", "--shapes", "--config"])
@pytest.mark.parametrize("content, needle", [
    (b'\xff\xfe{"a": 1}', "is not UTF-8 text (byte 0xff at offset 0)"),
    (b"[" * 100_000, "is not valid JSON: nested too deeply"),
    (b'{"a": ', "is not valid JSON"),
], ids=["not-utf8", "deep", "cut-short"])
def test_every_file_the_planner_reads_fails_in_one_line(tmp_path, capsys, option, content, needle):
    path = tmp_path / "in.json"
    path.write_bytes(content)
    value = str(path) if option == "--hf-config" else "@" + str(path)
    assert needle in refused(capsys, option, value)


@pytest.mark.parametrize("option", ["--hf-config", "--shapes", "--config"])
def test_missing_files_and_folders(tmp_path, capsys, option):
    for target in (tmp_path / "nope.json", tmp_path):
        value = str(target) if option == "--hf-config" else "@" + str(target)
        assert "not found" in refused(capsys, option, value)


# ---------------------------------------------------------------------------------------------
# A run's own config.json


def test_a_runs_resolved_config_json_plans_that_run(tmp_path, capsys):
    overrides = {"model": {"preset": "cpu-tiny", "vocab_size": 256}, "rank": 8, "data": {"seq_len": 32},
                 "train": {"batch_size": 8, "micro_batch_size": 4}}
    run_dir = write_run_config(tmp_path, "r", "mfsgd", overrides, world=2)
    with open(os.path.join(run_dir, "config.json")) as f:
        assert {"name", "optimizer_name", "launch"} <= set(json.load(f))  # the file as run.py writes it
    code, out, err = plan_cli(capsys, "--config", "@" + os.path.join(run_dir, "config.json"), "--runtime-mib", "100",
                              "--json")
    assert code == 0, err
    from_run = json.loads(out)
    assert from_run["plan"]["optimizer"] == "mfsgd r=8"  # its optimizer, rank, world and device
    assert from_run["setup"]["world"] == 2 and from_run["setup"]["device"] == "cpu"
    code, out, err = plan_cli(capsys, "--config", json.dumps(overrides), "--optimizer", "mfsgd", "--world", "2",
                              "--device", "cpu", "--distributed", "--runtime-mib", "100", "--json")
    assert code == 0, err
    assert json.loads(out) == from_run  # the same plan as the overrides it was made from
    # explicit options still apply, and what contradicts the run is refused
    code, out, err = plan_cli(capsys, "--config", "@" + os.path.join(run_dir, "config.json"), "--world", "1",
                              "--device", "cuda", "--json")
    assert code == 0, err
    assert json.loads(out)["setup"]["world"] == 1
    line = refused(capsys, "--config", "@" + os.path.join(run_dir, "config.json"), "--optimizer", "adamw")
    assert "--optimizer adamw contradicts the run config's optimizer_name 'mfsgd'" in line
    line = refused(capsys, "--config", "@" + os.path.join(run_dir, "config.json"), "--preset", "nanogpt-paper")
    assert "the run config is complete; drop --preset" in line


def test_a_committed_runs_config_json_plans(capsys):
    """An older run's config.json, as committed under results/cpu-ranks (the issue's example)."""
    run_dir = os.path.join(ROOT, "results", "cpu-ranks", "adamw-lr0.00025-seed0")
    code, out, err = plan_cli(capsys, "--config", "@" + os.path.join(run_dir, "config.json"), "--runtime-mib", "100")
    assert code == 0, err
    assert "- optimizer: adamw" in out and "device cpu" in out
