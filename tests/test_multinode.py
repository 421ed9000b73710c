"""Multi-node launches, as two nodes of one rank each on loopback: c10d rendezvous, the run folder
claimed by node 0 only, and the resume step chosen by rank 0 and broadcast."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch.multiprocessing as mp

from helpers import ROOT, end_spawned_rank, launch, read_metrics, tiny_overrides, write_tiny_corpus

pytestmark = pytest.mark.slow  # launches, rendezvous and process groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(node_rank, port, results_dir, overrides, *extra):
    args = ["--optimizer", "adamw", "--nnodes", "2", "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
            "--master-port", str(port), "--name", "two-nodes", "--config", json.dumps(overrides), *extra,
            "--results-dir", str(results_dir)]
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))


def losses(run_dir):
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in read_metrics(run_dir)]


@pytest.mark.slow
def test_two_nodes_on_c10d_equal_one_node_with_two_workers(tmp_path):
    """Node 1 starts first (it waits for node 0's folder instead of creating it), the c10d
    rendezvous joins them, and the run is bit-identical to --nproc 2 on one node."""
    overrides = tiny_overrides(write_tiny_corpus(tmp_path / "data"), steps=4, batch_size=8, micro_batch_size=4)
    port = free_port()
    node1 = start_node(1, port, tmp_path / "shared", overrides)
    node0 = start_node(0, port, tmp_path / "shared", overrides)
    outs = [node.communicate(timeout=300) for node in (node0, node1)]
    assert node0.returncode == 0 and node1.returncode == 0, outs
    run_dir = tmp_path / "shared" / "two-nodes"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert "writes its own" not in outs[1][1]  # node 1 found node 0's config.json

    single = launch(["--optimizer", "adamw", "--nproc", "2", "--name", "one-node", "--config", json.dumps(overrides)],
                    tmp_path / "single")
    assert single.returncode == 0, single.stderr
    assert losses(run_dir) == losses(tmp_path / "single" / "one-node")


def test_node_zero_takes_over_a_folder_a_peer_node_made(tmp_path):
    """A node rank > 0 whose wait ran out writes its own config.json; node 0, started later on the
    same filesystem, takes that folder over instead of refusing it as an existing run."""
    import run

    overrides = tiny_overrides(write_tiny_corpus(tmp_path / "data"), micro_batch_size=4)
    common = ["--optimizer", "adamw", "--nnodes", "2", "--master-addr", "127.0.0.1", "--name", "late",
              "--config", json.dumps(overrides), "--results-dir", str(tmp_path)]
    cmd, run_dir, fd = run.prepare_run(run.parse_args(common + ["--node-rank", "1", "--node-wait", "0"]))
    os.close(fd)
    assert sorted(e for e in os.listdir(run_dir) if not run.runlock.is_lock_file(e)) == ["config.json"]
    (tmp_path / "late" / "workers.node1.log").write_text("the peer node's torchrun output\n")
    cmd, run_dir0, fd = run.prepare_run(run.parse_args(common + ["--node-rank", "0"]))
    os.close(fd)
    assert run_dir0 == run_dir and "--rdzv-backend=c10d" in cmd and "--rdzv-id=late" in cmd
    # but a folder that holds a run's outputs is never taken over
    (tmp_path / "late" / "metrics.jsonl").write_text("")
    with pytest.raises(run.LaunchError, match="already exists"):
        run.prepare_run(run.parse_args(common + ["--node-rank", "0"]))


@pytest.mark.slow
def test_static_rendezvous_is_still_available(tmp_path):
    import run

    overrides = tiny_overrides(write_tiny_corpus(tmp_path / "data"), micro_batch_size=4)
    args = run.parse_args(["--optimizer", "adamw", "--nnodes", "2", "--master-addr", "10.0.0.1", "--rdzv", "static",
                           "--name", "s", "--config", json.dumps(overrides), "--results-dir", str(tmp_path), "--dry-run"])
    launch_cfg = run.launch_settings(args)
    cmd = run.torchrun_command(args, launch_cfg, str(tmp_path / "s"), resume=False)
    assert "--node-rank=0" in cmd and "--master-addr=10.0.0.1" in cmd and not any("rdzv" in c for c in cmd)


def _agree(rank, world, port, dirs, steps_per_rank, out):
    import torch.distributed as dist

    from worker.checkpoint import agreed_resume_checkpoint, checkpoint_step
    from worker.outcome import RunFailed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ckpt = os.path.join(dirs[rank], "checkpoints")
    os.makedirs(ckpt, exist_ok=True)
    for step in steps_per_rank[rank]:
        open(os.path.join(ckpt, f"step_{step:07d}.pt"), "wb").close()
    try:
        path = agreed_resume_checkpoint(dirs[rank], rank)
        out[rank] = ("ok", checkpoint_step(path) if path else None)
    except RunFailed as e:
        out[rank] = ("failed", str(e))
    dist.destroy_process_group()
    end_spawned_rank()


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_rank, expected", [
    ([[4, 8], [4, 8, 12]], [("ok", 8), ("ok", 8)]),  # rank 1's newer file is ignored: rank 0 decides
    ([[], [4]], [("ok", None), ("ok", None)]),  # rank 0 has none: every rank starts fresh
    ([[4, 8], [4]], [("failed", "1 rank(s) lack the checkpoint of step 8"), ("failed", "rank 1 has no")]),
])
def test_resume_step_is_rank_zeros_and_a_missing_file_fails_every_rank(tmp_path, steps_per_rank, expected):
    dirs = [str(tmp_path / f"node{r}") for r in range(2)]
    out = mp.Manager().dict()
    mp.start_processes(_agree, args=(2, free_port(), dirs, steps_per_rank, out), nprocs=2, start_method="spawn")
    for rank, (status, detail) in enumerate(expected):
        assert out[rank][0] == status
        assert (out[rank][1] == detail) if status == "ok" else (detail in out[rank][1]), out[rank]
