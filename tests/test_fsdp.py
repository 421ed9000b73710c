"""train.parallel fsdp: the harness's training loop on FSDP2 equals DDP (fp64, 2 gloo ranks, gradient
accumulation; the paper preset's bf16 tables beside fp32 weights, each dtype its own FSDP unit, to
bf16 rounding), its distributed checkpoints resume bit for bit on as many ranks and to rounding on
fewer, and the config refuses what FSDP cannot run."""

import json
import os
import shutil
import tempfile

import pytest
import torch

from helpers import tiny_overrides, train_in_process, write_run_config, write_tiny_corpus

STEPS, WORLD = 4, 2
# (optimizer, its keys) per case; each runs under DDP and FSDP unless it is FSDP-only
CASES = {
    "mfsgd": ("mfsgd", {"rank": 4}),
    "mfsgd-sketch": ("mfsgd", {"rank": 4, "memory_mode": "sketch"}),  # FSDP only: compared with DDP's mfsgd
    "mfsgd-nesterov-eta2": ("mfsgd", {"rank": 4, "nesterov": True, "eta2": 0.2, "init": "zero"}),
    "adamw": ("adamw", {}),
    "muon": ("muon", {"shard": False}),
}
FSDP_ONLY = {"mfsgd-sketch": "mfsgd"}  # case -> the DDP run it must equal


def write_run(root, name, optimizer, keys, parallel, world):
    """A run folder for `world` ranks: 4 steps of 12 sequences (3 micro-batches of 2 per rank on 2
    ranks; a batch that 1, 2 and 3 ranks divide), checkpoints at 2 and 4."""
    data = write_tiny_corpus(os.path.join(root, "corpus"))
    overrides = tiny_overrides(data, steps=STEPS, batch_size=12, micro_batch_size=2)
    overrides["train"].update(parallel=parallel, ckpt_every=2, keep_checkpoints=3)
    overrides["optimizer"] = keys
    return write_run_config(root, name, optimizer, overrides, world, distributed=True)


def run_all(run_dirs, world, resume=False):
    train_in_process(run_dirs, world, resume, dtype=torch.float64)


