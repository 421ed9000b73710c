"""Checkpoints and resume: a run killed with SIGKILL and resumed gives bit-identical losses and a
metrics file with every step exactly once; a crashed worker restarts and resumes by itself."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from unittest.mock import ANY

from worker.checkpoint import list_checkpoints
from helpers import (ROOT, launch, process_tree, read_metrics, tiny_overrides, train_in_process, write_run_config,
                     write_tiny_corpus)

STEPS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


def config(corpus, parallel="ddp", **optimizer_keys):
    cfg = tiny_overrides(corpus, steps=STEPS, batch_size=8, micro_batch_size=4, **optimizer_keys)
    cfg["train"].update(val_every=10, ckpt_every=3, keep_checkpoints=2, parallel=parallel)
    return cfg




def kill_after_step(args, results_dir, run_dir, step, timeout=120):
    """Starts run.py and SIGKILLs its whole process tree once metrics.jsonl has reached `step`."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *args, "--results-dir", str(results_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and sum(1 for _ in open(path)) > step:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    for pid in process_tree(proc.pid):  # torchrun starts workers in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    time.sleep(0.2)  # let the kernel reap the workers before the resume starts
    return sum(1 for _ in open(path)) - 1  # last step written


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,nproc,extra", [
    ("adamw", 1, {}), ("mfsgd", 2, {"rank": 4}),
    ("mfsgd", 2, {"rank": 4, "memory_mode": "sketch", "comm": "sketch"}),
    ("mfsgd", 2, {"rank": 4, "shard": True}),
    ("mfsgd", 2, {"rank": 4, "init": "zero", "rank_policy": "energy", "rank_every": 3}),  # ranks in the checkpoint
    ("mfsgd", 2, {"rank": 4, "memory_mode": "sketch", "parallel": "fsdp"}),  # distributed checkpoints (DCP)
])
def test_sigkill_and_resume_is_bit_exact(tmp_path, corpus, optimizer, nproc, extra):
    """The reference runs the worker in spawned processes (the launcher's start-up once less); the
    killed run and its resume go through run.py and torchrun, as a user's would."""
    overrides = config(corpus, **extra)
    common = ["--optimizer", optimizer, "--nproc", str(nproc), "--config", json.dumps(overrides)]
    train_in_process([write_run_config(tmp_path, "ref", optimizer, overrides, nproc)], nproc)
    killed_at = kill_after_step(common + ["--name", "cut"], tmp_path, tmp_path / "cut", step=5)
    assert killed_at < STEPS
    if extra.get("parallel") == "fsdp":  # DCP reshards: the launcher lets it resume on another number of ranks
        other = launch(["--resume", "cut", "--nproc", "1", "--dry-run"], tmp_path)  # (tests/test_fsdp.py runs one)
        assert other.returncode == 0, other.stderr
    resumed = launch(["--resume", "cut", "--nproc", str(nproc)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "cut")
    assert [m["step"] for m in b] == list(range(STEPS + 1))  # no step missing or duplicated
    for ma, mb in zip(a, b):
        for key in ("train_loss", "val_loss", "lr"):
            assert ma.get(key) == mb.get(key), (ma["step"], key)  # bit for bit
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    ref_summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["final_val_loss"] == a[-1]["val_loss"]
    for key in ("best_val_loss", "final_train_loss", "param_bytes", "opt_state_bytes_hidden"):
        assert summary[key] == ref_summary[key], key  # the summary sees the steps before the kill too
    assert len(list_checkpoints(str(tmp_path / "cut"))) == 2  # keep_checkpoints
    if extra.get("rank_policy") == "energy":  # the allocations, each once, as the uninterrupted run's
        ranks = [(tmp_path / run / "ranks.jsonl").read_text() for run in ("ref", "cut")]
        assert ranks[0] == ranks[1] and ranks[0].count("\n") == STEPS // 3 + 1
        assert len({line.split('"ranks"')[1] for line in ranks[0].splitlines()}) > 1  # they did change
    if optimizer == "adamw" or extra.get("parallel") == "fsdp":  # a file and a folder checkpoint; the rest alike
        again = launch(["--resume", "cut", "--nproc", str(nproc)], tmp_path)
        assert again.returncode == 2 and "already finished" in again.stderr


@pytest.mark.slow
def test_crashed_worker_restarts_and_resumes(tmp_path, corpus):
    cfg = config(corpus, rank=4)
    ref = launch(["--optimizer", "mfsgd", "--name", "ref", "--config", json.dumps(cfg)], tmp_path)
    assert ref.returncode == 0, ref.stderr
    cfg["train"]["debug_crash_at_step"] = 7
    crash = launch(["--optimizer", "mfsgd", "--name", "crash", "--max-restarts", "1", "--config", json.dumps(cfg)],
                   tmp_path)
    assert crash.returncode == 0, crash.stderr
    assert "injected crash at step 7" in crash.stderr
    a, b = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "crash")
    assert [m["step"] for m in b] == list(range(STEPS + 1))
    assert [m.get("train_loss") for m in a] == [m.get("train_loss") for m in b]


