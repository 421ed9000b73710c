"""logging.spectrum_every / spectrum_shadow: every logged quantity against a dense fp64 reference
(the projections formed as m x n matrices, the SVD of beta M + G_hat), the shadow momentum equal
to the factors at full rank, and off meaning no monitor at all."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from worker.fileio import keep_lines_up_to
from worker.spectrum import (SpectrumMonitor, energies_from_sums, energy_top, overlap_from_sum,
                             overlap_partial, projection_energies, projection_partials, shadow_error_from_sums,
                             shadow_partials, sketch_partials, subspace_overlap, truncation_energy)


def orthonormal(rows, cols, generator):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator))
    return q


def dense_tangent(G, U, V):
    PU, PV = U @ U.T, V @ V.T
    return PU @ G + G @ PV - PU @ G @ PV


@pytest.mark.parametrize("m,n,r", [(12, 9, 3), (9, 12, 3), (10, 10, 5)])
def test_projection_energies_equal_the_dense_projections(m, n, r):
    g = torch.Generator().manual_seed(m * n + r)
    G, U, V = torch.randn(m, n, dtype=torch.float64, generator=g), orthonormal(m, r, g), orthonormal(n, r, g)
    got = projection_energies(G, U, V)
    total = (G ** 2).sum()
    assert got["tangent_energy"] == pytest.approx(float((dense_tangent(G, U, V) ** 2).sum() / total), abs=1e-12)
    assert got["left_energy"] == pytest.approx(float(((U @ U.T @ G) ** 2).sum() / total), abs=1e-12)
    assert got["right_energy"] == pytest.approx(float(((G @ V @ V.T) ** 2).sum() / total), abs=1e-12)
    assert got["twosided_energy"] == pytest.approx(float(((U @ U.T @ G @ V @ V.T) ** 2).sum() / total), abs=1e-12)
    # the paper's ordering (Theorem 4.3): the tangent projection keeps at least what either side keeps
    assert got["tangent_energy"] >= max(got["left_energy"], got["right_energy"]) - 1e-12
    assert min(got["left_energy"], got["right_energy"]) >= got["twosided_energy"] - 1e-12
    full = projection_energies(G, orthonormal(m, min(m, n), g), orthonormal(n, min(m, n), g))
    assert full["tangent_energy"] == pytest.approx(1.0, abs=1e-12)  # full-rank factors keep everything


def test_row_blocks_sum_to_the_whole_matrix_values():
    """FSDP's way (tests/test_spectrum_fsdp.py runs it on 2 ranks): the row sums of uneven row blocks
    of G, U and the shadow, added up, give the whole matrix's energies, overlap and shadow error,
    equal to the dense fp64 definitions (projections formed as m x n matrices)."""
    g = torch.Generator().manual_seed(11)
    m, n, r = 11, 7, 3
    G, U, V, U_new = (torch.randn(m, n, dtype=torch.float64, generator=g), orthonormal(m, r, g), orthonormal(n, r, g),
                      orthonormal(m, r, g))
    M, F = torch.randn(m, n, dtype=torch.float64, generator=g), torch.randn(m, n, dtype=torch.float64, generator=g)
    blocks = [slice(0, 5), slice(5, 9), slice(9, 11), slice(11, 11)]  # uneven, one empty (a rank without rows)
    parts = [{**projection_partials(G[b], U[b], V), "overlap_u": overlap_partial(U_new[b], U[b]),
              **shadow_partials(M[b], F[b])} for b in blocks]
    sums = {key: sum(part[key] for part in parts) for key in parts[0]}
    got = energies_from_sums(sums)
    total = (G ** 2).sum()
    assert got["tangent_energy"] == pytest.approx(float((dense_tangent(G, U, V) ** 2).sum() / total), abs=1e-12)
    assert got["left_energy"] == pytest.approx(float(((U @ U.T @ G) ** 2).sum() / total), abs=1e-12)
    assert got["right_energy"] == pytest.approx(float(((G @ V @ V.T) ** 2).sum() / total), abs=1e-12)
    assert got["twosided_energy"] == pytest.approx(float(((U @ U.T @ G @ V @ V.T) ** 2).sum() / total), abs=1e-12)
    whole = projection_energies(G, U, V)
    assert all(got[k] == pytest.approx(whole[k], abs=1e-14) for k in ("left_energy", "tangent_energy"))
    assert overlap_from_sum(sums["overlap_u"]) == pytest.approx(subspace_overlap(U_new, U), abs=1e-14)
    assert shadow_error_from_sums(sums) == pytest.approx(float((M - F).norm() / M.norm()), abs=1e-14)


def test_the_sketches_give_the_squared_norms_but_no_share():
    """sketch_partials (from G V, G^T U, U^T G V): the four squared projection norms equal the dense
    ones; ||G||^2 is not in the sketches, so every share is None; summed over row blocks (FSDP's
    local_row_sketches) they equal the whole matrix's."""
    from mofasgd.factors import gradient_sketches
    from mofasgd.row_sharded import local_row_sketches

    g = torch.Generator().manual_seed(5)
    m, n, r = 14, 9, 3
    U, V = orthonormal(m, r, g), orthonormal(n, r, g)
    G = torch.randn(m, n, dtype=torch.float64, generator=g)
    got = energies_from_sums(sketch_partials(*gradient_sketches(G, U, V)))
    full = energies_from_sums(projection_partials(G, U, V))
    assert got["tangent_sq"] == pytest.approx(float((dense_tangent(G, U, V) ** 2).sum()), rel=1e-12)
    assert got["left_sq"] == pytest.approx(float(((U.T @ G) ** 2).sum()), rel=1e-12)
    assert got["right_sq"] == pytest.approx(float(((G @ V) ** 2).sum()), rel=1e-12)
    assert got["twosided_sq"] == pytest.approx(float(((U.T @ G @ V) ** 2).sum()), rel=1e-12)
    assert full["grad_sq"] == pytest.approx(float((G ** 2).sum()), rel=1e-12)
    assert got["grad_sq"] is None and all(got[f"{k}_energy"] is None for k in ("left", "right", "twosided", "tangent"))
    assert full["tangent_energy"] == pytest.approx(full["tangent_sq"] / full["grad_sq"], rel=1e-12)
    parts = [sketch_partials(*local_row_sketches(G[rows], U[rows], V)) for rows in (slice(0, 5), slice(5, m))]
    rows = energies_from_sums({k: parts[0][k] + parts[1][k] for k in parts[0]})
    assert all(rows[k] == pytest.approx(got[k], rel=1e-12) for k in ("left_sq", "right_sq", "twosided_sq", "tangent_sq"))


