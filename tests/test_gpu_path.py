"""The GPU path: scripts/gpu_check.sh at toy size on CPU (every part of the one-call check, the paper
preset with bf16 and FSDP included), the sliding window's no-retrace property on CPU, and the checks
that only a CUDA GPU can run (skipped here; gpu_check.sh's `tests` part runs them with
`python tests/test_gpu_path.py`, since the GPU machine has no pytest):

  * flex_attention's block mask, compiled by inductor, equals the dense mask in bf16 and the model
    does not recompile as the window tensor grows; the compiled bf16 model trains like the eager one;
  * memory_mode sketch under FSDP2 on CUDA (its hooks run on FSDP's reduce-scatter stream) trains
    like memory_mode full;
  * one NCCL worker with a process group (DDP, the overlapped sketch all-reduces, the shard
    all-gathers, CUDA streams) trains like one without.
None of the CUDA checks has run yet: no GPU was lent (docs/benchmarks.md, "GPU")."""

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers, when run as a script
from helpers import ROOT, read_metrics, train_in_process, write_tiny_corpus  # noqa: E402

sys.path.insert(0, ROOT)

try:
    import pytest

    slow = pytest.mark.slow
    cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
except ImportError:  # the GPU machine: the __main__ runner below calls the CUDA checks directly
    slow = cuda_only = lambda f: f

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
# the CPU test's runs: every kind of config the GPU's train part launches (DDP with bf16 tables, the
# sketch modes, FSDP, Muon); plain mfsgd and adamw add only start-up time here (~7 s a launch; the
# paper preset's adamw under DDP and FSDP runs in tests/test_fsdp.py)
RUNS = ["mfsgd-sketch", "mfsgd-fsdp", "muon"]
PARTS = ["env", "smoke", *(f"train:{run}" for run in RUNS), "memory", "bench"]


def run_check(out, work, parts=None, **env):
    environment = dict(os.environ, GPU_CHECK_DEVICE="cpu", GPU_CHECK_STEPS="2", GPU_CHECK_VOCAB="256",
                       GPU_CHECK_WORK=str(work), PY=sys.executable, OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", SCRIPT, str(out), *([parts] if parts else [])], env=environment,
                          capture_output=True, text=True, timeout=600)


def progress_rows(out) -> dict:
    """progress.md's part table: part -> (estimate, limit, real seconds, status)."""
    rows = {}
    for line in (out / "progress.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("part",):
            rows[cells[0]] = tuple(cells[1:])
    return rows


@slow
def test_gpu_check_runs_every_part_on_cpu(tmp_path):
    """The one-call check at toy size (GPU_CHECK_DEVICE=cpu): the same parts and runs as on the GPU,
    the paper preset included (speedrun model with bf16 tables and stream, DDP and FSDP, sketch
    modes, Muon), each part timed in progress.md; the output folder is what the lease can bring
    back (at most 8 plain files, none in a folder, each under 16 MiB) and holds no checkpoint."""
    data = write_tiny_corpus(str(tmp_path / "data"), train_tokens=20_000, val_tokens=3_000)
    out, work = tmp_path / "out", tmp_path / "work"
    proc = run_check(out, work, GPU_CHECK_DATA=os.path.dirname(data["train_files"]), GPU_CHECK_RUNS=" ".join(RUNS))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: 0 failed part(s)" in proc.stdout
    rows = progress_rows(out)
    assert list(rows) == PARTS
    for part, (estimate, limit, real, status) in rows.items():
        assert status == "ok" and int(real) <= int(limit) and int(estimate) > 0, part
    files = sorted(os.listdir(out))
    assert files == ["bench.md", "env.txt", "logs.tar.gz", "memory.md", "progress.md", "runs.tar.gz", "summary.md"]
    assert all(os.path.isfile(out / f) and os.path.getsize(out / f) < 16 << 20 for f in files)
    assert "| adamw |" in (out / "memory.md").read_text() and "| MoFaSGD ms |" in (out / "bench.md").read_text()
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
        configs = {n.split("/")[1]: json.load(tar.extractfile(n)) for n in names if n.endswith("/config.json")}
        summaries = {n.split("/")[1]: json.load(tar.extractfile(n)) for n in names if n.endswith("/summary.json")}
    assert not any("checkpoints" in n for n in names) and not list(work.rglob("checkpoints"))
    assert sorted(configs) == sorted(["smoke", *RUNS])
    assert all(s["status"] == "finished" for s in summaries.values()) and len(summaries) == 1 + len(RUNS)
    for name, cfg in configs.items():
        assert cfg["launch"]["distributed"] is True, name
        if name != "smoke":  # the paper preset at toy size
            assert cfg["model"]["arch"] == "speedrun" and cfg["model"]["bf16"] is True, name
            assert cfg["data"]["layout"] == "stream" and cfg["train"]["window_tokens"] == [128, 1856], name
    assert configs["mfsgd-fsdp"]["train"]["parallel"] == "fsdp"
    assert {k: configs["mfsgd-sketch"]["optimizer"][k] for k in ("memory_mode", "comm")} == \
        {"memory_mode": "sketch", "comm": "sketch"}
    assert configs["mfsgd-fsdp"]["optimizer"]["check_orthonormal"] == 0.001
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in configs)
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = set(tar.getnames())
    assert {f"logs/{part}.log" for part in ("env", "smoke", "train", "memory", "bench")} <= logs


