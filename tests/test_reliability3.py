"""Issue 27: a checkpoint is verified before it is used (every kind of damage: one line naming the
file and the older checkpoint), a run's config is fixed once it starts, an FSDP run resumes on
another number of ranks through run.py, and divergence is one path for every optimizer.
The damage and config cases run in-process against one small finished run; a few real launches
cover the command line."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import run
from worker import runlock
from helpers import (ROOT, launch, read_metrics, reseal_checkpoint, tiny_overrides, train_in_process,
                     write_run_config, write_tiny_corpus)

CKPT3, CKPT6 = "step_0000003.pt", "step_0000006.pt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def done(tmp_path_factory, corpus):
    """A finished 6-step AdamW run with checkpoints at steps 3 and 6 (tests change copies of it)."""
    root = tmp_path_factory.mktemp("done")
    overrides = tiny_overrides(corpus, steps=6)
    overrides["train"].update(ckpt_every=3)
    run_dir = write_run_config(root, "done", "adamw", overrides)
    train_in_process([run_dir], 1)
    return run_dir


def stopped_copy(done, tmp_path, name="r"):
    """A copy of the finished run without its summary: a run to resume."""
    dst = tmp_path / name
    shutil.copytree(done, dst)
    os.remove(dst / "summary.json")
    return dst


def files_of(path) -> dict:
    out = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            if runlock.is_lock_file(name):  # a launcher's claim of the folder, not its content
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.join(dirpath, name)] = f.read()
    return out


def resume_error(run_dir, capsys) -> str:
    """run.py --resume's one-line error (exit 2), checked to have changed nothing in the run folder."""
    before = files_of(run_dir)
    code = run.main(["--resume", run_dir.name, "--results-dir", str(run_dir.parent)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert files_of(run_dir) == before
    return lines[0]


def run_parts(run_dir, config: dict | None = None):
    """The model and optimizers of a run folder's config (or of `config`), as the worker builds them."""
    from configs import RunConfig
    from model import create_model
    from optimizers import RunOptimizers

    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = RunConfig.from_dict(config or json.load(f))
    model = create_model(cfg.model.arch, **cfg.model.resolved())
    return cfg, model, RunOptimizers.for_run(model, cfg, "cpu")


def worker_error(run_dir, checkpoint, config: dict | None = None) -> str:
    """The RunFailed the worker's load_checkpoint raises for `checkpoint` of run_dir."""
    from worker.checkpoint import load_checkpoint
    from worker.outcome import RunFailed

    cfg, model, optimizers = run_parts(run_dir, config)
    with pytest.raises(RunFailed) as caught:
        load_checkpoint(str(checkpoint), model, optimizers, 0, config=cfg.to_dict())
    assert "\n" not in str(caught.value)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------
# 1. Verified checkpoints


def zero_bytes(path, start_fraction=0.5, count=4000):
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * start_fraction))
        f.write(b"\0" * count)


def flip_one_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


DAMAGE = {  # what is done to the newest checkpoint (or its manifest) -> what the line says
    "4000 bytes zeroed": (lambda c: zero_bytes(c / CKPT6), "checksum"),
    "one bit flipped": (lambda c: flip_one_byte(c / CKPT6), "checksum"),
    "truncated": (lambda c: os.truncate(c / CKPT6, os.path.getsize(c / CKPT6) - 100), "bytes, its manifest says"),
    "bytes appended": (lambda c: open(c / CKPT6, "ab").write(b"x"), "bytes, its manifest says"),
    "swapped with the older file": (lambda c: shutil.copy(c / CKPT3, c / CKPT6), "its file step_0000006.pt has"),
    "manifest of another step": (lambda c: shutil.copy(c / "step_0000003.manifest.json", c / "step_0000006.manifest.json"),
                                 "is not a manifest of step 6"),
    "no manifest (unfinished)": (lambda c: os.remove(c / "step_0000006.manifest.json"), "its write did not finish"),
    "manifest not JSON": (lambda c: (c / "step_0000006.manifest.json").write_text("{"), "is unreadable"),
}


