"""Shared test fixtures: a tiny synthetic corpus and a tiny model, so runs take seconds."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VOCAB = 256


def write_tiny_corpus(directory, train_tokens=40_000, val_tokens=6_000, seed=0, vocab=TINY_VOCAB):
    """Random-walk tokens (a learnable pattern) in small train/val shards; returns the data config."""
    from data.shards import write_shard

    rng = np.random.default_rng(seed)
    steps = rng.integers(-3, 4, size=train_tokens + val_tokens)
    tokens = np.cumsum(steps) % vocab
    os.makedirs(directory, exist_ok=True)
    write_shard(os.path.join(directory, "train_000000.bin"), tokens[:train_tokens])
    write_shard(os.path.join(directory, "val_000000.bin"), tokens[train_tokens:])
    return {"train_files": os.path.join(directory, "train_*.bin"), "val_files": os.path.join(directory, "val_*.bin"),
            "seq_len": 32, "val_tokens": 2048}


def tiny_overrides(data_cfg, steps=4, batch_size=8, micro_batch_size=8, **optimizer_keys):
    return {
        "model": {"preset": None, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "vocab_size": TINY_VOCAB},
        "data": data_cfg,
        "train": {"steps": steps, "batch_size": batch_size, "micro_batch_size": micro_batch_size, "val_every": 2,
                  "val_batch_size": 16},
        "logging": {"progress": False},
        **optimizer_keys,
    }


def launch(args, results_dir, timeout=300):
    """Runs `python run.py ARGS --results-dir RESULTS_DIR`; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args, "--results-dir", str(results_dir)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def write_run_config(root, name, optimizer, overrides, world=1, distributed=None) -> str:
    """A run folder holding config.json as run.py writes it, for `world` CPU workers (under a
    process group when world > 1 or `distributed`), for train_in_process; returns its path."""
    from configs import resolve_config

    launch = dict(nproc=world, world_size=world, distributed=world > 1 if distributed is None else distributed)
    cfg = resolve_config(optimizer, overrides, name=name, launch=launch)
    run_dir = os.path.join(str(root), name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    return run_dir


def _train_worker(rank, world, ports_dir, run_dirs, resume, dtype):
    import socket
    import time

    import torch

    torch.set_num_threads(1)  # as torchrun's workers: one thread each
    if dtype is not None:
        torch.set_default_dtype(dtype)  # the model is built in the default dtype
    import train_gpt

    from worker.fileio import write_text_atomic

    for i, run_dir in enumerate(run_dirs):
        # each run's port is picked by rank 0 just before the run: one picked earlier can meanwhile
        # be taken (gloo's own connections use ephemeral ports), and the ranks would then never meet
        port_file = os.path.join(ports_dir, f"{i}.port")
        if rank == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            write_text_atomic(port_file, str(port))
        else:
            while not os.path.exists(port_file):
                time.sleep(0.01)
            port = int(open(port_file).read())
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        train_gpt.train(run_dir, resume=resume)
    end_spawned_rank()


def end_spawned_rank() -> None:
    """The last call of a spawned rank that succeeded (after destroy_process_group): exits as
    train_gpt.main ends a torchrun worker, without the interpreter's teardown. There a process group
    that outlived destroy_process_group (FSDP's modules and device meshes hold theirs) is freed
    late, and a gloo thread can abort the finished rank: SIGABRT, "terminate called without an
    active exception", about once in a few hundred spawned FSDP runs."""
    from worker.outcome import exit_process

    exit_process(0)


def train_in_process(run_dirs, world, resume=False, dtype=None, seconds_per_run=120) -> None:
    """Trains each run (folders from write_run_config, all for `world` workers) one after another
    with the worker's own train() on `world` spawned processes (gloo): the training loop without the
    launcher's start-up (run.py, torchrun), for tests that compare several runs. `dtype`: the
    default dtype the models are built in (torch.float64 for exact comparisons). A run that hangs
    (ranks that never meet at rendezvous, a collective one rank skips) fails the test once no run
    has finished for `seconds_per_run`, instead of stalling the suite: the ranks are killed and the
    error names the run they were at."""
    import tempfile
    import time

    import torch.multiprocessing as mp

    run_dirs, started = list(run_dirs), time.time()

    def finished() -> int:  # runs that wrote their summary.json since the start
        summaries = [os.path.join(d, "summary.json") for d in run_dirs]
        return sum(os.path.exists(s) and os.path.getmtime(s) >= started for s in summaries)

    with tempfile.TemporaryDirectory() as ports_dir:
        ranks = mp.start_processes(_train_worker, args=(world, ports_dir, run_dirs, resume, dtype), nprocs=world,
                                   start_method="spawn", join=False)
        done, progress = 0, time.monotonic()
        while not ranks.join(timeout=0.5):  # raises if a rank failed
            now_done = finished()
            if now_done != done:
                done, progress = now_done, time.monotonic()
            elif time.monotonic() - progress > seconds_per_run:
                for process in ranks.processes:
                    process.kill()
                at = run_dirs[min(done, len(run_dirs) - 1)]
                raise TimeoutError(f"train_in_process: {world} ranks were still at {at} ({done} of {len(run_dirs)} "
                                   f"runs done) after {seconds_per_run} s without a run finishing: a hang")


def reseal_checkpoint(checkpoint: str) -> None:
    """Rewrites a checkpoint's manifest to match its files as they are now: a test that changes a
    checkpoint's content on purpose, to reach the checks behind the checksums."""
    from worker.checkpoint import checkpoint_files, file_entry, manifest_path, read_manifest

    manifest, problem = read_manifest(checkpoint)
    assert problem is None, problem
    for name, path in checkpoint_files(checkpoint, manifest):
        if os.path.exists(path):
            manifest["files"][name] = file_entry(path)
    with open(manifest_path(checkpoint), "w") as f:
        json.dump(manifest, f)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def tiny_double_model():
    """A 2-layer fp64 GPT with a 64-token vocabulary, non-zero everywhere (every matrix has a real
    spectrum), for exact optimizer comparisons."""
    import torch

    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)).double()
    for p in model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    return model


