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
    ("unknown nested key", lambda e: ["--optimizer", "mfsgd", "--config", tiny(e, train__stepz=3)], "unknown config key 'train.stepz'; valid keys: steps"),
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
]


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


@pytest.mark.parametrize("argv,needle", [
    (["--optimizer", "mfsgd", "--config", "{oops"], "--config is not valid JSON"),
    (["--optimizer", "mfsgd", "--num-gpus", "2"], "this machine has none"),
])
def test_real_cli(env, argv, needle):
    r = launch(argv, env["results"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_rank_above_min_side_is_clipped_with_a_warning(env, capsys):
    code = run.main(["--optimizer", "mfsgd", "--dry-run", "--config", tiny(env, rank=64),
                     "--results-dir", str(env["results"])])
    assert code == 0
    assert "warning: optimizer rank 64 > min(m, n) = 32 of every hidden matrix: clipped to 32" in capsys.readouterr().err