@pytest.mark.slow  # the `done` fixture trains in a spawned process
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_file_is_refused_by_the_launcher_and_the_worker(done, tmp_path, capsys, damage):
    r = stopped_copy(done, tmp_path)
    ckpts = r / "checkpoints"
    change, needle = DAMAGE[damage]
    change(ckpts)
    line = resume_error(r, capsys)
    assert f"checkpoint {ckpts / CKPT6} is unusable: " in line and needle in line, line
    assert f"the older checkpoint {ckpts / CKPT3} exists: delete {CKPT6} to resume from it" in line
    # the worker checks before it reads a tensor, whoever launched it
    assert needle in worker_error(r, ckpts / CKPT6)
    # as the line says: without the damaged one, the older one resumes
    os.remove(ckpts / CKPT6)
    assert run.main(["--resume", "r", "--results-dir", str(tmp_path), "--dry-run"]) == 0


@pytest.mark.slow
def test_a_damaged_only_checkpoint_says_to_start_again(done, tmp_path, capsys):
    r = stopped_copy(done, tmp_path)
    os.remove(r / "checkpoints" / CKPT3)
    os.remove(r / "checkpoints" / "step_0000003.manifest.json")
    zero_bytes(r / "checkpoints" / CKPT6, 0.9, 100)
    assert "no older checkpoint exists: --overwrite starts the run again" in resume_error(r, capsys)


def test_manifest_checksum_is_of_the_bytes_written(tmp_path):
    """The CRC-32 computed while torch.save writes equals one computed from the file afterwards,
    and a later save removes unfinished checkpoints (no manifest) and the oldest past keep."""
    from worker.checkpoint import file_entry, integrity_problem, list_checkpoints, read_manifest, save_checkpoint
    from optimizers import RunOptimizers

    model = torch.nn.Linear(8, 8)
    opts = RunOptimizers(torch.optim.AdamW(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1),
                         lambda s: 1.0)
    config = {"optimizer": {"lr": 0.1}, "train": {"steps": 9}}
    save_checkpoint(str(tmp_path), 3, model, opts, 1.0, 2, 0, 1, config=config)
    path = str(tmp_path / "checkpoints" / CKPT3)
    manifest, problem = read_manifest(path)
    assert problem is None and manifest["files"] == {CKPT3: file_entry(path)}
    assert manifest["config"] == {"optimizer.lr": 0.1, "train.steps": 9}
    assert integrity_problem(path) is None
    (tmp_path / "checkpoints" / "step_0000004.pt").write_bytes(b"a write cut before its manifest")
    save_checkpoint(str(tmp_path), 5, model, opts, 1.0, 1, 0, 1, config=config)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step_0000005.pt"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000005.manifest.json", "step_0000005.pt"]


# ---------------------------------------------------------------------------------------------
# 2. A run's config is fixed once it starts


def set_key(config: dict, dotted: str, value) -> None:
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value


CHANGES = {  # a config.json edit -> the change the refusal lists
    "optimizer.lr": (0.5, "optimizer.lr 0.002 -> 0.5"),
    "optimizer.weight_decay": (0.5, "optimizer.weight_decay"),
    "train.steps": (12, "train.steps 6 -> 12"),
    "train.batch_size": (16, "train.batch_size 8 -> 16"),
    "train.seed": (7, "train.seed 1337 -> 7"),
    "model.n_layer": (3, "model.n_layer 2 -> 3"),
    "data.seq_len": (16, "data.seq_len 32 -> 16"),
    "adam.embed_lr": (0.1, "adam.embed_lr"),
}


@pytest.mark.slow
@pytest.mark.parametrize("key", CHANGES)
def test_an_edited_config_json_is_refused_with_the_changed_keys(done, tmp_path, capsys, key):
    r = stopped_copy(done, tmp_path)
    config = json.loads((r / "config.json").read_text())
    value, change = CHANGES[key]
    set_key(config, key, value)
    (r / "config.json").write_text(json.dumps(config))
    line = resume_error(r, capsys)
    assert f"config.json is not the config {r / 'checkpoints' / CKPT6} was made with: " in line and change in line
    assert "a run's config is fixed once it starts" in line
    assert change in worker_error(r, r / "checkpoints" / CKPT6)


