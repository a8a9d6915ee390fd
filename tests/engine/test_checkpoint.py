"""Checkpoint files: plain data that loads without running code, safe refusal of files that would,
one message on a full disk, usual permissions, fsynced folder, stale temporary files, the model check."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from vissl_vit.engine import checkpoint as ckpt
from vissl_vit.engine.checkpoint import (
    atomic_save,
    load_checkpoint,
    remove_stale_tmp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vissl_vit.engine.hooks.checkpoint_hook import check_model_fits
from vissl_vit.errors import UserError
from vissl_vit.utils.distributed import all_gather_object


class RunsCode:
    """Unpickling this object calls os.system: it creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state(it: int = 1, **extra) -> dict:
    return {"classy_state_dict": {"base_model": {"model": {"trunk": {"w": torch.ones(2)}}}}, "iteration": it, **extra}


def test_rng_state_is_plain_data_and_round_trips(tmp_path):
    state = rng_state()
    path = tmp_path / "rng.torch"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)  # no allow-list needed: tensors, tuples, numbers
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_older_checkpoint_with_numpy_rng_loads_safely(tmp_path, monkeypatch):
    # version 1 wrote numpy's state as a tuple holding an ndarray
    old = _state(rng={"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()})
    path = tmp_path / "old.torch"
    torch.save(old, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the plain safe load refuses numpy
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k["weights_only"]) or real_load(*a, **k))
    state = load_checkpoint(str(path))
    assert calls == [True]  # loaded safely, with the numpy allow-list, no unrestricted retry
    expected = np.random.rand()
    set_rng_state(state["rng"])
    np.random.set_state(old["rng"]["numpy"])
    assert np.random.rand() == expected


def test_checkpoint_that_would_run_code_is_refused_unless_allowed(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.torch"
    torch.save(_state(payload=RunsCode(str(marker))), path)
    with pytest.raises(UserError) as e:
        load_checkpoint(str(path))
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "config.CHECKPOINT.ALLOW_PICKLE_CODE_EXECUTION=True" in msg
    assert "system" in msg  # names what it would call
    load_checkpoint(str(path), allow_pickle_code_execution=True)
    assert marker.exists()


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.torch"
    path.write_text("not a torch file\n")
    with pytest.raises(UserError, match="Could not read checkpoint .*notes.torch"):
        load_checkpoint(str(path))


def test_disk_full_is_one_message_and_the_previous_checkpoint_is_intact(tmp_path, monkeypatch):
    save_checkpoint(str(tmp_path), "model_iteration1.torch", _state(1), keep_last=-1)
    real_open = open
    # every write of the checkpoint goes to /dev/full: the kernel's own "No space left on device"
    monkeypatch.setattr(ckpt, "open", lambda fd, mode: real_open("/dev/full", mode), raising=False)
    with pytest.raises(UserError) as e:
        save_checkpoint(str(tmp_path), "model_iteration2.torch", _state(2), keep_last=-1)
    msg = str(e.value)
    assert "model_iteration2.torch" in msg and "No space left on device" in msg
    assert "previous checkpoint" in msg and "model_iteration1.torch is intact" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained tracebacks
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.torch", "model_iteration1.torch"]  # no .tmp_ left
    assert load_checkpoint(str(tmp_path / "checkpoint.torch"))["iteration"] == 1


def test_checkpoint_mode_follows_the_umask_and_the_folder_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.isdir(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    old = os.umask(0o022)
    try:
        atomic_save({"a": torch.zeros(1)}, str(tmp_path / "a.torch"))
        os.umask(0o027)
        atomic_save({"a": torch.zeros(1)}, str(tmp_path / "b.torch"))
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "a.torch").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(tmp_path / "b.torch").st_mode & 0o777) == oct(0o640)
    assert synced == [False, True, False, True]  # the file, then its folder after the rename


def test_stale_temporary_files_are_removed(tmp_path):
    for name in (".tmp_abc123.torch", ".tmp_link_42", ".train_config.yaml.tmp", "model_phase0.torch", "log.txt"):
        (tmp_path / name).write_bytes(b"x" * 10)
    removed = remove_stale_tmp_files(str(tmp_path))
    assert removed == [".tmp_abc123.torch", ".tmp_link_42", ".train_config.yaml.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "model_phase0.torch"]


def test_shape_mismatch_lists_the_keys_with_both_shapes():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    check_model_fits(model, sd)  # fits
    sd["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(UserError) as e:
        check_model_fits(model, sd)
    assert "0.weight (5, 3) (model: (4, 3))" in str(e.value) and "0.bias" not in str(e.value)
    del sd["1.bias"]
    with pytest.raises(UserError, match=r"missing keys \['1.bias'\]"):
        check_model_fits(model, sd)


def test_all_gather_object_on_one_process():
    assert all_gather_object({"a": 1}) == [{"a": 1}]
