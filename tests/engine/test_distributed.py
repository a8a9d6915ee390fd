"""Multi-process training on CPU with gloo: equivalences, multi-node, torchrun, faults, preemption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO, read_losses, run_cli
from vissl_vit import run_train_engine
from vissl_vit.config import compose_config
from vissl_vit.engine.launch import environment_worker, first_slurm_host
from vissl_vit.engine.parallel import sync_bn_groups
from vissl_vit.errors import ConfigError

# no dropout, drop-path or BatchNorm: the loss of a global batch cannot depend on its split
EXACT = [
    "config=test/quick_vit",
    "config.TEST_MODEL=False",
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.0",
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.0",
    "config.DISTRIBUTED.TIMEOUT_SECONDS=60",
]


def assert_same(a: dict, b: dict, rtol: float = 2e-5) -> None:
    assert sorted(a) == sorted(b) and a
    for it in a:
        assert a[it] == pytest.approx(b[it], rel=rtol), f"iteration {it}: {a[it]} != {b[it]}"


def train(tmp_path, name, *args) -> dict[int, float]:
    """A run through the command line (the launcher spawns the workers of a multi-process run)."""
    proc = run_cli(*EXACT, *args, f"config.CHECKPOINT.DIR={tmp_path / name}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_losses(tmp_path / name)


def train_here(tmp_path, name, *args) -> dict[int, float]:
    """A one-process run in this process: the engine a one-process command runs, without its start-up."""
    run_train_engine(compose_config([*EXACT, *args, f"config.CHECKPOINT.DIR={tmp_path / name}"]))
    return read_losses(tmp_path / name)


def test_split_of_the_global_batch_does_not_matter_and_another_world_size_resumes(tmp_path, capfd):
    one_big = train_here(tmp_path, "1x16", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16")
    two = train(tmp_path, "2x8", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2")
    accum = train_here(
        tmp_path, "1x8x2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.OPTIMIZER.grad_accumulation_steps=2"
    )
    assert sorted(one_big) == list(range(1, 9))
    assert_same(two, one_big)
    assert_same(accum, one_big)
    assert not all(v == pytest.approx(one_big[1]) for v in one_big.values())  # it does train
    # the 2-process run (2 epochs of 4 iterations), resumed on 1 process with the same per-replica
    # batch: 8 iterations per epoch now, so it resumes at epoch 2's start, and says why
    capfd.readouterr()
    resumed = train_here(tmp_path, "2x8", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.OPTIMIZER.num_epochs=3")
    text = capfd.readouterr().out
    assert "4 iterations per epoch (world size 2)" in text and "has 8 (world size 1)" in text, text[-3000:]
    assert "resuming at iteration 16 (epoch 2, 0% through it) instead of 8" in text
    assert max(resumed) == 24


def test_fsdp_equals_ddp_and_its_checkpoint_resumes_on_one_process(tmp_path, capfd):
    # SGD: AdamW's first steps are sign-like (m / sqrt(v)), so rounding-level differences in
    # near-zero gradients between the two reduction orders would flip whole updates
    two = [
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
        "config.OPTIMIZER.name=sgd",
        "config.OPTIMIZER.param_schedulers.lr.name=cosine",
        "config.OPTIMIZER.param_schedulers.lr.start_value=0.1",
    ]
    ddp = train(tmp_path, "ddp", *two)
    fsdp = train(tmp_path, "fsdp", *two, "config.MODEL.FSDP.USE_FSDP=True")
    assert_same(fsdp, ddp)
    # the consolidated FSDP checkpoint continues on 1 process with twice the per-replica batch
    capfd.readouterr()
    resumed = train_here(
        tmp_path, "fsdp", *two[2:], "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16", "config.OPTIMIZER.num_epochs=3"
    )
    assert "Resumed at iteration 8" in capfd.readouterr().out and max(resumed) == 12


def test_two_nodes_on_loopback(tmp_path):
    port = 29600 + os.getpid() % 1000
    run = tmp_path / "run"
    common = [
        sys.executable,
        str(REPO / "tools" / "run_distributed_engines.py"),
        *EXACT,
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DISTRIBUTED.NUM_NODES=2",
        f"config.DISTRIBUTED.RUN_ID=127.0.0.1:{port}",
        f"config.CHECKPOINT.DIR={run}",
        "config.LOG_ALL_RANKS=True",  # node 1's console shows rank 1's lines (by default only warnings)
    ]
    nodes = [
        subprocess.Popen(
            common + [f"config.DISTRIBUTED.NODE_ID={n}"],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in (0, 1)
    ]
    outs = [n.communicate(timeout=180) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "[rank 1]" in outs[1][0]  # node 1 hosts rank 1
    one_big = train(tmp_path, "1x16", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16")
    assert_same(read_losses(run), one_big)
    assert os.readlink(run / "checkpoint.torch") == "model_phase1.torch"


def test_torchrun_joins_the_same_code_path(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29700 + os.getpid() % 1000),
        str(REPO / "tools" / "run_distributed_engines.py"),
        *EXACT,
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        f"config.CHECKPOINT.DIR={run}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchrun started 2 workers" in proc.stderr
    assert_same(read_losses(run), train(tmp_path, "1x16", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16"))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _long_run(run) -> subprocess.Popen:
    args = [
        *EXACT,
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
        "config.OPTIMIZER.num_epochs=200",
        "config.DATA.SYNTHETIC.NUM_IMAGES=256",
        f"config.CHECKPOINT.DIR={run}",
    ]
    return subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "run_distributed_engines.py"), *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for_iteration(run, n, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "stdout.json").exists() and read_losses(run) and max(read_losses(run)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach iteration {n}")


def test_a_killed_worker_ends_the_job_with_a_clear_message(tmp_path):
    run = tmp_path / "run"
    proc = _long_run(run)
    _wait_for_iteration(run, 5, proc)
    workers = [p for p in _children(proc.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
    assert len(workers) == 2
    start = time.monotonic()
    os.kill(workers[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and time.monotonic() - start < 60
    assert "died with signal SIGKILL" in err and "worker rank" in err and "Traceback" not in err
    time.sleep(0.5)
    assert not any(os.path.exists(f"/proc/{w}") and "spawn_main" in open(f"/proc/{w}/cmdline").read() for w in workers)


def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path):
    run = tmp_path / "run"
    proc = _long_run(run)
    _wait_for_iteration(run, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = max(read_losses(run))
    state = torch.load(run / "checkpoint.torch", weights_only=False)
    assert state["iteration"] == stopped and "preempted at iteration" in out


def test_slurm_and_torchrun_environments():
    cfg = compose_config(["config=test/quick_vit"]).config
    assert environment_worker(cfg, {}) is None
    w = environment_worker(cfg, {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (w.rank, w.local_rank, w.world_size, w.local_world_size, w.init_method) == (3, 1, 4, 2, "env://")
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu[03-04]",
        "SLURM_JOB_ID": "1234",
    }
    w = environment_worker(cfg, env)
    assert (w.rank, w.local_rank, w.world_size, w.local_world_size, w.how) == (5, 1, 8, 4, "slurm")
    assert w.init_method == "tcp://gpu03:21234"
    assert first_slurm_host("gpu[03-05,7],cpu1") == "gpu03" and first_slurm_host("node7") == "node7"
    assert environment_worker(cfg, {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # one task: spawn as usual


def test_sync_bn_groups():
    assert sync_bn_groups(8, 0, 4) is None
    assert sync_bn_groups(8, -1, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sync_bn_groups(8, 2, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ConfigError, match="do not divide"):
        sync_bn_groups(8, 3, 4)