def final_state(run_dir, step=STEPS):
    """{"model": ..., "optimizer": {name: state}, "metrics": [...]} of a run's checkpoint at `step`,
    from either format; the hidden optimizer's state keyed by parameter name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = os.path.join(run_dir, "checkpoints", f"step_{step:07d}")
    if os.path.isdir(path):
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path, os.path.join(tmp, "whole.pt"))
            whole = torch.load(os.path.join(tmp, "whole.pt"), weights_only=False)
        names = whole["optimizers"]["param_groups"][0]["params"]  # the hidden group, by name
        hidden = {name: whole["optimizers"]["state"].get(name, {}) for name in names}
        model = whole["model"]
    else:
        whole = torch.load(path + ".pt", weights_only=False)
        model = whole["model"]
        from model import create_model

        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
        from configs import RunConfig
        from optimizers import split_parameters

        rc = RunConfig.from_dict(cfg)
        names = [n for n, _ in split_parameters(create_model(rc.model.arch, **rc.model.resolved()))["hidden"]]
        saved = whole["optimizers"][0]
        hidden = {name: saved["state"].get(i, {}) for name, i in zip(names, saved["param_groups"][0]["params"])}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return {"model": model, "hidden": hidden, "metrics": metrics}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fsdp"))
    dirs = {}
    for case, (optimizer, keys) in CASES.items():
        for parallel in ("fsdp",) if case in FSDP_ONLY else ("ddp", "fsdp"):
            dirs[case, parallel] = write_run(root, f"{case}-{parallel}", optimizer, keys, parallel, WORLD)
    run_all(list(dirs.values()), WORLD)
    return root, dirs


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c != "muon"])
def test_fsdp_equals_ddp_to_1e10_in_fp64(runs, case):
    _, dirs = runs
    fsdp = final_state(dirs[case, "fsdp"])
    ddp = final_state(dirs[FSDP_ONLY.get(case, case), "ddp"])
    assert max_difference(fsdp["model"], ddp["model"]) < 1e-10
    for name, state in ddp["hidden"].items():
        for key in ("U", "S", "V", "exp_avg", "exp_avg_sq"):
            if key in state:
                got = fsdp["hidden"][name][key]
                assert (got.double() - state[key].double()).abs().max().item() < 1e-10, (name, key)
    for a, b in zip(fsdp["metrics"], ddp["metrics"], strict=True):
        for key in ("train_loss", "val_loss"):
            assert (a.get(key) is None) == (b.get(key) is None)
            if a.get(key) is not None:
                assert abs(a[key] - b[key]) < 1e-10, (a["step"], key)
    moved = max_difference(fsdp["model"], final_state(dirs[case, "fsdp"], step=2)["model"])
    assert moved > 1e-4  # the last two steps changed the weights
    # each rank holds half of every sharded tensor: parameters, gradients, the rows of U
    first_f, first_d = fsdp["metrics"][1], ddp["metrics"][1]
    assert first_f["param_bytes"] < 0.55 * first_d["param_bytes"]
    assert first_f["opt_state_bytes_hidden"] < first_d["opt_state_bytes_hidden"]
    if case == "mfsgd-sketch":  # the reduced shards were folded into sketches and freed
        assert first_f["grad_bytes"] < 0.5 * final_state(dirs["mfsgd", "fsdp"])["metrics"][1]["grad_bytes"]


@pytest.mark.slow
def test_muon_runs_under_fsdp_equal_to_ddp_up_to_bf16_newton_schulz(runs):
    """torch's Muon orthogonalises in bf16, so the order of DTensor's matmuls shows at bf16 rounding:
    Newton-Schulz's own bf16 error is ~1e-2 of its output (against fp64), and the sharded and the
    whole matrix's results differ by as much; 4 steps at lr 0.05 (x2 for the 4:1 MLP matrices)."""
    _, dirs = runs
    fsdp, ddp = final_state(dirs["muon", "fsdp"]), final_state(dirs["muon", "ddp"])
    assert 0 < max_difference(fsdp["model"], ddp["model"]) < 2e-2
    assert abs(fsdp["metrics"][-1]["val_loss"] - ddp["metrics"][-1]["val_loss"]) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("world", [WORLD, 1, 3])
def test_distributed_checkpoint_resumes_on_any_number_of_ranks(runs, tmp_path, world):
    """The FSDP MoFaSGD run resumed from its step-2 checkpoint: bit for bit on 2 ranks, to fp64
    rounding on 1 and on 3, where most rows split unevenly (DCP reads each rank's rows from the
    shards that hold them)."""
    _, dirs = runs
    source = dirs["mfsgd", "fsdp"]
    copy = str(tmp_path / "copy")
    shutil.copytree(source, copy)
    # the step-4 save as a kill midway leaves it: a staging folder without DCP's metadata or meta.pt
    newest = os.path.join(copy, "checkpoints", f"step_{STEPS:07d}")
    for name in (".metadata", "meta.pt"):
        os.remove(os.path.join(newest, name))
    os.rename(newest, newest + ".tmp")
    with open(os.path.join(copy, "config.json")) as f:
        cfg = json.load(f)
    cfg["launch"].update(nproc=world, world_size=world)
    with open(os.path.join(copy, "config.json"), "w") as f:
        json.dump(cfg, f)
    run_all([copy], world, resume=True)
    resumed, original = final_state(copy), final_state(source)
    tolerance = 0.0 if world == WORLD else 1e-12
    assert max_difference(resumed["model"], original["model"]) <= tolerance
    for name, state in original["hidden"].items():
        for key in ("U", "S", "V"):
            assert (resumed["hidden"][name][key] - state[key]).abs().max().item() <= 100 * tolerance, (name, key)
    assert [m["step"] for m in resumed["metrics"]] == list(range(STEPS + 1))
    assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == [f"step_{2:07d}", f"step_{STEPS:07d}"]  # .tmp gone