def process_tree(root: int) -> list[int]:
    """root and all its descendants, from /proc (Linux)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def write_run_folder(root, name, optimizer="adamw", lr=0.002, seed=0, rank=None, steps=10, final=5.0,
                     status="finished", steps_done=None, val_every=5, peak_mib=600.0, tokens_per_s=1000.0):
    """A run folder as the harness writes it (config.json, metrics.jsonl, summary.json), without
    training: the val loss falls linearly from final + 1 to `final` over the run. `status`:
    finished, stopped or failed (summary.json says so, at `steps_done`), or None (no summary)."""
    run_dir = os.path.join(str(root), name)
    os.makedirs(run_dir)
    opt = {"lr": lr}
    if rank is not None:
        opt.update({"group_params": {"rank": rank}} if optimizer == "galore" else {"rank": rank})
    config = {"name": name, "optimizer_name": optimizer, "optimizer": opt,
              "model": {"arch": "gpt2", "preset": "cpu-tiny"}, "train": {"steps": steps, "seed": seed, "batch_size": 8},
              "logging": {"progress": False}, "launch": {"nproc": 1, "nnodes": 1, "world_size": 1, "device": "cpu"}}
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    done = steps if steps_done is None else steps_done
    rows = []
    for step in range(done + 1):
        row = {"step": step, "tokens": 256 * step, "elapsed_s": 0.5 * step}
        if step:
            row.update(train_loss=final + 1.1 - step / steps, step_ms=500.0)
        if step % val_every == 0 or step == steps:
            row["val_loss"] = final + 1 - step / steps
        rows.append(row)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        vals = [r["val_loss"] for r in rows if "val_loss" in r]
        summary = {"name": name, "status": status, "optimizer": optimizer, "steps": done}
        if status == "finished":
            summary.update(final_val_loss=vals[-1], best_val_loss=min(vals), tokens_per_s=tokens_per_s,
                           peak_mem_bytes=int(peak_mib * 2**20), opt_state_bytes_hidden=(rank or 64) * 2**12)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
    return run_dir