@slow
def test_gpu_check_counts_failures_skips_past_its_budget_and_refuses_unknown_parts(tmp_path):
    """A part that cannot run is a counted failure (the exit status) and the next part still runs;
    a part whose estimate does not fit the budget left is skipped and named for the next command."""
    out, work = tmp_path / "out", tmp_path / "work"
    missing = run_check(out, work, "smoke train", GPU_CHECK_DATA=str(tmp_path / "none"))
    assert missing.returncode == 2 and "gpu_check: 2 failed part(s)" in missing.stdout
    assert "no train_*.bin / val_*.bin shards" in progress_rows(out)["smoke"][3]
    data = write_tiny_corpus(str(tmp_path / "data"), train_tokens=4_000, val_tokens=2_000)
    tight = run_check(out, work, "env smoke memory", GPU_CHECK_BUDGET_S="12",
                      GPU_CHECK_DATA=os.path.dirname(data["train_files"]))
    assert tight.returncode == 0, tight.stdout + tight.stderr
    rows = progress_rows(out)
    assert rows["env"][3] == "ok"
    assert rows["smoke"][3].startswith("skipped:") and rows["memory"][3].startswith("skipped:")
    assert "not run (budget): smoke memory" in (out / "progress.md").read_text()
    assert len(os.listdir(out)) <= 8
    bad = run_check(out, work, "nonsense")
    assert bad.returncode == 2 and "unknown part 'nonsense'" in bad.stderr


def _randomised_speedrun(device, bf16=True, T=384):
    """A small speedrun model with every weight random (the zero head would make each loss log V
    whatever the window), and one stream of T tokens with two documents."""
    from model import create_model

    torch.manual_seed(0)
    model = create_model("speedrun", n_layer=4, n_head=2, n_embd=32, vocab_size=128, block_size=T,
                         num_value_embeds=1, bf16=bf16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() < 2 else 0.05)
    model.config.eot_token = 0  # token 0 starts a document: a second one at token 40
    idx = torch.randint(1, 128, (1, T))
    idx[0, 40] = 0
    return model.to(device), idx.to(device)


def test_window_tensor_does_not_retrace_as_it_grows():
    """What the training loop relies on (train_gpt.SlidingWindow: a 0-d tensor updated in place):
    torch.compile traces the model once, and the graph follows the window 1 -> 2 -> 3 blocks (on
    CPU, the dense mask; test_cuda_flex_attention_compiled_... checks flex_attention with inductor)."""
    from train_gpt import SlidingWindow

    model, idx = _randomised_speedrun("cpu", bf16=False)
    graphs = []

    def backend(gm, example_inputs):  # counts traces; runs the traced graph as it is
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    window = SlidingWindow([128, 384], total_steps=2, device="cpu")
    losses = []
    for step in range(3):
        window.set(step)
        with torch.no_grad():
            losses.append(compiled(idx, idx, **window.forward_kwargs)[1].item())
            expected = model(idx, idx, window_blocks=int(window.blocks))[1].item()
        assert abs(losses[-1] - expected) < 1e-5, step
    assert len(graphs) == 1 and int(window.blocks) == 3
    assert len(set(losses)) == 3  # the window changed what the model computes


# ---------------------------------------------------------------------------------------------
# CUDA only


