"""Peak memory and speed of a training step with the plain and the chunked head loss, side by side.

    python -m scripts.bench_head_loss [--chunks 0 1024 4096] [--steps 4]

Each (model, chunk) pair runs in its own process: a few forward+backward passes of the model
(no optimizer); the peak resident set size of a pass (Linux VmHWM, reset before it) minus the
resident size before it is the pass's activation peak. Printed per model with ratios against the
plain head (chunk 0) measured in the same run. The model sizes:
    cpu-small    gpt2, 4 layers x 128, 8 x 128 tokens (the CPU default)
    gpt2-small   gpt2, 12 layers x 768, 1 x 1024 tokens
    paper        speedrun at the paper size (275.7M), one 1024-token stream, documents every ~300 tokens
With --seq-lens T1 T2 (one sequence per pass) the peaks are measured at two lengths: their slope
per token, plain minus chunked, is what the head holds per token, and the fitted lines give the
head's share of the pass's peak at --extrapolate tokens (default 65536, the paper preset's
micro-batch), plain and chunked.
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


def measure(name: str, chunk: int, steps: int, seq_len: int | None = None) -> dict:
    import torch

    from worker.memory import current_memory_bytes, peak_memory_bytes, reset_peak_memory
    from model import PRESETS, create_model

    arch, fields, batch, seq = MODELS[name]
    if seq_len:
        batch, seq = 1, seq_len
    shape = PRESETS[fields["preset"]]
    torch.manual_seed(0)
    model = create_model(arch, **dict(shape, block_size=max(seq, shape["block_size"])), vocab_size=50304,
                         loss_chunk_tokens=chunk)
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
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[None], metavar="T",
                        help="one sequence of T tokens per pass instead of the model's default shape; two or more "
                             "lengths also print the per-token fit and its extrapolation")
    parser.add_argument("--extrapolate", type=int, default=65536, metavar="TOKENS")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "CHUNK", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.steps, int(args.one[2]) or None)))
        return 0
    mib = 2 ** 20
    for name in args.models:
        by_length = {}
        for seq_len in args.seq_lens:
            rows = []
            for chunk in args.chunks:
                out = subprocess.run([sys.executable, "-m", "scripts.bench_head_loss", "--one", name, str(chunk),
                                      str(seq_len or 0), "--steps", str(args.steps)],
                                     capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            plain = next((r for r in rows if r["chunk"] == 0), rows[0])
            print(f"\n{name}: {plain['tokens']} tokens per pass, forward+backward, median of {args.steps - 1}")
            print("| loss_chunk_tokens | activation peak MiB | vs plain | tokens/s | vs plain | loss |")
            print("|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['chunk'] or 'off'} | {r['activation_peak'] / mib:,.0f} | {r['activation_peak'] / plain['activation_peak']:.2f}x "
                      f"| {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / plain['tokens_per_s']:.2f}x | {r['loss']:.6f} |",
                      flush=True)
            by_length[plain["tokens"]] = {r["chunk"]: r["activation_peak"] for r in rows}
        if len(by_length) >= 2 and 0 in args.chunks:
            print_extrapolation(name, by_length, args.extrapolate)
    return 0


def per_token_fit(by_length: dict, chunk: int) -> tuple[float, float]:
    """(bytes at 0 tokens, bytes per token) of the activation peak, a line through the shortest and
    the longest measured length."""
    short, long = min(by_length), max(by_length)
    slope = (by_length[long][chunk] - by_length[short][chunk]) / (long - short)
    return by_length[short][chunk] - slope * short, slope


def print_extrapolation(name: str, by_length: dict, tokens: int) -> None:
    """What the head holds per token (the plain slope minus a chunked one) and its share of the
    pass's activation peak at `tokens`: all of it at once without chunks, one chunk's worth with."""
    mib = 2 ** 20
    chunked = [c for c in sorted(by_length[min(by_length)]) if c]
    plain_base, plain_slope = per_token_fit(by_length, 0)
    print(f"\n{name}: per-token fit through {min(by_length)} and {max(by_length)} tokens, extrapolated to {tokens}")
    print("| loss_chunk_tokens | peak bytes per token | head bytes per token | peak at extrapolation MiB | head share |")
    print("|---|---|---|---|---|")
    head_per_token = {c: plain_slope - per_token_fit(by_length, c)[1] for c in chunked}
    plain_total = plain_base + plain_slope * tokens
    plain_head = max(head_per_token.values(), default=0.0) * tokens
    print(f"| off | {plain_slope:,.0f} | {max(head_per_token.values(), default=0.0):,.0f} | {plain_total / mib:,.0f} "
          f"| {plain_head / plain_total:.1%} |")
    for c in chunked:
        base, slope = per_token_fit(by_length, c)
        total = base + slope * tokens
        print(f"| {c} | {slope:,.0f} | {head_per_token[c]:,.0f} | {total / mib:,.0f} | {head_per_token[c] * c / total:.1%} |")

if __name__ == "__main__":
    sys.exit(main())
