"""Launcher and sweep behaviour around the edges: Ctrl-C of a sweep at any moment is one line and a
resumable state, a resumed run continues its wandb run, resume names the world size it needs,
finished runs can drop their checkpoints, the --help texts say what the tools take, and the
FineWeb tokenizer splits val from train by a fraction of the documents."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
from helpers import ROOT, launch, tiny_overrides, write_run_folder, write_tiny_corpus

import run
from configs import resolve_config
from scripts import sweep


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


def start_sweep(tmp_path, corpus, steps=300):
    cfg = tiny_overrides(corpus, steps=steps)
    cfg["train"].update(val_every=100)
    (tmp_path / "sw.yaml").write_text(json.dumps({"name": "s", "config": cfg, "runs": [{"optimizer": "adamw"}]}))
    argv = [sys.executable, "-m", "scripts.sweep", str(tmp_path / "sw.yaml"), "--results-dir", str(tmp_path / "res")]
    # a session of its own, so the signal goes to the sweep and everything it started, as a terminal's Ctrl-C does
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    return proc, argv


def ctrl_c_when(proc, marker: str, timeout=120) -> list[str]:
    """Sends SIGINT to the sweep's whole process group as soon as its stderr shows `marker`; returns
    the stderr lines read by then plus the rest."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=timeout)
    return lines + rest.splitlines(keepends=True)


@pytest.mark.slow
@pytest.mark.parametrize("marker", [
    "adamw: new",  # run.py is still importing torch
    "run dir:",  # the workers are starting: torchrun and train_gpt.py are importing
])
def test_ctrl_c_of_a_sweep_is_one_line_and_resumable(tmp_path, corpus, marker):
    proc, argv = start_sweep(tmp_path, corpus)
    err = "".join(ctrl_c_when(proc, marker))
    assert proc.returncode == 75, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "ChildFailedError" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines[-1].startswith("sweep s interrupted after ") and "rerun the same command to resume: " in lines[-1]
    assert sum("interrupted" in l or "stopped" in l for l in lines) == 1, err  # one line says it
    state = sweep.run_state(str(tmp_path / "res" / "s" / "adamw"))
    assert state in ("new", "broken", "resumable")  # whatever the moment, the same command continues it
    if state == "resumable":
        assert "adamw stopped at step" in lines[-1] and "checkpoint written" in lines[-1]