@pytest.mark.slow  # the runs fixture trains in spawned processes
@pytest.mark.parametrize("damage, message", [
    ("truncate .metadata", "is unusable: its file .metadata has"),
    ("remove meta.pt", "is unusable: its file meta.pt is missing"),
    ("remove __1_0.distcp", "is unusable: its file __1_0.distcp is missing"),
    ("truncate __0_0.distcp", "is unusable: its file __0_0.distcp has"),
])
def test_damaged_distributed_checkpoint_is_one_line_naming_the_older_one(runs, tmp_path, damage, message):
    """run.py --resume checks the newest DCP folder before launching (every file its manifest lists:
    meta.pt, DCP's metadata, the shards), without loading a tensor."""
    from run import LaunchError, check_newest_checkpoint

    _, dirs = runs
    copy = str(tmp_path / "copy")
    shutil.copytree(dirs["mfsgd", "fsdp"], copy)
    action, name = damage.split()
    target = os.path.join(copy, "checkpoints", f"step_{STEPS:07d}", name)
    if action == "remove":
        os.remove(target)
    else:
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)
    with pytest.raises(LaunchError) as caught:
        check_newest_checkpoint(copy)
    line = str(caught.value)
    assert "\n" not in line and message in line and f"the older checkpoint {copy}/checkpoints/step_{2:07d}" in line
    shutil.rmtree(os.path.join(copy, "checkpoints", f"step_{STEPS:07d}"))  # as the message says
    check_newest_checkpoint(copy)  # the older one is whole


@pytest.mark.parametrize("optimizer,keys,message", [
    ("galore", {}, "optimizer galore does not run under train.parallel fsdp"),
    ("adafactor", {}, "optimizer adafactor does not run under train.parallel fsdp"),
    ("muon", {"shard": True}, "optimizer.shard must be false under train.parallel fsdp"),
    ("mfsgd", {"comm": "sketch"}, "optimizer.comm must be full under train.parallel fsdp"),
])
def test_fsdp_refuses_what_it_cannot_run(optimizer, keys, message):
    from configs import ConfigError, resolve_config

    with pytest.raises(ConfigError, match=message):
        resolve_config(optimizer, {"train": {"parallel": "fsdp"}, "optimizer": keys},
                       launch=dict(nproc=2, world_size=2))


def test_fsdp_allows_memory_mode_sketch_without_comm_sketch():
    from configs import ConfigError, resolve_config

    keys = {"optimizer": {"memory_mode": "sketch"}}
    for parallel in ("fsdp", "ddp"):
        overrides = {"train": {"parallel": parallel, "micro_batch_size": 4}, **keys}
        if parallel == "fsdp":
            assert resolve_config("mfsgd", overrides, launch=dict(nproc=2, world_size=2)).train.parallel == "fsdp"
        else:
            with pytest.raises(ConfigError, match="needs optimizer.comm sketch"):  # DDP still needs it
                resolve_config("mfsgd", overrides, launch=dict(nproc=2, world_size=2))


# The paper preset at tiny size: the speedrun model with bf16 embedding tables (model.bf16, from the
# preset) beside fp32 matrices, head and skip weights, its stream layout, window and grad_scale
PAPER_TINY = {"model": {"preset": "speedrun-tiny", "n_embd": 32, "block_size": 64, "vocab_size": 256,
                        "loss_chunk_tokens": 16},
              "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 1, "val_every": 3, "val_batch_size": 1,
                        "compile": False, "ckpt_every": 0},
              "data": {"val_tokens": 256}, "logging": {"progress": False}}


