"""Peak memory and speed of a training step with the plain and the chunked head loss, side by side.

    python -m scripts.bench_head_loss [--chunks 0 1024 4096] [--steps 4]

Each (model, chunk) pair runs in its own process: a few forward+backward passes of the model
(no optimizer); the peak resident set size of a pass (Linux VmHWM, reset before it) minus the
resident size before it is the pass's activation peak. Printed per model with ratios against the
plain head (chunk 0) measured in the same run. The model sizes:
    cpu-small    gpt2, 4 layers x 128, 8 x 128 tokens (the CPU default)
    gpt2-small   gpt2, 12 layers x 768, 1 x 1024 tokens
    paper        speedrun at the paper size (275.7M), one 1024-token stream, documents every ~300 tokens
The head's share of the plain peak, per token, extrapolates to the paper's 64K-token micro-batch.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

MODELS = {
    "cpu-small": ("gpt2", dict(preset="cpu-small"), 8, 128),
    "gpt2-small": ("gpt2", dict(preset="gpt2-small"), 1, 1024),
    "paper": ("speedrun", dict(preset="speedrun"), 1, 1024),
}


def measure(name: str, chunk: int, steps: int) -> dict:
    import torch

    from memory import current_memory_bytes, peak_memory_bytes, reset_peak_memory
    from model import PRESETS, create_model

    arch, fields, batch, seq = MODELS[name]
    torch.manual_seed(0)
    model = create_model(arch, **PRESETS[fields["preset"]], vocab_size=50304, loss_chunk_tokens=chunk)
    idx = torch.randint(0, 50000, (batch, seq + 1))
    idx[:, ::300] = 50256  # documents (used by the speedrun model's attention mask)
    cpu = torch.device("cpu")
    times, peaks = [], []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        base = current_memory_bytes(cpu)
        reset_peak_memory(cpu)  # VmHWM := VmRSS
        start = time.perf_counter()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        times.append(time.perf_counter() - start)
        peaks.append(peak_memory_bytes(cpu) - base)
    return {"model": name, "chunk": chunk, "tokens": batch * seq, "loss": loss.item(),
            "tokens_per_s": batch * seq / statistics.median(times[1:] or times), "activation_peak": max(peaks[1:] or peaks)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--chunks", nargs="+", type=int, default=[0, 256, 1024, 4096])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.steps)))
        return 0
    mib = 2 ** 20
    for name in args.models:
        rows = []
        for chunk in args.chunks:
            out = subprocess.run([sys.executable, "-m", "scripts.bench_head_loss", "--one", name, str(chunk),
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        plain = next((r for r in rows if r["chunk"] == 0), rows[0])
        print(f"\n{name}: {plain['tokens']} tokens per pass, forward+backward, median of {args.steps - 1}")
        print("| loss_chunk_tokens | activation peak MiB | vs plain | tokens/s | vs plain | loss |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['chunk'] or 'off'} | {r['activation_peak'] / mib:,.0f} | {r['activation_peak'] / plain['activation_peak']:.2f}x "
                  f"| {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / plain['tokens_per_s']:.2f}x | {r['loss']:.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
