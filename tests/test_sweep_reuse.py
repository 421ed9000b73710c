"""What a sweep takes over from earlier runs: only runs made with the very config it would launch
now (finished, resumable or diverged), never one made with another (it refuses, or with
--rerun-changed keeps the old folder aside and runs again); run names that never collide (across
entries, tuned and plain, and for floats that print alike); a tuning that every lr diverged in, and
divergence outcomes. Fake run folders with the config.json the sweep expects, so nothing trains
but the one slow test that launches real runs."""

import json
import os
import pathlib

import pytest
from helpers import tiny_overrides, write_tiny_corpus

from scripts import sweep

DIVERGED = {"status": "diverged", "reason": "non-finite training loss nan at step 3", "steps": 3}
OLD_DIVERGED = {"status": "failed", "reason": "non-finite values in parameter wte.weight after step 3", "steps": 3}

BASE = ("name: s\nconfig: {model: {preset: cpu-tiny}, train: {steps: 20}, logging: {progress: false}}\n"
        "runs:\n  - optimizer: adamw\n    grid: {lr: [0.002]}\n")
TUNED = ("name: s\nconfig: {model: {preset: cpu-tiny}, train: {steps: 20}}\nruns:\n"
         "  - optimizer: mfsgd\n    lr: {tune: [0.01, 0.02, 0.04], max_extend: 2, seeds: [0, 1]}\n")


def write_sweep(tmp_path, text: str) -> list[str]:
    """The sweep file; returns main()'s arguments for it."""
    (tmp_path / "sw.yaml").write_text(text)
    return [str(tmp_path / "sw.yaml"), "--results-dir", str(tmp_path / "res")]


def runs_of(tmp_path) -> dict:
    """Every run the sweep file may make, by name."""
    return {r["name"]: r for r in sweep.sweep_runs(sweep.expand(sweep.load_sweep(str(tmp_path / "sw.yaml"))))}


def write_run(tmp_path, run: dict, summary="finished", loss=5.0, checkpoint=False, launch_args=()) -> str:
    """A run folder as run.py leaves it for `run` of the sweep (config.json exactly as the sweep
    expects it), without training: summary "finished" (with `loss`), a summary dict, or None."""
    run_dir = tmp_path / "res" / "s" / run["name"]
    os.makedirs(run_dir, exist_ok=True)
    config = sweep.launched_config(run, sweep.launch_settings(list(launch_args)))
    (run_dir / "config.json").write_text(json.dumps(config))
    if summary == "finished":
        summary = {"status": "finished", "steps": config["train"]["steps"], "final_val_loss": loss,
                   "best_val_loss": loss}
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if checkpoint:
        os.makedirs(run_dir / "checkpoints", exist_ok=True)
        (run_dir / "checkpoints" / "step_0000002.pt").write_bytes(b"x")
    return str(run_dir)


class StubRun:
    """Stands in for run.py (subprocess.Popen) in a sweep: writes the run folder as run.py would,
    finished with the loss `losses[name]` gives (default 5.0), or "diverged" (exit 3, as the NaN
    guard ends a run). `also` writes other folders meanwhile: {name: (run, changed config)}."""

    launched: list = []
    losses: dict = {}
    also: dict = {}

    def __init__(self, cmd, env=None):
        get = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
        name = get("--name")
        StubRun.launched.append(name)
        run = dict(name=name, optimizer=get("--optimizer"), config=json.loads(get("--config")), preset=None)
        tmp_path = pathlib.Path(get("--results-dir")).parent.parent  # --results-dir is TMP/res/s
        outcome = StubRun.losses.get(name, 5.0)
        write_run(tmp_path, run, summary=DIVERGED if outcome == "diverged" else "finished", loss=outcome,
                  launch_args=cmd[2:cmd.index("--results-dir")])
        for other, config in StubRun.also.pop(name, {}).items():
            write_run(tmp_path, dict(name=other, optimizer="adamw", config=config, preset=None))
        self.rc = 3 if outcome == "diverged" else 0

    def wait(self, timeout=None):
        return self.rc

    def poll(self):
        return self.rc


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(sweep.subprocess, "Popen", StubRun)
    StubRun.launched, StubRun.losses, StubRun.also = [], {}, {}
    return StubRun


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# 1. reuse only with the same config


