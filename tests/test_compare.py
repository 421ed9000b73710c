"""Comparing optimizers over seeds: the statistics (against hand-computed values), groups of runs,
the summarize tables (Markdown, CSV, LaTeX, paired differences), the plots, and sweeps that tune
the learning rate and then rerun the best one with several seeds. Synthetic run folders in the
harness's format; no training."""

import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest
from helpers import ROOT, write_run_folder

from scripts import plot, results, summarize, sweep
from scripts.stats import estimate, paired_difference, t_quantile_975

# ---------------------------------------------------------------------------------------------
# statistics


def test_t_quantiles_solve_the_t_distribution():
    """Each tabulated quantile (and Hill's expansion past df 30) puts 0.975 of Student's t below it:
    the density integrated numerically (Simpson, 4000 intervals) from 0 to the quantile is 0.475."""
    for df in (1, 2, 3, 4, 9, 29, 30, 31, 45, 120):
        q = t_quantile_975(df)
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        density = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
        n, h = 4000, q / 4000
        area = (density(0) + density(q) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))) * h / 3
        assert area == pytest.approx(0.475, abs=2e-8), df
    assert t_quantile_975(2) == 4.302652730 and t_quantile_975(1000) == pytest.approx(1.962339, abs=1e-6)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def test_estimate_by_hand():
    # 5.0, 5.2, 5.4: mean 5.2, std sqrt((0.04 + 0 + 0.04) / 2) = 0.2, CI 5.2 +- 4.302652730 * 0.2 / sqrt(3)
    e = estimate([5.0, 5.2, 5.4])
    half = 4.302652730 * 0.2 / math.sqrt(3)  # 0.4968275
    assert (e.n, e.mean, e.std) == (3, pytest.approx(5.2), pytest.approx(0.2))
    assert (e.ci_low, e.ci_high) == (pytest.approx(5.2 - half), pytest.approx(5.2 + half))
    assert half == pytest.approx(0.4968275, abs=1e-7)
    one = estimate([5.0])
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high) == (1, 5.0, None, None, None)


def test_paired_difference_by_hand():
    # pairs on the shared seeds 0, 1, 2: differences -0.3, -0.1, -0.2: mean -0.2, std 0.1,
    # CI -0.2 +- 4.302652730 * 0.1 / sqrt(3) = -0.2 +- 0.2484138; lower in all three
    d = paired_difference({0: 4.7, 1: 5.1, 2: 5.2, 7: 1.0}, {0: 5.0, 1: 5.2, 2: 5.4, 3: 9.0})
    assert d.seeds == (0, 1, 2) and (d.lower, d.higher, d.ties) == (3, 0, 0)
    assert d.diff.mean == pytest.approx(-0.2) and d.diff.std == pytest.approx(0.1)
    assert d.diff.ci_half_width == pytest.approx(0.2484138, abs=1e-7)
    assert paired_difference({1: 1.0}, {2: 1.0}) is None


# ---------------------------------------------------------------------------------------------
# groups and tables


@pytest.fixture
def study(tmp_path):
    """AdamW and MoFaSGD r=8 at the tuned lr with seeds 0-2, a MoFaSGD tuning run at another lr
    (seed 0 only), and a fourth MoFaSGD seed that was stopped at step 6 of 10."""
    root = tmp_path / "study"
    for seed, final in zip((0, 1, 2), (5.0, 5.2, 5.4)):
        write_run_folder(root, f"adamw-lr0.002-seed{seed}", "adamw", 0.002, seed, final=final)
    for seed, final in zip((0, 1, 2), (4.7, 5.1, 5.2)):
        write_run_folder(root, f"mfsgd-rank8-lr0.02-seed{seed}", "mfsgd", 0.02, seed, rank=8, final=final)
    write_run_folder(root, "mfsgd-rank8-lr0.02-seed3", "mfsgd", 0.02, 3, rank=8, final=4.0, status="stopped",
                     steps_done=6)
    write_run_folder(root, "mfsgd-rank8-lr0.05-seed0", "mfsgd", 0.05, 0, rank=8, final=4.9)
    return root