@cuda_only
def test_cuda_flex_attention_compiled_trains_like_the_dense_eager_model_without_recompiling():
    """The paper preset's path on a GPU: bf16, flex_attention's block-sparse kernel (compiled by
    inductor) with the window as a 0-d tensor growing 1 -> 3 blocks, 3 SGD steps. Equal, to bf16
    rounding, to the same model eager with the dense mask (model.use_flex_attention off); after the
    first step's compile, no recompile (torch._dynamo.config.error_on_recompile)."""
    import torch._dynamo

    import model as model_module
    from train_gpt import SlidingWindow

    losses = {}
    for compiled in (True, False):
        model, idx = _randomised_speedrun("cuda")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        window = SlidingWindow([128, 384], total_steps=2, device="cuda")
        run = torch.compile(model) if compiled else model
        flex = model_module.use_flex_attention
        if not compiled:
            model_module.use_flex_attention = lambda idx: False
        losses[compiled] = []
        try:
            for step in range(3):
                window.set(step)
                loss = run(idx, idx, **window.forward_kwargs)[1]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses[compiled].append(loss.item())
                if compiled and step == 0:
                    torch._dynamo.config.error_on_recompile = True  # raises on any recompile from here
        finally:
            torch._dynamo.config.error_on_recompile = False
            model_module.use_flex_attention = flex
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) < 3e-2 * abs(b), (losses[True], losses[False])  # bf16 stream and matmuls
    assert len(set(losses[True])) == 3


def _cuda_run(root, name, optimizer, overrides, distributed=True):
    """A run folder for one CUDA worker (nccl under a process group) as run.py --num-gpus 1 writes it."""
    from configs import resolve_config

    launch = dict(nproc=1, world_size=1, distributed=distributed, device="cuda", backend="nccl")
    cfg = resolve_config(optimizer, overrides, name=name, launch=launch)
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    return run_dir


def _tiny_cuda_overrides(root, **train):
    data = write_tiny_corpus(os.path.join(root, "corpus"))
    return {"model": {"preset": None, "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 256},
            "data": data, "logging": {"progress": False},
            "train": {"steps": 4, "batch_size": 8, "micro_batch_size": 4, "val_every": 2, "val_batch_size": 8,
                      "ckpt_every": 0, "compile": False, **train}}


def _losses(run_dir):
    return [(m["step"], m.get("train_loss"), m.get("val_loss")) for m in read_metrics(run_dir)]


def _assert_losses_close(a, b, rtol):
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (step, *x), (_, *y) in zip(a, b):
        for u, v in zip(x, y):
            assert (u is None) == (v is None) and (u is None or abs(u - v) <= rtol * abs(v)), (step, a, b)


@cuda_only
def test_cuda_sketch_mode_under_fsdp_trains_like_full_mode():
    """memory_mode sketch under FSDP2 on CUDA: each gradient shard is folded into sketches by a
    post-accumulate-grad hook that FSDP runs on its reduce-scatter stream, and step() reads the
    sketches on the default stream. 4 steps of 2 micro-batches, fp32: the losses equal memory_mode
    full's to fp32 rounding (a missing stream ordering shows as garbage sketches)."""
    with tempfile.TemporaryDirectory() as root:
        overrides = _tiny_cuda_overrides(root, parallel="fsdp")
        dirs = [_cuda_run(root, mode, "mfsgd", {**overrides, "optimizer": {"rank": 4, "memory_mode": mode}})
                for mode in ("full", "sketch")]
        train_in_process(dirs, 1)
        _assert_losses_close(_losses(dirs[1]), _losses(dirs[0]), 1e-4)


@cuda_only
def test_cuda_one_nccl_worker_with_a_process_group_trains_like_one_without():
    """What --distributed gives a one-GPU check: NCCL, DDP on CUDA streams, MoFaSGD's sketch
    all-reduces overlapped with backward (memory_mode and comm sketch) and shard's all-gathers:
    the plain one-worker run's losses, to fp32 rounding."""
    with tempfile.TemporaryDirectory() as root:
        overrides = {**_tiny_cuda_overrides(root), "optimizer": {"rank": 4, "shard": True, "comm": "sketch",
                                                                 "memory_mode": "sketch"}}
        dirs = [_cuda_run(root, name, "mfsgd", overrides, distributed=name == "distributed")
                for name in ("plain", "distributed")]
        train_in_process(dirs, 1)
        _assert_losses_close(_losses(dirs[1]), _losses(dirs[0]), 1e-4)
        assert all(m.get("comm_bytes", 1) > 0 for m in read_metrics(dirs[1]) if "train_loss" in m)


if __name__ == "__main__":  # gpu_check.sh's `tests` part: the CUDA checks, without pytest
    if not torch.cuda.is_available():
        print("no CUDA GPU: the CUDA checks are skipped")
        sys.exit(0)
    failures = 0
    for name, check in list(globals().items()):
        if name.startswith("test_cuda_") and callable(check):
            start = time.time()
            try:
                check()
                print(f"PASS {name} ({time.time() - start:.0f} s)", flush=True)
            except Exception as error:  # report every check, then fail
                failures += 1
                print(f"FAIL {name} ({time.time() - start:.0f} s): {type(error).__name__}: {error}", flush=True)
    sys.exit(failures)
