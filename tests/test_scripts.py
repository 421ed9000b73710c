"""Sweep expansion, naming and resume decisions; plot and summary scripts on a synthetic results dir."""

import csv
import json
import math
import os
import sys

import pytest

from scripts import plot, summarize, sweep


def test_sweep_expansion_and_names():
    spec = {
        "name": "s",
        "config": {"train": {"steps": 10}},
        "runs": [
            {"optimizer": "adamw"},
            {"optimizer": "mfsgd", "config": {"eta1": 0.5}, "grid": {"rank": [8, 16], "train.seed": [0, 1]}},
            {"optimizer": "galore", "grid": {"group_params.rank": [4]}},
        ],
    }
    runs = sweep.expand(spec)
    names = [r["name"] for r in runs]
    assert names == ["adamw", "mfsgd-rank8-seed0", "mfsgd-rank8-seed1", "mfsgd-rank16-seed0", "mfsgd-rank16-seed1",
                     "galore-rank4"]
    r = runs[3]
    assert r["config"] == {"train": {"steps": 10, "seed": 0}, "eta1": 0.5, "rank": 16}
    assert runs[0]["config"] == {"train": {"steps": 10}}  # grids do not leak between entries
    assert runs[-1]["config"]["group_params"] == {"rank": 4}


@pytest.mark.parametrize("spec,needle", [
    ({"name": "s", "runs": []}, "non-empty list 'runs'"),
    ({"name": "s", "runs": [{"rank": 3}]}, "needs an 'optimizer'"),
    ({"name": "s", "runs": [{"optimizer": "a", "grid": {"rank": 3}}]}, "must be a non-empty list"),
    ({"name": "s", "runs": [{"optimizer": "a"}, {"optimizer": "a"}]}, "two runs of the sweep would be named 'a'"),
])
def test_sweep_errors(spec, needle):
    with pytest.raises(sweep.SweepError, match=needle):
        sweep.expand(spec)


def make_run(root, name, optimizer, rank, steps=4, finished=True, checkpoint=False, loss0=5.0):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    opt = {"lr": 0.1} if rank is None else {"lr": 0.1, "rank": rank}
    (run_dir / "config.json").write_text(json.dumps({"name": name, "optimizer_name": optimizer, "optimizer": opt,
                                                     "train": {"steps": steps}}))
    rows = [{"step": 0, "val_loss": loss0 + 1, "tokens": 0, "elapsed_s": 0.0}]
    for s in range(1, steps + 1):
        row = {"step": s, "train_loss": loss0 - 0.1 * s, "tokens": 100 * s, "elapsed_s": 0.5 * s, "step_ms": 500.0 + s}
        if s % 2 == 0:
            row["val_loss"] = loss0 - 0.1 * s + 0.05
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({
            "steps": steps, "final_val_loss": rows[-1]["val_loss"], "best_val_loss": rows[-1]["val_loss"],
            "tokens_per_s": 200.0, "peak_mem_bytes": 3 * 2**20, "opt_state_bytes_hidden": (rank or 64) * 2**10,
            "opt_state_bytes_other": 2**20}))
    if checkpoint:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "step_0000002.pt").write_bytes(b"x")
    return run_dir


def test_sweep_resume_decisions(tmp_path):
    root = tmp_path / "s"
    make_run(root, "done", "adamw", None)
    make_run(root, "half", "mfsgd", 8, finished=False, checkpoint=True)
    make_run(root, "broken", "mfsgd", 16, finished=False)
    assert sweep.run_state(str(root / "done")) == "finished"
    assert sweep.run_state(str(root / "half")) == "resumable"
    assert sweep.run_state(str(root / "broken")) == "broken"
    assert sweep.run_state(str(root / "new")) == "new"
    spec = {"name": "s", "launch": ["--nproc", 2]}
    run = {"name": "half", "optimizer": "mfsgd", "config": {"rank": 8}, "preset": None}
    cmd = sweep.run_command(spec, run, str(root), "resumable", overwrite=False)
    assert cmd[-2:] == ["--resume", "half"] and "--nproc" in cmd and "2" in cmd
    cmd = sweep.run_command(spec, dict(run, name="broken"), str(root), "broken", overwrite=False)
    # a broken run is restarted with --restart-broken (run.py re-checks it under the lock), never --overwrite
    assert "--restart-broken" in cmd and "--overwrite" not in cmd and "--optimizer" in cmd
    assert json.loads(cmd[cmd.index("--config") + 1]) == {"rank": 8}


