"""Shared machinery of the multi-process resume tests: a short 2-process run, interrupting it, comparing.

Stable API (imported by tests/engine/test_resume_distributed.py and the fault tests)::

    TWO_PROC_ARGS                     args of a 50-step 2-process CPU run (gloo), dropout and drop-path on,
                                      a checkpoint every 3 iterations; append f"config.CHECKPOINT.DIR={run}"
    ITERATIONS                        its number of iterations (50)
    start_run(run_dir, *extra)        Popen of tools/run_distributed_engines.py TWO_PROC_ARGS + extra, in its
                                      own session (process group), stdout/stderr to run_dir.parent/<name>.out/.err
    run_to_end(run_dir, *extra)       the same run, waited for; asserts exit status 0; returns CompletedProcess
    wait_for_iteration(run_dir, n, proc)  block until stdout.json logs iteration >= n (AssertionError on timeout
                                      or if the run ends first); returns the last logged iteration
    kill_at_iteration(run_dir, proc, n, sig=SIGKILL, target="group")
                                      wait for iteration n, then send sig to the whole process group
                                      ("group"), the launcher only ("launcher") or one worker ("worker1");
                                      waits for the launcher to end; returns the last logged iteration
    worker_pids(proc)                 pids of the spawned worker processes (rank order is not guaranteed)
    assert_same_losses(a, b)          the same iterations and the same loss at each (bit-for-bit by default)

Example::

    ref = tmp_path / "ref"; run = tmp_path / "run"
    run_to_end(ref)
    kill_at_iteration(run, start_run(run), 17)
    proc = run_to_end(run)
    assert "Resuming from" in proc.stdout
    assert_same_losses(read_losses(run), read_losses(ref))
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, read_losses, run_cli

ITERATIONS = 50
# 160 images / (2 ranks x 8) = 10 iterations per epoch, 5 epochs; dropout and drop-path stay on
# (quick_vit's 0.1), so a resume is exact only if every rank gets its own RNG streams back
TWO_PROC_ARGS = [
    "config=test/quick_vit",
    "config.TEST_MODEL=False",
    "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
    "config.DISTRIBUTED.TIMEOUT_SECONDS=60",
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
    "config.DATA.SYNTHETIC.NUM_IMAGES=160",
    "config.OPTIMIZER.num_epochs=5",
    "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3",
    "config.LOG_ALL_RANKS=True",  # the tests read rank 1's lines too
]


def _command(run_dir: Path, extra: tuple[str, ...]) -> list[str]:
    script = str(REPO / "tools" / "run_distributed_engines.py")
    return [sys.executable, script, *TWO_PROC_ARGS, *extra, f"config.CHECKPOINT.DIR={run_dir}"]


def start_run(run_dir: Path, *extra: str) -> subprocess.Popen:
    """Start the 2-process run in its own process group (so the group can be killed).

    Args:
        run_dir: CHECKPOINT.DIR of the run.
        extra: more overrides, after TWO_PROC_ARGS.
    """
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    out = open(run_dir.parent / f"{run_dir.name}.out", "w")  # noqa: SIM115  closed by the child's end
    err = open(run_dir.parent / f"{run_dir.name}.err", "w")  # noqa: SIM115
    return subprocess.Popen(
        _command(run_dir, extra),
        cwd=REPO,
        stdout=out,
        stderr=err,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        start_new_session=True,
    )


def run_to_end(run_dir: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the 2-process run to its end; asserts it succeeded.

    Args:
        run_dir: CHECKPOINT.DIR of the run.
        extra: more overrides, after TWO_PROC_ARGS.
        timeout: seconds.
    """
    proc = run_cli(*TWO_PROC_ARGS, *extra, f"config.CHECKPOINT.DIR={run_dir}", timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _last_iteration(run_dir: Path) -> int:
    if not (Path(run_dir) / "stdout.json").exists():
        return 0
    done = read_losses(run_dir)
    return max(done) if done else 0


def wait_for_iteration(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> int:
    """Wait until the run has logged iteration n (or later); returns the last logged iteration.

    Args:
        run_dir: CHECKPOINT.DIR of the run.
        n: the iteration to wait for.
        proc: the launcher (an AssertionError if it ends first).
        timeout: seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        last = _last_iteration(run_dir)
        if last >= n:
            return last
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach iteration {n} (exit status {proc.poll()})")


def worker_pids(proc: subprocess.Popen) -> list[int]:
    """The launcher's spawned workers (processes whose command line holds spawn_main)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    pids = []
    for pid in (int(p) for p in out.split()):
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                if "spawn_main" in f.read():
                    pids.append(pid)
        except FileNotFoundError:
            continue
    return pids


def kill_at_iteration(
    run_dir: Path, proc: subprocess.Popen, n: int, sig: int = signal.SIGKILL, target: str = "group"
) -> int:
    """Send ``sig`` once the run has logged iteration n; wait for the launcher; return the last iteration.

    Args:
        run_dir: CHECKPOINT.DIR of the run.
        proc: the launcher, from :func:`start_run`.
        n: the iteration after which to interrupt.
        sig: the signal (SIGKILL, SIGTERM, ...).
        target: "group" (launcher and workers, as a cluster's kill -9 does), "launcher", or "worker1"
            (one of the two workers).
    """
    wait_for_iteration(run_dir, n, proc)
    if target == "group":
        os.killpg(proc.pid, sig)
    elif target == "launcher":
        proc.send_signal(sig)
    elif target == "worker1":
        workers = worker_pids(proc)
        assert len(workers) == 2, f"expected 2 workers, found {workers}"
        os.kill(workers[1], sig)
    else:
        raise ValueError(f"target={target!r}: expected group, launcher or worker1")
    proc.wait(timeout=180)
    return _last_iteration(run_dir)  # the caller checks it is short of the run's end


def assert_same_losses(a: dict[int, float], b: dict[int, float], rel: float = 0.0) -> None:
    """Same iterations, same loss at each: bit-for-bit with rel=0, else within the relative tolerance."""
    assert a and sorted(a) == sorted(b), f"iterations differ: {sorted(set(a) ^ set(b))[:10]}"
    if rel == 0.0:
        diff = [(it, a[it], b[it]) for it in sorted(a) if a[it] != b[it]]
    else:
        diff = [(it, a[it], b[it]) for it in sorted(a) if a[it] != pytest.approx(b[it], rel=rel)]
    assert not diff, f"losses differ at {len(diff)} iterations, first: {diff[:3]}"
