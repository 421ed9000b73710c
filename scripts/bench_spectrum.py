"""What the spectral diagnostics cost: the worker's mean step time with logging.spectrum_every off,
on every N steps, and on with the shadow momentum (MoFaSGD), in the same run.

    python -m scripts.bench_spectrum [--every 50] [--steps 100] [--repeats 2] [--config JSON]

Each variant runs the worker itself (`python train_gpt.py --run-dir`, the harness's bench_train
way) on cpu-small by default, MoFaSGD rank 32; the step times are the worker's own (metrics.jsonl,
the first steps left out), so a logged step's extra work is averaged over the steps between. The
repeats alternate the variants so machine noise hits them alike; medians are compared.
"""

import argparse
import statistics
import sys
import tempfile

from configs import deep_merge, parse_overrides, resolve_config
from scripts.bench_train import harness_tokens_per_s

VARIANTS = {"off": {}, "on": {"spectrum_shadow": False}, "on + shadow": {"spectrum_shadow": True}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--config", help="JSON overrides (as run.py); default cpu-small, rank 32")
    args = p.parse_args(argv)
    base = deep_merge({"rank": 32, "model": {"preset": "cpu-small"},
                       "train": {"steps": args.steps, "val_every": 0, "ckpt_every": 0},
                       "logging": {"progress": False}}, parse_overrides(args.config))
    tokens_per_s = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):
            for name, logging in VARIANTS.items():
                every = {"spectrum_every": args.every, **logging} if logging else {}
                cfg = resolve_config("mfsgd", deep_merge(base, {"logging": every}), name=f"bench-{name}")
                tokens_per_s[name].append(harness_tokens_per_s(cfg, workdir, f"{repeat}-{name.replace(' ', '')}"))
    off = statistics.median(tokens_per_s["off"])
    print(f"MoFaSGD, {base['model']['preset']}, {args.steps} steps, spectrum every {args.every}; median of {args.repeats}")
    print("| logging | tokens/s | step time vs off |")
    print("|---|---:|---:|")
    for name, values in tokens_per_s.items():
        median = statistics.median(values)
        print(f"| {name} | {median:,.0f} | {off / median - 1:+.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