@pytest.mark.slow
def test_non_finite_loss_stops_with_reason(tmp_path, corpus):
    cfg = config(corpus)
    cfg["lr"] = 1e30  # AdamW on the hidden matrices blows up at once
    cfg["train"]["ckpt_every"] = 1
    r = launch(["--optimizer", "adamw", "--name", "nan", "--config", json.dumps(cfg)], tmp_path)
    assert r.returncode == 3
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "non-finite" in summary["reason"]
    # the guard's one line is the last thing printed: no torchrun traceback after it
    assert r.stderr.strip().splitlines()[-1].startswith("error: non-finite")
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
    # every checkpoint kept holds finite weights
    import torch

    for path in list_checkpoints(str(tmp_path / "nan")):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.slow
def test_resuming_at_the_last_checkpoint_rebuilds_the_summary(tmp_path, corpus):
    """Killed after the final checkpoint but before summary.json (and with a metrics line cut short
    by the kill): the resume runs no step, and its summary matches the uninterrupted run's, best
    val loss (here at an early step) included."""
    cfg = config(corpus)
    cfg["lr"] = 0.3  # too high: the val loss rises after its first evaluations
    cfg["train"].update(steps=6, val_every=2)
    r = launch(["--optimizer", "adamw", "--name", "end", "--config", json.dumps(cfg)], tmp_path)
    assert r.returncode == 0, r.stderr
    ref = json.loads((tmp_path / "end" / "summary.json").read_text())
    vals = [m["val_loss"] for m in read_metrics(tmp_path / "end") if "val_loss" in m]
    assert ref["best_val_loss"] == min(vals) < vals[-1] == ref["final_val_loss"]
    os.remove(tmp_path / "end" / "summary.json")
    with open(tmp_path / "end" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train_lo')  # a line the kill cut short
    r = launch(["--resume", "end"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "end" / "summary.json").read_text()) == {**ref, "peak_mem_bytes": ANY}
    assert [m["step"] for m in read_metrics(tmp_path / "end")] == list(range(7))


@pytest.mark.slow
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, corpus):
    cfg = config(corpus)
    cfg["train"]["steps"] = 6
    r = launch(["--optimizer", "adamw", "--name", "c", "--config", json.dumps(cfg)], tmp_path)
    assert r.returncode == 0, r.stderr
    ckpts = sorted(os.listdir(tmp_path / "c" / "checkpoints"))
    assert ckpts == ["step_0000003.manifest.json", "step_0000003.pt", "step_0000006.manifest.json", "step_0000006.pt"]
    os.remove(tmp_path / "c" / "summary.json")  # pretend it was interrupted
    newest = tmp_path / "c" / "checkpoints" / ckpts[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    r = launch(["--resume", "c"], tmp_path)
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "is unusable: its file step_0000006.pt has 1000 bytes" in line
    assert "the older checkpoint" in line and "step_0000003.pt exists" in line


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_resumes(tmp_path, corpus):
    """Preemption: SIGTERM to run.py reaches the workers, which finish the step, write a checkpoint
    and stop; the resumed run then equals the uninterrupted one."""
    cfg = config(corpus, rank=4)
    cfg["train"]["ckpt_every"] = 0  # only the signal writes a checkpoint before the end
    common = ["--optimizer", "mfsgd", "--config", json.dumps(cfg)]
    ref = launch(common + ["--name", "ref"], tmp_path)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *common, "--name", "term",
                             "--results-dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    path = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (path.exists() and sum(1 for _ in open(path)) > 3):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 75, err  # a graceful stop has its own exit code
    assert err.strip().splitlines()[-1].startswith("stopped by signal at step")
    assert "resume with: python run.py --resume term" in err and "Traceback" not in err
    assert json.loads((tmp_path / "term" / "summary.json").read_text())["status"] == "stopped"
    ckpts = [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "term"))]
    assert len(ckpts) == 1 and ckpts[0] != f"step_{STEPS:07d}.pt"
    resumed = launch(["--resume", "term"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "term")
    assert [m["step"] for m in b] == list(range(STEPS + 1))
    assert [m.get("train_loss") for m in a] == [m.get("train_loss") for m in b]
