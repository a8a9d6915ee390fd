"""The run's environment (versions, devices, host, command line, git commit), written to
<run folder>/env.json on rank 0 at the start of training: what a result needs to be reproduced or
compared, kept beside it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from typing import Any

import torch

import vissl_vit

ENV_FILE = "env.json"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(path: str) -> dict[str, Any] | None:
    """The commit of the git checkout holding ``path`` and whether its tracked files differ from it
    (``{"commit": "77a69d2...", "dirty": False}``); None when ``path`` is not in a checkout or git is
    missing (an installed package)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", path, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def collect_environment(world_size: int) -> dict[str, Any]:
    """This process's environment, as env.json records it.

    Args:
        world_size: processes in the run.
    """
    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "command_line": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "vissl_vit": vissl_vit.__version__,
        "vissl_vit_path": os.path.dirname(os.path.abspath(vissl_vit.__file__)),
        "git": git_commit(os.path.dirname(os.path.abspath(vissl_vit.__file__))),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "numpy": _version("numpy"),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "gpus": devices,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "world_size": world_size,
    }


def write_environment(run_dir: str, world_size: int) -> dict[str, Any]:
    """Write env.json in ``run_dir`` (atomically) and return what it holds now.

    A resumed run may run elsewhere (another GPU, another torch): env.json describes the newest
    start, and the starts before it are kept, oldest first, under ``earlier_starts``.

    Args:
        run_dir: the run folder.
        world_size: processes in the run.
    """
    path = os.path.join(run_dir, ENV_FILE)
    env = collect_environment(world_size)
    earlier: list[dict[str, Any]] = []
    try:
        with open(path) as f:
            old = json.load(f)
        earlier = old.pop("earlier_starts", []) + [old]
    except (OSError, ValueError, AttributeError):
        pass  # none yet, or unreadable: this start is the first one on record
    env["earlier_starts"] = earlier
    tmp = os.path.join(run_dir, f".{ENV_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(env, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return env


def describe_environment(env: dict[str, Any]) -> str:
    """One line for the log: ``torch 2.6.0, CUDA 12.4, 1 x NVIDIA H200, 1 process, git 77a69d2``."""
    parts = [f"vissl_vit {env['vissl_vit']}", f"torch {env['torch']}"]
    if env["gpus"]:
        names = env["gpus"]
        parts.append(f"CUDA {env['cuda']}, {len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names))
    else:
        parts.append(f"CPU {env['cpu']}")
    parts.append(f"{env['world_size']} process{'es' if env['world_size'] != 1 else ''}")
    if env["git"]:
        parts.append(f"git {env['git']['commit'][:7]}{' (modified)' if env['git']['dirty'] else ''}")
    return ", ".join(parts)
