"""Nothing hangs, and a failure ends with its reason: a rank that stops answering fails the run on
every rank with one line naming the step (train.collective_timeout_s), a stop signal ends a stuck run
within seconds, and a worker's traceback goes to RUN/workers.log while the terminal's last line is
`error: <reason>` (run.py's WorkerOutput, RunWatch and supervise)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from helpers import ROOT, process_tree, read_metrics, tiny_overrides, write_tiny_corpus

TIMEOUT_S = 5  # train.collective_timeout_s of the runs that lose a rank: small, yet far above a tiny step


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))


def config(corpus, **train):
    # far more steps than any test waits for: the run is still training when a rank is stopped
    cfg = tiny_overrides(corpus, steps=1_000_000, batch_size=8, micro_batch_size=4)
    cfg["train"].update({"val_every": 100, "collective_timeout_s": TIMEOUT_S, **train})
    return cfg


def start(tmp_path, name, cfg, nproc=2):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), "--optimizer", "adamw", "--nproc", str(nproc),
                             "--name", name, "--config", json.dumps(cfg), "--results-dir", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def logged_steps(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def wait_until(condition, proc, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def workers(proc) -> dict:
    """{rank: pid} of the training workers under run.py `proc` (torchrun's children)."""
    found = {}
    for pid in process_tree(proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"train_gpt.py" not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
            found[int(env[b"RANK"])] = pid
        except (OSError, KeyError, ValueError):
            continue
    return found


def state(pid) -> str | None:
    """The process's state letter (T: stopped, Z: a zombie), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def all_gone(pids, timeout=10) -> bool:
    deadline = time.time() + timeout
    while any(state(pid) not in (None, "Z") for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    return all(state(pid) in (None, "Z") for pid in pids)


def summary(run_dir) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# A rank that stops answering. Three runs at once (their waits overlap, which saves the test time of
# two): `step`: rank 1 is stopped from outside (kill -STOP) between training steps, so rank 0 waits in
# the next step's all-reduce; `ckpt`: rank 1 stops itself (train.debug_hang_at_step) after logging
# step 3, whose checkpoint rank 0 then waits for; `sigint`: as `ckpt` but before step 4, under a
# collective timeout far beyond the test, and run.py gets SIGINT.


@pytest.fixture(scope="module")
def lost_ranks(tmp_path_factory, corpus):
    """{name: (run.py's exit code, its stderr, the run folder, its processes, seconds from the
    stop or SIGINT to run.py's end)} of the three runs."""
    root = tmp_path_factory.mktemp("lost")
    runs = {"step": start(root, "step", config(corpus)),
            "ckpt": start(root, "ckpt", config(corpus, debug_hang_at_step=3, ckpt_every=3)),
            "sigint": start(root, "sigint", config(corpus, collective_timeout_s=600, debug_hang_at_step=3,
                                                   ckpt_every=2))}
    trees, since = {}, {}
    wait_until(lambda: logged_steps(root / "step") > 3 and len(workers(runs["step"])) == 2, runs["step"], "step 3")
    trees["step"] = process_tree(runs["step"].pid)
    os.kill(workers(runs["step"])[1], signal.SIGSTOP)
    since["step"] = time.time()
    for name in ("ckpt", "sigint"):
        wait_until(lambda: any(state(pid) == "T" for pid in workers(runs[name]).values()), runs[name], "a stopped rank")
        trees[name], since[name] = process_tree(runs[name].pid), time.time()
    runs["sigint"].send_signal(signal.SIGINT)
    since["sigint"] = time.time()
    results = {}
    for name, proc in runs.items():
        err = proc.communicate(timeout=120)[1]
        results[name] = (proc.returncode, err, root / name, trees[name], time.time() - since[name])
    return results


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and SIGSTOP of a worker are Linux")
@pytest.mark.parametrize("name", ["step", "ckpt"])
def test_a_stopped_rank_fails_every_rank_with_one_line_naming_the_step(lost_ranks, name):
    """Within the collective timeout (plus the launcher's second for the healthy ranks to exit, then
    it kills the stopped one): one line naming the step and what the run was doing, "failed", exit 3,
    no process left; not gloo's 30-minute default, nor torchrun's --shutdown-timeout for the stopped rank."""
    code, err, run_dir, tree, took = lost_ranks[name]
    assert code == 3, err
    assert took < TIMEOUT_S + 15, f"the run took {took:.1f} s to fail"
    assert "Traceback" not in err and "ChildFailedError" not in err, err
    assert summary(run_dir)["status"] == "failed"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {summary(run_dir)['reason']}"), err
    assert all_gone(tree), f"processes left: {[p for p in tree if state(p) not in (None, 'Z')]}"
    if name == "step":
        stuck_step = read_metrics(run_dir)[-1]["step"] + 1  # rank 0 waited in the step after the last logged
        assert last == (f"error: a collective did not complete within train.collective_timeout_s={TIMEOUT_S} s at step "
                        f"{stuck_step}, in the training step (a rank stopped responding or died); the last good "
                        "checkpoint is kept")
    else:
        assert last == (f"error: a collective did not complete within train.collective_timeout_s={TIMEOUT_S} s at step "
                        "3, while writing its checkpoint (a rank stopped responding or died)")
        assert not (run_dir / "checkpoints" / "step_0000003.pt").exists()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and SIGSTOP of a worker are Linux")
def test_sigint_ends_a_stuck_run_within_seconds(lost_ranks):
    """SIGINT reaches the workers, which cannot act on it (rank 0 waits in step 4's all-reduce for the
    stopped rank 1); once they have written nothing for the stop grace (run.STOP_GRACE_S) the launcher
    kills them. "failed", exit 3, and the line says where a resume starts: step 2's checkpoint."""
    code, err, run_dir, tree, took = lost_ranks["sigint"]
    assert code == 3, err
    assert took < 20, f"SIGINT took {took:.1f} s to end a stuck run"
    reason = summary(run_dir)["reason"]
    assert summary(run_dir)["status"] == "failed"
    assert reason.startswith("stopped by SIGINT, but the workers were stuck after step 3 (the last logged) and were "
                             "killed after ") and reason.endswith("; no stop checkpoint written; resume with --resume "
                                                                  "sigint from step 2"), reason
    assert err.strip().splitlines()[-1] == f"error: {reason}"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert all_gone(tree)


# ---------------------------------------------------------------------------------------------
# A crashed worker: its error is the last line, its traceback in RUN/workers.log


@pytest.mark.slow
def test_a_crashed_worker_s_error_is_the_last_line_and_its_traceback_is_in_the_log(tmp_path, corpus):
    cfg = config(corpus, debug_crash_at_step=2)
    cfg["train"]["steps"] = 4
    proc = start(tmp_path, "crash", cfg)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert re.fullmatch(r"error: rank [01] crashed: RuntimeError: debug_crash_at_step: injected crash at step 2; "
                        r"resume with --resume crash \(from its newest checkpoint\)", lines[-1]), err
    assert "Traceback" not in err and "ChildFailedError" not in err and "elastic" not in err, err
    # each rank raised the same error: shown once, with where its traceback is
    log = tmp_path / "crash" / "workers.log"
    assert [line for line in lines if "injected crash" in line and "traceback:" in line] == [
        re.search(r"\[rank[01]\]: RuntimeError: debug_crash_at_step: injected crash at step 2 \(traceback: .*\)", err)[0]]
    assert f"(traceback: {log})" in err
    text = log.read_text()
    assert "Traceback (most recent call last):" in text and "ChildFailedError" in text
    assert summary(tmp_path / "crash")["reason"].endswith("crashed: RuntimeError: debug_crash_at_step: injected crash "
                                                          "at step 2")


# ---------------------------------------------------------------------------------------------
# The terminal's share of the workers' output (run.WorkerOutput), from a log written by hand


def show(tmp_path, capsys, *writes):
    """Feeds `writes` (bytes) to a WorkerOutput one by one, pumping after each (b"": a pause, which
    completes the tracebacks held); returns it and what it showed after each write and after close()."""
    import run

    path = tmp_path / "workers.log"
    path.write_bytes(b"")
    output, shown = run.WorkerOutput(str(path), 0), []
    for data in writes:
        with open(path, "ab") as f:
            f.write(data)
        output.pump()
        shown.append(capsys.readouterr().err)
    output.close()
    shown.append(capsys.readouterr().err)
    return output, shown


def test_progress_bar_updates_show_as_they_come_and_a_traceback_glued_to_one_is_kept_back(tmp_path, capsys):
    output, shown = show(tmp_path, capsys, b"run: 1 step\n", b"\rbar 1/3", b"\rbar 2/3",
                         b"[rank0]: Traceback (most recent call last):\n[rank0]:   File \"x.py\", line 1, in <module>\n"
                         b"[rank0]: KeyError: 'x'\n", b"")
    assert shown[:3] == ["run: 1 step\n", "\rbar 1/3", "\rbar 2/3"]  # no line end needed to show a \r update
    assert shown[3:] == ["\n", f"[rank0]: KeyError: 'x' (traceback: {tmp_path / 'workers.log'})\n", ""]
    assert output.crash == "rank 0 crashed: KeyError: 'x'"


TORCHRUN_REPORT = b"""\
E1204 13:40:33.432000 4397 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] \
failed (exitcode: -9) local_rank: 1 (pid: 4408) of binary: python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
train_gpt.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  exitcode  : -9 (pid: 4408)  (SIGKILL)
============================================================
"""


def test_torchrun_report_is_kept_back_and_names_a_worker_killed_by_a_signal(tmp_path, capsys):
    output, shown = show(tmp_path, capsys, b"before\n", TORCHRUN_REPORT, b"after\n")
    assert shown[:3] == ["before\n", "", "after\n"]
    assert shown[3] == f"(the workers' full output: {tmp_path / 'workers.log'})\n"
    assert output.crash is None and output.failed_worker == "the worker of local rank 1 was killed by SIGKILL"


def test_each_distinct_worker_error_shows_once_and_a_chain_shows_its_last_error(tmp_path, capsys):
    ranks = b"".join(b"[rank%d]: Traceback (most recent call last):\n[rank%d]:   File \"t.py\", line 3, in f\n"
                     b"[rank%d]: RuntimeError: boom\n" % (r, r, r) for r in (1, 0))
    chain = (b"Traceback (most recent call last):\n  File \"a.py\", line 1\nValueError: inner\n\nThe above exception was "
             b"the direct cause of the following exception:\n\nTraceback (most recent call last):\n  File \"a.py\", "
             b"line 2\nValueError: outer\nnext line\n")
    output, shown = show(tmp_path, capsys, ranks, b"", chain)
    log = tmp_path / "workers.log"
    assert shown[0] == ""  # held until the output pauses: a chained traceback may follow
    assert shown[1] == f"[rank1]: RuntimeError: boom (traceback: {log})\n"  # rank 0's, the same error: not again
    assert shown[2] == f"ValueError: outer (traceback: {log})\nnext line\n"
    assert output.crash == "rank 1 crashed: RuntimeError: boom"


# ---------------------------------------------------------------------------------------------
# The launcher's last line


def outcome_of(tmp_path, capsys, summary_json, crash):
    import run

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"name": "r", "optimizer_name": "adamw"}))
    (run_dir / "summary.json").write_text(json.dumps(summary_json))
    args = SimpleNamespace(num_gpus=None, nproc=2, results_dir=str(tmp_path))
    code = run.outcome(args, str(run_dir), 1, False, crash=crash)
    return code, capsys.readouterr().err.strip().splitlines()[-1], json.loads((run_dir / "summary.json").read_text())


def test_a_crashed_rank_s_error_comes_before_the_lost_connection_its_peers_report(tmp_path, capsys):
    lost = "a collective lost its connection to another rank at step 5, in the training step (...)"
    code, last, written = outcome_of(tmp_path, capsys, {"status": "failed", "reason": lost, "lost_rank": True},
                                     crash="rank 1 crashed: KeyError: 'x'")
    assert code == 1 and last == f"error: rank 1 crashed: KeyError: 'x'; then {lost}; resume with --resume r (from its " \
                                  "newest checkpoint)"
    assert written["status"] == "failed" and written["reason"].startswith("rank 1 crashed: KeyError: 'x'; then ")


@pytest.mark.parametrize("status", ["failed", "diverged"])
def test_a_failure_the_workers_reported_is_the_last_line_exit_3(tmp_path, capsys, status):
    code, last, _ = outcome_of(tmp_path, capsys, {"status": status, "reason": "non-finite loss at step 3"}, crash=None)
    assert code == 3 and last == "error: non-finite loss at step 3; the last good checkpoint is kept"


def test_stuck_after_a_stop_means_quiet_for_twice_the_longest_quiet_spell_or_the_grace(tmp_path):
    import run

    watch = run.RunWatch(str(tmp_path))
    (tmp_path / "workers.log").write_text("the launcher's own log is no sign of the workers")
    watch.poll(1.0)
    assert watch.stuck_since(stop_reached=1.0, now=100.0) is None  # nothing written yet: still starting
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    watch.poll(10.0)
    (tmp_path / "metrics.jsonl").write_text("{}\n{}\n")
    watch.poll(14.0)  # 4 s between two writes: the grace is 8 s (twice that), not run.STOP_GRACE_S
    assert watch.longest_quiet == 4.0 and run.STOP_GRACE_S < 8
    assert watch.stuck_since(stop_reached=15.0, now=23.0) is None
    assert watch.stuck_since(stop_reached=15.0, now=23.5) == 8.5
    (tmp_path / "summary.json").write_text('{"status": "failed"}')
    watch.poll(24.0)
    assert watch.status == "failed"
