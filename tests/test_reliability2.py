"""Issue 15: one owner per run folder, no value a worker cannot take, no traceback on any file the
harness reads, a full disk, graceful stops with their own exit code.

Fast in-process cases first; the few real launches share tiny models and few steps."""

import dataclasses
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

import run
from worker import runlock
from configs import SECTIONS, ConfigError, resolve_config
from helpers import ROOT, launch, process_tree, read_metrics, reseal_checkpoint, tiny_overrides, write_tiny_corpus
from optimizers import OPTIMIZERS

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import sweep  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def done(tmp_path_factory, corpus):
    """A finished 6-step AdamW run with checkpoints at steps 3 and 6 (copied by the tests that change it)."""
    results = tmp_path_factory.mktemp("done")
    cfg = tiny_overrides(corpus, steps=6)
    cfg["train"].update(ckpt_every=3)
    r = launch(["--optimizer", "adamw", "--name", "done", "--config", json.dumps(cfg)], results)
    assert r.returncode == 0, r.stderr
    return results / "done"


def copy_run(done, tmp_path, name="r", unfinish=True):
    dst = tmp_path / name
    shutil.copytree(done, dst)
    if unfinish:
        os.remove(dst / "summary.json")
    return dst


def one_error_line(code, err, needle, expect_code=2):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expect_code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


def digest(path):
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            out[full] = open(full, "rb").read()
    return out


# ---------------------------------------------------------------------------------------------
# 2. Every number of every section: finite, 64-bit


def number_fields():
    """(optimizer, override dict, dotted key) for every float and int field of every config section."""
    cases = []

    def walk(cls, path, make):
        for f in dataclasses.fields(cls):
            hint = f.type if not isinstance(f.type, str) else eval(f.type, vars(sys.modules[cls.__module__]))
            if dataclasses.is_dataclass(hint):
                walk(hint, path + [f.name], make)
            elif hint in (float, int) or str(hint) in ("float | None", "int | None", "typing.Optional[int]"):
                cases.append((make(path + [f.name]), ".".join(path + [f.name]), hint))

    def nest(keys, value):
        for key in reversed(keys):
            value = {key: value}
        return value

    for section, cls in SECTIONS.items():
        walk(cls, [section], lambda keys: ("adamw", keys))
    for name, spec in OPTIMIZERS.items():
        walk(spec.config, ["optimizer"], lambda keys, name=name: (name, keys))
    return [(opt, keys, dotted, nest, "int" in str(hint)) for (opt, keys), dotted, hint in cases]


NUMBER_FIELDS = number_fields()


def test_number_fields_cover_every_section():
    sections = {dotted.split(".")[0] for _, _, dotted, _, _ in NUMBER_FIELDS}
    assert sections == {"model", "data", "train", "adam", "logging", "optimizer"}
    assert len(NUMBER_FIELDS) > 60


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 2**64, -(2**64)])
def test_every_number_field_rejects_non_finite_and_overflow(bad):
    """One clear ConfigError naming the key, for every number field of every section and optimizer."""
    for opt, keys, dotted, nest, is_int in NUMBER_FIELDS:
        if isinstance(bad, int) and not is_int:
            continue  # 2**64 is a finite float: range checks decide
        with pytest.raises(ConfigError) as e:
            resolve_config(opt, nest(keys, bad))
        msg = str(e.value)
        assert dotted in msg and ("finite" in msg or "64 bits" in msg), (dotted, msg)


# ---------------------------------------------------------------------------------------------
# 3. Files the harness reads


@pytest.mark.slow
@pytest.mark.parametrize("name,content,needle", [
    ("not UTF-8", b'{"name": "caf\xe9"}', "is not UTF-8 text"),
    ("not JSON", b'{"name": ', "is not valid JSON"),
    ("a list", b"[1, 2]", "must hold a JSON object"),
    ("no optimizer_name", b'{"name": "r"}', "optimizer_name must be a string"),
    ("5000 digits", b'{"name": ' + b"7" * 5000 + b"}", "is not valid JSON"),
    ("nested deep", b"[" * 100_000, "is not valid JSON"),
])
def test_resume_with_bad_config_json(done, tmp_path, capsys, name, content, needle):
    r = copy_run(done, tmp_path)
    (r / "config.json").write_bytes(content)
    before = digest(r)
    one_error_line(run.main(["--resume", "r", "--results-dir", str(tmp_path)]), capsys.readouterr().err, needle)
    assert digest(r) == before