@pytest.mark.slow
def test_sweep_skips_finished_runs(tmp_path, capsys):
    (tmp_path / "sw.yaml").write_text("name: s\nconfig: {train: {steps: 4}}\nruns:\n  - optimizer: adamw\n")
    run_dir = make_run(tmp_path / "results" / "s", "adamw", "adamw", None)
    # reused only as the very config the sweep would launch (as run.py writes it)
    run = dict(name="adamw", optimizer="adamw", config={"train": {"steps": 4}}, preset=None)
    (run_dir / "config.json").write_text(json.dumps(sweep.launched_config(run, sweep.launch_settings([]))))
    assert sweep.main([str(tmp_path / "sw.yaml"), "--results-dir", str(tmp_path / "results")]) == 0
    assert "finished, skipped" in capsys.readouterr().err


def test_plot_and_summary_on_synthetic_runs(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, "adamw", "adamw", None, loss0=4.0)
    make_run(root, "mfsgd-rank8", "mfsgd", 8)
    make_run(root, "mfsgd-rank16", "mfsgd", 16, loss0=4.5)
    out = tmp_path / "figs"
    assert plot.main([str(root), "--out", str(out)]) == 0
    for name in ("loss.png", "ranks.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    assert summarize.main([str(root), "--format", "csv", "--table", "runs", "--out", str(tmp_path / "t.csv")]) == 0
    assert summarize.main([str(root), "--out", str(tmp_path / "t.md")]) == 0
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "t.csv"))}
    assert set(rows) == {"adamw", "mfsgd-rank8", "mfsgd-rank16"}
    metrics = [json.loads(l) for l in open(root / "mfsgd-rank16" / "metrics.jsonl")]
    final = metrics[-1]["val_loss"]
    assert float(rows["mfsgd-rank16"]["final_val_loss"]) == pytest.approx(final)
    assert float(rows["mfsgd-rank16"]["final_val_ppl"]) == pytest.approx(math.exp(final))
    assert float(rows["mfsgd-rank16"]["ms_per_step"]) == pytest.approx(502.5)  # median of 501..504
    assert float(rows["mfsgd-rank16"]["tokens_per_s"]) == 200.0  # summary.json's whole-run number
    assert float(rows["mfsgd-rank16"]["steady_tokens_per_s"]) == pytest.approx(100 / 0.5025)  # 100 tokens/step
    assert float(rows["mfsgd-rank16"]["first_step_ms"]) == 501.0
    assert float(rows["mfsgd-rank16"]["opt_state_mib_hidden"]) == pytest.approx(16 * 2**10 / 2**20)
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("## Groups") and "| run | group | optimizer | rank |" in md and "mfsgd-rank8" in md