@pytest.mark.slow
def test_another_optimizer_in_config_json_is_refused_not_a_key_error(done, tmp_path, capsys):
    """The optimizer's name and keys replaced by MoFaSGD's: one line listing them, before any worker
    starts; and a worker given that config with a manifest made to agree still refuses the AdamW
    state in one line (the file's own config hash), not a KeyError in the first step."""
    from configs import resolve_config

    r = stopped_copy(done, tmp_path)
    config = json.loads((r / "config.json").read_text())
    mfsgd = resolve_config("mfsgd", {k: v for k, v in config.items() if k not in ("name", "optimizer_name",
                                                                               "optimizer", "launch")},
                           name="r").to_dict()
    (r / "config.json").write_text(json.dumps(mfsgd))
    line = resume_error(r, capsys)
    assert 'optimizer_name "adamw" -> "mfsgd"' in line and "optimizer.rank <absent> -> " in line
    # a manifest that claims the MoFaSGD config, over AdamW's state
    from worker.checkpoint import make_manifest, manifest_path, read_manifest

    newest = str(r / "checkpoints" / CKPT6)
    manifest, _ = read_manifest(newest)
    with open(manifest_path(newest), "w") as f:
        json.dump(make_manifest(6, mfsgd, manifest["files"], 1), f)
    error = worker_error(r, newest, mfsgd)
    assert "it was made with another config than config.json (the config hash it holds differs" in error


@pytest.mark.slow
def test_what_does_not_change_the_numbers_may_change(done, tmp_path):
    """Logging, checkpoint cadence, testing aids and the collective timeout are not part of the fixed
    config: a resume accepts them changed (and a run name, for a copied folder)."""
    r = stopped_copy(done, tmp_path)
    config = json.loads((r / "config.json").read_text())
    config["logging"]["progress"] = not config["logging"]["progress"]
    config["train"].update(ckpt_every=1, keep_checkpoints=5, debug_crash_at_step=5, collective_timeout_s=30.0)
    config["name"] = "renamed"
    (r / "config.json").write_text(json.dumps(config))
    assert run.main(["--resume", "r", "--results-dir", str(tmp_path), "--dry-run"]) == 0


def test_config_changes_and_hash_cover_every_entry():
    from configs import config_changes, config_hash, resolve_config

    a = resolve_config("mfsgd", {"rank": 8}, name="a").to_dict()
    b = json.loads(json.dumps(a))
    assert config_hash(a) == config_hash(b) and config_changes(a, b) == []
    b["optimizer"]["rank"] = 16
    b["model"]["n_embd"] = 64
    b["name"], b["logging"]["progress"], b["launch"]["world_size"] = "b", False, 4  # neutral
    assert config_changes(a, b) == ["model.n_embd null -> 64", "optimizer.rank 8 -> 16"]
    assert config_hash(a) != config_hash(b)
    b["optimizer"]["rank"], b["model"]["n_embd"] = 8, None
    assert config_hash(a) == config_hash(b)
    a["optimizer"]["lr"], b["optimizer"]["lr"] = 1.0, 1  # the same number as another type: a change
    assert config_changes(a, b) == ["optimizer.lr 1.0 -> 1"]


# ---------------------------------------------------------------------------------------------
# 4. FSDP resume on another number of ranks, through run.py


@pytest.fixture(scope="module")
def fsdp_crashed(tmp_path_factory, corpus):
    """A 2-rank FSDP MoFaSGD run through run.py that crashed after step 3, with a checkpoint at 2."""
    results = tmp_path_factory.mktemp("fsdp")
    cfg = tiny_overrides(corpus, steps=4, batch_size=12, micro_batch_size=2, rank=4)
    cfg["train"].update(parallel="fsdp", ckpt_every=2, debug_crash_at_step=3)
    r = launch(["--optimizer", "mfsgd", "--name", "f", "--nproc", "2", "--config", json.dumps(cfg)], results)
    assert r.returncode != 0 and os.path.isdir(results / "f" / "checkpoints" / "step_0000002"), r.stderr
    return results / "f"


