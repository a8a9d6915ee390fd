"""Stop signals: preemption of the whole process group with loader workers, Ctrl-C, a stopped worker."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import read_losses
from tests.engine.resume_utils import (
    ITERATIONS,
    assert_same_losses,
    kill_at_iteration,
    run_to_end,
    start_run,
    wait_for_iteration,
    worker_pids,
)
from vissl_vit.data.build import _loader_context, _worker_init

WORKERS = "config.DATA.NUM_DATALOADER_WORKERS=2"
# 1 process with the 2-process run's global batch: the same 50 iterations
ONE_PROCESS = ["config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16"]
LONG = "config.OPTIMIZER.num_epochs=200"  # 2000 iterations: a run that would not end by itself in a test


def _stderr(run: Path) -> str:
    return (run.parent / f"{run.name}.err").read_text()


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if os.path.exists(f"/proc/{p}") and "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]


def _checkpoint_iteration(run: Path) -> int:
    return torch.load(run / "checkpoint.torch", weights_only=False)["iteration"]


class _Slow(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.005)
        return torch.zeros(1)


def test_loader_workers_ignore_stop_signals_from_others_and_stop_when_their_loader_asks():
    loader = torch.utils.data.DataLoader(
        _Slow(),
        batch_size=2,
        num_workers=2,
        worker_init_fn=_worker_init,
        multiprocessing_context=_loader_context(2),
        persistent_workers=True,
    )
    it = iter(loader)
    next(it)
    workers = list(it._workers)
    for sig in ("TERM", "USR1", "INT"):  # from another process, as a scheduler's or a terminal's are
        for w in workers:
            subprocess.run(["kill", f"-{sig}", str(w.pid)], check=True)
    time.sleep(1.0)
    next(it)  # the loader did not notice anything
    assert all(w.is_alive() for w in workers)
    for w in workers:  # the parent's SIGTERM (the loader's and multiprocessing's shutdown) still stops them
        w.terminate()
        w.join(timeout=10)
    assert [w.exitcode for w in workers] == [0, 0]
    del it, loader


@pytest.mark.slow
# 2 processes: long (SIGTERM of a 2-process job is also in tests/engine/test_distributed.py, and its
# exact resume in tests/engine/test_resume_distributed.py)
@pytest.mark.parametrize("procs", [1, pytest.param(2, marks=pytest.mark.long)])
def test_sigterm_to_the_process_group_with_loader_workers_checkpoints_and_resumes_exactly(tmp_path, procs):
    extra = [WORKERS, *(ONE_PROCESS if procs == 1 else [])]
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_to_end(ref, *extra)
    proc = start_run(run, *extra)
    stopped = kill_at_iteration(run, proc, 8, signal.SIGTERM, "group")  # as SLURM does: every process of the job
    err = _stderr(run)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert _checkpoint_iteration(run) == stopped  # the preemption checkpoint, at the step it stopped after
    rerun = run_to_end(run, *extra)  # the same command
    assert f"Resumed at iteration {stopped}" in rerun.stdout
    assert_same_losses(read_losses(run), read_losses(ref))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["group", "launcher"])  # a terminal's Ctrl-C; kill -INT of the launcher
def test_ctrl_c_stops_every_worker_with_a_checkpoint_and_exits_130(tmp_path, target):
    run = tmp_path / "run"
    proc = start_run(run, LONG, WORKERS)
    wait_for_iteration(run, 5, proc)
    workers = worker_pids(proc)
    assert len(workers) == 2
    if target == "group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=90)  # without the fix the workers train on (2000 iterations)
    err = _stderr(run)
    assert proc.returncode == 130, err[-3000:]
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not _alive(workers)
    stopped = max(read_losses(run))
    assert stopped < ITERATIONS and _checkpoint_iteration(run) == stopped


@pytest.mark.slow
def test_a_stopped_worker_is_named_and_the_job_ends_soon_after_the_timeout(tmp_path):
    run = tmp_path / "run"
    proc = start_run(run, LONG, "config.DISTRIBUTED.TIMEOUT_SECONDS=15")
    wait_for_iteration(run, 5, proc)
    workers = worker_pids(proc)
    start = time.monotonic()
    os.kill(workers[1], signal.SIGSTOP)
    proc.wait(timeout=120)
    elapsed = time.monotonic() - start
    err = _stderr(run)
    assert proc.returncode == 2, err[-3000:]
    assert f"(pid {workers[1]}) is stopped (SIGSTOP) and did not reach the collective" in err
    assert "timed out after DISTRIBUTED.TIMEOUT_SECONDS=15 s" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("vissl_vit")]) == 1
    # gloo gives up at the timeout; the launcher then kills at once (it waited 30 s more before)
    assert elapsed < 15 + 12, f"the job ended {elapsed:.0f} s after the worker was stopped"
    assert not _alive(workers)  # SIGKILL ends a stopped process too


def test_a_stop_signal_while_the_run_is_built_stops_it_before_its_first_step():
    from tests.engine.toy import toy_trainer as _toy_trainer
    from vissl_vit.engine.hooks.checkpoint_hook import Preempted, PreemptionHook, catch_early_preemption

    saved = []
    checkpoint = type("Checkpoint", (), {"_save": lambda self, name: saved.append(name)})()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        catch_early_preemption()  # run_worker's first call: from here on SIGTERM is recorded
        os.kill(os.getpid(), signal.SIGTERM)  # ... while data, model and resume are being built
        trainer = _toy_trainer()
        trainer.register_hooks([PreemptionHook(checkpoint, lambda t: t, world_size=1)])
        with pytest.raises(Preempted, match="before training resumed at iteration 0"):
            trainer.train()
        assert trainer.iteration == 0 and saved == []  # no step taken, nothing new to save
        # the request was consumed: the next run trains
        trainer = _toy_trainer()
        trainer.register_hooks([PreemptionHook(checkpoint, lambda t: t, world_size=1)])
        trainer.train()
        assert trainer.iteration == trainer.max_iterations
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_sigterm_while_the_command_still_imports_torch_exits_0_with_nothing_started(tmp_path):
    run = tmp_path / "run"
    proc = start_run(run)
    time.sleep(1.0)  # the tool's first lines have run; torch takes seconds to import
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "received SIGTERM before the workers started: nothing was started" in (run.parent / "run.out").read_text()
    assert "Traceback" not in _stderr(run) and not (run / "stdout.json").exists()