def test_runs_that_differ_only_in_seed_form_a_group(study):
    groups = {g.name: g for g in results.group_runs(results.find_runs([str(study)]))}
    assert set(groups) == {"adamw-lr0.002", "mfsgd-rank8-lr0.02", "mfsgd-rank8-lr0.05"}
    tuned = groups["mfsgd-rank8-lr0.02"]
    assert [r.seed for r in tuned.runs] == [0, 1, 2, 3] and tuned.label == "mfsgd r=8 lr 0.02"
    assert [r.status for r in tuned.runs] == ["finished"] * 3 + ["stopped"]
    assert tuned.runs[3].steps_done == 6 and tuned.runs[3].final_val_loss == pytest.approx(4.0 + 1 - 0.5)
    assert sorted(tuned.per_seed("final_val_loss")) == [0, 1, 2]  # the stopped run is left out
    assert sorted(tuned.per_seed("final_val_loss", include_unfinished=True)) == [0, 1, 2, 3]


def test_group_names_without_a_seed_in_the_run_name(tmp_path):
    """Runs named by hand form groups by config; the name comes from what the groups differ in."""
    write_run_folder(tmp_path, "first", "mfsgd", 0.02, 0, rank=8)
    write_run_folder(tmp_path, "second", "mfsgd", 0.02, 1, rank=8)
    write_run_folder(tmp_path, "third", "mfsgd", 0.05, 0, rank=8)
    groups = results.group_runs(results.find_runs([str(tmp_path)]))
    assert [(g.name, len(g.runs)) for g in groups] == [("mfsgd-rank8-lr0.02", 2), ("third", 1)]


