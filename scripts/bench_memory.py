"""Memory and communication per step: AdamW, GaLore, MoFaSGD (full gradients) and MoFaSGD (sketch).

    python -m scripts.bench_memory [--model gpt2-small] [--seq-len 256] [--rank 32] [--device cpu]

Each optimizer runs in its own process (peak memory is per process): the model, the same random
batch, 3 training steps. Reported per optimizer:
- exact tensor bytes: parameters, gradients held when the optimizer steps (in sketch mode: the
  pending sketches instead of the hidden gradients), optimizer state (hidden matrices / the rest);
- peak memory: peak RSS on CPU, torch.cuda.max_memory_allocated on GPU;
- bytes all-reduced per step per rank under data parallelism (2+ ranks): DDP's gradient all-reduce,
  or MoFaSGD's sketches ((m + n) r + r^2 per matrix) plus the non-hidden gradients.
Ratios are against AdamW measured in the same run.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "adamw": ("adamw", {}),
    "galore": ("galore", {"group_params": {"rank": None}}),
    "mfsgd (full grads)": ("mfsgd", {"rank": None}),
    "mfsgd (sketch)": ("mfsgd", {"rank": None, "memory_mode": "sketch", "comm": "sketch"}),
}


def measure(variant: str, model_preset: str, seq_len: int, rank: int, device: str, steps: int) -> dict:
    """Runs in a fresh process: builds everything, trains `steps` steps, returns the numbers."""
    import torch

    from configs import resolve_config
    from worker.memory import memory_parts, peak_memory_bytes
    from model import create_model
    from optimizers import build_optimizers, split_parameters

    name, overrides = VARIANTS[variant]
    overrides = json.loads(json.dumps(overrides).replace("null", str(rank)))
    overrides["model"] = {"preset": model_preset}
    overrides["data"] = {"seq_len": seq_len}
    cfg = resolve_config(name, overrides)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = create_model(cfg.model.arch, **cfg.model.resolved()).to(dev)
    hidden_opt, adam_opt = build_optimizers(model, name, cfg.optimizer, cfg.adam, dev.type)
    x = torch.randint(0, cfg.model.vocab_size, (1, seq_len + 1), device=dev)
    parts = {}
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        if getattr(cfg.optimizer, "comm", "full") == "sketch":
            hidden_opt.sketch_gradients_()
        parts = memory_parts(model, hidden_opt, adam_opt)  # gradients as held at step time
        hidden_opt.step()
        adam_opt.step()
        hidden_opt.zero_grad(set_to_none=True)
        adam_opt.zero_grad(set_to_none=True)
    parts.update(memory_parts(model, hidden_opt, adam_opt), grad_bytes=parts["grad_bytes"])  # state after steps
    routing = split_parameters(model)
    hidden_bytes = sum(p.numel() * p.element_size() for _, p in routing["hidden"])
    other_bytes = parts["param_bytes"] - hidden_bytes
    if getattr(cfg.optimizer, "comm", "full") == "sketch":
        comm_hidden = 4 * sum(sum(p.shape) * min(rank, *p.shape) + min(rank, *p.shape) ** 2 for _, p in routing["hidden"])
    else:
        comm_hidden = hidden_bytes
    parts.update(peak_mem_bytes=peak_memory_bytes(dev), comm_bytes_hidden=comm_hidden, comm_bytes_other=other_bytes)
    return parts


def mib(b):
    return f"{b / 2**20:,.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-small", help="model preset (gpt2-small, cpu-small, ...)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.seq_len, args.rank, args.device, args.steps)))
        return 0
    results = {}
    for variant in args.variants.split(","):
        out = subprocess.run([sys.executable, "-m", "scripts.bench_memory", "--one", variant, "--model", args.model,
                              "--seq-len", str(args.seq_len), "--rank", str(args.rank), "--device", args.device,
                              "--steps", str(args.steps)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:  # e.g. GaLore without galore-torch: the others are still measured
            lines = out.stderr.strip().splitlines() or ["no output"]
            print(f"{variant}: skipped ({lines[-1][:200]})", file=sys.stderr, flush=True)
            continue
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"measured {variant}", file=sys.stderr, flush=True)
    base = results.get("adamw")
    print(f"\nmodel {args.model}, batch 1 x {args.seq_len}, rank {args.rank}, device {args.device}, fp32; MiB, "
          "ratio = value / AdamW's")
    print("| optimizer | params | grads at step | state hidden | state other | peak memory | ratio | "
          "all-reduce/step hidden | all-reduce/step total | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant, r in results.items():
        comm = r["comm_bytes_hidden"] + r["comm_bytes_other"]
        ratio = lambda key, value: f"{value / base[key]:.2f}" if base else "-"  # noqa: E731
        base_comm = base["comm_bytes_hidden"] + base["comm_bytes_other"] if base else None
        print(f"| {variant} | {mib(r['param_bytes'])} | {mib(r['grad_bytes'])} | {mib(r['opt_state_bytes_hidden'])} | "
              f"{mib(r['opt_state_bytes_other'])} | {mib(r['peak_mem_bytes'])} | {ratio('peak_mem_bytes', r['peak_mem_bytes'])} | "
              f"{mib(r['comm_bytes_hidden'])} | {mib(comm)} | {comm / base_comm:.3f} |" if base else "")
    if base:
        h = results.get("mfsgd (sketch)")
        if h:
            print(f"\nhidden-matrix all-reduce, full gradients / sketches: {base['comm_bytes_hidden'] / h['comm_bytes_hidden']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
