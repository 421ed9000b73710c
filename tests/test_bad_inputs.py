"""The wall of bad inputs: each gives exit code 2, one line on stderr naming the problem (and what is
accepted), no traceback, and leaves an existing run folder untouched.

Most cases call run.main() in-process (fast); a few go through a real subprocess to prove the CLI
behaves the same.
"""

import hashlib
import json
import os

import numpy as np
import pytest

import run
from data.shards import write_shard
from helpers import launch, tiny_overrides, write_tiny_corpus


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("wall")
    corpus = write_tiny_corpus(str(root / "corpus"))
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty_000000.bin").write_bytes(b"")
    write_shard(str(bad / "trunc_000000.bin"), np.arange(1000) % 256)
    data = (bad / "trunc_000000.bin").read_bytes()
    (bad / "trunc_000000.bin").write_bytes(data[:-100])
    write_shard(str(bad / "magic_000000.bin"), np.arange(1000) % 256)
    data = bytearray((bad / "magic_000000.bin").read_bytes())
    data[0:4] = (12345).to_bytes(4, "little")
    (bad / "magic_000000.bin").write_bytes(bytes(data))
    write_shard(str(bad / "bigid_000000.bin"), np.full(5000, 300))
    write_shard(str(bad / "tinyval_000000.bin"), np.arange(100) % 256)
    for i in range(4):  # 4 x 20 tokens: more than one 33-token window in all, none in any one shard
        write_shard(str(bad / f"shorttrain_{i:06d}.bin"), np.arange(20))
    for i in range(45):  # 45 x 50 tokens >= 2048 + 1, but one 33-token window each: 45 < 64 windows
        write_shard(str(bad / f"shortval_{i:06d}.bin"), np.arange(50))
    (root / "notadir").write_text("a file")
    (bad / "latin1.json").write_bytes('{"lr": 0.1, "note": "caf\u00e9"}'.encode("latin-1"))
    (bad / "bigint.json").write_text('{"lr": ' + "9" * 5000 + "}")
    (bad / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (bad / "nan.json").write_text('{"lr": NaN}')
    (bad / "huge.json").write_bytes(b" " * (17 * 2**20) + b"{}")
    results = root / "results"
    # an existing finished run that no bad input may touch
    ok = launch(["--optimizer", "adamw", "--name", "existing", "--config", json.dumps(tiny_overrides(corpus, steps=2))],
                results)
    assert ok.returncode == 0, ok.stderr
    return dict(root=root, corpus=corpus, bad=bad, results=results)


def tree_digest(path) -> str:
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(dirpath, name)
            h.update(full.encode())
            h.update(open(full, "rb").read())
    return h.hexdigest()


def tiny(env, **changes):
    cfg = tiny_overrides(env["corpus"])
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section] = dict(cfg[section], **{field: value})
        else:
            cfg[section] = value
    return json.dumps(cfg)


def shard_data(env, train=None, val=None):
    data = dict(env["corpus"])
    if train:
        data["train_files"] = str(env["bad"] / train)
    if val:
        data["val_files"] = str(env["bad"] / val)
    return data