def without_crash(fsdp_crashed, tmp_path, name):
    """A copy whose config.json drops the testing aid (not part of the fixed config)."""
    copy = tmp_path / name
    shutil.copytree(fsdp_crashed, copy)
    config = json.loads((copy / "config.json").read_text())
    config["train"]["debug_crash_at_step"] = 0
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])
def test_fsdp_run_resumes_on_another_number_of_ranks_through_run_py(fsdp_crashed, tmp_path, world):
    copy = without_crash(fsdp_crashed, tmp_path, f"w{world}")
    dry = launch(["--resume", copy.name, "--nproc", str(world), "--dry-run"], tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert f"# resumes {copy.name} from its checkpoint of step 2 on {world} workers (it ran on 2: the distributed " \
           "checkpoint is resharded)" in dry.stdout
    assert json.loads((copy / "config.json").read_text())["launch"]["world_size"] == 2  # the dry run wrote nothing
    r = launch(["--resume", copy.name, "--nproc", str(world)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert [m["step"] for m in read_metrics(copy)] == [0, 1, 2, 3, 4]
    assert json.loads((copy / "summary.json").read_text())["status"] == "finished"
    assert json.loads((copy / "config.json").read_text())["launch"]["world_size"] == world
    launches = [json.loads(line) for line in (copy / "launches.jsonl").read_text().splitlines()]
    assert [(x["resumed_at_step"], x["launch"]["world_size"]) for x in launches] == [(None, 2), (2, world)]


@pytest.mark.slow
def test_a_ddp_run_still_resumes_only_on_its_world_size(done, tmp_path, capsys):
    r = stopped_copy(done, tmp_path)
    line = resume_error_args(r, capsys, ["--nproc", "2"])
    assert "ran on 1 workers" in line and "--nproc 1" in line


def resume_error_args(run_dir, capsys, extra):
    code = run.main(["--resume", run_dir.name, "--results-dir", str(run_dir.parent), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    return err


DCP_DAMAGE = {  # what is done to the newest DCP folder -> what the line says
    "5000 bytes zeroed in a shard": (lambda c: zero_bytes(c / "__0_0.distcp", 0.3, 5000), "__0_0.distcp has checksum"),
    "a shard swapped with the other rank's": (lambda c: shutil.copy(c / "__1_0.distcp", c / "__0_0.distcp"),
                                              "its file __0_0.distcp has"),
    "garbage shard of the same size": (lambda c: (c / "__1_0.distcp").write_bytes(os.urandom(
        os.path.getsize(c / "__1_0.distcp"))), "__1_0.distcp has checksum"),
    "meta.pt changed": (lambda c: flip_one_byte(c / "meta.pt"), "meta.pt has checksum"),
    "no manifest": (lambda c: os.remove(c / "manifest.json"), "its write did not finish"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DCP_DAMAGE)
def test_damaged_distributed_checkpoint_is_one_line(fsdp_crashed, tmp_path, capsys, damage):
    copy = without_crash(fsdp_crashed, tmp_path, "d")
    newest = copy / "checkpoints" / "step_0000002"
    change, needle = DCP_DAMAGE[damage]
    change(newest)
    line = resume_error_args(copy, capsys, ["--nproc", "2"])
    assert f"error: checkpoint {newest} is unusable: " in line and needle in line, line
    assert "no older checkpoint exists" in line


@pytest.mark.slow
def test_the_workers_verify_a_distributed_checkpoint_between_them(fsdp_crashed, tmp_path):
    """Started without run.py, the 2 ranks split the folder's files, and both stop with the damage
    rank 1 found (rank 0 never reads the damaged shard)."""
    from worker.checkpoint import integrity_problem

    copy = without_crash(fsdp_crashed, tmp_path, "w")
    newest = copy / "checkpoints" / "step_0000002"
    names = sorted(os.listdir(newest))
    damaged = names[1]  # checked by rank 1 of 2
    flip_one_byte(newest / damaged)
    assert integrity_problem(str(newest), (0, 2)) is None and damaged in integrity_problem(str(newest), (1, 2))
    with pytest.raises(Exception) as caught:
        train_in_process([str(copy)], 2, resume=True, seconds_per_run=60)
    assert f"its file {damaged} has" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# 6. Divergence: one path for every optimizer


def test_non_finite_gradients_are_found_in_one_pass():
    from train_gpt import non_finite_gradients

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 0))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert non_finite_gradients(model).item() == 0.0  # the empty 3x0 gradient is skipped
    for bad in (float("nan"), float("inf"), -float("inf")):
        model[0].bias.grad[1] = bad
        assert non_finite_gradients(model).item() == 1.0
        model[0].bias.grad[1] = 1.0
    half = torch.nn.Linear(3, 3).bfloat16()  # bf16 parameters beside fp32 ones (the paper preset's embeddings)
    half.weight.grad = torch.ones_like(half.weight)
    mixed = torch.nn.ModuleList([model, half])
    assert non_finite_gradients(mixed).item() == 0.0
    half.weight.grad[0, 0] = float("nan")
    assert non_finite_gradients(mixed).item() == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,keys", [
    ("mfsgd", {"lr": 1e30, "rank": 4}),
    ("mfsgd", {"lr": 1e30, "rank": 4, "memory_mode": "sketch"}),
    ("muon", {"lr": 1e30}),
    ("adafactor", {"lr": 1e30}),
], ids=["mfsgd", "mfsgd-sketch", "muon", "adafactor"])
def test_every_optimizer_diverging_ends_through_the_nan_guard(corpus, tmp_path, optimizer, keys):
    cfg = tiny_overrides(corpus, steps=6, **keys)
    cfg["adam"] = {"embed_lr": 1e30, "scalar_lr": 1e30}
    r = launch(["--optimizer", optimizer, "--name", "x", "--config", json.dumps(cfg)], tmp_path)
    assert r.returncode == 3, r.stderr
    summary = json.loads((tmp_path / "x" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["reason"].startswith("non-finite"), summary
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite") and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_a_finished_run_whose_config_json_was_edited_is_left_out(done, tmp_path, capsys):
    """summary.json records the config's hash: reports leave a run out whose config.json was edited
    afterwards (its groups and labels would claim values it never ran with), and a sweep does not
    reuse it."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import results
    import sweep

    r = tmp_path / "r"
    shutil.copytree(done, r)
    assert results.load_run(str(r)).status == "finished"
    config = json.loads((r / "config.json").read_text())
    config["optimizer"]["lr"] = 0.5
    (r / "config.json").write_text(json.dumps(config))
    assert results.load_run(str(r)).status == "edited"
    assert "config.json was edited after the run finished" in capsys.readouterr().err
    assert sweep.config_drift(str(r), config) == [
        "config.json was edited after the run finished (it no longer hashes to summary.json's config_hash)"]


def test_checkpoint_benchmark_prints_its_table(tmp_path, capsys):
    from scripts import bench_checkpoint

    assert bench_checkpoint.main(["--model", "cpu-tiny", "--repeats", "1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("| write, plain torch.save |", "| write with manifest (CRC-32) |", "| verify (read + CRC-32) |",
                "| CRC-32 of the bytes alone |"):
        assert row in out
    assert os.listdir(tmp_path) == []  # its checkpoints are gone


def test_a_failed_distributed_load_is_one_line_with_its_cause():
    """DCP raises a CheckpointException whose text is every rank's flattened traceback: the line
    keeps the first failing rank's exception, and says what a missing entry means."""
    from torch.distributed.checkpoint.api import CheckpointException

    from worker.checkpoint import dcp_failure_cause

    error = CheckpointException("load failed", {1: (KeyError("optimizers.state.x.U"), None),
                                                0: (RuntimeError("size mismatch\nfor U: [4, 2] vs [4, 3]"), None)})
    assert dcp_failure_cause(error) == "rank 0: RuntimeError: size mismatch"
    error = CheckpointException("load failed", {1: (KeyError("optimizers.state.x.U"), None)})
    assert dcp_failure_cause(error) == ("rank 1: KeyError: no entry 'optimizers.state.x.U' in the checkpoint (another "
                                        "optimizer or model wrote it)")
    assert dcp_failure_cause(ValueError("bad\nmore")) == "ValueError: bad"
