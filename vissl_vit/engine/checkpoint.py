"""Checkpoints: atomic writes, the ``checkpoint.torch`` link to the newest, keep-last-N, the best, resume.

Layout (VISSL's, so VISSL tools read it, plus the trainer's state)::

    {"classy_state_dict": {"base_model": {"model": {"trunk": ..., "heads": ...}, "meta": {}},
                           "optimizer": ..., "loss": ..., "train_phase_idx": epoch, "iteration": it},
     "iteration": it, "epoch": epoch, "rng_per_rank": [{...} per rank], "loss_per_rank": [...],
     "config_yaml": "...", "hooks": {...}, "version": 2}

Everything in it is plain data (tensors, containers, numbers, strings): it loads with
``torch.load(weights_only=True)`` (a plain ``torch.load`` on torch >= 2.6), so resuming runs no
code from the file. Files get the usual permissions (0644 under the usual umask 022).

``checkpoint.torch`` names the newest checkpoint: a symlink by default, or (``latest_as_copy``)
a regular file, a hard link to it (a copy where the file system has none), for object stores and
copy tools that do not keep symlinks. ``model_best.torch`` (see :func:`save_best`) is the
checkpoint of the best test value so far; neither is counted or pruned by keep-last-N.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import torch

from vissl_vit.errors import UserError
from vissl_vit.utils.safe_load import load_torch_file

logger = logging.getLogger(__name__)

LATEST = "checkpoint.torch"
BEST = "model_best.torch"
_NAME_RE = re.compile(r"^model_(phase|iteration)(\d+)\.torch$")
VERSION = 2  # 2: per-rank RNG and loss states, the config, plain numpy RNG state


def rng_state() -> dict[str, Any]:
    """Every RNG's state, so that dropout and drop-path continue exactly after a resume.

    Plain values only (tensors, tuples, ints), so that ``torch.load(weights_only=True)`` reads it:
    numpy's state is stored as its parts, the key array as an int64 tensor.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`; also reads the state of older checkpoints (numpy's as a tuple)."""
    random.setstate(state["python"])
    npy = state["numpy"]
    if isinstance(npy, dict):
        keys = npy["keys"].numpy().astype(np.uint32)
        npy = (npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind an exception (torch.save reports a full disk as a RuntimeError whose
    context is the OSError), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _fsync_folder(folder: str) -> None:
    """fsync a folder, so that a rename in it survives a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable[[IO[bytes]], None], note: str = "") -> None:
    """Call ``write`` on a temporary file in the same folder, fsync, rename over ``path``, fsync the folder.

    A crash (or kill -9) at any moment leaves either the old file or the new one, never a part; a
    temporary file a kill -9 leaves behind is removed by :func:`remove_stale_tmp_files`.
    The file gets the usual permissions (0666 less the umask, as ``open`` gives), not mkstemp's 0600.

    Raises:
        UserError: the write failed (disk full, permissions, ...); ``path`` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.splitext(path)[1] or ".tmp", dir=folder)
    except OSError as e:
        raise UserError(f"Could not write {path}: {e.strerror or e}{note}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except Exception as e:  # noqa: BLE001  one message instead of torch's chained tracebacks
        if os.path.exists(tmp):
            os.remove(tmp)
        err = _os_error(e)
        if err is None:
            raise
        raise UserError(f"Could not write {path}: {err.strerror or err}{note}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str, note: str = "") -> None:
    """torch.save ``obj`` to ``path`` atomically (see :func:`_atomic_write`).

    Args:
        obj: what to save.
        path: the destination.
        note: added to the error message when the write fails (e.g. which checkpoint is intact).

    Raises:
        UserError: the write failed (disk full, permissions, ...); ``path`` is untouched.
    """
    _atomic_write(path, lambda f: torch.save(obj, f), note)


def atomic_write_bytes(data: bytes, path: str, note: str = "") -> None:
    """Write ``data`` to ``path`` atomically, with the usual permissions (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda f: f.write(data), note)


def remove_stale_tmp_files(folder: str) -> list[str]:
    """Remove the temporary files a killed run left in its run folder; returns their names.

    Call only while this run holds the run folder (at the start of a run, on rank 0): any
    temporary file then belongs to a process that died before renaming it.
    """
    stale = sorted(glob.glob(os.path.join(folder, ".tmp_*")) + glob.glob(os.path.join(folder, ".*.tmp")))
    for path in stale:
        os.remove(path)
    if stale:
        names = [os.path.basename(p) for p in stale]
        logger.info("Removed %d temporary files left by an interrupted run: %s", len(names), ", ".join(names))
    return [os.path.basename(p) for p in stale]


