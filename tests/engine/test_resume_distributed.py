"""Resuming 2-process runs: kill -9 of the whole job, of the launcher or of one worker, and the same
command gives the same losses;
a finished run extended with more epochs resumes on every rank; SwAV's queue moves to another
world size; a config change is refused or listed before train_config.yaml is touched."""

from __future__ import annotations

import os
import time

import pytest
import torch
import yaml

from tests.conftest import read_losses, run_cli, run_here
from tests.engine.resume_utils import (
    ITERATIONS,
    TWO_PROC_ARGS,
    assert_same_losses,
    kill_at_iteration,
    run_to_end,
    start_run,
    wait_for_iteration,
    worker_pids,
)

pytestmark = pytest.mark.slow


def _final_state(run_dir) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoint.torch", map_location="cpu", weights_only=True)
    csd = state["classy_state_dict"]
    flat = {f"model.{g}.{k}": v for g, group in csd["base_model"]["model"].items() for k, v in group.items()}
    flat.update({f"rng{r}.torch": s["torch"] for r, s in enumerate(state["rng_per_rank"])})
    return flat


def _interrupt(run, n: int, target: str) -> int:
    """Start the 2-process run, kill -9 its whole job ("group"), its launcher alone (its workers must
    die with it) or one worker (the launcher stops the other) at iteration n; the last logged iteration."""
    proc = start_run(run)
    workers = []
    if target == "launcher":
        wait_for_iteration(run, 1, proc)
        workers = worker_pids(proc)
    stopped = kill_at_iteration(run, proc, n, target=target)
    assert stopped < ITERATIONS, f"the run ended before kill -9 of the {target}"
    assert proc.returncode == (-9 if target in ("group", "launcher") else 2)
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{w}") for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)  # the workers of a killed launcher die with it (PR_SET_PDEATHSIG)
    assert not any(os.path.exists(f"/proc/{w}") for w in workers)
    return stopped


def _rerun_gives_the_same_run(ref, run) -> None:
    """The same command runs to the end: both ranks resumed, the same losses bit for bit, the same
    final weights and per-rank RNG streams as the uninterrupted reference."""
    proc = run_to_end(run)
    resumed = [line for line in proc.stdout.splitlines() if "Resumed at iteration" in line]
    assert len(resumed) == 2 and any(line.startswith("[rank 1]") for line in resumed)  # both ranks resumed
    assert_same_losses(read_losses(run), read_losses(ref))  # bit-for-bit: dropout and drop-path on both ranks
    a, b = _final_state(ref), _final_state(run)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not torch.equal(a["rng0.torch"], a["rng1.torch"])  # each rank's own streams were saved
    assert not list(run.glob(".tmp_*"))  # whatever the kill left mid-write was removed