@pytest.mark.parametrize("momentum", ["sum", "ema"])
def test_sketch_memory_mode_logs_full_modes_values_but_the_shares(momentum):
    """memory_mode sketch, two micro-batches folded by the backward hooks: the monitor reads the
    optimizer's pending sketches (MoFaSGD.pending_sketches, equal to the dense sketches of the summed
    gradient). Truncation energy, overlaps, singular values and the squared projection norms equal
    full mode's to fp64 rounding; the shares of ||G||^2 are None (no m x n gradient is held)."""
    from mofasgd import MoFaSGD
    from mofasgd.factors import gradient_sketches

    lines = {}
    for mode in ("full", "sketch"):
        g = torch.Generator().manual_seed(11)
        weights = [torch.nn.Parameter(torch.randn(m, n, dtype=torch.float64, generator=g)) for m, n in ((12, 9), (8, 10))]
        batches = [[(torch.randn(w.shape[1], 5, dtype=torch.float64, generator=g),
                     torch.randn(w.shape[0], 5, dtype=torch.float64, generator=g)) for w in weights] for _ in range(6)]
        opt = MoFaSGD(weights, lr=0.05, rank=3, beta=0.9, momentum=momentum, memory_mode=mode)
        monitor = SpectrumMonitor([(f"w{i}", w) for i, w in enumerate(weights)], opt, every=1, shadow=False, path=None)
        lines[mode] = []
        for step in range(3):
            summed = [torch.zeros_like(w) for w in weights]
            for micro in batches[2 * step: 2 * step + 2]:
                loss = sum(((w @ x - y) ** 2).sum() for w, (x, y) in zip(weights, micro))
                grads = torch.autograd.grad(loss, weights, retain_graph=True)
                summed = [a + b.detach() for a, b in zip(summed, grads)]
                loss.backward()
            if mode == "sketch" and step > 0:
                for w, G in zip(weights, summed):
                    state = opt.state[w]
                    dense = gradient_sketches(G, state["U"], state["V"])
                    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(opt.pending_sketches(w), dense))
            monitor.before_step(step)
            opt.step()
            lines[mode].append(monitor.after_step(step))
            opt.zero_grad()
    for step, (full, sketch) in enumerate(zip(lines["full"], lines["sketch"])):
        for name, expected in full["matrices"].items():
            got = sketch["matrices"][name]
            for key, value in expected.items():
                if value is None:  # full mode's first step: no factors before it to compare with
                    assert step == 0, key
                elif key == "grad_sq" or key.endswith("_energy") and key != "truncation_energy":
                    assert got[key] is None, key
                elif isinstance(value, list):
                    assert got[key] == pytest.approx(value, rel=1e-9), key
                else:
                    assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
            if step > 0:  # from the second step on, both hold the factors the step projected on
                assert set(got) == set(expected) and "tangent_sq" in got
    with pytest.raises(ValueError, match="spectrum_shadow needs the reduced m x n gradient"):
        weights = [torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))]
        opt = MoFaSGD(weights, rank=2, memory_mode="sketch")
        (weights[0] ** 2).sum().backward()
        SpectrumMonitor([("w", weights[0])], opt, every=1, shadow=True, path=None).before_step(0)