def test_a_finished_run_with_the_same_config_is_reused(tmp_path, capsys, stub):
    argv = write_sweep(tmp_path, BASE)
    write_run(tmp_path, runs_of(tmp_path)["adamw-lr0.002"])
    assert sweep.main(argv + ["--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == ["# adamw-lr0.002: finished, skipped"]
    # logging is not compared: it changes nothing a run computes
    argv = write_sweep(tmp_path, BASE.replace("progress: false", "progress: true"))
    assert sweep.main(argv) == 0 and stub.launched == []
    assert "adamw-lr0.002: finished, skipped" in capsys.readouterr().err


def preset_file(tmp_path):
    (tmp_path / "p.yaml").write_text("train: {val_every: 5}\n")
    return str(tmp_path / "p.yaml")


@pytest.mark.parametrize("old,new,change", [
    ("train: {steps: 20}", "train: {steps: 30}", "train.steps 20 -> 30"),  # the common config
    ("preset: cpu-tiny}", "preset: cpu-tiny, n_embd: 128}", "model.n_embd null -> 128"),
    ("grid: {lr: [0.002]}", "grid: {lr: [0.002]}\n    config: {weight_decay: 0.5}",
     "optimizer.weight_decay 0.0 -> 0.5"),
    ("train: {steps: 20}", "train: {steps: 20}, data: {train_files: data/other/train_*.bin}",
     'data.train_files "data/shakespeare/train_*.bin" -> "data/other/train_*.bin"'),
    ("name: s\n", "name: s\npreset: PRESET\n", "train.val_every 25 -> 5"),
    ("name: s\n", "name: s\nlaunch: [--nproc, 2]\n", "launch.world_size 1 -> 2"),
])
def test_a_run_made_with_another_config_stops_the_sweep(tmp_path, capsys, stub, old, new, change):
    write_sweep(tmp_path, BASE)
    run_dir = write_run(tmp_path, runs_of(tmp_path)["adamw-lr0.002"])
    before = {f: open(os.path.join(run_dir, f)).read() for f in os.listdir(run_dir)}
    text = BASE.replace(old, new.replace("PRESET", preset_file(tmp_path)))
    if "--nproc, 2" in new:
        text = text.replace("train: {steps: 20}", "train: {steps: 20, micro_batch_size: 4}")
    argv = write_sweep(tmp_path, text)
    for dry in (["--dry-run"], []):
        assert sweep.main(argv + dry) == 2
        lines = error_lines(capsys)
        assert len(lines) == 2, lines
        assert lines[0].startswith("adamw-lr0.002: made with another config than the sweep's now: ")
        assert change in lines[0]
        assert lines[1].startswith("error: 1 existing run(s) of ") and "--rerun-changed" in lines[1]
    assert stub.launched == [] and not os.path.exists(tmp_path / "res" / "s" / "sweep.yaml")
    assert {f: open(os.path.join(run_dir, f)).read() for f in os.listdir(run_dir)} == before


def test_a_resumable_run_with_a_changed_key_is_not_resumed(tmp_path, capsys, stub):
    write_sweep(tmp_path, BASE)
    write_run(tmp_path, runs_of(tmp_path)["adamw-lr0.002"], summary={"status": "stopped", "steps": 2}, checkpoint=True)
    assert sweep.main(write_sweep(tmp_path, BASE) + ["--dry-run"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("--resume adamw-lr0.002")  # the same config: resumed
    argv = write_sweep(tmp_path, BASE.replace("grid:", "config: {betas: [0.9, 0.99]}\n    grid:"))
    assert sweep.main(argv) == 2
    lines = error_lines(capsys)
    assert lines[0].startswith("adamw-lr0.002: made with another config")
    assert "optimizer.betas [0.8, 0.95] -> [0.9, 0.99]" in lines[0]
    assert stub.launched == []


@pytest.mark.parametrize("summary", ["finished", DIVERGED, {"status": "stopped", "steps": 2}])
def test_an_unreadable_config_json_counts_as_changed(tmp_path, capsys, stub, summary):
    argv = write_sweep(tmp_path, BASE)
    run_dir = write_run(tmp_path, runs_of(tmp_path)["adamw-lr0.002"], summary=summary, checkpoint=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write('{"name": "adamw-lr0.002", "train": ')
    assert sweep.main(argv + ["--dry-run"]) == 2
    lines = error_lines(capsys)
    assert lines[0].startswith("adamw-lr0.002: made with another config") and "config.json unreadable (" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("error: ")
    # without a checkpoint nothing of it is taken over: it starts again from scratch (as a broken run)
    os.remove(os.path.join(run_dir, "checkpoints", "step_0000002.pt"))
    assert sweep.main(argv + ["--dry-run"]) == 0
    assert "--restart-broken" in capsys.readouterr().out


def test_a_key_added_since_a_run_counts_with_its_default(tmp_path, capsys):
    """A run made before a config key existed resumes with its default: that is the same config."""
    argv = write_sweep(tmp_path, BASE)
    run_dir = write_run(tmp_path, runs_of(tmp_path)["adamw-lr0.002"])
    config = json.load(open(os.path.join(run_dir, "config.json")))
    del config["train"]["parallel"]  # as the committed results/cpu-ranks runs were written
    json.dump(config, open(os.path.join(run_dir, "config.json"), "w"))
    assert sweep.main(argv + ["--dry-run"]) == 0
    config["train"]["stepz"] = 3  # a key that no longer exists (or never did) is a change
    json.dump(config, open(os.path.join(run_dir, "config.json"), "w"))
    assert sweep.main(argv + ["--dry-run"]) == 2
    assert "train.stepz 3 -> <absent>" in error_lines(capsys)[0]


def test_fsdp_runs_may_have_resumed_on_another_number_of_ranks(tmp_path):
    run = dict(name="r", optimizer="adamw", config={"train": {"micro_batch_size": 2}}, preset=None)
    for parallel, same in (("fsdp", True), ("ddp", False)):
        run["config"]["train"]["parallel"] = parallel
        made = sweep.launched_config(run, sweep.launch_settings(["--nproc", "4"]))
        os.makedirs(tmp_path / parallel)
        (tmp_path / parallel / "config.json").write_text(json.dumps(made))
        now = sweep.launched_config(run, sweep.launch_settings(["--nproc", "2"]))
        changes = sweep.config_drift(str(tmp_path / parallel), now)
        assert changes == ([] if same else ["launch.nproc 4 -> 2", "launch.world_size 4 -> 2"])
        cuda = dict(now, launch=dict(now["launch"], device="cuda", backend="nccl"))
        assert "launch.device \"cpu\" -> \"cuda\"" in sweep.config_drift(str(tmp_path / parallel), cuda)


def test_rerun_changed_keeps_the_old_folder_aside_and_runs_again(tmp_path, capsys, stub):
    text = BASE + "  - optimizer: adamw\n    name: same\n"
    write_sweep(tmp_path, text)
    runs = runs_of(tmp_path)
    old_dir = write_run(tmp_path, runs["adamw-lr0.002"], loss=4.0)
    write_run(tmp_path, runs["same"], loss=4.5)
    argv = write_sweep(tmp_path, text.replace("grid:", "config: {eps: 1.0e-6}\n    grid:"))  # the first entry's
    # the dry run says what it would do, and moves nothing
    assert sweep.main(argv + ["--dry-run", "--rerun-changed"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# adamw-lr0.002: made with another config") and "optimizer.eps 1e-08 -> 1e-06" in out[0]
    assert out[0].endswith("would be kept aside in _old/ and run again")
    assert "--name adamw-lr0.002" in out[1] and "--overwrite" not in out[1] and "--resume" not in out[1]
    assert out[2] == "# same: finished, skipped"
    assert os.path.exists(os.path.join(old_dir, "summary.json")) and not (tmp_path / "res" / "s" / "_old").exists()
    assert sweep.main(argv + ["--rerun-changed"]) == 0
    assert stub.launched == ["adamw-lr0.002"]
    (aside,) = os.listdir(tmp_path / "res" / "s" / "_old")
    assert aside.startswith("adamw-lr0.002-") and f"kept aside as _old/{aside}, run again" in capsys.readouterr().err
    kept = json.load(open(tmp_path / "res" / "s" / "_old" / aside / "summary.json"))
    assert kept["final_val_loss"] == 4.0  # the old run, whole
    assert sweep.config_drift(old_dir, sweep.launched_config(runs_of(tmp_path)["adamw-lr0.002"],
                                                             sweep.launch_settings([]))) == []
    # nothing is left to rerun: the same command now reuses everything
    stub.launched = []
    assert sweep.main(argv + ["--rerun-changed"]) == 0 and stub.launched == []


def test_a_tuning_decides_only_from_runs_of_its_config(tmp_path, capsys, stub):
    """Tuning runs made with the old step count neither feed the decision nor are silently kept."""
    write_sweep(tmp_path, TUNED)
    runs = runs_of(tmp_path)
    for lr, loss in (("0.01", 5.3), ("0.02", 5.0), ("0.04", 5.2)):  # at 20 steps, 0.02 is best
        write_run(tmp_path, runs[f"mfsgd-lr{lr}-seed0"], loss=loss)
    argv = write_sweep(tmp_path, TUNED.replace("steps: 20", "steps: 30"))
    assert sweep.main(argv) == 2
    lines = error_lines(capsys)
    assert [line.split(":")[0] for line in lines[:3]] == ["mfsgd-lr0.01-seed0", "mfsgd-lr0.02-seed0",
                                                          "mfsgd-lr0.04-seed0"]
    assert all("train.steps 20 -> 30" in line for line in lines[:3]) and lines[3].startswith("error: 3 existing run(s)")
    stub.losses = {"mfsgd-lr0.01-seed0": 5.0, "mfsgd-lr0.02-seed0": 5.1, "mfsgd-lr0.04-seed0": 5.2,
                   "mfsgd-lr0.005-seed0": 5.05}  # at 30 steps, 0.01
    assert sweep.main(argv + ["--rerun-changed"]) == 0
    assert stub.launched == ["mfsgd-lr0.01-seed0", "mfsgd-lr0.02-seed0", "mfsgd-lr0.04-seed0", "mfsgd-lr0.005-seed0",
                             "mfsgd-lr0.01-seed1"]
    assert "mfsgd: lr 0.01 chosen" in capsys.readouterr().err
    assert len(os.listdir(tmp_path / "res" / "s" / "_old")) == 3


def test_keep_aside_never_replaces_an_earlier_one(tmp_path):
    names = []
    for _ in range(3):
        os.makedirs(tmp_path / "s" / "r")
        (tmp_path / "s" / "r" / "config.json").write_text("{}")
        names.append(os.path.basename(sweep.keep_aside(str(tmp_path / "s" / "r"))))
    assert len(set(names)) == 3 and sorted(os.listdir(tmp_path / "s" / "_old")) == sorted(names)
    assert not (tmp_path / "s" / "r").exists()


def test_a_changed_run_that_appears_mid_sweep_is_left_alone(tmp_path, capsys, stub):
    """The check at the start covers the folders there then; one written meanwhile (another
    process) is checked again before it is taken over."""
    argv = write_sweep(tmp_path, BASE + "  - optimizer: adamw\n    name: later\n")
    stub.also = {"adamw-lr0.002": {"later": {"train": {"steps": 7}}}}
    assert sweep.main(argv) == 1
    lines = error_lines(capsys)
    assert any(line.startswith("[2/2] later: made with another config") and "train.steps 7 -> 20" in line
               and line.endswith("not run (--rerun-changed runs it again)") for line in lines), lines
    assert lines[-1].endswith("not run (made with another config): later") and stub.launched == ["adamw-lr0.002"]


def test_overwrite_redoes_changed_runs_without_asking(tmp_path, capsys):
    write_sweep(tmp_path, BASE)
    write_run(tmp_path, runs_of(tmp_path)["adamw-lr0.002"])
    argv = write_sweep(tmp_path, BASE.replace("steps: 20", "steps: 30"))
    assert sweep.main(argv + ["--dry-run", "--overwrite"]) == 0
    assert "--overwrite" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 2. names


@pytest.mark.parametrize("value,name", [(0.002, "0.002"), (0.05, "0.05"), (1e-05, "1e-05"), (0.00025, "0.00025"),
                                        (0.016, "0.016"), (1.0, "1"), (3e-4, "0.0003"), (0.010000001, "0.010000001"),
                                        (1 / 3, "0.3333333333333333"), (8, "8"), (True, "true")])
def test_float_names_keep_the_digits_that_tell_them_apart(value, name):
    assert sweep.format_value(value) == name


def test_committed_runs_keep_their_names():
    """Every run folder of the committed results/cpu-ranks is a name sweeps/cpu-ranks.yaml makes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    jobs = sweep.expand(sweep.load_sweep(os.path.join(root, "sweeps", "cpu-ranks.yaml")))
    names = {r["name"] for r in sweep.sweep_runs(jobs)}
    folders = {e for e in os.listdir(os.path.join(root, "results", "cpu-ranks"))
               if os.path.exists(os.path.join(root, "results", "cpu-ranks", e, "config.json"))}
    assert folders and folders <= names


def test_grid_values_that_print_alike_in_full_are_two_runs():
    jobs = sweep.expand({"name": "s", "runs": [{"optimizer": "adamw", "grid": {"lr": [0.01, 0.010000001]}}]})
    assert [j["name"] for j in jobs] == ["adamw-lr0.01", "adamw-lr0.010000001"]
    tuned = sweep.expand({"name": "s", "runs": [{"optimizer": "adamw", "lr": {"tune": [0.01, 0.010000001],
                                                                              "seeds": [0]}}]})[0]
    assert tuned.run(0.010000001, 0)["name"] == "adamw-lr0.010000001-seed0"


@pytest.mark.parametrize("runs,needle", [
    ([{"optimizer": "adamw", "name": "x"}, {"optimizer": "mfsgd", "name": "x"}],
     "two runs of the sweep would be named 'x': runs[0] and runs[1]"),
    ([{"optimizer": "adamw", "grid": {"lr": [1, 1.0]}}],
     "two runs of the sweep would be named 'adamw-lr1': both runs[0] (two grid values that print alike)"),
    ([{"optimizer": "adamw", "name": "a-b", "grid": {"train.seed": [1]}},
      {"optimizer": "adamw", "name": "a", "grid": {"b-seed": [1]}}],  # the same name from other parts
     "two runs of the sweep would be named 'a-b-seed1': runs[0] and runs[1]"),
    # a plain run at an lr and seed the tuning makes: the plain entry's run would feed the tuning
    ([{"optimizer": "adamw", "lr": {"tune": [0.001, 0.002, 0.004], "seeds": [0, 1, 2]}},
      {"optimizer": "adamw", "config": {"weight_decay": 0.5}, "grid": {"lr": [0.002], "train.seed": [0]}}],
     "two runs of the sweep would be named 'adamw-lr0.002-seed0': runs[0] and runs[1]"),
    # ... the plain entry first, at a seed run's lr of an extension (0.001 / 2, seed 1)
    ([{"optimizer": "adamw", "grid": {"lr": [0.0005], "train.seed": [1]}},
      {"optimizer": "adamw", "lr": {"tune": [0.001, 0.002, 0.004], "max_extend": 1, "seeds": [0, 1, 2]}}],
     "two runs of the sweep would be named 'adamw-lr0.0005-seed1': runs[0] and runs[1]"),
    # ... but not past max_extend extensions, nor at a seed the tuning never runs
    ([{"optimizer": "adamw", "grid": {"lr": [0.00025, 0.002], "train.seed": [1, 7]}},
      {"optimizer": "adamw", "lr": {"tune": [0.001, 0.002, 0.004], "max_extend": 1, "seeds": [0, 1, 2]}}],
     "two runs of the sweep would be named 'adamw-lr0.002-seed1'"),
    ([{"optimizer": "adamw", "grid": {"lr": [0.00025], "train.seed": [1]}},
      {"optimizer": "adamw", "grid": {"lr": [0.002], "train.seed": [7]}},
      {"optimizer": "adamw", "lr": {"tune": [0.001, 0.002, 0.004], "max_extend": 1, "seeds": [0, 1, 2]}}], None),
    # two tuned entries
    ([{"optimizer": "adamw", "lr": {"tune": [0.01, 0.02], "seeds": [0]}},
      {"optimizer": "adamw", "config": {"eps": 1.0e-6}, "lr": {"tune": [0.04, 0.08], "max_extend": 1, "seeds": [0]}}],
     "two runs of the sweep would be named 'adamw-lr0.02-seed0': runs[0] and runs[1]"),
])
def test_run_names_never_collide(runs, needle):
    if needle is None:
        sweep.expand({"name": "s", "runs": runs})
        return
    with pytest.raises(sweep.SweepError) as e:
        sweep.expand({"name": "s", "runs": runs})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_name_collision_is_one_line_before_anything_runs(tmp_path, capsys, stub):
    argv = write_sweep(tmp_path, "name: s\nruns:\n  - optimizer: adamw\n    lr: {tune: [0.001, 0.002], seeds: [0]}\n"
                                 "  - optimizer: adamw\n    grid: {lr: [0.002], train.seed: [0]}\n")
    for dry in (["--dry-run"], []):
        assert sweep.main(argv + dry) == 2
        assert error_lines(capsys) == ["error: two runs of the sweep would be named 'adamw-lr0.002-seed0': runs[0] "
                                       "and runs[1]; give an entry a 'name' or change the grid values"]
    assert stub.launched == [] and not (tmp_path / "res").exists()


# ---------------------------------------------------------------------------------------------
# 3. divergence


@pytest.mark.parametrize("summary", [DIVERGED, OLD_DIVERGED])
def test_a_tuning_where_every_lr_diverged_chooses_none(tmp_path, capsys, stub, summary):
    argv = write_sweep(tmp_path, TUNED + "  - optimizer: adamw\n")
    runs = runs_of(tmp_path)
    for lr in ("0.01", "0.02", "0.04"):
        write_run(tmp_path, runs[f"mfsgd-lr{lr}-seed0"], summary=summary, checkpoint=True)
    write_run(tmp_path, runs["adamw"])
    line = "mfsgd: every lr tried diverged (lr 0.01, 0.02, 0.04): no lr chosen, no seeds run; try smaller lrs"
    assert sweep.main(argv + ["--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"# {line}", "# adamw: finished, skipped"]
    assert sweep.main(argv) == 1
    lines = error_lines(capsys)
    assert line in lines and stub.launched == []  # no extension past an inf, no seed run
    assert lines[-1].startswith("sweep s: 1/1 runs ok")
    assert lines[-1].endswith("; no lr chosen (every lr diverged): mfsgd")
    record = json.loads((tmp_path / "res" / "s" / "tuning.json").read_text())["mfsgd"]
    assert record["status"] == "all-diverged" and record["chosen_lr"] is None
    assert record["tried"] == {"0.01": float("inf"), "0.02": float("inf"), "0.04": float("inf")}


def test_every_lr_diverging_as_it_runs_stops_the_entry(tmp_path, capsys, stub):
    argv = write_sweep(tmp_path, TUNED)
    stub.losses = {f"mfsgd-lr{lr}-seed0": "diverged" for lr in ("0.01", "0.02", "0.04")}
    assert sweep.main(argv) == 1
    err = capsys.readouterr().err
    assert stub.launched == ["mfsgd-lr0.01-seed0", "mfsgd-lr0.02-seed0", "mfsgd-lr0.04-seed0"]
    assert "[1/4] mfsgd-lr0.01-seed0: diverged (non-finite training loss nan at step 3)" in err and "FAILED" not in err
    assert "mfsgd: every lr tried diverged (lr 0.01, 0.02, 0.04)" in err
    # the counter said [1/4]: the line says why only 3 ran
    assert err.strip().splitlines()[-1] == ("sweep s: 0/3 runs ok in 0.0 min (1 of the 4 counted runs were not needed: "
                                            "a tuning stopped or chose no lr); diverged while tuning (counted as the "
                                            "worst lr): mfsgd-lr0.01-seed0, mfsgd-lr0.02-seed0, mfsgd-lr0.04-seed0; "
                                            "no lr chosen (every lr diverged): mfsgd")


def test_a_partly_diverged_tuning_chooses_among_the_finite(tmp_path, capsys, stub):
    argv = write_sweep(tmp_path, TUNED)
    runs = runs_of(tmp_path)
    write_run(tmp_path, runs["mfsgd-lr0.01-seed0"], loss=5.2)
    write_run(tmp_path, runs["mfsgd-lr0.04-seed0"], summary=DIVERGED)  # found on disk
    stub.losses = {"mfsgd-lr0.02-seed0": 5.0}  # run now
    assert sweep.main(argv) == 0
    err = capsys.readouterr().err
    assert "mfsgd: lr 0.02 chosen (tune seed 0: lr 0.01 5.2000, lr 0.02 5.0000, lr 0.04 inf)" in err
    assert stub.launched == ["mfsgd-lr0.02-seed0", "mfsgd-lr0.02-seed1"]
    record = json.loads((tmp_path / "res" / "s" / "tuning.json").read_text())["mfsgd"]
    assert record["status"] == "chosen" and record["chosen_lr"] == 0.02


def test_a_tuning_lr_that_diverges_as_it_runs_is_the_worst_not_a_failure(tmp_path, capsys, stub):
    argv = write_sweep(tmp_path, TUNED)
    stub.losses = {"mfsgd-lr0.01-seed0": 5.2, "mfsgd-lr0.02-seed0": 5.0, "mfsgd-lr0.04-seed0": "diverged"}
    assert sweep.main(argv) == 0
    err = capsys.readouterr().err
    assert "[3/4] mfsgd-lr0.04-seed0: diverged (non-finite training loss nan at step 3)" in err and "FAILED" not in err
    assert err.strip().splitlines()[-1] == ("sweep s: 3/4 runs ok in 0.0 min; diverged while tuning (counted as the "
                                            "worst lr): mfsgd-lr0.04-seed0")


def test_a_plain_run_that_diverges_fails_the_sweep(tmp_path, capsys, stub):
    argv = write_sweep(tmp_path, BASE)
    stub.losses = {"adamw-lr0.002": "diverged"}
    assert sweep.main(argv) == 1
    lines = error_lines(capsys)
    assert "[1/1] adamw-lr0.002: diverged (non-finite training loss nan at step 3)" in lines
    assert lines[-1] == "sweep s: 0/1 runs ok in 0.0 min; diverged: adamw-lr0.002"
    # a diverged run is not resumed into the same divergence: it stays diverged, and still fails
    stub.launched = []
    assert sweep.main(argv) == 1 and stub.launched == []
    assert "adamw-lr0.002: diverged (non-finite training loss nan at step 3), not run again (--overwrite does)" in \
        capsys.readouterr().err


def test_a_tuning_where_a_seed_run_diverges_fails_the_sweep(tmp_path, capsys, stub):
    argv = write_sweep(tmp_path, TUNED)
    stub.losses = {"mfsgd-lr0.01-seed0": 5.2, "mfsgd-lr0.02-seed0": 5.0, "mfsgd-lr0.04-seed0": 5.1,
                   "mfsgd-lr0.02-seed1": "diverged"}
    assert sweep.main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("; diverged: mfsgd-lr0.02-seed1")


def test_tune_state_stops_when_every_lr_diverged():
    (job,) = sweep.expand({"name": "s", "runs": [{"optimizer": "adamw", "lr": {"tune": [0.01, 0.02], "seeds": [0]}}]})
    state = sweep.tune_state(job, lambda lr: float("inf"))
    assert state.all_diverged and state.chosen is None and state.extensions == [] and state.need == []
    assert sweep.tune_record(job, state)["status"] == "all-diverged"
    state = sweep.tune_state(job, {0.01: 5.0, 0.02: float("inf"), 0.005: 5.1}.get)
    assert not state.all_diverged and state.chosen == 0.01


# ---------------------------------------------------------------------------------------------
# the whole loop with run.py itself


@pytest.mark.slow
def test_real_runs_are_reused_then_refused_then_rerun(tmp_path, capsys, monkeypatch):
    """What run.py writes is what the sweep compares with: its finished run is reused as is; a
    changed step count is refused, then rerun with --rerun-changed, the old run kept aside."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tiny_overrides(write_tiny_corpus(str(tmp_path / "corpus")), steps=2)
    spec = {"name": "s", "launch": ["--nproc", "1"], "config": config, "runs": [{"optimizer": "adamw"}]}
    argv = write_sweep(tmp_path, json.dumps(spec))
    assert sweep.main(argv) == 0
    assert "[1/1] adamw: new" in capsys.readouterr().err
    assert sweep.main(argv) == 0
    assert "[1/1] adamw: finished, skipped" in capsys.readouterr().err
    config["train"]["steps"] = 3
    argv = write_sweep(tmp_path, json.dumps(spec))
    assert sweep.main(argv) == 2
    assert "adamw: made with another config than the sweep's now: train.steps 2 -> 3" in capsys.readouterr().err
    assert sweep.main(argv + ["--rerun-changed"]) == 0
    assert "kept aside as _old/adamw-" in capsys.readouterr().err
    assert json.loads((tmp_path / "res" / "s" / "adamw" / "summary.json").read_text())["steps"] == 3
    (aside,) = os.listdir(tmp_path / "res" / "s" / "_old")
    assert json.loads((tmp_path / "res" / "s" / "_old" / aside / "summary.json").read_text())["steps"] == 2
