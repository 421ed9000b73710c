"""logging.spectrum_every / spectrum_shadow on several ranks (2 gloo ranks, fp64): under FSDP2 every
quantity comes from all-reduced row sums and rank-0 gathers, and equals a dense fp64 reference
(rows split unevenly) and the DDP run's spectrum.jsonl; optimizer.shard (owners) equals DDP too; the
row-sharded shadow momentum resumes from a distributed checkpoint exactly (and is dropped when a
resume turns it off). docs/spectrum.md, "Under DDP, FSDP and shard"."""

import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from helpers import end_spawned_rank, tiny_overrides, train_in_process, write_run_config, write_tiny_corpus

WORLD, STEPS, EVERY = 2, 4, 2
SHAPES = [(7, 5), (6, 9)]  # 7 rows split 4 + 3 over 2 ranks: uneven shards
RANK = 2


# ---------------------------------------------------------------------------------------------
# The monitor on row-sharded DTensors against a dense fp64 reference


def recorded(call, sent):
    """Runs call() with every torch.distributed collective recorded in `sent` as (name, numbers this
    rank sends); returns (its result, the number of collectives torch's CommDebugMode saw)."""
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode

    originals = {name: getattr(dist, name) for name in ("all_reduce", "gather", "all_gather", "broadcast",
                                                         "reduce_scatter", "all_gather_into_tensor")}

    def recording(name):
        def run(tensor, *args, **kwargs):
            sent.append((name, tensor.numel()))
            return originals[name](tensor, *args, **kwargs)
        return run

    try:
        for name in originals:
            setattr(dist, name, recording(name))
        with CommDebugMode() as comm:
            result = call()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return result, comm.get_total_counts()


