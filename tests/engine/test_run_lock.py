"""One run per run folder: a second run is refused while the first lives; kill -9 leaves no stale lock."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tests.conftest import read_losses, run_cli
from tests.engine.resume_utils import TWO_PROC_ARGS, start_run, wait_for_iteration, worker_pids
from vissl_vit.config import compose_config
from vissl_vit.engine.launch import WorkerInfo, main, run_worker
from vissl_vit.engine.run_lock import LOCK_NAME, lock_run_folder
from vissl_vit.errors import UserError


def test_a_locked_folder_is_refused_naming_the_holder_and_free_again_after_release(tmp_path):
    run = tmp_path / "new" / "run"
    lock = lock_run_folder(str(run))  # creates the folder
    assert (run / LOCK_NAME).exists()
    holder = f"pid {os.getpid()} on host {socket.gethostname()}"
    with pytest.raises(UserError, match=holder):
        lock_run_folder(str(run))
    lock.release()
    lock_run_folder(str(run)).release()


@pytest.mark.parametrize("engine", ["train", "extract_features", "nearest_neighbor"])
def test_every_engine_is_refused_before_building_anything(tmp_path, capsys, engine):
    run = tmp_path / "run"
    with lock_run_folder(str(run)):
        args = ["config=test/quick_vit", f"config.ENGINE_NAME={engine}", f"config.CHECKPOINT.DIR={run}"]
        status = main([*args, "config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True"])
    err = capsys.readouterr().err
    assert status == 2 and f"in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written: no log, no config


def test_rank_0_of_torchrun_or_srun_takes_the_lock(tmp_path):
    # no launcher of ours runs there: rank 0 locks the folder before the process group exists
    run = tmp_path / "run"
    cfg_root = compose_config(["config=test/quick_vit", f"config.CHECKPOINT.DIR={run}"])
    with lock_run_folder(str(run)), pytest.raises(UserError, match=f"pid {os.getpid()} on host"):
        run_worker(cfg_root, WorkerInfo(0, 0, 2, 2, "env://", "gloo", "torchrun"))


LONG = "config.OPTIMIZER.num_epochs=200"  # 2000 iterations: still running when the second run starts


def _rerun_takes_the_lock_and_resumes(run, last: int, *extra: str) -> None:
    """Start the same command again: it must get past the lock, resume and train on (then it is killed)."""
    again = start_run(run, *extra)
    try:
        wait_for_iteration(run, last + 2, again)
        assert "Resuming from" in (run.parent / f"{run.name}.out").read_text()
    finally:
        os.killpg(again.pid, signal.SIGKILL)
        again.wait(timeout=30)


# long: the lock itself is tested in-process above, kill -9 of a launcher and the resume after it in
# tests/engine/test_resume_distributed.py, a stale lock after kill -9 in the test below
@pytest.mark.slow
@pytest.mark.long
def test_a_second_run_is_refused_while_the_first_runs_and_kill_9_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    first = start_run(run, LONG, "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1")
    wait_for_iteration(run, 3, first)
    workers = worker_pids(first)
    second = run_cli(*TWO_PROC_ARGS, LONG, f"config.CHECKPOINT.DIR={run}", timeout=120)
    assert second.returncode == 2
    assert f"in use by another run (pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert first.poll() is None  # the first run goes on
    first.send_signal(signal.SIGKILL)  # the launcher only: its workers die with it (PR_SET_PDEATHSIG)
    first.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{w}") for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{w}") for w in workers), "workers outlived their launcher"
    _rerun_takes_the_lock_and_resumes(run, max(read_losses(run)), LONG, "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1")


@pytest.mark.slow
def test_kill_9_of_a_one_process_run_with_loader_workers_leaves_no_stale_lock(tmp_path):
    # its loader workers are forked with the lock's descriptor, and outlive it for a few seconds
    run = tmp_path / "run"
    one = [LONG, "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DATA.NUM_DATALOADER_WORKERS=2"]
    first = start_run(run, *one, "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1")
    wait_for_iteration(run, 3, first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    _rerun_takes_the_lock_and_resumes(run, max(read_losses(run)), *one, "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1")