# (name, argv builder, text that must appear in the one-line message)
CASES = [
    ("bad JSON", lambda e: ["--optimizer", "mfsgd", "--config", '{"lr": 0.1,'], "--config is not valid JSON"),
    ("JSON not an object", lambda e: ["--optimizer", "mfsgd", "--config", "[1, 2]"], "must be a JSON object"),
    ("missing config file", lambda e: ["--optimizer", "mfsgd", "--config", "@/nonexistent/cfg.json"], "--config file not found"),
    ("unknown top-level key", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, lrate=0.1)], "unknown config key 'optimizer.lrate'; valid keys: lr"),
    ("unknown nested key", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, train__stepz=3)], "unknown config key 'train.stepz' (did you mean train.steps?); valid keys: steps"),
    ("section not a mapping", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, train=3)], "train must be a mapping"),
    ("wrong type int", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, train__steps="many")], "train.steps must be an integer"),
    ("wrong type bool", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, nesterov=1)], "optimizer.nesterov must be true or false"),
    ("wrong type list", lambda e: ["--optimizer", "adamw", "--config", tiny(e, betas=0.9)], "optimizer.betas must be a list"),
    ("negative rank", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, rank=-4)], "optimizer.rank must be >= 1, got -4"),
    ("zero rank", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, rank=0)], "optimizer.rank must be >= 1, got 0"),
    ("too-large rank", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, rank=100000)], "exceeds every side of every hidden matrix"),
    ("zero lr", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, lr=0)], "optimizer.lr must be > 0, got 0"),
    ("negative lr", lambda e: ["--optimizer", "adamw", "--config", tiny(e, lr=-0.1)], "optimizer.lr must be > 0"),
    ("beta = 1", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, beta=1.0)], "optimizer.beta must be in [0, 1)"),
    ("negative beta_start", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, beta_start=-0.1)], "optimizer.beta_start must be in [0, 1)"),
    ("unknown optimizer", lambda e: ["--optimizer", "sgdx", "--config", tiny(e)], "unknown optimizer 'sgdx'; choose one of"),
    ("unknown preset", lambda e: ["--optimizer", "mfsgd", "--preset", "nanogpt-nope", "--config", tiny(e)], "unknown preset 'nanogpt-nope'"),
    ("unknown model preset", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, model={"preset": "gpt9"})], "model.preset 'gpt9' is unknown; choose one of"),
    ("no shards", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, data=shard_data(e, train="none_*.bin"))], "no shards match"),
    ("empty shard", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, data=shard_data(e, train="empty_*.bin"))], "empty_000000.bin"),
    ("truncated shard", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, data=shard_data(e, train="trunc_*.bin"))], "trunc_000000.bin"),
    ("wrong magic", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, data=shard_data(e, train="magic_*.bin"))], "magic"),
    ("token id >= vocab", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, data=shard_data(e, train="bigid_*.bin"))], "holds token id 300, not below model.vocab_size=256"),
    ("val split too small", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, data=shard_data(e, val="tinyval_*.bin"))], "fewer than data.val_tokens=2048"),
    ("train windows split over shards", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, data=shard_data(e, train="shorttrain_*.bin"))], "no training window fits: the longest shard holds 20 tokens"),
    ("val windows split over shards", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, data=shard_data(e, val="shortval_*.bin"))], "only 45 whole windows of seq_len+1=33 tokens, fewer than the 64"),
    ("val tokens below one sequence", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, data__val_tokens=8)], "data.val_tokens (8) must be at least data.seq_len (32)"),
    ("seq_len > context", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, data__seq_len=128)], "data.seq_len (128) exceeds the model's context model.block_size (64)"),
    ("batch not divisible by ranks", lambda e: ["--optimizer", "mfsgd", "--nproc", "3", "--config", tiny(e)], "must be a multiple of world size x train.micro_batch_size"),
    ("train.device unlike the launch", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, train__device="cuda")], "train.device is 'cuda' but the workers run on cpu: launch with --num-gpus N"),
    ("batch not divisible by micro batch", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, train__micro_batch_size=3)], "must be a multiple of train.micro_batch_size"),
    ("--num-gpus without GPUs", lambda e: ["--optimizer", "mfsgd", "--num-gpus", "1", "--config", tiny(e)], "this machine has none; use --nproc"),
    ("zero --nproc", lambda e: ["--optimizer", "mfsgd", "--nproc", "0", "--config", tiny(e)], "--nproc must be >= 1"),
    ("unwritable results dir", lambda e: ["--optimizer", "mfsgd", "--results-dir", str(e["root"] / "notadir" / "x"), "--config", tiny(e)], "cannot create the results dir"),
    ("existing run name", lambda e: ["--optimizer", "adamw", "--name", "existing", "--config", tiny(e)], "run 'existing' already exists"),
    ("bad run name", lambda e: ["--optimizer", "adamw", "--name", "../escape", "--config", tiny(e)], "may hold only letters"),
    ("resume unknown run", lambda e: ["--resume", "ghost"], "cannot resume 'ghost'"),
    ("resume finished run", lambda e: ["--resume", "existing"], "already finished"),
    ("resume with new config", lambda e: ["--resume", "existing", "--config", "{}"], "drop --optimizer/--config/--preset"),
    ("resume and overwrite", lambda e: ["--resume", "existing", "--overwrite"], "exclude each other"),
    ("no optimizer", lambda e: ["--config", tiny(e)], "--optimizer is required"),
    ("bad wandb mode", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, logging={"wandb": "cloud"})], "logging.wandb must be one of off, offline, online"),
    ("bad init", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, init="random")], "optimizer.init must be weight_svd or zero"),
    # numbers a worker or torch would reject (issue 15): NaN, infinities, overflowing JSON, 64-bit overflow
    ("NaN lr", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, lr=float("nan"))], "optimizer.lr must be a finite number, got NaN"),
    ("Infinity lr", lambda e: ["--optimizer", "adamw", "--config", tiny(e, lr=float("inf"))], "optimizer.lr must be a finite number, got Infinity"),
    ("1e400 lr", lambda e: ["--optimizer", "mfsgd", "--config", '{"lr": 1e400}'], "optimizer.lr must be a finite number"),
    ("-Infinity eta1", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, eta1=float("-inf"))], "optimizer.eta1 must be a finite number"),
    ("negative eta2", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, eta2=-0.5)], "optimizer.eta2 must be >= 0"),
    ("NaN eps", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, eps=float("nan"))], "optimizer.eps must be a finite number"),
    ("Infinity max_value", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, max_value=float("inf"))], "optimizer.max_value must be a finite number"),
    ("NaN grad_clip", lambda e: ["--optimizer", "adamw", "--config", tiny(e, train__grad_clip=float("nan"))], "train.grad_clip must be a finite number"),
    ("NaN adam beta", lambda e: ["--optimizer", "adamw", "--config", tiny(e, adam={"betas": [float("nan"), 0.9]})], "adam.betas[0] must be a finite number"),
    ("Infinity adam lr", lambda e: ["--optimizer", "muon", "--config", tiny(e, adam={"embed_lr": float("inf")})], "adam.embed_lr must be a finite number"),
    ("NaN galore scale", lambda e: ["--optimizer", "galore", "--config", tiny(e, group_params={"scale": float("nan")})], "optimizer.group_params.scale must be a finite number"),
    ("NaN adafactor eps", lambda e: ["--optimizer", "adafactor", "--config", tiny(e, eps=[None, float("nan")])], "optimizer.eps[1] must be a finite number"),
    ("seed 1e20", lambda e: ["--optimizer", "adamw", "--config", tiny(e, train__seed=1e20)], "train.seed must be an integer of at most 64 bits"),
    ("seed 2**64", lambda e: ["--optimizer", "adamw", "--config", tiny(e, train__seed=2**64)], "train.seed must be an integer of at most 64 bits"),
    ("Infinity steps", lambda e: ["--optimizer", "adamw", "--config", tiny(e, train__steps=float("inf"))], "train.steps must be a finite integer"),
    ("n_layer 1e9", lambda e: ["--optimizer", "adamw", "--config", tiny(e, model={"preset": "cpu-tiny", "n_layer": 10**9})], "GiB per worker, more than"),
    ("block_size 1e12", lambda e: ["--optimizer", "adamw", "--config", tiny(e, model={"preset": "cpu-tiny", "block_size": 10**12, "vocab_size": 256})], "GiB per worker, more than"),
    ("vocab_size 1e12", lambda e: ["--optimizer", "adamw", "--config", tiny(e, model={"preset": "cpu-tiny", "vocab_size": 10**12})], "GiB per worker, more than"),
    ("val_batch_size 1e9", lambda e: ["--optimizer", "adamw", "--config", tiny(e, train__val_batch_size=10**9)], "GiB per worker, more than"),
    # launcher flags torchrun would reject or hang on
    ("--max-restarts -1", lambda e: ["--optimizer", "adamw", "--max-restarts", "-1", "--config", tiny(e)], "--max-restarts must be in 0..1000, got -1"),
    ("--master-port 0", lambda e: ["--optimizer", "adamw", "--master-port", "0", "--config", tiny(e)], "--master-port must be in 1..65535"),
    ("--master-port 70000", lambda e: ["--optimizer", "adamw", "--master-port", "70000", "--config", tiny(e)], "--master-port must be in 1..65535"),
    ("multi-node without --master-addr", lambda e: ["--optimizer", "adamw", "--nnodes", "2", "--config", tiny(e)], "--nnodes 2 needs --master-addr"),
    ("bad --master-addr", lambda e: ["--optimizer", "adamw", "--nnodes", "2", "--master-addr", "a b", "--config", tiny(e)], "--master-addr must be a host name"),
    ("multi-node without --name", lambda e: ["--optimizer", "adamw", "--nnodes", "2", "--master-addr", "127.0.0.1", "--config", tiny(e)], "--nnodes 2 needs --name NAME"),
    ("absurd --nproc", lambda e: ["--optimizer", "adamw", "--nproc", "100000", "--config", tiny(e)], "--nproc 100000 is more than 4 workers per CPU core"),
    ("node rank 1 rewrites a run", lambda e: ["--optimizer", "adamw", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1", "--name", "existing", "--config", tiny(e, lr=0.5, train__micro_batch_size=4)], "already exists in"),
    # files the launcher reads
    ("--config file not UTF-8", lambda e: ["--optimizer", "mfsgd", "--config", "@" + str(e["bad"] / "latin1.json")], "latin1.json is not UTF-8 text (byte 0xe9"),
    ("--config 5000-digit integer", lambda e: ["--optimizer", "mfsgd", "--config", "@" + str(e["bad"] / "bigint.json")], "bigint.json is not valid JSON: Exceeds the limit"),
    ("--config nested 100k deep", lambda e: ["--optimizer", "mfsgd", "--config", "@" + str(e["bad"] / "deep.json")], "deep.json is not valid JSON: nested too deeply"),
    ("--config file with NaN", lambda e: ["--optimizer", "mfsgd", "--config", "@" + str(e["bad"] / "nan.json")], "optimizer.lr must be a finite number, got NaN"),
    ("--config file too large", lambda e: ["--optimizer", "mfsgd", "--config", "@" + str(e["bad"] / "huge.json")], "huge.json is larger than 16 MiB"),
    ("--config is a directory", lambda e: ["--optimizer", "mfsgd", "--config", "@" + str(e["bad"])], "--config file not found"),
    ("--config inline 5000 digits", lambda e: ["--optimizer", "mfsgd", "--config", '{"rank": ' + "1" * 5000 + "}"], "--config is not valid JSON"),
    # names and paths confined to their folders
    ("run name ending in a newline", lambda e: ["--optimizer", "adamw", "--name", "x\n", "--config", tiny(e)], "may hold only letters"),
    ("run name with a tab", lambda e: ["--optimizer", "adamw", "--name", "a\tb", "--config", tiny(e)], "may hold only letters"),
    ("run name with a slash", lambda e: ["--optimizer", "adamw", "--name", "a/b", "--config", tiny(e)], "may hold only letters"),
    ("run name ..", lambda e: ["--optimizer", "adamw", "--name", "..", "--config", tiny(e)], "may hold only letters"),
    ("run name too long", lambda e: ["--optimizer", "adamw", "--name", "a" * 300, "--config", tiny(e)], "may hold only letters"),
    ("--resume ../x", lambda e: ["--resume", "../results/existing"], "is not a run name"),
    ("--resume a/b", lambda e: ["--resume", "sub/existing"], "is not a run name"),
    ("--resume with a newline", lambda e: ["--resume", "existing\n"], "is not a run name"),
    ("--preset ../x", lambda e: ["--optimizer", "adamw", "--preset", "../presets/nanogpt-paper", "--config", tiny(e)], "is not a preset name"),
    ("--preset a/b", lambda e: ["--optimizer", "adamw", "--preset", "presets/x", "--config", tiny(e)], "is not a preset name"),
    ("--preset missing .yaml path", lambda e: ["--optimizer", "adamw", "--preset", str(e["bad"] / "none.yaml"), "--config", tiny(e)], "preset file not found"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(env, capsys, name, argv, needle):
    before = tree_digest(env["results"])
    args = argv(env)
    if "--results-dir" not in args:
        args += ["--results-dir", str(env["results"])]
    code = run.main(args)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err
    assert tree_digest(env["results"]) == before


def test_case_count():
    assert len(CASES) >= 25


@pytest.mark.slow
@pytest.mark.parametrize("argv,needle", [
    (["--optimizer", "mfsgd", "--config", "{oops"], "--config is not valid JSON"),
    (["--optimizer", "mfsgd", "--num-gpus", "2"], "this machine has none"),
])
def test_real_cli(env, argv, needle):
    r = launch(argv, env["results"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


@pytest.mark.slow
def test_rank_above_min_side_is_clipped_with_a_warning(env, capsys):
    code = run.main(["--optimizer", "mfsgd", "--dry-run", "--config", tiny(env, rank=64),
                     "--results-dir", str(env["results"])])
    assert code == 0
    assert "warning: optimizer rank 64 > min(m, n) = 32 of every hidden matrix: clipped to 32" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("optimizer, keys, missing, needle", [
    ("galore", {}, "galore_torch", "optimizer galore needs the package galore-torch, which is not installed"),
    ("mfsgd", {"logging": {"wandb": "offline"}}, "wandb", "logging.wandb offline needs the package wandb"),
])
def test_missing_optional_package_is_one_line(env, capsys, monkeypatch, optimizer, keys, missing, needle):
    """A machine without galore-torch or wandb (a GPU image, say): one line naming the package; the
    optimizers and settings that do not need it still launch."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    argv = ["--optimizer", optimizer, "--config", tiny(env, **keys), "--results-dir", str(env["results"]), "--dry-run"]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert run.main(["--optimizer", "adamw", "--config", tiny(env), "--results-dir", str(env["results"]), "--dry-run"]) == 0
