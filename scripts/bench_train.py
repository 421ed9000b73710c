"""Harness overhead: tokens/s of the full training loop vs a bare forward/backward/step loop.

    python -m scripts.bench_train [--optimizer adamw] [--steps 40] [--repeats 3] [--config JSON]

Both run on the same model, optimizers, batch shape and seeds (the bare loop in this process, the
harness as the worker itself, `python train_gpt.py --run-dir`, in a child process), and both leave
out their first WARMUP steps (optimizer state creation; the compile, with train.compile). The harness
number is the worker's own step times from metrics.jsonl (data loading, schedules,
metrics.jsonl writes, memory accounting, progress bar; validation and checkpoints are not in them);
the bare loop reuses one batch and does nothing else. With `{"train": {"compile": true}}` the bare
loop compiles its model too. Repeats alternate the two so machine noise hits both alike; the
medians are compared.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


import torch

from configs import deep_merge, parse_overrides, resolve_config, resolve_path
from data.loader import TokenLoader
from data.shards import find_shards
from worker.fileio import write_json
from model import create_model
from optimizers import build_optimizers
from scripts.results import read_jsonl


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP = 2  # steps left out of both numbers


def harness_tokens_per_s(cfg, workdir: str, repeat: int) -> float:
    run_dir = os.path.join(workdir, f"harness{repeat}")
    os.makedirs(run_dir)
    write_json(os.path.join(run_dir, "config.json"), cfg.to_dict())
    subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py"), "--run-dir", run_dir], check=True)
    step_ms = [row["step_ms"] for row in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
               if row["step"] > WARMUP and "step_ms" in row]
    return len(step_ms) * cfg.train.batch_size * cfg.data.seq_len / (sum(step_ms) / 1000)


def bare_tokens_per_s(cfg) -> float:
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.arch, **cfg.model.resolved())
    hidden_opt, adam_opt = build_optimizers(model, cfg.optimizer_name, cfg.optimizer, cfg.adam)
    if cfg.train.compile:
        model = torch.compile(model)
    loader = TokenLoader(find_shards(resolve_path(cfg.data.train_files)), cfg.data.seq_len, seed=cfg.train.seed)
    x, y = loader.micro_batch(0, cfg.train.batch_size, 0, 1, 0, 1)
    elapsed = 0.0
    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        hidden_opt.step()
        adam_opt.step()
        hidden_opt.zero_grad(set_to_none=True)
        adam_opt.zero_grad(set_to_none=True)
        loss.item()  # the harness reads the loss every step too
        if step >= WARMUP:
            elapsed += time.perf_counter() - t0
    return (cfg.train.steps - WARMUP) * cfg.train.batch_size * cfg.data.seq_len / elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--config", help="JSON overrides (as run.py)")
    args = p.parse_args(argv)
    overrides = deep_merge({"train": {"steps": args.steps, "val_every": 0, "micro_batch_size": 8, "batch_size": 8},
                            "data": {"val_tokens": 1024}, "logging": {"progress": False}},
                           parse_overrides(args.config))
    cfg = resolve_config(args.optimizer, overrides, name="bench-train")
    if cfg.train.steps <= WARMUP:
        p.error(f"steps must be > {WARMUP} (the first {WARMUP} steps are warm-up), got {cfg.train.steps}")
    harness, bare = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):
            bare.append(bare_tokens_per_s(cfg))
            harness.append(harness_tokens_per_s(cfg, workdir, repeat))
    h, b = statistics.median(harness), statistics.median(bare)
    print(f"model {cfg.model.preset} ({cfg.model.arch}), optimizer {args.optimizer}, {cfg.train.batch_size} x "
          f"{cfg.data.seq_len} tokens/step, {cfg.train.steps} steps ({cfg.train.steps - WARMUP} timed), {args.repeats} repeats, "
          f"compile {cfg.train.compile}, torch threads {torch.get_num_threads()}")
    print("| loop | tokens/s (median) | all repeats |")
    print("|---|---|---|")
    print(f"| bare fwd/bwd/step | {b:,.0f} | {', '.join(f'{v:,.0f}' for v in bare)} |")
    print(f"| harness (train_gpt.py) | {h:,.0f} | {', '.join(f'{v:,.0f}' for v in harness)} |")
    print(f"\nharness overhead: {100 * (b - h) / b:+.1f}% (goal: <= 3%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
