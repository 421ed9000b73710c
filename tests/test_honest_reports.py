"""Reports that say only what their runs show (issue 30, items 3 and 4): each training step records
the load it ran under; plot panels take their limits from what they draw, speak of a band or a CI
only where there are seeds to make one, draw memory from zero and mark times taken under load;
summarize marks groups chosen at a tuning edge, with fewer than 3 seeds, or timed unevenly or under
load, and explains each mark under its table. Every mark is tested with a case that sets it and
one that does not, on run folders written without training."""

import csv
import io
import json
import os
import time

import pytest

from helpers import ROOT, write_run_folder
from scripts import plot, results, summarize
from worker.metrics import StepClock, metrics_record

# ---------------------------------------------------------------------------------------------
# helpers: run folders as the harness writes them, with the load fields of this issue


def set_load(run_dir, load=None, cpu_share=None, step_ms=None, cpus=2, device="cpu"):
    """Gives a written run folder an env.json (cpu_count, device) and, per training step, the
    load average `load`, cpu_s = cpu_share x the step's time, and `step_ms` (None: leave as is)."""
    with open(os.path.join(run_dir, "env.json"), "w") as f:
        json.dump({"cpu_count": cpus, "device": device}, f)
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        if not row["step"]:
            continue
        if step_ms is not None:
            row["step_ms"] = step_ms
        if load is not None:
            row["load_avg_1m"] = load
        if cpu_share is not None:
            row["cpu_s"] = cpu_share * row["step_ms"] / 1000
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def write_tuning(root, **entries):
    """tuning.json as scripts/sweep.py writes it: {base: {optimizer, chosen_lr, chosen_at_edge, ...}}."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "tuning.json"), "w") as f:
        json.dump({base: {"optimizer": opt, "grid": [0.01, 0.02], "chosen_lr": lr, "chosen_at_edge": edge,
                          "status": "chosen"} for base, (opt, lr, edge) in entries.items()}, f)


def csv_rows(args, capsys, key):
    assert summarize.main(args + ["--format", "csv"]) == 0
    return {r[key]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}


def markdown(args, capsys):
    assert summarize.main(args) == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# What a step records: cpu_s and load_avg_1m (worker/metrics.py)


def busy(cpu_seconds):
    """Spins until this process has used `cpu_seconds` of CPU (not of wall time: on a loaded machine
    a wall-time spin can get little CPU, and the assertions below are about CPU time)."""
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


def test_step_clock_counts_the_steps_cpu_time_and_leaves_pauses_out():
    clock = StepClock()
    busy(0.05)
    clock.lap()
    assert clock.cpu_s >= 0.05  # the step's CPU time
    with clock.paused():
        busy(0.1)  # validation, a checkpoint: not the step's
    clock.lap()
    assert clock.cpu_s < 0.05
    fields = clock.load_fields()
    assert fields["cpu_s"] == clock.cpu_s
    if hasattr(os, "getloadavg"):
        assert fields["load_avg_1m"] == pytest.approx(os.getloadavg()[0], abs=1.0)


def test_no_load_average_on_a_platform_without_one(monkeypatch):
    def unsupported():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", unsupported)
    assert set(StepClock().load_fields()) == {"cpu_s"}


def test_load_fields_are_numbers_or_the_record_is_refused():
    assert metrics_record(b'{"step": 3, "load_avg_1m": 1.5, "cpu_s": 0.2}') is not None
    assert metrics_record(b'{"step": 3, "load_avg_1m": "high"}') is None
    assert results.file_problem("metrics.jsonl", {"step": 3, "cpu_s": -1.0}) == "cpu_s must be a number in [0, 1e18], got -1.0"


def test_the_load_fields_are_documented():
    with open(os.path.join(ROOT, "docs", "failures.md")) as f:
        text = f.read()
    assert "`load_avg_1m`" in text and "`cpu_s`" in text


# ---------------------------------------------------------------------------------------------
# Whether a run's times are reliable (scripts/results.py run_load, load_summary)


def one_run(tmp_path, name="r", **load):
    run_dir = write_run_folder(tmp_path, name, steps=4, val_every=2)
    if load:
        set_load(run_dir, **load)
    return results.load_run(run_dir)


@pytest.mark.parametrize("load,expected", [
    (dict(load=3.0, cpu_share=1.0), "load average 3.0 on 2 CPUs"),  # more runnable processes than cores
    (dict(load=1.5, cpu_share=0.3), "the process had a CPU 30% of its step time"),  # waiting for a core
    (dict(load=1.5, cpu_share=1.0), None),
    (dict(load=1.5, cpu_share=0.3, device="cuda:0"), None),  # on a GPU the process waits for the device
    (dict(load=3.0, cpus=4), None),
])
def test_when_a_runs_times_are_unreliable(tmp_path, load, expected):
    found = results.run_load(one_run(tmp_path, **load))
    assert found.recorded and found.reason == expected and found.unreliable == (expected is not None)


def test_a_run_without_load_fields_is_not_guessed_about(tmp_path):
    found = results.run_load(one_run(tmp_path))
    assert not found.recorded and not found.unreliable and found.load_avg is None


def test_load_summary_of_many_runs(tmp_path):
    loaded = one_run(tmp_path, "a", load=3.0, cpu_share=1.0)
    calm = one_run(tmp_path, "b", load=1.0, cpu_share=1.0)
    old = one_run(tmp_path, "c")
    assert results.load_summary([calm]) is None
    assert results.load_summary([old]) == "load not recorded"
    assert results.load_summary([loaded]) == "times unreliable: load average 3.0 on 2 CPUs"
    assert results.load_summary([loaded, calm, old]) == ("times unreliable: load average 3.0 on 2 CPUs (1 of 3 runs); "
                                                          "load not recorded for 1 of 3 runs")


# ---------------------------------------------------------------------------------------------
# summarize's marks


@pytest.fixture
def sweep(tmp_path):
    """A tuned sweep: AdamW (3 seeds, its lr chosen inside the grid), MoFaSGD r=8 (2 seeds, chosen
    at the grid's edge) with the tuning run of its other lr."""
    root = tmp_path / "sweep"
    for seed, final in enumerate((5.0, 5.2, 5.4)):
        write_run_folder(root, f"adamw-lr0.002-seed{seed}", "adamw", 0.002, seed, final=final)
    for seed, final in enumerate((4.8, 5.0)):
        write_run_folder(root, f"mfsgd-rank8-lr0.02-seed{seed}", "mfsgd", 0.02, seed, rank=8, final=final)
    write_run_folder(root, "mfsgd-rank8-lr0.01-seed0", "mfsgd", 0.01, 0, rank=8, final=5.1)
    write_tuning(root, adamw=("adamw", 0.002, False), **{"mfsgd-rank8": ("mfsgd", 0.02, True)})
    return root


def test_a_group_chosen_at_an_edge_is_marked(sweep, capsys):
    rows = csv_rows([str(sweep), "--table", "groups"], capsys, "group")
    assert rows["mfsgd-rank8-lr0.02"]["lr_at_edge"] == "True" and "edge" in rows["mfsgd-rank8-lr0.02"]["notes"]
    assert rows["adamw-lr0.002"]["lr_at_edge"] == "False" and "edge" not in rows["adamw-lr0.002"]["notes"]
    assert rows["mfsgd-rank8-lr0.01"]["lr_at_edge"] == ""  # a tuning run, not the chosen lr
    md = markdown([str(sweep)], capsys)
    assert "| mfsgd-rank8-lr0.02 [edge] [seeds] | 2 |" in md and "| adamw-lr0.002 | 3 |" in md
    assert "- [edge] lr chosen at an edge of the lrs its tuning tried" in md


def test_the_edge_mark_follows_the_baseline_into_the_paired_table(sweep, capsys):
    rows = csv_rows([str(sweep), "--table", "paired", "--baseline", "mfsgd-rank8-lr0.02"], capsys, "group")
    assert rows["adamw-lr0.002"]["baseline_notes"] == "edge" and rows["adamw-lr0.002"]["notes"] == "seeds"
    md = markdown([str(sweep), "--table", "paired", "--baseline", "adamw"], capsys)
    assert "| mfsgd-rank8-lr0.02 [edge] [seeds] | adamw-lr0.002 | 2 |" in md


def test_no_edge_mark_without_tuning_json(sweep, capsys):
    os.remove(sweep / "tuning.json")
    assert "[edge]" not in markdown([str(sweep)], capsys)


def test_an_unreadable_tuning_json_is_one_warning(sweep, capsys):
    (sweep / "tuning.json").write_text("{not json")
    assert summarize.main([str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert "[edge]" not in out and err.count("\n") == 1 and "tuning.json is unreadable" in err


def test_fewer_than_three_seeds_are_marked_in_groups_and_pairs(sweep, capsys):
    groups = csv_rows([str(sweep), "--table", "groups"], capsys, "group")
    assert "seeds" in groups["mfsgd-rank8-lr0.02"]["notes"].split() and groups["adamw-lr0.002"]["notes"] == ""
    paired = csv_rows([str(sweep), "--table", "paired", "--baseline", "adamw"], capsys, "group")
    assert paired["mfsgd-rank8-lr0.02"]["notes"] == "edge seeds"  # 2 pairs
    write_run_folder(sweep, "mfsgd-rank8-lr0.02-seed2", "mfsgd", 0.02, 2, rank=8, final=5.1)
    paired = csv_rows([str(sweep), "--table", "paired", "--baseline", "adamw"], capsys, "group")
    assert paired["mfsgd-rank8-lr0.02"]["notes"] == "edge"  # 3 pairs
    md = markdown([str(sweep), "--baseline", "adamw"], capsys)
    assert "| mfsgd-rank8-lr0.02 [edge] | adamw-lr0.002 | 3 |" in md
    assert "[seeds] fewer than 3 seeds" in md  # the tuning run at lr 0.01 still has one
    assert "at n = 2 the 95% CI is mean +- 9 standard deviations" in md


def test_the_legend_lists_only_the_marks_used(tmp_path, capsys):
    for seed in range(3):
        write_run_folder(tmp_path, f"adamw-seed{seed}", seed=seed)
    md = markdown([str(tmp_path)], capsys)
    assert not any(f"[{mark}]" in md for mark in summarize.MARKS)


@pytest.mark.parametrize("slow_ms,marked", [(700.0, True), (550.0, False)])
def test_a_group_whose_seeds_ran_at_unlike_speeds_is_marked(tmp_path, capsys, slow_ms, marked):
    for seed in range(3):
        run_dir = write_run_folder(tmp_path, f"adamw-seed{seed}", seed=seed)
        set_load(run_dir, step_ms=slow_ms if seed == 2 else 500.0)
    row = csv_rows([str(tmp_path), "--table", "groups"], capsys, "group")["adamw"]
    assert float(row["step_time_ratio"]) == pytest.approx(slow_ms / 500)
    assert ("speed" in row["notes"].split()) == marked
    md = markdown([str(tmp_path)], capsys)
    assert ("[speed] its runs' median step times differ by more than a factor 1.25" in md) == marked


@pytest.mark.parametrize("load,marked", [(3.5, True), (1.2, False)])
def test_groups_and_runs_timed_under_load_are_marked(tmp_path, capsys, load, marked):
    for seed in range(3):  # seed 0 under `load` on 2 CPUs, the others calm
        set_load(write_run_folder(tmp_path, f"adamw-seed{seed}", seed=seed), load=load if seed == 0 else 1.2,
                 cpu_share=1.0)
    groups = csv_rows([str(tmp_path), "--table", "groups"], capsys, "group")
    assert ("load" in groups["adamw"]["notes"].split()) == marked
    runs = csv_rows([str(tmp_path), "--table", "runs"], capsys, "run")
    assert float(runs["adamw-seed0"]["load_avg"]) == load and (runs["adamw-seed0"]["notes"] == "load") == marked
    assert runs["adamw-seed1"]["notes"] == ""
    md = markdown([str(tmp_path)], capsys)
    assert ("| adamw-seed0 [load] | adamw |" in md) == marked
    assert "recorded no load average" not in md


def test_the_runs_table_says_how_many_runs_recorded_no_load(tmp_path, capsys):
    write_run_folder(tmp_path, "old", seed=0)
    set_load(write_run_folder(tmp_path, "new", seed=1), load=1.0, cpu_share=1.0)
    md = markdown([str(tmp_path)], capsys)
    assert "1 of 2 runs recorded no load average" in md


def test_latex_puts_the_legend_in_comments(sweep, capsys):
    assert summarize.main([str(sweep), "--format", "latex", "--table", "groups"]) == 0
    tex = capsys.readouterr().out
    assert "mfsgd-rank8-lr0.02 [edge] [seeds] & 2" in tex and "\n% [edge] lr chosen at an edge" in tex


# ---------------------------------------------------------------------------------------------
# plot's decisions


def test_panel_limits_come_from_the_values_drawn():
    low, high, note = plot.panel_limits([7.1, 7.0, 6.9, 6.95])
    assert low < 6.9 and high > 7.1 and high - low < 0.3 and note is None
    # the first evaluations (~ln(vocab)) would squash the rest: cut, and said
    low, high, note = plot.panel_limits([10.8, 7.2, 6.5, 10.8, 7.3, 6.6])
    assert low < 6.5 and 7.3 < high < 10.8 and note.startswith("y axis cut at") and "values up to 10.8" in note
    assert plot.panel_limits([5.0])[2] is None and plot.panel_limits([5.0, 5.0])[:2] == pytest.approx((4.75, 5.25))


@pytest.mark.parametrize("counts,band,title_has,lists_single", [
    ([1, 1], "minmax", "one seed per group", False),
    ([1, 1], "ci", "one seed per group", False),
    ([3, 2], "minmax", "band: min-max over seeds", False),
    ([3, 2], "ci", "band: 95% CI of the mean over seeds", False),
    ([3, 1], "minmax", "only for groups with 2+ seeds", True),
])
def test_band_wording(counts, band, title_has, lists_single):
    title, single = plot.band_wording(counts, band)
    assert title_has in title and single == lists_single
    if max(counts) < 2:
        assert "band:" not in title and "CI" not in title and "min-max" not in title


@pytest.mark.parametrize("counts,has,lacks", [
    ({"adamw": 1, "mfsgd r=8": 1}, "one seed per point (n=1): no interval", "CI"),
    ({"adamw": 3, "mfsgd r=8": 2}, "mean and 95% CI over seeds (n=2-3)", "none for"),
    ({"adamw": 3, "mfsgd r=8": 1}, "95% CI where n >= 2, none for mfsgd r=8", "one seed"),
])
def test_interval_wording(counts, has, lacks):
    title = plot.interval_wording(counts)
    assert has in title and lacks not in title


def test_memory_panels_start_at_zero_and_say_when_values_are_close():
    low, high, note = plot.memory_limits([520.0, 529.4])
    assert low == 0 and high > 529.4 and note == "values within 1.8% of each other"
    low, high, note = plot.memory_limits([0.06, 0.5])
    assert low == 0 and note is None
    assert plot.memory_limits([100.0])[2] is None  # one value: nothing to compare


def drawn_figures(monkeypatch):
    """The figures plot.py closes, kept for their axes (plt.close is where each one ends)."""
    figures = []
    monkeypatch.setattr(plot.plt, "close", lambda fig=None: figures.append(fig))
    return figures


def short_sweep(root, seeds_of):
    """A 20-step sweep evaluated every 10 steps: {name: number of seeds}."""
    for i, (name, seeds) in enumerate(seeds_of.items()):
        for seed in range(seeds):
            write_run_folder(root, f"{name}-seed{seed}", "mfsgd", 0.02, seed, rank=8 * (i + 1), steps=20, val_every=10,
                             final=6.5 + i / 10 + seed / 20)
    return results.select_groups(results.find_runs([str(root)]))


def test_the_train_loss_panel_is_scaled_to_the_train_loss(tmp_path, monkeypatch):
    """In a 20-step sweep the train loss lies above the final val losses; its panel shows it."""
    groups = short_sweep(tmp_path / "s", {"a": 1, "b": 1})
    figures = drawn_figures(monkeypatch)
    plot.plot_losses(groups, str(tmp_path / "loss.png"))
    axes = figures[-1].axes
    train = [v for g in groups for r in g.runs for v in plot.run_curve(r, "train_loss", "step").values()]
    low, high = axes[3].get_ylim()
    assert low <= min(y for _, y in train) and high >= max(y for _, y in train)
    val_low, val_high = axes[0].get_ylim()
    assert val_low <= 6.5 and val_high >= 7.6  # every val point of both groups (6.5 ... 7.6) is inside


def test_single_seed_groups_get_no_band_and_no_band_wording(tmp_path, monkeypatch):
    groups = short_sweep(tmp_path / "s", {"a": 1, "b": 1})
    figures = drawn_figures(monkeypatch)
    plot.plot_losses(groups, str(tmp_path / "loss.png"), band="ci")
    fig = figures[-1]
    assert all(not ax.collections for ax in fig.axes)  # no fill_between anywhere
    text = fig._suptitle.get_text() + " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "CI" not in text and "band:" not in text and "min-max" not in text


def test_mixed_groups_say_which_have_a_band(tmp_path, monkeypatch):
    groups = short_sweep(tmp_path / "s", {"a": 3, "b": 1})
    figures = drawn_figures(monkeypatch)
    plot.plot_losses(groups, str(tmp_path / "loss.png"))
    fig = figures[-1]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["mfsgd r=8 lr 0.02 (n=3)", "mfsgd r=16 lr 0.02 (n=1, no band)"]
    assert "only for groups with 2+ seeds" in fig._suptitle.get_text()
    assert len(fig.axes[0].collections) == 1  # one band: group a's


@pytest.mark.parametrize("load,needle", [(None, "load not recorded"), (3.0, "times unreliable: load average 3.0 on 2 CPUs"),
                                         (1.0, None)])
def test_the_time_panel_says_when_its_times_are_unreliable(tmp_path, monkeypatch, load, needle):
    for seed in range(2):
        run_dir = write_run_folder(tmp_path / "s", f"adamw-seed{seed}", seed=seed)
        if load is not None:
            set_load(run_dir, load=load, cpu_share=1.0)
    groups = results.select_groups(results.find_runs([str(tmp_path / "s")]))
    figures = drawn_figures(monkeypatch)
    plot.plot_losses(groups, str(tmp_path / "loss.png"))
    titles = [ax.get_title() for ax in figures[-1].axes]
    time_title = titles[2]
    assert time_title.startswith("validation loss vs training time")
    if needle:
        assert needle in time_title and not any(needle in t for t in titles[:2] + titles[3:])
    else:
        assert "load" not in time_title and "unreliable" not in time_title


def test_the_rank_figure_draws_memory_from_zero_and_no_ci_for_one_seed(tmp_path, monkeypatch):
    write_run_folder(tmp_path, "adamw-seed0", seed=0, peak_mib=520.0)
    write_run_folder(tmp_path, "mfsgd-rank8-seed0", "mfsgd", 0.02, 0, rank=8, peak_mib=529.4)
    groups = results.select_groups(results.find_runs([str(tmp_path)]))
    figures = drawn_figures(monkeypatch)
    plot.plot_ranks(groups, str(tmp_path / "ranks.png"))
    loss, peak, state = figures[-1].axes
    assert "CI" not in loss.get_title() and "no interval" in loss.get_title()
    assert peak.get_ylim()[0] == 0 and state.get_ylim()[0] == 0
    assert "values within 1.8% of each other" in peak.get_title() and "min-max" not in peak.get_title()


def test_the_marks_and_notes_are_documented():
    with open(os.path.join(ROOT, "docs", "sweeps.md")) as f:
        sweeps = f.read()
    for mark in summarize.MARKS:
        assert f"`[{mark}]`" in sweeps, mark
    for phrase in ("times unreliable", "load not recorded", "no band", "y axis cut at", "values within"):
        assert phrase in sweeps, phrase
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "### How to read the tables and plots" in readme
    assert all(f"`[{mark}]`" in readme for mark in summarize.MARKS)