def write_paper_tiny_run(root, name, optimizer, keys, parallel):
    from configs import deep_merge, resolve_config

    data = write_tiny_corpus(os.path.join(root, "corpus"))
    overrides = deep_merge(PAPER_TINY, {"data": {k: data[k] for k in ("train_files", "val_files", "seq_len")},
                                        "train": {"parallel": parallel}, "optimizer": keys})
    cfg = resolve_config(optimizer, overrides, preset="nanogpt-paper", name=name,
                         launch=dict(nproc=WORLD, world_size=WORLD, distributed=True))
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    return run_dir


@pytest.mark.slow
def test_paper_preset_with_bf16_embeddings_under_fsdp_equals_ddp(tmp_path):
    """The paper preset (model.bf16: bf16 embedding tables, fp32 everything else) failed at FSDP's
    first forward ("FSDP expects uniform original parameter dtype"); each dtype is now its own unit.
    3 steps on 2 ranks (step 1 moves only the head and the tables, step 2 the output projections,
    step 3 everything), MoFaSGD and AdamW: FSDP equals DDP within bf16 rounding of the tables."""
    dirs = {(opt, par): write_paper_tiny_run(str(tmp_path), f"{opt}-{par}", opt, keys, par)
            for opt, keys in (("mfsgd", {"rank": 4}), ("adamw", {})) for par in ("ddp", "fsdp")}
    train_in_process(list(dirs.values()), WORLD)
    for opt in ("mfsgd", "adamw"):
        fsdp, ddp = final_state(dirs[opt, "fsdp"], 3), final_state(dirs[opt, "ddp"], 3)
        assert {k: v.dtype for k, v in fsdp["model"].items()} == {k: v.dtype for k, v in ddp["model"].items()}
        assert fsdp["model"]["embed.weight"].dtype == torch.bfloat16
        for name, weight in ddp["model"].items():
            # relative to the weight's largest entry. The bf16 tables' gradients are reduced in bf16
            # (DDP's all-reduce, FSDP's reduce-scatter: other orders), so a table entry may differ by
            # a few ulps (2^-8 relative; measured 6e-3); the model runs in bf16 (stream, matmuls),
            # so the fp32 weights see that through their gradients (measured 3e-4)
            error = (fsdp["model"][name].double() - weight.double()).abs().max().item()
            tolerance = 2**-6 if weight.dtype == torch.bfloat16 else 2e-3
            assert error <= tolerance * weight.double().abs().max().item(), (opt, name, error)
        for a, b in zip(fsdp["metrics"], ddp["metrics"], strict=True):
            for key in ("train_loss", "val_loss"):
                if key in b:
                    assert abs(a[key] - b[key]) < 1e-3, (opt, a["step"], key)


def test_each_dtype_is_its_own_fsdp_unit():
    """parallel.dtype_units on the paper model (meta device): the bf16 tables leave the root, which
    keeps its fp32 skip weights and head; fp32 blocks and a one-dtype model need no extra unit; a
    module holding two dtypes itself is one line."""
    from model import create_model
    from worker.parallel import dtype_units

    with torch.device("meta"):
        paper = create_model("speedrun", n_layer=12, n_head=6, n_embd=768, vocab_size=50304, block_size=1024,
                             bf16=True)
        plain = create_model("speedrun", n_layer=12, n_head=6, n_embd=768, vocab_size=50304, block_size=1024)
    blocks = paper.transformer_blocks()
    units = dtype_units(paper, set(blocks))
    assert units == [paper.embed, *paper.value_embeds.embed]
    assert all(dtype_units(block, set()) == [] for block in blocks)
    assert dtype_units(plain, set(plain.transformer_blocks())) == []
    mixed = torch.nn.Linear(4, 4)
    mixed.bias.data = mixed.bias.data.bfloat16()
    line = r"^FSDP: Linear holds parameters of 2 dtypes \(torch.bfloat16, torch.float32\): one FSDP unit needs one"
    with pytest.raises(ValueError, match=line):
        dtype_units(torch.nn.Sequential(mixed), set())