@pytest.mark.slow
@pytest.mark.parametrize("change,needle", [
    (lambda c: c["optimizer"].update(lr=float("nan")), "optimizer.lr must be a finite number"),
    (lambda c: c["train"].update(steps=2), "was made with: train.steps 6 -> 2 (a run's config is fixed"),
    (lambda c: c["model"].update(n_embd=64), "was made with: model.n_embd 32 -> 64"),
    (lambda c: c.update(model=3), "model must be a mapping"),
])
def test_resume_with_edited_config_json(done, tmp_path, capsys, change, needle):
    r = copy_run(done, tmp_path)
    cfg = json.loads((r / "config.json").read_text())
    change(cfg)
    (r / "config.json").write_text(json.dumps(cfg))
    before = digest(r)
    one_error_line(run.main(["--resume", "r", "--results-dir", str(tmp_path)]), capsys.readouterr().err, needle)
    assert digest(r) == before


@pytest.mark.slow
@pytest.mark.parametrize("state,needle", [
    ({"step": 6}, "no 'elapsed_s' entry"),
    ([1, 2, 3], "holds a list, not a checkpoint"),
    ("checkpoint", "holds a str"),
    ("step", "it holds step 5, its name says 6"),
    ("rng", "no CPU random state"),
])
def test_resume_with_a_checkpoint_without_its_keys(done, tmp_path, capsys, state, needle):
    import torch

    r = copy_run(done, tmp_path)
    newest = r / "checkpoints" / "step_0000006.pt"
    if state in ("step", "rng"):
        full = torch.load(newest, weights_only=True)
        if state == "step":
            full["step"] = 5
        else:
            full["rng"] = [{}]
        state = full
    torch.save(state, newest)
    reseal_checkpoint(str(newest))  # its manifest matches: the structure itself is checked
    before = digest(r)
    one_error_line(run.main(["--resume", "r", "--results-dir", str(tmp_path)]), capsys.readouterr().err, needle)
    assert "step_0000003.pt exists" in needle or True
    assert digest(r) == before


@pytest.mark.slow
def test_checkpoint_names_without_a_step_are_not_checkpoints(done, tmp_path):
    from worker.checkpoint import list_checkpoints

    r = copy_run(done, tmp_path)
    for bad in ("step_.pt", "step_abc.pt", "step_12x.pt", "step_-1.pt"):
        (r / "checkpoints" / bad).write_bytes(b"junk")
    (r / "checkpoints" / "step_1e3.pt").mkdir()
    assert [os.path.basename(p) for p in list_checkpoints(str(r))] == ["step_0000003.pt", "step_0000006.pt"]
    assert run.main(["--resume", "r", "--results-dir", str(tmp_path), "--dry-run"]) == 0