def test_kill_dash_nine_of_a_two_process_run_and_rerun_gives_the_same_losses(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_to_end(ref)
    assert sorted(read_losses(ref)) == list(range(1, ITERATIONS + 1))

    # two interruptions of one run, each resumed by the same command: kill -9 of the whole job
    # (mid-epoch 2, past several checkpoints), then of the launcher alone (its workers die with it)
    stopped = [_interrupt(run, 12, "group"), _interrupt(run, 22, "launcher")]
    assert stopped == sorted(stopped)
    _rerun_gives_the_same_run(ref, run)

    # a finished run, extended with more epochs: resumes on both ranks, the change is listed
    proc = run_to_end(ref, "config.OPTIMIZER.num_epochs=6")
    out = proc.stdout
    assert out.count("Resumed at iteration 50") == 2, out[-3000:]
    assert "OPTIMIZER.num_epochs: 5 -> 6" in out and out.count("with a changed config") == 1  # once, by rank 0
    assert max(read_losses(ref)) == 60

    # a refused resume on 2 processes: each rank's one-line error, and the launcher does not
    # suggest rerunning the same command
    proc = run_cli(
        *TWO_PROC_ARGS, "config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=3", f"config.CHECKPOINT.DIR={ref}"
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Cannot resume" in proc.stderr and "stopped on the error above" in proc.stderr
    assert "Rerun the same command" not in proc.stderr


@pytest.mark.long
def test_kill_dash_nine_of_one_worker_and_rerun_gives_the_same_losses(tmp_path):
    # the launcher stops the other worker (tests/engine/test_distributed.py checks its message);
    # what the rerun finds is a checkpoint like the one a group kill leaves
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_to_end(ref)
    _interrupt(run, 32, "worker1")
    _rerun_gives_the_same_run(ref, run)


SWAV = [
    "config=test/quick_swav",
    # no BatchNorm, dropout or drop-path: the loss of a global batch cannot depend on its split
    "config.MODEL.HEAD.PARAMS=[[swav_head,{dims:[32,64,16],num_clusters:[10],use_bn:False}]]",
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.0",
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.0",
    "config.LOSS.swav_loss.queue.start_iter=2",
    # the first run is shorter than the reference: a schedule that does not depend on the length
    "config.OPTIMIZER.param_schedulers.lr.name=constant",
    "config.OPTIMIZER.param_schedulers.lr.value=0.001",
    "config.DISTRIBUTED.TIMEOUT_SECONDS=60",
]
ONE = ["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16"]
TWO = ["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"]


def _swav(run_dir, *args) -> dict[int, float]:
    proc = run_cli(*SWAV, *args, f"config.CHECKPOINT.DIR={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_losses(run_dir)


@pytest.mark.long  # its parts run faster elsewhere: test_resume_with_another_world_size_says_what_changed
# (tests/engine/test_distributed.py) and the queue redistribution (tests/losses/test_swav_state.py)
def test_swav_queue_resumes_at_another_world_size(tmp_path):
    # an epoch on 2 processes, then one on 1 (4 iterations per epoch either way); the queue (32: two
    # global batches) is full after the first epoch and its halves must join into one queue
    reference = _swav(tmp_path / "ref", *ONE, "config.OPTIMIZER.num_epochs=2")
    _swav(tmp_path / "run", *TWO, "config.OPTIMIZER.num_epochs=1")
    resumed = _swav(tmp_path / "run", *ONE, "config.OPTIMIZER.num_epochs=2")
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    # Sinkhorn over the global queue is a set operation: only float rounding differs
    assert_same_losses(resumed, reference, 1e-4)
    state = torch.load(tmp_path / "run" / "checkpoint.torch", weights_only=True)
    assert [s["queue"].shape[1] for s in state["loss_per_rank"]] == [32]
    assert int(state["loss_per_rank"][0]["queue_filled"]) == 32


def test_a_changed_model_is_refused_and_train_config_is_kept(tmp_path, capfd):
    run = tmp_path / "run"
    base = ["config=test/quick_vit", "config.TEST_MODEL=False", "config.OPTIMIZER.num_epochs=1"]
    proc = run_here(capfd, *base, f"config.CHECKPOINT.DIR={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = (run / "train_config.yaml").read_text()
    (run / ".tmp_stale.torch").write_bytes(b"x" * 100)  # what a kill -9 mid-write leaves
    proc = run_here(
        capfd,
        *base,
        "config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=3",
        "config.OPTIMIZER.name=sgd",
        "config.OPTIMIZER.num_epochs=2",
        f"config.CHECKPOINT.DIR={run}",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    msg = [line for line in proc.stderr.splitlines() if "Cannot resume" in line]
    assert len(msg) == 1 and "another config.CHECKPOINT.DIR" in msg[0]
    assert (
        "MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS: 2 -> 3" in msg[0] and "OPTIMIZER.name: 'adamw' -> 'sgd'" in msg[0]
    )
    assert "num_epochs" not in msg[0]  # accepted changes are not what stops it
    assert (run / "train_config.yaml").read_text() == before
    # an accepted change resumes, listed in one warning; the stale temporary file is gone
    proc = run_here(
        capfd, *base, "config.OPTIMIZER.num_epochs=2", "config.LOG_FREQUENCY=2", f"config.CHECKPOINT.DIR={run}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = [line for line in proc.stdout.splitlines() if "with a changed config" in line]
    assert len(warning) == 1 and "OPTIMIZER.num_epochs: 1 -> 2" in warning[0] and "LOG_FREQUENCY: 1 -> 2" in warning[0]
    assert not (run / ".tmp_stale.torch").exists()
    assert yaml.safe_load((run / "train_config.yaml").read_text())["config"]["OPTIMIZER"]["num_epochs"] == 2
