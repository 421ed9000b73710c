"""The report scripts (results, summarize, plot) never trace back: a run whose files hold wrong
types or absurd values is listed as unreadable, with one warning line naming the file and key,
and left out of every statistic; --out problems are one line. (Issue 29.)"""

import csv
import io
import json
import math
import os

import pytest

from helpers import write_run_folder
from scripts import plot, results, summarize


@pytest.fixture
def study(tmp_path):
    """Three finished AdamW seeds and one MoFaSGD run; tests add a fourth AdamW seed and break it."""
    root = tmp_path / "study"
    for seed, final in enumerate((4.0, 4.2, 4.1)):
        write_run_folder(root, f"adamw-seed{seed}", seed=seed, final=final, steps=6, val_every=3)
    write_run_folder(root, "mfsgd-seed0", optimizer="mfsgd", rank=8, lr=0.02, final=3.9, steps=6, val_every=3)
    return root


def edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def edit_metrics(path, edit):
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    edit(rows)
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def put(dotted, value):
    def edit(data):
        *parents, last = dotted.split(".")
        for key in parents:
            data = data[key]
        data[last] = value
    return edit


def row(i, key, value):
    return lambda rows: rows[i].__setitem__(key, value)


BREAKS = [
    ("summary.json", put("final_val_loss", "4.1"), "summary.json: final_val_loss must be a number in [0, 1e6], got \"4.1\""),
    ("summary.json", put("final_val_loss", 1e9), "final_val_loss must be a number in [0, 1e6], got 1000000000.0"),
    ("summary.json", put("best_val_loss", -2.0), "best_val_loss must be a number in [0, 1e6], got -2.0"),
    ("summary.json", put("steps", "6"), "summary.json: steps must be an integer in [0, 2^62], got \"6\""),
    ("summary.json", put("tokens_per_s", [1]), "tokens_per_s must be a number in [0, 1e18], got [1]"),
    ("summary.json", put("peak_mem_bytes", math.inf), "peak_mem_bytes must be a number in [0, 1e18], got Infinity"),
    ("summary.json", put("status", 3), "status must be a string, got 3"),
    ("config.json", put("train", "fast"), "config.json: train must be a mapping, got \"fast\""),
    ("config.json", put("train.seed", "3"), "config.json: train.seed must be an integer or null, got \"3\""),
    ("config.json", put("train.steps", 6.5), "train.steps must be an integer in [0, 2^62], got 6.5"),
    ("config.json", put("optimizer.lr", "0.002"), "optimizer.lr must be a number >= 0, got \"0.002\""),
    ("config.json", put("optimizer.rank", "8"), "optimizer.rank must be an integer >= 1 or null, got \"8\""),
    ("config.json", put("optimizer", None), "optimizer must be a mapping, got null"),
    ("config.json", put("name", 17), "config.json: name must be a string, got 17"),
    ("metrics.jsonl", row(3, "val_loss", "4.5"), "metrics.jsonl: the record of step 3: val_loss must be a number in [0, "
                                                  "1e6], got \"4.5\""),
    ("metrics.jsonl", row(2, "step", "two"), "the record of step \"two\": step must be an integer in [0, 2^62]"),
    ("metrics.jsonl", row(4, "train_loss", math.nan), "the record of step 4: train_loss must be a number in [0, 1e6], "
                                                       "got NaN"),
    ("metrics.jsonl", row(1, "step_ms", -5), "step_ms must be a number in [0, 1e18], got -5"),
    ("metrics.jsonl", lambda rows: rows[1].pop("step"), "metrics.jsonl: a record without a step"),
]
BREAK_IDS = ["str-loss", "huge-loss", "negative-loss", "str-steps", "list-speed", "inf-memory", "int-status",
             "str-train", "str-seed", "float-steps", "str-lr", "str-rank", "null-optimizer", "int-name", "str-val",
             "str-step", "nan-train", "negative-ms", "no-step"]


def one_warning(err: str, needle: str, path) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and needle in lines[0], err
    assert lines[0].endswith("the run is listed as unreadable and left out") and str(path) in lines[0], err