@pytest.mark.slow
def test_bad_metrics_lines_and_summary_are_recovered(done, tmp_path):
    """Lines that are valid JSON but not records, or not UTF-8, are dropped as a cut line is; an
    unreadable summary.json is a warning; the resume (at the final checkpoint) restores both."""
    r = copy_run(done, tmp_path)
    good = (r / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    bad = [b"[1, 2]\n", b'{"foo": 1}\n', b'{"step": "3"}\n', b'{"step": true}\n', b'{"step": 2, "val_loss": "x"}\n',
           b"\xff\xfe\x00garbage\n", b"null\n", b'{"step": 1, "train_loss": 9.0}\n']  # the last: a repeated step
    (r / "metrics.jsonl").write_bytes(b"".join(good[:3] + bad + good[3:]))
    (r / "summary.json").write_bytes(b'{"status": "fini')
    res = launch(["--resume", "r"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "summary.json" in res.stderr and "dropped 8 line(s)" in res.stderr
    assert (r / "metrics.jsonl").read_bytes() == b"".join(good)
    ref = json.loads((done / "summary.json").read_text())
    new = json.loads((r / "summary.json").read_text())
    assert new["status"] == "finished"
    assert {k: new[k] for k in ("best_val_loss", "final_val_loss", "final_train_loss", "steps")} == \
        {k: ref[k] for k in ("best_val_loss", "final_val_loss", "final_train_loss", "steps")}


# ---------------------------------------------------------------------------------------------
# 1. One owner per run folder


@pytest.mark.slow
def test_a_held_folder_refuses_every_other_claimant(done, tmp_path, capsys, corpus):
    r = copy_run(done, tmp_path)
    fd = runlock.claim(str(r))
    runlock.write_holder(fd, ["python", "run.py", "--resume", "r"])
    try:
        before = digest(r)
        cfg = json.dumps(tiny_overrides(corpus, steps=2))
        for argv in (["--resume", "r"], ["--resume", "r", "--dry-run"],
                     ["--optimizer", "adamw", "--name", "r", "--overwrite", "--config", cfg],
                     ["--optimizer", "adamw", "--name", "r", "--restart-broken", "--config", cfg],
                     ["--optimizer", "adamw", "--name", "r", "--config", cfg]):
            code = run.main(argv + ["--results-dir", str(tmp_path)])
            one_error_line(code, capsys.readouterr().err, f"in use by pid {os.getpid()}")
        assert sweep.run_state(str(r)) == "running"
        assert digest(r) == before
    finally:
        os.close(fd)
    assert sweep.run_state(str(r)) == "resumable"


@pytest.mark.slow
def test_workers_of_an_earlier_launch_block_a_claim(done, tmp_path, capsys):
    """Orphaned workers (their launcher gone) still hold the workers lock: no resume, no overwrite."""
    r = copy_run(done, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "from worker import runlock; import sys, time; runlock.hold_as_worker(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(r)], cwd=ROOT, stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == b"held"
        one_error_line(run.main(["--resume", "r", "--results-dir", str(tmp_path)]), capsys.readouterr().err,
                       "training workers of an earlier launch of 'r' still run")
        assert sweep.run_state(str(r)) == "running"
    finally:
        holder.kill()
        holder.wait()
    assert sweep.run_state(str(r)) == "resumable"


@pytest.mark.slow
def test_restart_broken_never_replaces_a_run_with_a_checkpoint(done, tmp_path, capsys, corpus):
    r = copy_run(done, tmp_path)
    before = digest(r)
    cfg = json.dumps(tiny_overrides(corpus, steps=2))
    one_error_line(run.main(["--optimizer", "adamw", "--name", "r", "--restart-broken", "--config", cfg,
                             "--results-dir", str(tmp_path)]), capsys.readouterr().err, "has a checkpoint; resume it")
    finished = copy_run(done, tmp_path, "f", unfinish=False)
    shutil.rmtree(finished / "checkpoints")
    one_error_line(run.main(["--optimizer", "adamw", "--name", "f", "--restart-broken", "--config", cfg,
                             "--results-dir", str(tmp_path)]), capsys.readouterr().err, "finished; --restart-broken")
    assert digest(r) == before


@pytest.mark.slow
def test_sweep_skips_a_live_run_and_dry_run_says_so(done, tmp_path, capsys):
    sw = tmp_path / "sw.yaml"
    sw.write_text("name: s\nruns:\n  - optimizer: adamw\n    name: live\n")
    os.makedirs(tmp_path / "results" / "s")
    live = tmp_path / "results" / "s" / "live"
    os.mkdir(live)
    (live / "config.json").write_text(json.dumps({"name": "live", "optimizer_name": "adamw"}))  # no checkpoint yet
    fd = runlock.claim(str(live))
    try:
        assert sweep.main([str(sw), "--results-dir", str(tmp_path / "results"), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "--overwrite" not in out and "--restart-broken" not in out and "live: in use by" in out
        assert sweep.main([str(sw), "--results-dir", str(tmp_path / "results")]) == 1
        assert "in use by" in capsys.readouterr().err
        assert os.listdir(live) == [".lock", ".workers.lock", "config.json"] or \
            sorted(os.listdir(live)) == sorted([".lock", ".workers.lock", "config.json"])
    finally:
        os.close(fd)
    assert sweep.main([str(sw), "--results-dir", str(tmp_path / "results"), "--dry-run"]) == 0
    assert "--restart-broken" in capsys.readouterr().out  # broken, and nobody owns it now




def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_step(path, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and sum(1 for _ in open(path)) > step:
            return
        time.sleep(0.01)
    raise AssertionError("the run did not reach step %d" % step)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux")
def test_live_run_has_one_owner_and_its_workers_die_with_the_launcher(tmp_path, corpus):
    """While a run trains, a second resume, an overwrite and a sweep are refused; SIGKILL to run.py
    alone ends torchrun and the workers (a graceful stop: "stopped" summary), and the resume then
    continues with every step once."""
    # far more steps than the checks below take on any machine: the run is still training when they end
    cfg = tiny_overrides(corpus, steps=1_000_000, batch_size=8, micro_batch_size=4)
    cfg["train"].update(val_every=100, ckpt_every=5)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), "--optimizer", "adamw", "--name", "live",
                             "--config", json.dumps(cfg), "--results-dir", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    run_dir = tmp_path / "live"
    try:
        wait_for_step(run_dir / "metrics.jsonl", 3, proc)
        second = launch(["--resume", "live"], tmp_path)
        one_error_line(second.returncode, second.stderr, f"run 'live' is in use by pid {proc.pid}")
        again = launch(["--optimizer", "adamw", "--name", "live", "--overwrite", "--config", json.dumps(cfg)], tmp_path)
        one_error_line(again.returncode, again.stderr, "is in use by")
        assert sweep.run_state(str(run_dir)) == "running"
        tree = process_tree(proc.pid)
        assert len(tree) >= 3  # run.py, torchrun, a worker
    finally:
        proc.kill()  # the launcher alone
        proc.wait()
    deadline = time.time() + 90
    while time.time() < deadline and any(alive(pid) for pid in tree[1:]):
        time.sleep(0.1)
    assert not any(alive(pid) for pid in tree[1:]), "trainers outlived their launcher"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"
    stopped_at = json.loads((run_dir / "summary.json").read_text())["steps"]
    # the resume (its config is fixed: the same 1,000,000 steps) trains a few steps, then is stopped
    resumed = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), "--resume", "live", "--results-dir",
                                str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    wait_for_step(run_dir / "metrics.jsonl", stopped_at + 3, resumed)
    resumed.send_signal(signal.SIGINT)
    assert resumed.wait(timeout=120) == 75, resumed.stderr.read()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] > stopped_at
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(summary["steps"] + 1))  # every step once


# ---------------------------------------------------------------------------------------------
# 4. A full disk


def test_full_disk_while_checkpointing(tmp_path, corpus, monkeypatch):
    """In-process: torch.save fails (ENOSPC) mid-write: RunFailed with one line, no temp file, the
    older checkpoints untouched."""
    import torch

    from worker.checkpoint import save_checkpoint
    from optimizers import RunOptimizers
    from worker.outcome import RunFailed

    model = torch.nn.Linear(4, 4)
    opts = RunOptimizers(torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1),
                         lambda s: 1.0)
    save_checkpoint(str(tmp_path), 3, model, opts, 1.0, 2, 0, 1, config={})
    old = (tmp_path / "checkpoints" / "step_0000003.pt").read_bytes()
    real_save = torch.save

    for exc in (OSError(errno.ENOSPC, "No space left on device"), RuntimeError("PytorchStreamWriter failed writing file"),
                OSError(errno.EDQUOT, "Disk quota exceeded")):
        def failing_save(obj, f, exc=exc):
            f.write(b"partial")
            raise exc

        monkeypatch.setattr(torch, "save", failing_save)
        with pytest.raises(RunFailed) as e:
            save_checkpoint(str(tmp_path), 6, model, opts, 2.0, 2, 0, 1, config={})
        assert "cannot write the checkpoint of step 6" in str(e.value) and "\n" not in str(e.value)
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000003.manifest.json", "step_0000003.pt"]
        assert (tmp_path / "checkpoints" / "step_0000003.pt").read_bytes() == old
    monkeypatch.setattr(torch, "save", real_save)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as a full disk")
def test_full_disk_run_fails_with_one_line_and_resumes(tmp_path, corpus):
    """A file-size limit (EFBIG, as a full disk) hits the first checkpoint: exit 3, one last line,
    "failed" in summary.json, no temp file; the resume with space back finishes."""
    cfg = tiny_overrides(corpus, steps=6)
    cfg["train"].update(ckpt_every=3)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    r = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "--optimizer", "adamw", "--name", "full",
                        "--config", json.dumps(cfg), "--results-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, preexec_fn=limit, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot write the checkpoint of step 3")
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["status"] == "failed" and "checkpoint" in summary["reason"]
    leftovers = [f for _, _, fs in os.walk(tmp_path / "full") for f in fs if ".tmp" in f]
    assert leftovers == []
    resumed = launch(["--resume", "full"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "full")] == list(range(7))
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["status"] == "finished"


# ---------------------------------------------------------------------------------------------
# 5. Graceful stops in sweeps


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sweep_records_a_graceful_stop_as_stopped(tmp_path, corpus, sig):
    cfg = tiny_overrides(corpus, steps=300)
    cfg["train"].update(val_every=100)
    (tmp_path / "sw.yaml").write_text(json.dumps({"name": "s", "config": cfg,
                                                  "runs": [{"optimizer": "adamw"}, {"optimizer": "mfsgd"}]}))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "sweep.py"), str(tmp_path / "sw.yaml"),
                             "--results-dir", str(tmp_path / "results")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wait_for_step(tmp_path / "results" / "s" / "adamw" / "metrics.jsonl", 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "Traceback" not in err and "ChildFailedError" not in err
    last = err.strip().splitlines()[-1]  # one line: the sweep says what stopped and how to go on
    assert last.startswith("sweep s interrupted after ") and "adamw stopped at step" in last and "FAILED" not in err
    assert "checkpoint written" in last and "rerun the same command to resume: python -m scripts.sweep" in last
    assert json.loads((tmp_path / "results" / "s" / "adamw" / "summary.json").read_text())["status"] == "stopped"
    assert not (tmp_path / "results" / "s" / "mfsgd").exists()  # the sweep ended there
    assert sweep.run_state(str(tmp_path / "results" / "s" / "adamw")) == "resumable"


# ---------------------------------------------------------------------------------------------
# 3/6. Sweep files


@pytest.mark.parametrize("text,needle", [
    ("name: s\nconfg: {train: {steps: 3}}\nruns: [{optimizer: adamw}]\n", "unknown key 'confg' (did you mean 'config'?); valid keys: name"),
    ("name: s\nlaunch: --nproc 1\nruns: [{optimizer: adamw}]\n", "launch must be a list of run.py arguments"),
    ("name: s\nlaunch: [--nproc, [1]]\nruns: [{optimizer: adamw}]\n", "launch must be a list of run.py arguments"),
    ("name: s\nlaunch: [--results-dir, /tmp]\nruns: [{optimizer: adamw}]\n", "launch may not hold --results-dir"),
    ("name: ../up\nruns: [{optimizer: adamw}]\n", "must be one folder name"),
    ("name: a/b\nruns: [{optimizer: adamw}]\n", "must be one folder name"),
    ("name: 5\nruns: [{optimizer: adamw}]\n", "must be one folder name"),
    ("name: s\nruns: [{optimizer: adamw, name: ../x}]\n", "would be named '../x'"),
    ("name: s\nruns: [{optimizer: adamw, grid: {data.train_files: [a/b]}}]\n", "a run name is one folder name"),
    ("name: s\nruns: [{optimizer: adamw, name: [1]}]\n", "runs[0].name must be a string"),
    ("name: s\nruns: [{optimizer: 3}]\n", "runs[0].optimizer must be an optimizer name"),
    ("name: s\nruns: [{optimizer: adamw, config: [1]}]\n", "runs[0].config must be a mapping"),
    ("name: s\nruns: [{optimizer: adamw, grid: [1]}]\n", "runs[0].grid must be a mapping"),
    ("name: s\nruns: [{optimizer: adamw, grid: {lr: 0.1}}]\n", "runs[0].grid.lr must be a non-empty list"),
    ("name: s\nconfig: [1]\nruns: [{optimizer: adamw}]\n", "config must be a mapping"),
    ("name: s\npreset: [x]\nruns: [{optimizer: adamw}]\n", "preset must be a preset name"),
    ("name: s\nruns: adamw\n", "non-empty list 'runs'"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("name: s\nruns: [{optimizer: adamw\n", "is not valid YAML"),
    ("name: s\nruns: " + "[" * 50_000 + "\n", "is not valid YAML"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
     "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]\n"
     "name: s\nruns: [{optimizer: adamw, config: {x: *h}}]\n", "expands to more than 100000 YAML nodes"),
    (b"name: caf\xe9\nruns: [{optimizer: adamw}]\n", "is not UTF-8 text"),
    ("name: s\nruns: [{optimizer: adamw}]\n!!python/object:os.system {}: 1\n", "is not valid YAML"),
])
def test_bad_sweep_files(tmp_path, capsys, text, needle):
    path = tmp_path / "sw.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    t0 = time.time()
    code = sweep.main([str(path), "--results-dir", str(tmp_path / "results"), "--dry-run"])
    one_error_line(code, capsys.readouterr().err, needle)
    assert time.time() - t0 < 10
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_sweep_state_of_unreadable_run_files(done, tmp_path):
    """A corrupt summary.json never makes a run look finished, and never a traceback."""
    r = copy_run(done, tmp_path, unfinish=False)
    (r / "summary.json").write_bytes(b"\xff{")
    assert sweep.run_state(str(r)) == "resumable"
    (r / "config.json").write_text("[")
    assert sweep.run_state(str(r)) == "resumable"
    shutil.rmtree(r / "checkpoints")
    assert sweep.run_state(str(r)) == "broken"
