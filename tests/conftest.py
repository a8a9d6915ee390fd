"""Shared fixtures: small configs and run folders. Everything runs on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

torch.set_num_threads(1)


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run tools/run_distributed_engines.py with arguments; returns the finished process."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "run_distributed_engines.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )


def run_here(capfd, *args: str) -> subprocess.CompletedProcess:
    """What :func:`run_cli` gives, from the command's ``main`` run in this process: for one-process
    runs and errors, which need no process of their own (and so skip its start-up of ~6 s)."""
    from vissl_vit.engine.launch import main

    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["run_distributed_engines.py", *args], code, out, err)


@pytest.fixture
def quick_overrides(tmp_path: Path) -> list[str]:
    """The instant test config, writing its run folder under tmp_path."""
    return ["config=test/quick_vit", f"config.CHECKPOINT.DIR={tmp_path / 'run'}"]


def read_losses(run_dir) -> dict[int, float]:
    """iteration -> loss from a run's stdout.json; re-run iterations (after a resume) overwrite the
    earlier lines, and a line still being written is ignored."""
    out = {}
    with open(os.path.join(run_dir, "stdout.json")) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            rec = json.loads(line)
            out[rec["iteration"]] = rec["loss"]
    return out