def row_sharded_worker(rank, world, port, out):
    """MoFaSGD (ema, a beta that changes every step) and AdamW on Shard(0) DTensor matrices with the
    monitor on every rank; rank 0 returns its lines and the whole gradients and factors of each step,
    and the collectives of the last step's after_step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from mofasgd import MoFaSGD
    from worker.spectrum import SpectrumMonitor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)  # the same draws on every rank
    weights = [torch.randn(s, dtype=torch.float64, generator=gen) for s in SHAPES]

    def rows(t):
        return distribute_tensor(t, mesh, [Shard(0)])

    def whole(state):
        return {k: state[k].full_tensor() if k == "U" else state[k].clone() for k in ("U", "S", "V")} if state else None

    params = [torch.nn.Parameter(rows(W)) for W in weights]
    opt = MoFaSGD(params, lr=0.05, rank=RANK, momentum="ema")
    monitor = SpectrumMonitor([(f"w{i}", p) for i, p in enumerate(params)], opt, every=1, shadow=True, path=None)
    adam_params = [torch.nn.Parameter(rows(W)) for W in weights]
    adam = torch.optim.AdamW(adam_params, lr=0.01)
    adam_monitor = SpectrumMonitor([(f"w{i}", p) for i, p in enumerate(adam_params)], adam, every=1, shadow=False,
                                   path=None)
    steps = []
    for step in range(3):
        beta = 0.7 + 0.05 * step
        for group in opt.param_groups:
            group["beta"] = beta
        grads = [torch.randn(s, dtype=torch.float64, generator=gen) for s in SHAPES]
        for p, q, G in zip(params, adam_params, grads):
            p.grad, q.grad = rows(G), rows(G)
        before = [whole(opt.state.get(p)) for p in params]
        monitor.before_step(step)
        opt.step()
        sent, adam_sent = [], []
        line, counted = recorded(lambda: monitor.after_step(step), sent)
        adam.step()
        adam_line, adam_counted = recorded(lambda: adam_monitor.after_step(step), adam_sent)
        steps.append({"beta": beta, "grads": grads, "before": before, "after": [whole(opt.state[p]) for p in params],
                      "line": line, "adam_line": adam_line, "sent": (sent, counted), "adam_sent": (adam_sent, adam_counted),
                      "exp_avg": [adam.state[q]["exp_avg"].full_tensor() for q in adam_params]})
    out[rank] = {"weights": weights, "steps": steps, "shadow_rows": [m.shape[0] for m in monitor.shadows.values()]}
    dist.destroy_process_group()
    end_spawned_rank()


@pytest.fixture(scope="module")
def row_sharded():
    from test_multinode import free_port

    out = mp.Manager().dict()
    mp.start_processes(row_sharded_worker, args=(WORLD, free_port(), out), nprocs=WORLD, start_method="spawn")
    return out[0], out[1]


def dense_tangent(G, U, V):
    PU, PV = U @ U.T, V @ V.T
    return PU @ G + G @ PV - PU @ G @ PV


def shares(M):
    """The top-k shares of energy_top, from numpy's SVD."""
    import numpy as np

    s2 = np.linalg.svd(M.numpy(), compute_uv=False) ** 2
    side = min(M.shape)
    ks = {"8": min(8, side), "16": min(16, side), "32": min(32, side), "64": min(64, side),
          "1/4": max(1, side // 4), "1/2": max(1, side // 2)}
    return {key: s2[:k].sum() / s2.sum() for key, k in ks.items()}


@pytest.mark.slow  # spawns 2 processes
def test_row_sharded_values_equal_the_dense_fp64_reference(row_sharded):
    """Each value rank 0 logs, from all-reduced row sums (G, U split 4 + 3 rows) and rank-0 gathers,
    against the projections formed as m x n matrices, the SVD of beta M + (1 - beta) G_hat, a dense
    shadow momentum and numpy's SVD of the gathered matrices."""
    first, second = row_sharded
    assert first["shadow_rows"] == [4, 3] and second["shadow_rows"] == [3, 3]  # each rank keeps its rows
    shadows = []
    for W in first["weights"]:  # M_0: the weight's rank-r truncated SVD (init weight_svd)
        u, s, vh = torch.linalg.svd(W, full_matrices=False)
        shadows.append((u[:, :RANK] * s[:RANK]) @ vh[:RANK])
    checked = 0
    for step in first["steps"]:
        beta = step["beta"]
        for i, G in enumerate(step["grads"]):
            got = step["line"]["matrices"][f"w{i}"]
            old, new = step["before"][i], step["after"][i]
            shadows[i] = beta * shadows[i] + (1 - beta) * G
            M = shadows[i]
            factors = (new["U"] * new["S"]) @ new["V"].T
            assert got["shadow_error"] == pytest.approx(float((M - factors).norm() / M.norm()), abs=1e-12)
            for key, value in shares(M).items():
                assert got["shadow_energy_top"][key] == pytest.approx(value, abs=1e-12)
            assert got["singular_values"] == pytest.approx(new["S"].tolist(), abs=1e-14)
            if old is None:  # the first step: the factors were made by it, nothing was projected
                assert "tangent_energy" not in got and got["overlap_u"] is None
                continue
            U, V = old["U"], old["V"]
            total = (G ** 2).sum()
            dense = {"left_energy": U @ U.T @ G, "right_energy": G @ V @ V.T, "twosided_energy": U @ U.T @ G @ V @ V.T,
                     "tangent_energy": dense_tangent(G, U, V)}
            for key, projected in dense.items():
                assert got[key] == pytest.approx(float((projected ** 2).sum() / total), abs=1e-12), key
            s = torch.linalg.svdvals(beta * (U * old["S"]) @ V.T + (1 - beta) * dense_tangent(G, U, V))
            assert got["truncation_energy"] == pytest.approx(float((s[:RANK] ** 2).sum() / (s ** 2).sum()), abs=1e-12)
            assert got["overlap_u"] == pytest.approx(float((new["U"].T @ U).square().sum() / RANK), abs=1e-12)
            assert got["overlap_v"] == pytest.approx(float((new["V"].T @ V).square().sum() / RANK), abs=1e-12)
            checked += 1
        for i, exp_avg in enumerate(step["exp_avg"]):  # AdamW's momentum, gathered to rank 0
            for key, value in shares(exp_avg).items():
                assert step["adam_line"]["matrices"][f"w{i}"]["momentum_energy_top"][key] == pytest.approx(value, abs=1e-12)
        assert step["adam_line"]["matrices"] and not second["steps"][0]["adam_line"]["matrices"]  # rank 0's alone
    assert checked == 4  # 2 matrices x the 2 steps that projected on existing factors
    # what a logged step sends (docs/spectrum.md): one all-reduce of 2 + r n + r^2 + r^2 + 2 numbers
    # per matrix (||G||^2, ||G V||^2, U^T G, U^T G V, U_new^T U_old, the shadow's two norms), then
    # one gather to rank 0 per matrix of ceil(m / world) x n numbers (the shadow; AdamW: exp_avg).
    # Nothing else: CommDebugMode sees as many collectives as were recorded.
    gathers = [("gather", -(-m // WORLD) * n) for m, n in SHAPES]
    for step in (first["steps"][-1], second["steps"][-1]):
        assert step["sent"] == ([("all_reduce", sum(2 + RANK * n + 2 * RANK ** 2 + 2 for _, n in SHAPES))] + gathers,
                                1 + len(SHAPES))
        assert step["adam_sent"] == (gathers, len(SHAPES))
    # the row sums are every rank's: rank 1's energies are rank 0's
    for a, b in zip(first["steps"], second["steps"]):
        for name, matrix in a["line"]["matrices"].items():
            for key in ("tangent_energy", "truncation_energy", "overlap_u", "shadow_error"):
                assert matrix.get(key) == b["line"]["matrices"][name].get(key)


# ---------------------------------------------------------------------------------------------
# The harness's runs: FSDP and shard against DDP, and the resume of the row-sharded shadow

CASES = {  # name: (optimizer, optimizer keys, train.parallel, spectrum_shadow)
    "mfsgd-ddp": ("mfsgd", {"rank": 4}, "ddp", True),
    "mfsgd-fsdp": ("mfsgd", {"rank": 4}, "fsdp", True),
    "mfsgd-shard": ("mfsgd", {"rank": 4, "shard": True}, "ddp", True),
    "adamw-ddp": ("adamw", {}, "ddp", False),
    "adamw-fsdp": ("adamw", {}, "fsdp", False),
    "muon-ddp": ("muon", {"shard": False}, "ddp", False),
    "muon-shard": ("muon", {"shard": True}, "ddp", False),
    # sketch modes: no m x n gradient; the spectrum comes from the (reduced) sketches, no shadow
    "mfsgd-sketch-ddp": ("mfsgd", {"rank": 4, "memory_mode": "sketch", "comm": "sketch"}, "ddp", False),
    "mfsgd-comm-sketch": ("mfsgd", {"rank": 4, "comm": "sketch"}, "ddp", False),
    "mfsgd-sketch-fsdp": ("mfsgd", {"rank": 4, "memory_mode": "sketch"}, "fsdp", False),
}
SAME_AS = {"mfsgd-fsdp": "mfsgd-ddp", "mfsgd-shard": "mfsgd-ddp", "adamw-fsdp": "adamw-ddp", "muon-shard": "muon-ddp"}


def write_run(root, name):
    optimizer, keys, parallel, shadow = CASES[name]
    data = write_tiny_corpus(os.path.join(root, "corpus"))
    overrides = tiny_overrides(data, steps=STEPS, batch_size=8, micro_batch_size=2)
    overrides["train"].update(parallel=parallel, ckpt_every=2, keep_checkpoints=3)
    overrides["optimizer"] = keys
    overrides["logging"].update(spectrum_every=EVERY, spectrum_shadow=shadow)
    return write_run_config(root, name, optimizer, overrides, WORLD, distributed=True)


def spectrum(run_dir):
    with open(os.path.join(run_dir, "spectrum.jsonl")) as f:
        return [json.loads(line) for line in f]


def numbers(value, path=""):
    """{path: number} of a line's values (nested dicts and lists flattened)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{path}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in numbers(item, f"{path}/{i}").items()}
    return {path: value}


def assert_same_lines(got, expected, tolerance, skip=("shadow_bytes",)):
    assert [line["step"] for line in got] == [line["step"] for line in expected]
    for a, b in zip(got, expected):
        a, b = numbers({k: v for k, v in a.items() if k not in skip}), numbers({k: v for k, v in b.items() if k not in skip})
        assert set(a) == set(b)
        for key in b:
            if isinstance(b[key], float):
                assert abs(a[key] - b[key]) <= tolerance, (key, a[key], b[key])
            else:
                assert a[key] == b[key], key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("spectrum-fsdp"))
    dirs = {name: write_run(root, name) for name in CASES}
    train_in_process(list(dirs.values()), WORLD, dtype=torch.float64)
    return dirs


@pytest.mark.slow
def test_fsdp_and_shard_log_what_ddp_logs(runs):
    """The same seed and data in fp64: FSDP's all-reduced row sums and gathers, and shard's owners,
    give DDP's spectrum.jsonl to 1e-10 (measured: ~1e-15), for MoFaSGD with its shadow, AdamW and
    Muon; each FSDP rank holds half the shadow, each shard rank its own matrices' shadows."""
    for name, reference in SAME_AS.items():
        got, expected = spectrum(runs[name]), spectrum(runs[reference])
        assert [line["step"] for line in got] == [EVERY, STEPS] and len(got[-1]["matrices"]) == 8
        assert_same_lines(got, expected, 1e-10)
    whole = spectrum(runs["mfsgd-ddp"])[-1]["shadow_bytes"]
    assert whole == 8 * 2 * (96 * 32 + 32 * 32 + 128 * 32 + 32 * 128)  # fp64, 2 layers
    assert spectrum(runs["mfsgd-fsdp"])[-1]["shadow_bytes"] == whole // 2  # rank 0's rows
    assert 0 < spectrum(runs["mfsgd-shard"])[-1]["shadow_bytes"] < whole  # rank 0's matrices
    assert all(line["shadow_since"] == 0 for line in spectrum(runs["mfsgd-fsdp"]))


@pytest.mark.slow
def test_sketch_modes_log_what_the_sketches_determine(runs):
    """Under DDP with sketch comm (memory_mode sketch or full) and under FSDP with memory_mode sketch,
    the monitor reads the reduced sketches (FSDP: each rank's row partials, all-reduced): truncation
    energy, overlaps, singular values and the squared projection norms equal DDP's full-mode values
    to fp64 rounding; the shares of ||G||^2 and grad_sq, which no sketch determines, are None."""
    shadow = {"shadow_error", "shadow_energy_top"}
    unknown = {"grad_sq", "left_energy", "right_energy", "twosided_energy", "tangent_energy"}
    reference = spectrum(runs["mfsgd-ddp"])
    for name in ("mfsgd-sketch-ddp", "mfsgd-comm-sketch", "mfsgd-sketch-fsdp"):
        got = spectrum(runs[name])
        assert [line["step"] for line in got] == [EVERY, STEPS] and all("shadow_since" not in x for x in got)
        for a, b in zip(got, reference):
            assert a["matrices"].keys() == b["matrices"].keys() and len(a["matrices"]) == 8
            for matrix, expected in b["matrices"].items():
                entry = a["matrices"][matrix]
                assert set(entry) == set(expected) - shadow, (name, matrix)
                assert all(entry[k] is None for k in unknown)
                for key in set(entry) - unknown:
                    assert entry[key] == pytest.approx(expected[key], rel=1e-8, abs=1e-12), (name, matrix, key)


@pytest.mark.slow
def test_the_row_sharded_shadow_resumes_from_a_distributed_checkpoint(runs, tmp_path):
    """The FSDP MoFaSGD run resumed from its step-2 DCP checkpoint (its shadow saved as row-sharded
    DTensors) logs the uninterrupted run's lines again, bit for bit; resumed with the shadow off, it
    ignores the saved shadow and logs the same values without it. The shard run's owners' shadows,
    gathered into its file checkpoint, resume bit for bit too."""
    shard = str(tmp_path / "shard")
    shutil.copytree(runs["mfsgd-shard"], shard)
    for suffix in (".pt", ".manifest.json"):
        os.remove(os.path.join(shard, "checkpoints", f"step_{STEPS:07d}{suffix}"))
    copies = {}
    for shadow in (True, False):
        copy = copies[shadow] = str(tmp_path / f"shadow-{shadow}")
        shutil.copytree(runs["mfsgd-fsdp"], copy)
        shutil.rmtree(os.path.join(copy, "checkpoints", f"step_{STEPS:07d}"))
        with open(os.path.join(copy, "config.json")) as f:
            cfg = json.load(f)
        cfg["logging"]["spectrum_shadow"] = shadow  # a logging key: the resume may change it
        with open(os.path.join(copy, "config.json"), "w") as f:
            json.dump(cfg, f)
    assert torch.load(os.path.join(copies[True], "checkpoints", f"step_{EVERY:07d}", "meta.pt"),
                      weights_only=True)["spectrum_shadow"] == {"since": 0}
    train_in_process([*copies.values(), shard], WORLD, resume=True, dtype=torch.float64)
    assert spectrum(shard) == spectrum(runs["mfsgd-shard"])
    original = spectrum(runs["mfsgd-fsdp"])
    assert spectrum(copies[True]) == original  # bit for bit, shadow_error included
    without = spectrum(copies[False])
    assert without[0] == original[0]  # the line before the checkpoint is kept
    shadow_keys = {"shadow_error", "shadow_energy_top"}
    assert not shadow_keys & set(next(iter(without[1]["matrices"].values())))
    for name, matrix in without[1]["matrices"].items():
        assert matrix == {k: v for k, v in original[1]["matrices"][name].items() if k not in shadow_keys}
    meta = torch.load(os.path.join(copies[False], "checkpoints", f"step_{STEPS:07d}", "meta.pt"), weights_only=True)
    assert "spectrum_shadow" not in meta  # its checkpoints hold no shadow