@pytest.mark.parametrize("momentum", ["sum", "ema"])
def test_truncation_energy_is_the_share_the_rank_r_update_keeps(momentum):
    """From the factors alone, equal to the dense SVD of beta M + c G_hat; and the optimizer's own
    update keeps exactly the top r of those singular values."""
    from mofasgd.factors import gradient_sketches, update_momentum_factors

    g = torch.Generator().manual_seed(7)
    m, n, r, beta = 16, 11, 3, 0.8
    U, V = orthonormal(m, r, g), orthonormal(n, r, g)
    S = torch.sort(torch.rand(r, dtype=torch.float64, generator=g) * 3, descending=True).values
    G = torch.randn(m, n, dtype=torch.float64, generator=g)
    scale = 1.0 if momentum == "sum" else 1 - beta
    s = torch.linalg.svdvals(beta * (U * S) @ V.T + scale * dense_tangent(G, U, V))
    _, S_new, _ = update_momentum_factors(U, S, V, *gradient_sketches(G, U, V), beta, momentum)
    assert torch.allclose(S_new, s[:r], atol=1e-12)
    energies = projection_energies(G, U, V)
    got = truncation_energy(S, S_new, energies["core"], energies["tangent_sq"], beta, scale)
    assert got == pytest.approx(float((s[:r] ** 2).sum() / (s ** 2).sum()), abs=1e-12)
    assert 0 < got <= 1


def test_subspace_overlap_and_energy_top():
    g = torch.Generator().manual_seed(3)
    U = orthonormal(10, 4, g)
    assert subspace_overlap(U, U @ orthonormal(4, 4, g)) == pytest.approx(1.0, abs=1e-12)  # same span, rotated
    W = orthonormal(10, 4, g)
    W = W - U @ (U.T @ W)  # orthogonal to span(U)
    assert subspace_overlap(U, torch.linalg.qr(W)[0]) == pytest.approx(0.0, abs=1e-12)
    M = torch.randn(40, 100, dtype=torch.float64, generator=g)
    s2 = np.linalg.svd(M.numpy(), compute_uv=False) ** 2
    top = energy_top(M)
    assert set(top) == {"8", "16", "32", "64", "1/4", "1/2"}
    for key, k in {"8": 8, "16": 16, "32": 32, "64": 40, "1/4": 10, "1/2": 20}.items():  # 64 capped at min(m, n)
        assert top[key] == pytest.approx(s2[:k].sum() / s2.sum(), abs=1e-12)


