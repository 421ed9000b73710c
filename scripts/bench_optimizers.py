"""Optimizer-step benchmark: MoFaSGD vs torch.optim.AdamW on GPT-2-small hidden weight shapes.

Times optimizer.step() alone (gradients are pre-generated outside the timed region) and counts the
optimizer state by distinct storages actually held (untyped_storage().nbytes()). Prints Markdown.

    python -m scripts.bench_optimizers                    # per-shape table, CPU
    python -m scripts.bench_optimizers --whole-model      # also the 72-matrix GPT-2-small hidden set
                                                          # (with the projector-forming reference row)
    python -m scripts.bench_optimizers --device cuda
    python -m scripts.bench_optimizers --shard 2          # hidden set, replicated vs sharded over 2 gloo ranks
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from mofasgd import MoFaSGD, spectral_scales
from mofasgd.factors import _umf_householder, factor_dtype
from optimizers import OPTIMIZERS, state_bytes

GPT2_SMALL_SHAPES = "768x768,768x2304,768x3072,3072x768"
# 12 blocks x (q, k, v, attention out as 768x768; MLP up 768x3072; MLP down 3072x768).
WHOLE_MODEL_SHAPES = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]
WHOLE_MODEL_BLOCKS = 12


class OtherLoad:
    """Average number of cores used by *other* processes while the block ran (Linux /proc/stat
    busy time minus this process's CPU time). Timings taken while it is well above 0 are suspect."""

    def __enter__(self):
        self.start = (self._busy_seconds(), self._own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        self.end = (self._busy_seconds(), self._own_seconds(), time.perf_counter())

    @staticmethod
    def _busy_seconds():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return float("nan")
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds():
        t = os.times()
        return t.user + t.system

    def cores(self) -> str:
        busy = self.end[0] - self.start[0]
        own = self.end[1] - self.start[1]
        wall = self.end[2] - self.start[2]
        return f"{max(busy - own, 0.0) / wall:.2f}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} CPUs"


def parse_shapes(text: str):
    shapes = []
    for item in text.split(","):
        m, n = item.lower().split("x")
        shapes.append((int(m), int(n)))
    return shapes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_problem(shapes, device, dtype, seed, gradient_sets=2):
    """Parameters plus a few pre-generated gradient sets (alternated between steps so the
    momentum subspace keeps seeing new directions, as in training)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    params, gradients = [], [[] for _ in range(gradient_sets)]
    for m, n in shapes:
        w = torch.randn(m, n, generator=generator) * 0.02
        params.append(torch.nn.Parameter(w.to(device=device, dtype=dtype)))
        for g in gradients:
            g.append((torch.randn(m, n, generator=generator) * 1e-3).to(device=device, dtype=dtype))
    return params, gradients


def timed_step(optimizer, params, gradients, device) -> float:
    """Milliseconds of one optimizer.step() with the given gradients (set outside the timing)."""
    for p, g in zip(params, gradients):
        p.grad = g
    synchronize(device)
    start = time.perf_counter()
    optimizer.step()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def time_interleaved(factories, shapes, steps, warmup, device, dtype, seed):
    """Median step time in ms for each optimizer, plus the optimizers (for their state).

    Each optimizer gets its own copy of the parameters; all see the same gradients. The steps are
    interleaved round-robin (rotating the order each round) so that background load on the
    machine affects every optimizer alike instead of biasing whichever ran during a busy spell.
    """
    _, gradients = make_problem(shapes, device, dtype, seed)
    runs = []
    for factory in factories:
        params, _ = make_problem(shapes, device, dtype, seed, gradient_sets=0)
        runs.append((params, factory(params), []))
    for i in range(warmup + steps):
        order = runs[i % len(runs):] + runs[: i % len(runs)]
        for params, optimizer, times in order:
            ms = timed_step(optimizer, params, gradients[i % len(gradients)], device)
            if i >= warmup:
                times.append(ms)
    return [(statistics.median(times), optimizer) for _, optimizer, times in runs]


def mofasgd_factory(rank, cls=None):
    # Official mfsgd.yaml hyperparameters that matter for cost (eta2 = 0, current projection).
    # cls=ProjectorMoFaSGD builds the projector-forming reference with the same values.
    cls = cls or MoFaSGD
    return lambda params: cls(params, lr=0.05, rank=rank, beta=0.95, eta1=0.25, eta2=0.0, max_value=5.0)


class ProjectorMoFaSGD(MoFaSGD):
    """The same MoFaSGD math written the straightforward way, as the reference the fast step is
    measured against: it forms the m x m and n x n projectors P_U = U U^T, P_V = V V^T, the dense
    tangent projection G_hat = P_U G + (I - P_U) G P_V and the dense step, and updates the factors
    one matrix at a time with Householder QR (the UMF of the paper, on the sketches of G_hat).
    Same state, init and hyperparameters as MoFaSGD (nesterov and the sketch/shard modes are not
    part of it); tests/test_scripts.py checks that it gives MoFaSGD's parameters in fp64.
    """

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["nesterov"]:
                raise ValueError("ProjectorMoFaSGD: nesterov is not supported")
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] if self.state[p] else self._init_state(p, group)
                U, S, V = state["U"], state["S"], state["V"]
                G = p.grad.to(U.dtype)
                P_U, P_V = U @ U.mT, V @ V.mT  # m x m, n x n
                P_U_G = P_U @ G
                G_hat = P_U_G + (G - P_U_G) @ P_V  # = P_U G + G P_V - P_U G P_V, two dense products
                if group["momentum"] == "ema":
                    G_hat = G_hat * (1.0 - group["beta"])
                G_hat_V = G_hat @ V
                U_new, S_new, V_new = _umf_householder(
                    U, S, V, G_hat_V, G_hat.mT @ U, U.mT @ G_hat_V, group["beta"])
                d = spectral_scales(S_new, group["eps"], group["max_value"], group["use_ones_for_nonzero_s"])
                direction = group["eta1"] * (U_new * d) @ V_new.mT
                if group["eta2"] != 0.0:
                    if group["use_current_projection"]:
                        P_U, P_V = U_new @ U_new.mT, V_new @ V_new.mT
                    G_perp_U = G - P_U @ G  # (I - P_U) G (I - P_V)
                    direction += group["eta2"] * (G_perp_U - G_perp_U @ P_V)
                p.add_(direction.to(p.dtype), alpha=-group["lr"])
                state["U"], state["S"], state["V"] = U_new, S_new, V_new
                state["step"] += 1
        return None


def adamw_factory(variant):
    kwargs = {"fused": True} if variant == "fused" else {"foreach": True}
    return lambda params: torch.optim.AdamW(params, lr=2e-3, betas=(0.8, 0.95), weight_decay=0.0, **kwargs)


def expected_mofasgd_bytes(shapes, rank, param_dtype):
    """(m + n) r + r numbers per matrix in the factors' dtype (fp32 for bf16 weights), plus one
    4-byte step counter per matrix."""
    element_size = torch.tensor([], dtype=factor_dtype(param_dtype)).element_size()
    total = 0
    for m, n in shapes:
        r = min(rank, m, n)
        total += ((m + n) * r + r) * element_size + 4
    return total


def mib(nbytes):
    return nbytes / 2**20


def fallback_note(optimizer):
    return f"{optimizer.householder_updates}/{optimizer.householder_updates + optimizer.cholesky_updates}"


def run_per_shape(args, device, dtype):
    print("| shape | rank | MoFaSGD ms | AdamW foreach ms | AdamW fused ms | MoFaSGD / AdamW foreach "
          "| MoFaSGD / AdamW fused | MoFaSGD state bytes | (m+n)r+r floats + step | AdamW state bytes "
          "| Householder fallbacks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m, n in parse_shapes(args.shapes):
        factories = [adamw_factory("foreach"), adamw_factory("fused")] + [mofasgd_factory(r) for r in args.ranks]
        results = time_interleaved(factories, [(m, n)], args.steps, args.warmup, device, dtype, args.seed)
        (foreach_ms, _), (fused_ms, fused) = results[:2]
        adamw_bytes = state_bytes(fused)
        for rank, (ms, opt) in zip(args.ranks, results[2:]):
            held = state_bytes(opt)
            assert held == opt.state_bytes()
            print(f"| {m}x{n} | {rank} | {ms:.2f} | {foreach_ms:.2f} | {fused_ms:.2f} "
                  f"| {ms / foreach_ms:.2f} | {ms / fused_ms:.2f} | {held:,} "
                  f"| {expected_mofasgd_bytes([(m, n)], rank, dtype):,} | {adamw_bytes:,} "
                  f"| {fallback_note(opt)} |", flush=True)
        del results


def registry_factory(name, **keys):
    """An optimizer exactly as the harness builds it from configs/optimizers/NAME.yaml's defaults."""
    spec = OPTIMIZERS[name]
    cfg = spec.config()
    for key, value in keys.items():
        if key == "rank" and hasattr(cfg, "group_params"):
            cfg.group_params.rank = value
        else:
            setattr(cfg, key, value)
    return lambda params: spec.build(params, cfg, "cpu")


def run_baselines(args, device, dtype):
    """Every optimizer of the harness at one rank, per shape, ratios against both AdamWs.

    GaLore recomputes its projector (an SVD of the gradient) every update_proj_gap steps; its
    first step does that, so 'GaLore refresh' is the first step's time, 'GaLore plain' the median
    of the others, and 'GaLore amortised' = (refresh + (gap - 1) * plain) / gap.
    """
    rank, gap = args.baseline_rank, args.galore_gap
    names = ["AdamW foreach", "AdamW fused", f"MoFaSGD r={rank}", "GaLore plain", "GaLore refresh",
             f"GaLore amortised (gap {gap})", "Muon", "Adafactor"]
    print(f"\nAll optimizers, rank {rank}: step ms (state MiB held); ratio = ms / AdamW foreach, ms / AdamW fused\n")
    print("| shape | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for m, n in parse_shapes(args.shapes):
        factories = [adamw_factory("foreach"), adamw_factory("fused"), mofasgd_factory(rank),
                     registry_factory("muon"), registry_factory("adafactor")]
        results = time_interleaved(factories, [(m, n)], args.steps, args.warmup, device, dtype, args.seed)
        galore_plain, galore_first, galore = time_galore([(m, n)], rank, gap, args.steps, device, dtype, args.seed)
        cells = {}
        for name, (ms, opt) in zip(["AdamW foreach", "AdamW fused", f"MoFaSGD r={rank}", "Muon", "Adafactor"], results):
            cells[name] = (ms, state_bytes(opt))
        held = state_bytes(galore)
        cells["GaLore plain"] = (galore_plain, held)
        cells["GaLore refresh"] = (galore_first, held)
        cells[f"GaLore amortised (gap {gap})"] = ((galore_first + (gap - 1) * galore_plain) / gap, held)
        foreach_ms, fused_ms = cells["AdamW foreach"][0], cells["AdamW fused"][0]
        row = [f"{ms:.2f} ({mib(b):.2f} MiB; {ms / foreach_ms:.2f}, {ms / fused_ms:.2f})" for ms, b in
               (cells[name] for name in names)]
        print(f"| {m}x{n} | " + " | ".join(row) + " |", flush=True)


def time_galore(shapes, rank, gap, steps, device, dtype, seed):
    """(plain step ms, first step ms incl. the projector SVD, optimizer) for GaLore."""
    params, gradients = make_problem(shapes, device, dtype, seed)
    optimizer = registry_factory("galore", rank=rank)(params)
    optimizer.param_groups[0]["update_proj_gap"] = gap + steps + 1  # only the first step refreshes
    times = []
    for i in range(steps + 1):
        times.append(timed_step(optimizer, params, gradients[i % len(gradients)], device))
    return statistics.median(times[1:]), times[0], optimizer


def run_whole_model(args, device, dtype):
    shapes = WHOLE_MODEL_SHAPES * WHOLE_MODEL_BLOCKS
    rank = args.whole_model_rank
    element_size = torch.tensor([], dtype=dtype).element_size()
    numel = sum(m * n for m, n in shapes)
    print(f"\nWhole GPT-2-small hidden set: {len(shapes)} matrices, {numel / 1e6:.1f} M params, "
          f"one optimizer each, MoFaSGD rank {rank}\n")
    names = ["AdamW foreach=True", "AdamW fused=True", f"MoFaSGD r={rank}"]
    factories = [adamw_factory("foreach"), adamw_factory("fused"), mofasgd_factory(rank)]
    if not args.no_projector_reference:
        names.append(f"MoFaSGD r={rank}, projector-forming reference")
        factories.append(mofasgd_factory(rank, ProjectorMoFaSGD))
    print("| optimizer | ms/step (median) | / AdamW foreach | / AdamW fused | / MoFaSGD "
          "| state MiB held | expected MiB |")
    print("|---|---|---|---|---|---|---|")
    results = time_interleaved(factories, shapes, args.whole_model_steps, args.warmup, device, dtype, args.seed)
    foreach_ms, fused_ms, mofasgd_ms = results[0][0], results[1][0], results[2][0]
    for name, (ms, opt) in zip(names, results):
        if isinstance(opt, MoFaSGD):
            expected = mib(expected_mofasgd_bytes(shapes, rank, dtype))
            if not isinstance(opt, ProjectorMoFaSGD):
                name += f" (Householder fallbacks {fallback_note(opt)})"
        else:
            expected = mib(2 * numel * element_size + 4 * len(shapes))
        print(f"| {name} | {ms:.1f} | {ms / foreach_ms:.2f} | {ms / fused_ms:.2f} | {ms / mofasgd_ms:.2f} "
              f"| {mib(state_bytes(opt)):.1f} | {expected:.1f} |")


def shard_bench_worker(rank, world, port, args):
    """One rank of the sharded benchmark: AdamW, MoFaSGD replicated (what plain data parallelism
    does: every rank updates every matrix) and MoFaSGD shard=True, timed interleaved."""
    import torch.distributed as dist

    torch.set_num_threads(max(1, (args.threads or os.cpu_count()) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shapes = WHOLE_MODEL_SHAPES * WHOLE_MODEL_BLOCKS
        r = args.whole_model_rank
        sharded = lambda params: MoFaSGD(params, lr=0.05, rank=r, beta=0.95, eta1=0.25, max_value=5.0, shard=True)
        factories = [adamw_factory("foreach"), mofasgd_factory(r), sharded]
        results = time_interleaved(factories, shapes, args.whole_model_steps, args.warmup, torch.device("cpu"),
                                   torch.float32, args.seed)
        mine = [(ms, state_bytes(opt), getattr(opt, "exchanged_bytes", 0)) for ms, opt in results]
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            names = ["AdamW foreach=True (replicated)", f"MoFaSGD r={r} (replicated)", f"MoFaSGD r={r} shard=True"]
            print(f"\nWhole GPT-2-small hidden set on {world} gloo ranks, {torch.get_num_threads()} thread(s) each, "
                  f"median of {args.whole_model_steps} steps; per rank: the slowest rank's time, the largest state\n")
            print("| optimizer | ms/step (slowest rank) | / AdamW | state MiB per rank | step factors all-gathered, MiB per rank |")
            print("|---|---|---|---|---|")
            adamw_ms = max(per_rank[0][0] for per_rank in everyone)
            for i, name in enumerate(names):
                ms = max(per_rank[i][0] for per_rank in everyone)
                state = max(per_rank[i][1] for per_rank in everyone)
                sent = max(per_rank[i][2] for per_rank in everyone)
                print(f"| {name} | {ms:.1f} | {ms / adamw_ms:.2f} | {mib(state):.1f} | {mib(sent):.2f} |")
    finally:
        dist.destroy_process_group()
    from worker.outcome import exit_process

    exit_process(0)  # as a torchrun worker ends: no interpreter teardown, where a late-freed gloo group can abort


def run_sharded(args):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(shard_bench_worker, args=(args.shard, port, args), nprocs=args.shard)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ranks", default="8,16,32,64,128", type=lambda s: [int(x) for x in s.split(",")],
                        help="comma-separated MoFaSGD ranks for the per-shape table")
    parser.add_argument("--shapes", default=GPT2_SMALL_SHAPES, help="comma-separated MxN list")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (includes the SVD init)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--whole-model", action="store_true", help="also time the 72-matrix hidden set")
    parser.add_argument("--whole-model-only", action="store_true", help="skip the per-shape table")
    parser.add_argument("--whole-model-rank", type=int, default=32)
    parser.add_argument("--whole-model-steps", type=int, default=10)
    parser.add_argument("--no-projector-reference", action="store_true",
                        help="whole-model table without the (slow) projector-forming MoFaSGD row")
    parser.add_argument("--baselines", action="store_true",
                        help="also time GaLore (plain, refresh, amortised), Muon and Adafactor per shape")
    parser.add_argument("--baselines-only", action="store_true", help="only the all-optimizer table")
    parser.add_argument("--baseline-rank", type=int, default=32)
    parser.add_argument("--shard", type=int, default=0, metavar="N",
                        help="only the hidden set on N gloo ranks (CPU): replicated vs shard=True MoFaSGD")
    parser.add_argument("--galore-gap", type=int, default=75, help="GaLore update_proj_gap for the amortised column")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"torch {torch.__version__}, device {args.device} ({machine}), threads {torch.get_num_threads()}, "
          f"{args.dtype}; per-shape: median of {args.steps} steps, whole model: median of "
          f"{args.whole_model_steps} steps; {args.warmup} warmup steps first (they include the SVD init)\n")
    if args.shard:
        if device.type != "cpu":
            parser.error("--shard runs on CPU (gloo); on GPUs use run.py with optimizer.shard true")
        run_sharded(args)  # (no OtherLoad line: the ranks themselves are other processes)
        return
    if args.baselines or args.baselines_only:
        with OtherLoad() as load:
            run_baselines(args, device, dtype)
        print(f"\nOther processes used {load.cores()} cores on average during this table.")
        if args.baselines_only:
            return
    if not args.whole_model_only:
        with OtherLoad() as load:
            run_per_shape(args, device, dtype)
        print(f"\nOther processes used {load.cores()} cores on average during this table.")
    if args.whole_model or args.whole_model_only:
        with OtherLoad() as load:
            run_whole_model(args, device, dtype)
        print(f"\nOther processes used {load.cores()} cores on average during this table.")


if __name__ == "__main__":
    main()
