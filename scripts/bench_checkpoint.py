"""What verified checkpoints cost: writing a run's checkpoint with its manifest (the CRC-32 computed
while torch.save writes) against the same torch.save without one, and verifying it (every byte read
and checksummed) against loading it.

    python -m scripts.bench_checkpoint [--model gpt2-small] [--optimizer adamw] [--repeats 3]

The model and its optimizer state as a run holds them after one step (AdamW: two moments per
parameter). Writes go to a temporary folder under --dir (default: results/, the disk runs write to),
with the fsyncs a run does; each kind is timed --repeats times, alternating, and the median is shown
with the ratio to the plain write (to the load, for reading) measured in the same run; the CRC-32
and sha256 of the file's bytes in memory show the checksum's own share of a write.
"""

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not __package__:
    sys.path.insert(0, ROOT)


def build(model_preset: str, optimizer: str):
    """The model and its RunOptimizers after one zero-gradient step (the state exists), and the config."""
    import torch

    from configs import resolve_config
    from model import create_model
    from optimizers import RunOptimizers

    cfg = resolve_config(optimizer, {"model": {"preset": model_preset}, "logging": {"progress": False}}, name="bench")
    torch.manual_seed(0)
    model = create_model(cfg.model.arch, **cfg.model.resolved())
    optimizers = RunOptimizers.for_run(model, cfg, "cpu")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizers.step()
    return model, optimizers, cfg.to_dict()


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-small", help="a model.preset (default gpt2-small)")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=os.path.join(ROOT, "results"), help="where the checkpoints are written")
    args = p.parse_args(argv)

    import torch

    from worker.checkpoint import integrity_problem, save_checkpoint
    from worker.fileio import write_atomic

    model, optimizers, config = build(args.model, args.optimizer)
    os.makedirs(args.dir, exist_ok=True)
    times = {"write, plain torch.save": [], "write with manifest (CRC-32)": [], "load (torch.load)": [],
             "verify (read + CRC-32)": [], "CRC-32 of the bytes alone": [], "sha256 of the bytes alone": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        plain = os.path.join(tmp, "plain.pt")
        path = os.path.join(tmp, "checkpoints", "step_0000001.pt")

        def write_plain():
            state = {"step": 1, "model": model.state_dict(), **optimizers.state_dict()}
            write_atomic(plain, lambda f: torch.save(state, f), binary=True)

        for _ in range(args.repeats):
            times["write, plain torch.save"].append(timed(write_plain))
            times["write with manifest (CRC-32)"].append(timed(lambda: save_checkpoint(
                tmp, 1, model, optimizers, 0.0, 1, 0, 1, config=config)))
            times["load (torch.load)"].append(timed(lambda: torch.load(path, map_location="cpu", weights_only=True)))
            times["verify (read + CRC-32)"].append(timed(lambda: integrity_problem(path)))
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            data = f.read()
        for _ in range(args.repeats):  # the checksum's own share, and what a cryptographic hash would cost
            times["CRC-32 of the bytes alone"].append(timed(lambda: zlib.crc32(data)))
            times["sha256 of the bytes alone"].append(timed(lambda: hashlib.sha256(data).digest()))
    base = {"write": statistics.median(times["write, plain torch.save"]),
            "read": statistics.median(times["load (torch.load)"])}
    print(f"checkpoint of {args.model} with {args.optimizer}: {size / 2**20:,.0f} MiB; median of {args.repeats}")
    print("| what | seconds | ratio |")
    print("|---|---:|---:|")
    for what, seconds in times.items():
        ref = base["read"] if what.startswith(("load", "verify")) else base["write"]
        print(f"| {what} | {statistics.median(seconds):.2f} | {statistics.median(seconds) / ref:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