@pytest.mark.parametrize("init,momentum", [("weight_svd", "sum"), ("zero", "ema")])
def test_the_shadow_equals_the_factors_at_full_rank(tmp_path, init, momentum):
    """At rank = min(m, n) the tangent projection is the identity and the truncation keeps all: the
    factors are the full momentum, so the shadow kept beside them differs by rounding only, with
    the beta of each step (a schedule) and the optimizer's own M_0. Below full rank it differs."""
    from mofasgd import MoFaSGD

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(5, 5, dtype=torch.float64))]
    for rank, full in ((6, True), (2, False)):
        model_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = MoFaSGD(model_params, lr=0.01, rank=rank, init=init, momentum=momentum)
        named = [(f"w{i}", p) for i, p in enumerate(model_params)]
        path = str(tmp_path / f"spectrum-{rank}.jsonl")
        monitor = SpectrumMonitor(named, opt, every=1, shadow=True, path=path)
        for step in range(5):
            for group in opt.param_groups:
                group["beta"] = 0.6 + 0.05 * step  # the step's beta, as BetaWarmup sets it
            for p in model_params:
                p.grad = torch.randn_like(p)
            monitor.before_step(step)
            opt.step()
            line = monitor.after_step(step)
            errors = [m["shadow_error"] for m in line["matrices"].values()]
            assert (max(errors) < 1e-12) if full else (min(errors) > 1e-6), (rank, step, errors)
        assert line["shadow_bytes"] == (6 * 4 + 5 * 5) * 8
        lines = [json.loads(x) for x in open(path)]
        assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]


