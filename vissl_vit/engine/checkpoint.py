"""Checkpoints: atomic writes, the ``checkpoint.torch`` link to the newest, keep-last-N, resume.

Layout (VISSL's, so VISSL tools read it, plus the trainer's state)::

    {"classy_state_dict": {"base_model": {"model": {"trunk": ..., "heads": ...}, "meta": {}},
                           "optimizer": ..., "loss": ..., "train_phase_idx": epoch, "iteration": it},
     "iteration": it, "epoch": epoch, "rng": {...}, "hooks": {...}, "version": 1}
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
import tempfile
from typing import Any

import numpy as np
import torch

from vissl_vit.errors import UserError

logger = logging.getLogger(__name__)

LATEST = "checkpoint.torch"
_NAME_RE = re.compile(r"^model_(phase|iteration)(\d+)\.torch$")
VERSION = 1


def rng_state() -> dict[str, Any]:
    """Every RNG's state, so that dropout and drop-path continue exactly after a resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash (or kill -9) at any moment leaves either the old file or the new one, never a part.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".torch", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _point_latest(folder: str, name: str) -> None:
    link = os.path.join(folder, LATEST)
    tmp = os.path.join(folder, f".tmp_link_{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, link)  # atomic: the link always points at a complete checkpoint


def list_checkpoints(folder: str) -> list[str]:
    """Checkpoint files of a run folder, oldest first (by modification time, then name)."""
    files = [f for f in glob.glob(os.path.join(folder, "model_*.torch")) if _NAME_RE.match(os.path.basename(f))]
    return sorted(files, key=lambda f: (os.path.getmtime(f), f))


def save_checkpoint(folder: str, name: str, state: dict[str, Any], keep_last: int) -> str:
    """Write ``folder/name`` atomically, point checkpoint.torch at it, prune to ``keep_last`` (-1: all)."""
    path = os.path.join(folder, name)
    atomic_save(state, path)
    _point_latest(folder, name)
    if keep_last > 0:
        for old in list_checkpoints(folder)[:-keep_last]:
            if os.path.basename(old) != name:
                os.remove(old)
    logger.info("Saved checkpoint %s (iteration %d)", path, state["iteration"])
    return path


def find_latest(folder: str) -> str | None:
    """The checkpoint checkpoint.torch points to, else the newest model_*.torch, else None."""
    link = os.path.join(folder, LATEST)
    if os.path.exists(link):
        return os.path.realpath(link)
    files = list_checkpoints(folder)
    return files[-1] if files else None


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint on the CPU; a file that is not one is a clear error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  any unpickling / zip error
        raise UserError(f"Could not read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or "classy_state_dict" not in state:
        raise UserError(f"{path} is not a vissl_vit checkpoint (no 'classy_state_dict').")
    return state


def group_model_state(state_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A model state dict in VISSL's layout: {"trunk": ..., "heads": ...}, plus any other top-level
    submodule's (e.g. MoCo's "momentum_encoder")."""
    groups: dict[str, dict[str, Any]] = {"trunk": {}, "heads": {}}
    for key, value in state_dict.items():
        top, rest = key.split(".", 1)
        groups.setdefault(top, {})[rest] = value
    return groups


def load_model_state(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Load a grouped state (see :func:`group_model_state`) into a plain model; strict, and a
    mismatch is an error listing the keys."""
    sd = {f"{top}.{k}": v for top, group in state.items() for k, v in group.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(
            f"The checkpoint does not fit the model: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}. "
            "Was it written with another MODEL config?"
        )