@pytest.mark.slow
def test_ctrl_c_mid_run_then_the_same_command_resumes(tmp_path, corpus):
    proc, argv = start_sweep(tmp_path, corpus, steps=40)
    metrics = tmp_path / "res" / "s" / "adamw" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "adamw stopped at step" in last and "checkpoint written" in last and "rerun the same command" in last
    assert "resume with: python run.py" not in err  # the sweep, not run.py, says how to go on
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert again.returncode == 0, again.stderr
    assert "adamw: resumable" in again.stderr
    summary = json.loads((tmp_path / "res" / "s" / "adamw" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 40


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """wandb.init gets the id kept in RUN/wandb_id.txt and resume="allow", files under RUN/."""
    from worker.metrics import start_wandb

    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = resolve_config("adamw", {"logging": {"wandb": "offline"}}, name="r")
    first = start_wandb(cfg, str(tmp_path))
    again = start_wandb(cfg, str(tmp_path))
    assert first.id == again.id and len(first.id) == 16
    assert (tmp_path / "wandb_id.txt").read_text().strip() == first.id
    assert all(c["resume"] == "allow" and c["dir"] == str(tmp_path) and c["mode"] == "offline" and c["name"] == "r"
               for c in calls)


def test_resume_on_another_world_size_names_the_one_it_needs(tmp_path, capsys):
    run_dir = write_run_folder(tmp_path, "r", "adamw", status="stopped", steps_done=5)
    config = json.loads(open(os.path.join(run_dir, "config.json")).read())
    config["launch"].update(nproc=2, world_size=2)
    open(os.path.join(run_dir, "config.json"), "w").write(json.dumps(config))
    assert run.main(["--resume", "r", "--nproc", "1", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == ("error: 'r' ran on 2 workers (config.json launch.world_size) and resumes only on as many: "
                   "--resume r --nproc 2 (train.parallel fsdp runs resume on any number)\n")


@pytest.mark.slow
def test_drop_checkpoints_of_finished_runs(tmp_path, corpus, capsys):
    r = launch(["--optimizer", "adamw", "--name", "a", "--drop-checkpoints", "--config",
                json.dumps(tiny_overrides(corpus, steps=2))], tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "a" / "checkpoints").exists() and "checkpoints of a dropped" in r.stderr
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["status"] == "finished"
    # a sweep drops them for the finished runs it skips; an unfinished run keeps its own
    root = tmp_path / "res" / "s"
    for name, status in (("done", "finished"), ("half", "stopped")):
        write_run_folder(root, name, "adamw", status=status, steps_done=None if status == "finished" else 4)
        os.makedirs(root / name / "checkpoints")
        (root / name / "checkpoints" / "step_0000004.pt").write_bytes(b"x")
    assert run.drop_checkpoints(str(root / "half")) is False and (root / "half" / "checkpoints").exists()
    (tmp_path / "sw.yaml").write_text("name: s\nruns:\n  - optimizer: adamw\n    name: done\n    config: "
                                      "{train: {steps: 10, seed: 0, batch_size: 8}}\n")
    # reused only as the very config the sweep would launch (as run.py writes it)
    done = dict(name="done", optimizer="adamw", config={"train": {"steps": 10, "seed": 0, "batch_size": 8}}, preset=None)
    (root / "done" / "config.json").write_text(json.dumps(sweep.launched_config(done, sweep.launch_settings([]))))
    assert sweep.main([str(tmp_path / "sw.yaml"), "--results-dir", str(tmp_path / "res"), "--drop-checkpoints"]) == 0
    assert "done: finished, skipped (checkpoints dropped)" in capsys.readouterr().err
    assert not (root / "done" / "checkpoints").exists()


@pytest.mark.slow
def test_help_texts_say_what_the_tools_take():
    def help_of(*module):
        r = subprocess.run([sys.executable, *module, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        return r.stdout

    text = help_of("run.py")
    assert "optimizers (configs/optimizers/NAME.yaml): adafactor, adamw, galore, mfsgd, muon" in text
    assert "presets (configs/presets/NAME.yaml): nanogpt-paper" in text and "example:" in text and "cpu-tiny" in text
    text = help_of("-m", "scripts.sweep")
    assert "runs:" in text and "grid:" in text and "lr: {tune:" in text and "tune_seed" in text
    text = help_of("-m", "data.fineweb", "tokenize")
    assert "(default: 0.01)" in text and "--val-docs" in text


def test_tokenize_splits_a_fraction_of_the_documents(tmp_path):
    raw = tmp_path / "docs.jsonl"
    raw.write_text("".join(json.dumps({"text": f"document {i} " * 3}) + "\n" for i in range(50)))
    r = subprocess.run([sys.executable, "-m", "data.fineweb", "tokenize", "--input", str(raw), "--out",
                        str(tmp_path / "out"), "--workers", "1", "--val-fraction", "0.1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(f"{tmp_path / 'out'}: val 5 documents, ")
    assert "train 45 documents" in r.stdout
    from data import fineweb

    few = tmp_path / "two.jsonl"  # default 1%: one val document, and always one left for train
    few.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    done = fineweb.tokenize(str(few), str(tmp_path / "out2"))
    assert (done.val_docs, done.train_docs) == (1, 1)
    with pytest.raises(Exception, match="only 2 non-empty documents in the input, all of them val"):
        fineweb.tokenize(str(few), str(tmp_path / "out3"), val_docs=2)


@pytest.mark.slow
def test_ctrl_c_while_run_py_imports_is_one_line(tmp_path, corpus):
    """A stop that reaches run.py before its workers start: nothing trained, one line, exit 75."""
    argv = [sys.executable, os.path.join(ROOT, "run.py"), "--optimizer", "adamw", "--name", "r", "--results-dir",
            str(tmp_path), "--config", json.dumps(tiny_overrides(corpus, steps=2))]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    time.sleep(0.5)  # python is up; torch is still importing
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert err.strip().splitlines() == ["stopped before training started, nothing trained; resume with: python run.py "
                                        "--resume r"] or err.strip() == "stopped before training started, nothing trained"