def test_keep_lines_up_to_drops_what_a_resume_redoes(tmp_path):
    path = tmp_path / "spectrum.jsonl"
    path.write_text("".join(json.dumps({"step": s, "matrices": {}}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "ma')
    keep_lines_up_to(str(path), 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [2, 4]


@pytest.mark.parametrize("overrides,message", [
    ({"logging": {"spectrum_every": -1}}, "logging.spectrum_every must be >= 0"),
    ({"logging": {"spectrum_shadow": True}}, "logging.spectrum_shadow needs logging.spectrum_every > 0"),
    ({"logging": {"spectrum_every": 5, "spectrum_shadow": True}, "memory_mode": "sketch"},
     "logging.spectrum_shadow does not run with optimizer.memory_mode sketch"),
    ({"logging": {"spectrum_every": 5, "spectrum_shadow": True}, "memory_mode": "sketch", "train": {"parallel": "fsdp"}},
     "logging.spectrum_shadow does not run with optimizer.memory_mode sketch"),
    ({"logging": {"spectrum_every": 5, "spectrum_shadow": True}, "comm": "sketch"},
     "logging.spectrum_shadow does not run with optimizer.comm sketch"),
])
def test_the_config_refuses_what_the_monitor_cannot_read(overrides, message):
    from configs import ConfigError, resolve_config

    with pytest.raises(ConfigError, match=message):
        resolve_config("mfsgd", overrides)
    with pytest.raises(ConfigError, match="logging.spectrum_shadow is for MoFaSGD"):
        resolve_config("adamw", {"logging": {"spectrum_every": 5, "spectrum_shadow": True}})


def test_the_config_accepts_fsdp_shard_and_sketch_modes():
    from configs import resolve_config

    logging = {"logging": {"spectrum_every": 5, "spectrum_shadow": True}}
    two = dict(nproc=2, world_size=2)
    for optimizer, overrides in (("mfsgd", {"train": {"parallel": "fsdp"}, **logging}),
                                 ("mfsgd", {"shard": True, **logging}),
                                 ("adamw", {"train": {"parallel": "fsdp"}, "logging": {"spectrum_every": 5}}),
                                 ("muon", {"shard": True, "logging": {"spectrum_every": 5}}),
                                 ("mfsgd", {"memory_mode": "sketch", "comm": "sketch", "logging": {"spectrum_every": 5}}),
                                 ("mfsgd", {"comm": "sketch", "logging": {"spectrum_every": 5}}),
                                 ("mfsgd", {"memory_mode": "sketch", "train": {"parallel": "fsdp"},
                                            "logging": {"spectrum_every": 5}})):
        overrides.setdefault("train", {})["micro_batch_size"] = 4
        assert resolve_config(optimizer, overrides, launch=two).logging.spectrum_every == 5


@pytest.mark.slow  # trains in spawned processes
def test_a_run_logs_its_spectrum_and_off_logs_nothing(tmp_path):
    from helpers import read_metrics, tiny_overrides, train_in_process, write_run_config, write_tiny_corpus

    data = write_tiny_corpus(str(tmp_path / "corpus"))
    dirs = {}
    for name, optimizer, logging in (("mf", "mfsgd", {"spectrum_every": 2, "spectrum_shadow": True}),
                                     ("adam", "adamw", {"spectrum_every": 2}), ("off", "mfsgd", {})):
        overrides = tiny_overrides(data, steps=4, rank=4)
        if optimizer != "mfsgd":
            overrides.pop("rank")
        overrides["logging"].update(logging)
        dirs[name] = write_run_config(tmp_path, name, optimizer, overrides)
    train_in_process(list(dirs.values()), 1)
    lines = [json.loads(x) for x in open(os.path.join(dirs["mf"], "spectrum.jsonl"))]
    assert [x["step"] for x in lines] == [2, 4] and len(lines[0]["matrices"]) == 8  # 2 layers x 4 matrices
    first = next(iter(lines[-1]["matrices"].values()))
    for key in ("tangent_energy", "left_energy", "right_energy", "twosided_energy", "truncation_energy",
                "overlap_u", "overlap_v", "singular_values", "shadow_error", "shadow_energy_top"):
        assert key in first, key
    assert len(first["singular_values"]) == 4
    shadow = read_metrics(dirs["mf"])[1]["spectrum_shadow_bytes"]
    assert shadow == lines[-1]["shadow_bytes"] == 4 * 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)
    adam = [json.loads(x) for x in open(os.path.join(dirs["adam"], "spectrum.jsonl"))]
    assert set(next(iter(adam[-1]["matrices"].values()))) == {"momentum_energy_top"}
    assert not os.path.exists(os.path.join(dirs["off"], "spectrum.jsonl"))
    assert all("spectrum_shadow_bytes" not in m for m in read_metrics(dirs["off"]))
    # the figures and the table, the runs side by side
    from scripts import spectrum as report

    out = tmp_path / "report"
    assert report.main([str(tmp_path), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["drift.png", "energy.png", "spectrum.md", "tangent.png"]
    table = (out / "spectrum.md").read_text()
    assert "| mf | 4 | attn qkv | 2 |" in table and "| adam | 4 | mlp in | 2 |" in table and "| off |" not in table


def test_the_report_takes_sketch_mode_lines(tmp_path):
    """A sketch-mode run's lines (shares of ||G||^2 None): no tangent heatmap, "-" in their table
    cells, the values the sketches give (truncation energy) shown."""
    from scripts import spectrum as report

    entry = {"singular_values": [2.0, 1.0], "overlap_u": 0.9, "overlap_v": 0.8, "truncation_energy": 0.97,
             "tangent_energy": None, "left_energy": None, "right_energy": None, "twosided_energy": None,
             "grad_sq": None, "left_sq": 1.0, "right_sq": 2.0, "twosided_sq": 0.5, "tangent_sq": 2.5}
    lines = [{"step": s, "matrices": {"transformer.h.0.attn.c_attn.weight": entry}} for s in (2, 4)]
    assert report.plot_tangent({"sketch": lines}, str(tmp_path)) is False
    row = next(x for x in report.table({"sketch": lines}, None).splitlines() if x.startswith("| sketch"))
    cells = [c.strip() for c in row.split("|")[5:-1]]
    assert cells[:4] == ["-"] * 4 and cells[4] == "0.970"  # tangent, left, right, two-sided; truncation


def test_layer_types_of_both_architectures():
    from scripts.spectrum import layer_type

    assert [layer_type(n) for n in ("transformer.h.0.attn.c_attn.weight", "transformer.h.3.attn.c_proj.weight",
                                    "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
                                    "blocks.2.attn.c_q.weight", "blocks.2.attn.c_k.weight", "blocks.2.attn.c_v.weight")] \
        == ["attn qkv", "attn out", "mlp in", "mlp out", "attn q", "attn k", "attn v"]


@pytest.mark.slow  # trains in spawned processes
def test_a_resume_continues_the_shadow_exactly(tmp_path):
    """A run with the shadow, resumed from its step-2 checkpoint, logs the uninterrupted run's lines
    bit for bit (the shadow is in the checkpoint). The rule for turning it on or off across a
    resume: from a checkpoint without a shadow, a new one starts from the factors at the resume
    step (shadow_since 2) and only the shadow's values differ; with it turned off, the saved one is
    ignored, the lines lack it and the new checkpoints hold none."""
    from helpers import reseal_checkpoint, tiny_overrides, train_in_process, write_run_config, write_tiny_corpus

    overrides = tiny_overrides(write_tiny_corpus(str(tmp_path / "corpus")), steps=6, rank=4)
    overrides["train"].update(ckpt_every=2, keep_checkpoints=3)
    overrides["logging"].update(spectrum_every=2, spectrum_shadow=True)
    ref = write_run_config(tmp_path, "ref", "mfsgd", overrides)
    train_in_process([ref], 1)
    copies = {}
    for case in ("saved", "started", "off"):
        copy = copies[case] = str(tmp_path / case)
        shutil.copytree(ref, copy)
        for step in (4, 6):  # back to the step-2 checkpoint, as after a kill at step 3
            os.remove(os.path.join(copy, "checkpoints", f"step_{step:07d}.pt"))
            os.remove(os.path.join(copy, "checkpoints", f"step_{step:07d}.manifest.json"))
    checkpoint = os.path.join(copies["started"], "checkpoints", f"step_{2:07d}.pt")
    state = torch.load(checkpoint, weights_only=True)
    assert state.pop("spectrum_shadow")["since"] == 0
    torch.save(state, checkpoint)  # as a run with the shadow off would have written it
    reseal_checkpoint(checkpoint)
    with open(os.path.join(copies["off"], "config.json")) as f:
        cfg = json.load(f)
    cfg["logging"]["spectrum_shadow"] = False  # a logging key: a resume may change it
    with open(os.path.join(copies["off"], "config.json"), "w") as f:
        json.dump(cfg, f)
    train_in_process(list(copies.values()), 1, resume=True)

    def lines(run_dir):
        return [json.loads(x) for x in open(os.path.join(run_dir, "spectrum.jsonl"))]

    original = lines(ref)
    assert [x["step"] for x in original] == [2, 4, 6] and all(x["shadow_since"] == 0 for x in original)
    assert lines(copies["saved"]) == original
    shadow = {"shadow_error", "shadow_energy_top"}
    for case in ("started", "off"):
        got = lines(copies[case])
        assert got[0] == original[0]  # logged before the checkpoint, kept
        for a, b in zip(got[1:], original[1:], strict=True):
            for name, matrix in b["matrices"].items():
                assert {k: v for k, v in a["matrices"][name].items() if k not in shadow} == \
                    {k: v for k, v in matrix.items() if k not in shadow}
            if case == "started":
                assert a["shadow_since"] == 2 and a["shadow_bytes"] == b["shadow_bytes"]
                errors = [(a["matrices"][n]["shadow_error"], m["shadow_error"]) for n, m in b["matrices"].items()]
                assert all(x != y for x, y in errors)  # another shadow: begun at step 2, not 0
            else:
                assert "shadow_since" not in a and not shadow & set(next(iter(a["matrices"].values())))
    newest = torch.load(os.path.join(copies["off"], "checkpoints", f"step_{6:07d}.pt"), weights_only=True)
    assert "spectrum_shadow" not in newest