@pytest.mark.parametrize("file, edit, needle", BREAKS, ids=BREAK_IDS)
def test_a_run_with_wrong_values_is_listed_as_unreadable_and_left_out(study, capsys, file, edit, needle):
    summarize.main([str(study), "--format", "csv", "--table", "groups"])
    clean_groups = capsys.readouterr().out
    bad = write_run_folder(study, "adamw-seed3", seed=3, final=9.0, steps=6, val_every=3)
    (edit_metrics if file == "metrics.jsonl" else edit_json)(os.path.join(bad, file), edit)

    assert summarize.main([str(study), "--format", "csv", "--table", "groups"]) == 0
    out, err = capsys.readouterr()
    one_warning(err, needle, os.path.join(bad, file))
    groups = {r["group"]: r for r in csv.DictReader(io.StringIO(out))}
    clean = {r["group"]: r for r in csv.DictReader(io.StringIO(clean_groups))}
    for name, before in clean.items():  # the statistics are those without the broken run
        after = groups[name]
        for key in ("n", "seeds", "final_val_loss_mean", "final_val_loss_std", "best_val_loss_ci_low"):
            assert after[key] == before[key], (name, key)
    for include in ([], ["--include-unfinished"]):  # never counted, also with --include-unfinished
        assert summarize.main([str(study), "--format", "csv", "--table", "runs", *include]) == 0
        runs = {r["run"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
        assert runs["adamw-seed3"]["status"] == "unreadable"
    assert summarize.main([str(study), "--include-unfinished", "--format", "csv", "--table", "groups"]) == 0
    assert {r["group"]: r["n"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}["adamw"] == "3"
    assert results.main([str(study)]) == 0
    listing = capsys.readouterr().out
    assert sum("\tunreadable\t" in line for line in listing.splitlines()) == 1


@pytest.mark.parametrize("file, content", [
    ("summary.json", b"\xff{"), ("summary.json", b"[1, 2]"), ("config.json", b'{"name": '),
    ("config.json", b"[" * 100_000), ("env.json", b"7"),
], ids=["summary-not-utf8", "summary-list", "config-cut-short", "config-deep", "env-number"])
def test_unreadable_files_list_the_run_instead_of_stopping_the_report(study, capsys, file, content):
    bad = write_run_folder(study, "adamw-seed3", seed=3, steps=6, val_every=3)
    with open(os.path.join(bad, file), "wb") as f:
        f.write(content)
    assert summarize.main([str(study), "--table", "runs", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    one_warning(err, os.path.join(bad, file), bad)
    assert [r["status"] for r in csv.DictReader(io.StringIO(out)) if r["run"] == "adamw-seed3"] == ["unreadable"]


def test_edited_runs_stay_out_with_include_unfinished_too(study, capsys):
    bad = write_run_folder(study, "adamw-seed3", seed=3, final=9.0, steps=6, val_every=3)
    edit_json(os.path.join(bad, "summary.json"), put("config_hash", "0" * 64))  # not this config's hash
    assert summarize.main([str(study), "--include-unfinished", "--format", "csv", "--table", "groups"]) == 0
    out, err = capsys.readouterr()
    assert "config.json was edited after the run finished" in err
    adamw = {r["group"]: r for r in csv.DictReader(io.StringIO(out))}["adamw"]
    assert adamw["n"] == "3" and adamw["status"] == "3 finished, 1 edited (left out)"


def test_a_huge_but_finite_loss_gives_an_infinite_perplexity(study, capsys):
    """The issue's case: math.exp(800) overflowed in the perplexity column."""
    write_run_folder(study, "adamw-seed3", seed=3, final=799.0, steps=6, val_every=3)
    assert summarize.main([str(study), "--table", "runs", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(out))}
    assert rows["adamw-seed3"]["final_val_loss"] == "799.0" and rows["adamw-seed3"]["final_val_ppl"] == "inf"
    assert float(rows["adamw-seed0"]["final_val_ppl"]) == pytest.approx(math.exp(4.0))
    assert summarize.main([str(study)]) == 0  # Markdown: every table
    assert "| inf |" in capsys.readouterr().out
    assert summarize.perplexity(708.0) == math.exp(708.0) and summarize.perplexity(None) is None


def test_plot_draws_around_an_unreadable_run(study, tmp_path, capsys):
    bad = write_run_folder(study, "adamw-seed3", seed=3, steps=6, val_every=3)
    edit_json(os.path.join(bad, "summary.json"), put("final_val_loss", "x"))
    assert plot.main([str(study), "--out", str(tmp_path / "a" / "b"), "--include-unfinished"]) == 0
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "unreadable" in err
    assert (tmp_path / "a" / "b" / "loss.png").stat().st_size > 10_000  # missing folders are made


def test_out_problems_are_one_line(study, tmp_path, capsys):
    def error_line(code):
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: --out "), err
        return err[0]

    assert "does not exist" in error_line(summarize.main([str(study), "--out", str(tmp_path / "no" / "t.md")]))
    assert "is a folder; give a file path" in error_line(summarize.main([str(study), "--out", str(tmp_path)]))
    existing = tmp_path / "t.md"
    existing.write_text("old")
    assert summarize.main([str(study), "--out", str(existing)]) == 0  # a file is overwritten, as `>` does
    assert existing.read_text().startswith("## Groups")
    assert "is a file; give a folder" in error_line(plot.main([str(study), "--out", str(existing)]))
    assert "cannot write" in error_line(plot.main([str(study), "--out", str(existing / "figs")]))
    (tmp_path / "figs" / "loss.png").mkdir(parents=True)  # a folder where the PNG goes
    assert "cannot write" in error_line(plot.main([str(study), "--out", str(tmp_path / "figs")]))


def test_a_file_given_as_results_folder_is_one_line(study, capsys):
    path = os.path.join(study, "adamw-seed0", "summary.json")
    assert results.main([path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a results folder" in err[0]