def test_plot_errors_on_missing_folder(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "no such results folder" in capsys.readouterr().err


@pytest.mark.parametrize("eta2, current_projection, momentum", [
    (0.0, True, "sum"), (0.3, True, "sum"), (0.3, False, "ema"), (0.0, True, "ema")])
def test_projector_forming_reference_gives_mofasgd_parameters(eta2, current_projection, momentum):
    """bench_optimizers' projector-forming baseline is the same optimizer (fp64, 6 steps), so the
    speed-up the benchmark reports is between two implementations of one update."""
    import torch

    from mofasgd import MoFaSGD
    from scripts import bench_optimizers

    g = torch.Generator().manual_seed(3)
    shapes = [(40, 72), (72, 40), (40, 72)]
    weights = [torch.randn(m, n, generator=g, dtype=torch.float64) for m, n in shapes]
    grads = [[torch.randn(m, n, generator=g, dtype=torch.float64) for m, n in shapes] for _ in range(6)]
    keys = dict(lr=0.05, rank=5, beta=0.9, eta1=0.25, eta2=eta2, use_current_projection=current_projection,
                momentum=momentum, max_value=5.0)
    results = []
    for cls in (MoFaSGD, bench_optimizers.ProjectorMoFaSGD):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = cls(params, **keys)
        for step_grads in grads:
            for p, G in zip(params, step_grads):
                p.grad = G.clone()
            opt.step()
        results.append(params)
    for fast, plain, w in zip(*results, weights):
        assert (fast - w).abs().max().item() > 1e-4  # the steps moved the weights
        assert (fast - plain).abs().max().item() < 1e-10


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float64"])
def test_bench_optimizers_expected_bytes_equal_the_state_held(dtype_name):
    """The expected-bytes column counts the factors in their own dtype (fp32 for bf16 weights)."""
    import torch

    from mofasgd import MoFaSGD
    from optimizers import state_bytes
    from scripts.bench_optimizers import expected_mofasgd_bytes

    dtype = getattr(torch, dtype_name)
    shapes = [(24, 40), (40, 24), (8, 6)]
    params = [torch.nn.Parameter(torch.randn(m, n).to(dtype)) for m, n in shapes]
    opt = MoFaSGD(params, lr=0.01, rank=7)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert state_bytes(opt) == expected_mofasgd_bytes(shapes, 7, dtype)


@pytest.mark.slow
def test_bench_train_prints_both_loops(tmp_path, capsys):
    """bench_train.py on a tiny model: the harness's own step times (metrics.jsonl, warm-up left
    out) against the bare loop, both positive, in one table."""
    from scripts import bench_train
    from helpers import tiny_overrides, write_tiny_corpus

    cfg = tiny_overrides(write_tiny_corpus(tmp_path / "data"), rank=4)
    assert bench_train.main(["--optimizer", "mfsgd", "--steps", "4", "--repeats", "1", "--config", json.dumps(cfg)]) == 0
    out = capsys.readouterr().out
    assert "4 steps (2 timed), 1 repeats, compile False" in out
    speeds = {}
    for line in out.splitlines():
        if line.startswith("| bare") or line.startswith("| harness"):
            speeds[line.split("|")[1].strip()] = float(line.split("|")[2].replace(",", ""))
    assert len(speeds) == 2 and all(v > 0 for v in speeds.values()), out
    assert "harness overhead:" in out
    with pytest.raises(SystemExit):
        bench_train.main(["--steps", "2"])  # nothing left to time after the warm-up
    assert "steps must be > 2" in capsys.readouterr().err


def test_paper_ranks_sweep_uses_the_published_per_rank_settings():
    """Rank 16 runs with the paper harness README's commands, rank 32 with its YAMLs; every run
    resolves with the nanogpt-paper preset."""
    from configs import resolve_config

    from helpers import ROOT

    runs = {r["name"]: r for r in sweep.expand(sweep.load_sweep(os.path.join(ROOT, "sweeps", "paper-ranks.yaml")))}
    assert sorted(runs) == sorted(["mfsgd-rank16", "mfsgd-rank32", "mfsgd-rank64", "mfsgd-rank128", "galore-rank16",
                                   "galore-rank32", "galore-rank64", "galore-rank128", "adamw", "muon"])
    cfg = {name: resolve_config(r["optimizer"], r["config"], preset=r["preset"]) for name, r in runs.items()}
    m16, m32 = cfg["mfsgd-rank16"].optimizer, cfg["mfsgd-rank32"].optimizer
    assert (m16.rank, m16.lr, m16.eps, m16.max_value, m16.beta_start, m16.beta_end) == (16, 0.0009, 1e-6, 1000, 0.75, 0.95)
    assert (m32.rank, m32.lr, m32.eps, m32.max_value, m32.beta_start, m32.beta_end) == (32, 0.05, 1e-10, 5, 0.65, 0.85)
    g16, g32 = cfg["galore-rank16"].optimizer.group_params, cfg["galore-rank32"].optimizer.group_params
    assert (g16.rank, g16.update_proj_gap, g32.rank, g32.update_proj_gap) == (16, 150, 32, 75)
    assert all(c.data.layout == "stream" and c.model.arch == "speedrun" for c in cfg.values())


@pytest.mark.slow
def test_bench_memory_skips_what_cannot_be_built():
    """A variant that fails to build (as GaLore without galore-torch) is skipped with one line; the
    others are still measured and tabled."""
    import subprocess

    from helpers import ROOT

    out = subprocess.run([sys.executable, "-m", "scripts.bench_memory", "--model", "cpu-tiny", "--seq-len", "16",
                          "--rank", "4", "--steps", "1", "--variants", "adamw,no-such-optimizer,mfsgd (full grads)"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "no-such-optimizer: skipped (" in out.stderr
    assert "| adamw |" in out.stdout and "| mfsgd (full grads) |" in out.stdout


@pytest.mark.slow
def test_bench_head_loss_prints_the_side_by_side_table():
    import subprocess

    from helpers import ROOT

    out = subprocess.run([sys.executable, "-m", "scripts.bench_head_loss", "--models", "cpu-small", "--chunks", "0", "256",
                          "--steps", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| off") or line.startswith("| 256")]
    assert [r[1].strip() for r in rows] == ["off", "256"]
    assert rows[0][3].strip() == "1.00x" and rows[0][5].strip() == "1.00x"
    assert abs(float(rows[0][6]) - float(rows[1][6])) < 1e-5  # the same loss, chunked or not


def test_bench_head_loss_extrapolation_from_two_lengths(capsys):
    """The per-token fit: plain slope 50 B, chunked slope 10 B, so the head holds 40 B per token;
    at 10,000 tokens the plain head is 400,000 of 500,100 bytes, the 10-token chunk's 400 of 100,200."""
    from scripts.bench_head_loss import per_token_fit, print_extrapolation

    by_length = {1000: {0: 50_100, 10: 10_200}, 2000: {0: 100_100, 10: 20_200}}
    assert per_token_fit(by_length, 0) == (100.0, 50.0) and per_token_fit(by_length, 10) == (200.0, 10.0)
    print_extrapolation("m", by_length, 10_000)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| off", "| 10 "))]
    assert rows[0][1:3] == ["50", "40"] and rows[0][4] == f"{400_000 / 500_100:.1%}"
    assert rows[1][1:3] == ["10", "40"] and rows[1][4] == f"{400 / 100_200:.1%}"