def read_csv(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_group_table_csv_by_hand(study, capsys):
    assert summarize.main([str(study), "--format", "csv", "--table", "groups"]) == 0
    rows = {r["group"]: r for r in read_csv(capsys.readouterr().out)}
    adamw = rows["adamw-lr0.002"]
    half = 4.302652730 * 0.2 / math.sqrt(3)
    assert (adamw["n"], adamw["seeds"], adamw["status"]) == ("3", "0 1 2", "3 finished")
    assert float(adamw["final_val_loss_mean"]) == pytest.approx(5.2)
    assert float(adamw["final_val_loss_std"]) == pytest.approx(0.2)
    assert float(adamw["final_val_loss_ci_low"]) == pytest.approx(5.2 - half)
    assert float(adamw["final_val_loss_ci_high"]) == pytest.approx(5.2 + half)
    tuned = rows["mfsgd-rank8-lr0.02"]
    assert tuned["n"] == "3" and tuned["status"] == "3 finished, 1 stopped (left out)" and tuned["steps"] == "6-10"
    assert float(tuned["final_val_loss_mean"]) == pytest.approx((4.7 + 5.1 + 5.2) / 3)
    single = rows["mfsgd-rank8-lr0.05"]
    assert single["n"] == "1" and single["final_val_loss_std"] == "" and single["final_val_loss_ci_low"] == ""
    # counted on request: the stopped run with the last val loss it logged (4.5 at step 6)
    assert summarize.main([str(study), "--format", "csv", "--table", "groups", "--include-unfinished"]) == 0
    tuned = {r["group"]: r for r in read_csv(capsys.readouterr().out)}["mfsgd-rank8-lr0.02"]
    assert tuned["n"] == "4" and float(tuned["final_val_loss_mean"]) == pytest.approx((4.7 + 5.1 + 5.2 + 4.5) / 4)


def test_paired_table_by_hand(study, capsys):
    assert summarize.main([str(study), "--format", "csv", "--table", "paired", "--baseline", "adamw"]) == 0
    rows = {r["group"]: r for r in read_csv(capsys.readouterr().out)}
    assert set(rows) == {"mfsgd-rank8-lr0.02", "mfsgd-rank8-lr0.05"}
    tuned = rows["mfsgd-rank8-lr0.02"]  # differences -0.3, -0.1, -0.2
    assert (tuned["baseline"], tuned["n_pairs"], tuned["seeds"]) == ("adamw-lr0.002", "3", "0 1 2")
    assert float(tuned["diff_mean"]) == pytest.approx(-0.2) and float(tuned["diff_std"]) == pytest.approx(0.1)
    assert float(tuned["diff_ci_high"]) == pytest.approx(-0.2 + 4.302652730 * 0.1 / math.sqrt(3))
    assert (tuned["lower"], tuned["higher"], tuned["ties"]) == ("3", "0", "0")
    single = rows["mfsgd-rank8-lr0.05"]  # one pair: seed 0, 4.9 - 5.0
    assert single["n_pairs"] == "1" and float(single["diff_mean"]) == pytest.approx(-0.1) and single["diff_std"] == ""


def test_markdown_and_latex_documents(study, capsys):
    assert summarize.main([str(study), "--baseline", "adamw", "--min-seeds", "2"]) == 0
    md = capsys.readouterr().out
    assert "## Groups" in md and "## Paired differences" in md and "## Runs" in md
    assert "mfsgd-rank8-lr0.05" not in md  # a single-seed tuning run, left out by --min-seeds 2
    assert "| mfsgd-rank8-lr0.02 | adamw-lr0.002 | 3 | -0.2000 | 0.1000 | [-0.4484, +0.0484] | 3/3 lower |" in md
    assert "| adamw-lr0.002 | 3 | 0 1 2 | 5.2000 | 0.2000 | [4.7032, 5.6968] |" in md
    assert "| mfsgd-rank8-lr0.02-seed3 | mfsgd-rank8-lr0.02 | mfsgd | 8 | 0.02 | 3 | stopped | 6 |" in md
    assert summarize.main([str(study), "--format", "latex", "--table", "paired", "--baseline", "adamw"]) == 0
    tex = capsys.readouterr().out
    assert tex.startswith("\\begin{tabular}{lrrrrrr}\n\\toprule\n") and "\\end{tabular}\n" in tex
    after = tex.split("\\end{tabular}\n", 1)[1]  # only comments follow: the marks' legend (the single-seed row)
    assert all(line.startswith("% ") for line in after.splitlines()) and "% [seeds] fewer than 3" in after
    assert "mfsgd-rank8-lr0.02 & adamw-lr0.002 & 3 & -0.2000 & 0.1000 & [-0.4484, +0.0484] & 3/3 lower \\\\" in tex
    assert summarize.main([str(study), "--format", "latex", "--table", "runs"]) == 0
    assert "final\\_val\\_loss" in capsys.readouterr().out  # LaTeX specials escaped


@pytest.mark.parametrize("args,needle", [
    (["--baseline", "mfsgd"], "--baseline 'mfsgd' matches 2 groups (mfsgd-rank8-lr0.02, mfsgd-rank8-lr0.05)"),
    (["--baseline", "sgd"], "--baseline 'sgd' is neither a group nor an optimizer with one group; groups: adamw-lr0.002"),
    (["--format", "csv"], "--format csv holds one table: add --table groups, paired or runs"),
    (["--table", "paired"], "--table paired needs --baseline NAME"),
    (["--min-seeds", "5"], "no group has 5 or more seeds"),
    (["--min-seeds", "-1"], "--min-seeds must be >= 0, got -1"),
])
def test_summarize_errors_are_one_line(study, capsys, args, needle):
    assert summarize.main([str(study), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_plots_of_groups(study, tmp_path, capsys):
    out = tmp_path / "figs"
    assert plot.main([str(study), "--out", str(out)]) == 0
    for name in ("loss.png", "ranks.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    groups = results.select_groups(results.find_runs([str(study)]))
    # the band: min-max over seeds, or the mean's CI; the step-10 point of AdamW is 5.0, 5.2, 5.4
    adamw = next(g for g in groups if g.optimizer == "adamw")
    xs, mean, low, high = plot.mean_curve(adamw.included(), "val_loss", "step", "minmax")
    assert xs == [0, 5, 10] and mean[-1] == pytest.approx(5.2) and (low[-1], high[-1]) == (5.0, pytest.approx(5.4))
    _, _, low, high = plot.mean_curve(adamw.included(), "val_loss", "step", "ci")
    assert high[-1] - low[-1] == pytest.approx(2 * 4.302652730 * 0.2 / math.sqrt(3))
    # rank panel: of the two MoFaSGD lrs at rank 8, the one with three seeds stands for the point
    # (never the lucky single seed at 0.05, 4.9 < 5.0), and the choice is over the lr
    chosen, over = plot.select_points(groups, include_unfinished=False)
    assert chosen[("mfsgd", 8)].name == "mfsgd-rank8-lr0.02" and over == {"lr"}


def test_rank_panel_says_nothing_was_selected_without_a_grid(tmp_path):
    for seed in (0, 1):
        write_run_folder(tmp_path, f"mfsgd-rank8-seed{seed}", "mfsgd", 0.02, seed, rank=8)
        write_run_folder(tmp_path, f"mfsgd-rank32-seed{seed}", "mfsgd", 0.02, seed, rank=32)
    chosen, over = plot.select_points(results.select_groups(results.find_runs([str(tmp_path)])), False)
    assert len(chosen) == 2 and over == set()


def test_loss_plot_stays_readable_with_many_groups(tmp_path):
    """24 groups x 2 seeds: one legend entry per group beside the panels, colours reused only past 20."""
    for i in range(24):
        for seed in (0, 1):
            write_run_folder(tmp_path / "many", f"mfsgd-rank{i + 1}-seed{seed}", "mfsgd", 0.02, seed, rank=i + 1,
                             final=5 + i / 50)
    groups = results.select_groups(results.find_runs([str(tmp_path / "many")]))
    assert len(groups) == 24 and len(set(plot.group_colors(24)[:20])) == 20
    path = plot.plot_losses(groups, str(tmp_path / "loss.png"))
    assert os.path.getsize(path) > 20_000


# ---------------------------------------------------------------------------------------------
# learning-rate tuning in sweeps


def make_job(**kw):
    spec = {"tune": [0.01, 0.02, 0.04], "extend": 2, "seeds": [0, 1, 2]}
    spec.update(kw)
    entry = {"optimizer": "mfsgd", "grid": {"rank": [8]}, "lr": spec}
    (job,) = sweep.expand({"name": "s", "runs": [entry]})
    return job


def test_tuning_extends_past_an_edge_until_the_best_is_interior():
    job = make_job()
    assert isinstance(job, sweep.TuneJob) and job.base == "mfsgd-rank8" and job.tune_seed == 0
    assert job.run(0.02, 1)["name"] == "mfsgd-rank8-lr0.02-seed1"
    assert job.run(0.02, 1)["config"] == {"rank": 8, "lr": 0.02, "train": {"seed": 1}}
    losses = {0.01: 5.0, 0.02: 5.1, 0.04: 5.3, 0.005: 4.9, 0.0025: 5.05}
    state = sweep.tune_state(job, lambda lr: None)
    assert state.need == [0.01, 0.02, 0.04] and state.chosen is None
    # 0.01 is best at the lower edge: try 0.005; best again at the edge: 0.0025; then 0.005 is interior
    state = sweep.tune_state(job, lambda lr: losses[lr] if lr != 0.0025 else None)
    assert state.need == [0.0025] and state.extensions == [0.005, 0.0025]
    state = sweep.tune_state(job, losses.get)
    assert (state.chosen, state.at_edge, state.extensions) == (0.005, False, [0.005, 0.0025])
    # the upper edge, a diverged run (inf) beyond it
    state = sweep.tune_state(job, {0.01: 5.3, 0.02: 5.2, 0.04: 5.1, 0.08: math.inf}.get)
    assert (state.chosen, state.at_edge) == (0.04, False)
    # out of extensions: the best is used, flagged as still at an edge
    state = sweep.tune_state(make_job(max_extend=1), {0.01: 5.0, 0.02: 5.1, 0.04: 5.3, 0.005: 4.0}.get)
    assert (state.chosen, state.at_edge) == (0.005, True)


@pytest.mark.parametrize("lr,needle", [
    ({"tune": [0.01]}, "runs[0].lr.tune must be a list of at least two different learning rates > 0"),
    ({"tune": [0.01, -1], "seeds": [0]}, "runs[0].lr.tune must be a list of at least two"),
    ({"tune": [0.01, 0.02]}, "runs[0].lr.seeds must be a non-empty list of different integers >= 0"),
    ({"tune": [0.01, 0.02], "seeds": [0, 0]}, "runs[0].lr.seeds must be a non-empty list of different integers"),
    ({"tune": [0.01, 0.02], "seeds": [0], "extend": 1}, "runs[0].lr.extend must be a number > 1"),
    ({"tune": [0.01, 0.02], "seeds": [0], "seed": 1}, "runs[0].lr has unknown key 'seed' (did you mean 'seeds'?)"),
    (0.01, "runs[0].lr must be a mapping {tune: [lr, ...], extend: 2, seeds: [0, 1, 2]}"),
])
def test_bad_tuning_specs(lr, needle):
    with pytest.raises(sweep.SweepError) as e:
        sweep.expand({"name": "s", "runs": [{"optimizer": "adamw", "lr": lr}]})
    assert needle in str(e.value)


def test_tuned_entry_may_not_set_lr_or_seed_itself():
    with pytest.raises(sweep.SweepError, match="tunes lr over seeds: remove 'train.seed'"):
        sweep.expand({"name": "s", "runs": [{"optimizer": "adamw", "grid": {"train.seed": [0]},
                                            "lr": {"tune": [0.1, 0.2], "seeds": [0]}}]})


def write_sweep_config(run_dir, optimizer, overrides, preset=None):
    """config.json as run.py writes it for a sweep's run (no launch arguments): what the sweep reuses."""
    run = dict(name=os.path.basename(run_dir), optimizer=optimizer, config=overrides, preset=preset)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(sweep.launched_config(run, sweep.launch_settings([])), f)


class FakeRun:
    """Stands in for run.py: writes a finished run folder whose final val loss is a bowl in log lr
    around `best_lr` (plus 0.01 per seed), so a sweep's tuning runs in milliseconds."""

    launched: list = []
    best_lr = 0.005

    def __init__(self, cmd, env=None):
        args = cmd
        get = lambda flag: args[args.index(flag) + 1]  # noqa: E731
        config = json.loads(get("--config"))
        name, seed = get("--name"), config["train"].get("seed", 1337)
        FakeRun.launched.append(name)
        lr = config.get("lr", 0.002)
        loss = 5 + (math.log2(lr / FakeRun.best_lr)) ** 2 / 10 + 0.01 * seed
        run_dir = write_run_folder(get("--results-dir"), name, get("--optimizer"), lr, seed,
                                   rank=config.get("rank"), final=loss, steps=config["train"]["steps"])
        write_sweep_config(run_dir, get("--optimizer"), config)
        self.run_dir = run_dir

    def wait(self, timeout=None):
        return 0

    def poll(self):
        return 0


def test_a_sweep_tunes_then_reruns_the_best_lr_with_every_seed(tmp_path, monkeypatch, capsys):
    text = ("name: t\nconfig: {train: {steps: 10}}\nruns:\n  - optimizer: mfsgd\n    grid: {rank: [8]}\n"
            "    lr: {tune: [0.01, 0.02, 0.04], extend: 2, seeds: [0, 1, 2]}\n  - optimizer: adamw\n")
    (tmp_path / "sw.yaml").write_text(text)
    monkeypatch.setattr(sweep.subprocess, "Popen", FakeRun)
    FakeRun.launched = []
    argv = [str(tmp_path / "sw.yaml"), "--results-dir", str(tmp_path / "results")]
    assert sweep.main(argv) == 0
    # 0.01 best at the edge -> 0.005 -> best at the edge again -> 0.0025; 0.005 is interior
    assert FakeRun.launched == ["mfsgd-rank8-lr0.01-seed0", "mfsgd-rank8-lr0.02-seed0", "mfsgd-rank8-lr0.04-seed0",
                                "mfsgd-rank8-lr0.005-seed0", "mfsgd-rank8-lr0.0025-seed0",
                                "mfsgd-rank8-lr0.005-seed1", "mfsgd-rank8-lr0.005-seed2", "adamw"]
    assert "mfsgd-rank8: lr 0.005 chosen (tune seed 0: lr 0.0025 5.1000, lr 0.005 5.0000" in capsys.readouterr().err
    out = tmp_path / "results" / "t"
    assert (out / "sweep.yaml").read_text() == text  # the sweep file, recorded with its results
    record = json.loads((out / "tuning.json").read_text())["mfsgd-rank8"]
    assert record["chosen_lr"] == 0.005 and record["extensions"] == [0.005, 0.0025] and not record["chosen_at_edge"]
    assert record["tried"]["0.005"] == pytest.approx(5.0) and record["status"] == "chosen"
    # a rerun re-derives every decision from the finished runs and launches nothing
    FakeRun.launched = []
    assert sweep.main(argv) == 0 and FakeRun.launched == []
    groups = {g.name: len(g.runs) for g in results.select_groups(results.find_runs([str(out)]), min_seeds=3)}
    assert groups == {"mfsgd-rank8-lr0.005": 3}


def test_dry_run_prints_what_the_sweep_would_do(tmp_path, capsys):
    (tmp_path / "sw.yaml").write_text("name: t\nconfig: {train: {steps: 10}}\nruns:\n  - optimizer: adamw\n"
                                      "  - optimizer: mfsgd\n    lr: {tune: [0.01, 0.02], seeds: [0, 1]}\n")
    write_sweep_config(write_run_folder(tmp_path / "results" / "t", "adamw", "adamw", steps=10), "adamw",
                       {"train": {"steps": 10}})
    assert sweep.main([str(tmp_path / "sw.yaml"), "--results-dir", str(tmp_path / "results"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# adamw: finished, skipped"  # what the real sweep does: never --overwrite
    assert not any("--overwrite" in line for line in out)
    assert "--name mfsgd-lr0.01-seed0" in out[1] and "--name mfsgd-lr0.02-seed0" in out[2]
    assert out[3].startswith("# mfsgd: then lrs past an edge (x2, at most 3 more)")
    assert not (tmp_path / "results" / "t" / "sweep.yaml").exists()  # a dry run writes nothing


@pytest.mark.parametrize("text,needle", [
    ("runs:\n  - optimizer: adamw\n    grid: {trian.seed: [0]}\n",
     "run adamw-seed0: unknown config key 'optimizer.trian' (did you mean train.seed? train is a section)"),
    ("runs:\n  - optimizer: galore\n    grid: {rank: [8]}\n",
     "run galore-rank8: unknown config key 'optimizer.rank' (did you mean optimizer.group_params.rank?"),
    ("runs:\n  - optimizer: mfsgd\n    lr: {tune: [0.01, 0.02], seeds: [0]}\n    config: {train: {stepz: 3}}\n",
     "run mfsgd-lr0.01-seed0: unknown config key 'train.stepz' (did you mean train.steps?)"),
    ("launch: [--nprocs, 2]\nruns:\n  - optimizer: adamw\n", "launch holds '--nprocs', which run.py does not take"),
    ("runs:\n  - optimizer: adamw\n    lr: 0.01\n", "runs[0].lr must be a mapping"),
])
def test_every_run_config_is_checked_before_anything_runs(tmp_path, capsys, text, needle):
    (tmp_path / "sw.yaml").write_text("name: t\n" + text)
    for dry in ([], ["--dry-run"]):
        assert sweep.main([str(tmp_path / "sw.yaml"), "--results-dir", str(tmp_path / "results"), *dry]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "results").exists()


def test_results_cli_lists_runs_with_their_group_and_status(study):
    r = subprocess.run([sys.executable, "-m", "scripts.results", str(study)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if "seed3" in l)
    assert line.split("\t")[:4] == ["mfsgd-rank8-lr0.02", "seed 3", "stopped", "6/10 steps"]
    help_text = subprocess.run([sys.executable, "-m", "scripts.results", "--help"], capture_output=True, text=True,
                               cwd=ROOT).stdout
    assert "group they belong to" in help_text and "summarize.py" in help_text