def _place_copy(src: str, dst: str) -> None:
    """Make ``dst`` a regular file with ``src``'s content, atomically: a hard link (no space, no
    time), or a copy where the file system has no hard links (some FUSE and network mounts)."""
    folder = os.path.dirname(dst)
    tmp = os.path.join(folder, f".tmp_copy_{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    _fsync_folder(folder)


def _point_latest(folder: str, name: str, as_copy: bool = False) -> None:
    """Make checkpoint.torch name ``name``: a relative symlink, or with ``as_copy`` a regular file
    (:func:`_place_copy`). Either replaces the old one atomically: it always names a complete checkpoint."""
    link = os.path.join(folder, LATEST)
    if as_copy:
        _place_copy(os.path.join(folder, name), link)
        return
    tmp = os.path.join(folder, f".tmp_link_{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, link)


def list_checkpoints(folder: str) -> list[str]:
    """Checkpoint files of a run folder, oldest first (by modification time, then name)."""
    files = [f for f in glob.glob(os.path.join(folder, "model_*.torch")) if _NAME_RE.match(os.path.basename(f))]
    return sorted(files, key=lambda f: (os.path.getmtime(f), f))


def save_checkpoint(folder: str, name: str, state: dict[str, Any], keep_last: int, latest_as_copy: bool = False) -> str:
    """Write ``folder/name`` atomically, point checkpoint.torch at it, prune to ``keep_last`` (-1: all).

    Args:
        folder: the run folder.
        name: the file name (model_phase{epoch}.torch or model_iteration{it}.torch).
        state: what to save (:func:`~vissl_vit.engine.hooks.checkpoint_hook.trainer_state`).
        keep_last: keep the newest N model_*.torch files; -1 keeps all.
        latest_as_copy: checkpoint.torch as a regular file instead of a symlink.
    """
    path = os.path.join(folder, name)
    previous = find_latest(folder)
    intact = f"; the previous checkpoint {previous} is intact" if previous else "; no earlier checkpoint exists"
    atomic_save(state, path, note=intact)
    _point_latest(folder, name, as_copy=latest_as_copy)
    if keep_last > 0:
        for old in list_checkpoints(folder)[:-keep_last]:
            if os.path.basename(old) != name:
                os.remove(old)
    logger.info("Saved checkpoint %s (iteration %d)", path, state["iteration"])
    return path


def save_best(folder: str, state: dict[str, Any] | None = None, same_as: str | None = None) -> str:
    """Write ``folder/model_best.torch``: ``state``, or a hard link to (copy of) the checkpoint
    ``same_as`` just written with the same state (then it costs no space). Returns its path."""
    path = os.path.join(folder, BEST)
    if same_as is not None:
        _place_copy(same_as, path)
    else:
        atomic_save(state, path, note="; the previous model_best.torch is intact")
    return path


def find_latest(folder: str) -> str | None:
    """The checkpoint checkpoint.torch names, else the newest model_*.torch, else None.

    checkpoint.torch as a symlink: its target. As a regular file (``latest_as_copy``, or a copy tool
    that followed the link): the model_*.torch it is a hard link of, else itself.
    """
    link = os.path.join(folder, LATEST)
    if os.path.islink(link) and os.path.exists(link):
        return os.path.realpath(link)
    files = list_checkpoints(folder)
    if os.path.isfile(link) and not os.path.islink(link):
        same = [f for f in files if os.path.samefile(f, link)]
        return same[-1] if same else link
    return files[-1] if files else None


def load_checkpoint(path: str, allow_pickle_code_execution: bool = False) -> dict[str, Any]:
    """Load a checkpoint on the CPU, running no code from the file; a file that is not one is a clear error.

    Args:
        path: the checkpoint.
        allow_pickle_code_execution: CHECKPOINT.ALLOW_PICKLE_CODE_EXECUTION: also load checkpoints
            that pickle Python objects (which runs the code they name). Ours never need it.
    """
    state = load_torch_file(
        path,
        name=f"checkpoint {path}",
        allow_code_key="config.CHECKPOINT.ALLOW_PICKLE_CODE_EXECUTION",
        allow_code=allow_pickle_code_execution,
    )
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
