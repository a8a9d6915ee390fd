"""Checkpoint files: plain data that loads without running code (a plain torch.load), safe refusal of
files that would, one message on a full disk, usual permissions, fsynced folder, stale temporary
files, the model check; checkpoint.torch as a regular file, model_best.torch, keep-last."""

from __future__ import annotations

import functools
import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import read_losses
from vissl_vit import compose_config, run_train_engine
from vissl_vit.engine import checkpoint as ckpt
from vissl_vit.engine.checkpoint import (
    LATEST,
    atomic_save,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    remove_stale_tmp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.engine.hooks.checkpoint_hook import CheckpointHook, Preempted, check_model_fits
from vissl_vit.errors import ConfigError, UserError
from vissl_vit.registry import HOOKS
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


# ---- weights out: plain torch.load, modes, the newest as a regular file, the best, keep-last ----

QUICK_3_EPOCHS = ["config=test/quick_vit", "config.OPTIMIZER.num_epochs=3", "config.DATA.SYNTHETIC.NUM_IMAGES=32"]


def _bind_checkpoint_args(monkeypatch, **kwargs):
    """Pass CheckpointHook arguments as build_hooks will from CHECKPOINT.* (the tests give both the
    config key and the argument, so they hold before and after build_hooks passes it)."""
    monkeypatch.setitem(HOOKS._obj_map, "checkpoint_hook", functools.partial(CheckpointHook, **kwargs))


def test_defaults_keep_the_newest_two_checkpoints(tmp_path):
    assert compose_config(["config=test/quick_vit"]).config.CHECKPOINT.KEEP_LAST == 2
    run = tmp_path / "run"
    run_train_engine(compose_config([*QUICK_3_EPOCHS, f"config.CHECKPOINT.DIR={run}"]))
    assert [os.path.basename(p) for p in list_checkpoints(str(run))] == ["model_phase1.torch", "model_phase2.torch"]


@pytest.mark.parametrize("keep_last", [0, -2])
def test_keep_last_zero_or_below_minus_one_is_a_config_error(tmp_path, keep_last):
    with pytest.raises(ConfigError) as e:
        CheckpointHook(str(tmp_path), 1, -1, keep_last=keep_last, is_primary=True)
    assert str(e.value).startswith(f"config.CHECKPOINT.KEEP_LAST={keep_last}: expected -1") and "\n" not in str(e.value)


def test_run_files_are_0644_and_checkpoints_load_with_a_plain_torch_load(tmp_path, monkeypatch):
    run = tmp_path / "run"
    metric = "test_accuracy_list_meter.top_1.0"
    _bind_checkpoint_args(monkeypatch, latest_as_copy=True, keep_best_metric=metric)
    old = os.umask(0o022)
    try:
        run_train_engine(
            compose_config(
                [*QUICK_3_EPOCHS, f"config.CHECKPOINT.DIR={run}", "config.CHECKPOINT.LATEST_AS_COPY=True",
                 f"config.CHECKPOINT.KEEP_BEST_METRIC={metric}"]
            )
        )  # fmt: skip
    finally:
        os.umask(old)
    names = {"checkpoint.torch", "model_best.torch", "model_phase2.torch", "model_final.safetensors"}
    assert names <= set(os.listdir(run))
    for name in os.listdir(run):
        if os.path.isfile(run / name):
            assert oct(os.stat(run / name).st_mode & 0o777) == oct(0o644), name
    for name in ("checkpoint.torch", "model_best.torch", "model_phase2.torch"):
        state = torch.load(run / name)  # weights_only=True by default on torch >= 2.6: plain data only
        assert state["classy_state_dict"]["base_model"]["model"]["trunk"]


def test_latest_as_copy_is_a_regular_file_that_find_latest_and_pruning_follow(tmp_path, monkeypatch):
    folder = str(tmp_path)
    for it in (1, 2, 3):
        save_checkpoint(folder, f"model_iteration{it}.torch", _state(it), keep_last=2, latest_as_copy=True)
    link = tmp_path / LATEST
    assert link.is_file() and not link.is_symlink() and os.path.samefile(link, tmp_path / "model_iteration3.torch")
    assert find_latest(folder) == str(tmp_path / "model_iteration3.torch")
    assert sorted(os.listdir(tmp_path)) == [LATEST, "model_iteration2.torch", "model_iteration3.torch"]
    # a file system without hard links: a copy, found as checkpoint.torch itself
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError(95, "Operation not supported")))
    save_checkpoint(folder, "model_iteration4.torch", _state(4), keep_last=2, latest_as_copy=True)
    assert not os.path.samefile(link, tmp_path / "model_iteration4.torch")
    assert find_latest(folder) == str(link) and load_checkpoint(find_latest(folder))["iteration"] == 4
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp_")]
    # back to a symlink when the option is off again
    save_checkpoint(folder, "model_iteration5.torch", _state(5), keep_last=2)
    assert os.readlink(link) == "model_iteration5.torch" and find_latest(folder) == str(
        tmp_path / "model_iteration5.torch"
    )


def test_resume_from_a_regular_file_checkpoint_gives_the_uninterrupted_losses(tmp_path, monkeypatch):
    ref, run = tmp_path / "ref", tmp_path / "run"
    base = ["config=test/quick_vit", "config.DATA.SYNTHETIC.NUM_IMAGES=32", "config.TEST_MODEL=False"]
    run_train_engine(compose_config([*base, f"config.CHECKPOINT.DIR={ref}", "config.OPTIMIZER.num_epochs=3"]))
    with monkeypatch.context() as m:  # the first epoch with checkpoint.torch as a hard link
        _bind_checkpoint_args(m, latest_as_copy=True)
        first = [*base, f"config.CHECKPOINT.DIR={run}", "config.OPTIMIZER.num_epochs=3"]
        run_train_engine(compose_config([*first, "config.CHECKPOINT.LATEST_AS_COPY=True"]), extra_hooks=[_StopAt(2)])
    assert (run / LATEST).is_file() and not (run / LATEST).is_symlink()
    # then as a copy tool leaves it: a plain copy, and the checkpoint it named gone
    shutil.copyfile(run / "model_phase0.torch", run / "copy")
    os.remove(run / "model_phase0.torch")
    os.replace(run / "copy", run / LATEST)
    trainer = run_train_engine(compose_config([*base, f"config.CHECKPOINT.DIR={run}", "config.OPTIMIZER.num_epochs=3"]))
    assert trainer.iteration == 6
    assert "Resuming from " + str(run / LATEST) in (run / "log.txt").read_text()
    assert read_losses(run) == read_losses(ref)


class _StopAt(HookBase):
    """Stops the run before step ``n + 1``, as a preemption would (the checkpoints so far are kept)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def before_step(self) -> None:
        if self.trainer.iteration == self.n:
            raise Preempted(f"stopped at iteration {self.n}")


class _Values:
    """A test_values callable: the test phases' values in turn, one per epoch."""

    def __init__(self, tops: list[float]) -> None:
        self.tops, self.epoch = tops, -1

    def __call__(self):
        return self.epoch, {
            "loss": 1.0 - self.tops[self.epoch] / 100,
            "accuracy_list_meter": {"top_1": {"0": self.tops[self.epoch]}},
        }


@pytest.mark.parametrize(
    "metric, mode, expected",
    [
        ("test_accuracy_list_meter.top_1.0", "auto", [True, False, True, False, False]),  # max; a tie keeps the first
        ("test_loss", "auto", [True, False, True, False, False]),  # auto: min for a loss
        ("test_accuracy_list_meter.top_1.0", "min", [True, True, False, False, True]),
    ],
)
def test_best_is_kept_or_replaced_by_the_new_test_value(tmp_path, metric, mode, expected):
    values = _Values([50.0, 40.0, 60.0, 60.0, 10.0])
    hook = CheckpointHook(
        str(tmp_path), 1, -1, 2, True, keep_best_metric=metric, keep_best_mode=mode, test_values=values
    )
    got = []
    for epoch in range(5):
        values.epoch = epoch
        got.append(hook._new_best())
        assert hook._new_best() is False  # the same test phase again (no test this epoch): not compared twice
    assert got == expected
    state = hook.state_dict()
    again = CheckpointHook(str(tmp_path), 1, -1, 2, True, keep_best_metric=metric, keep_best_mode=mode)
    again.load_state_dict(state)  # a resumed run compares with the best so far
    assert (again.best, again.best_epoch) == (hook.best, hook.best_epoch)


def test_a_best_metric_the_test_phase_does_not_have_lists_the_names(tmp_path):
    with pytest.raises(ConfigError, match=r"KEEP_BEST_METRIC='top_1': expected a test phase's value"):
        CheckpointHook(str(tmp_path), 1, -1, 2, True, keep_best_metric="top_1")
    values = _Values([50.0])
    values.epoch = 0
    hook = CheckpointHook(
        str(tmp_path), 1, -1, 2, True, keep_best_metric="test_accuracy_list_meter.top_5.0", test_values=values
    )
    with pytest.raises(ConfigError) as e:
        hook._new_best()
    assert "it has test_loss, test_accuracy_list_meter.top_1.0." in str(e.value) and "\n" not in str(e.value)


def test_model_best_holds_the_epoch_of_the_best_test_value(tmp_path, monkeypatch):
    run = tmp_path / "run"
    metric = "test_accuracy_list_meter.top_1.0"
    _bind_checkpoint_args(monkeypatch, keep_best_metric=metric)
    overrides = [*QUICK_3_EPOCHS, f"config.CHECKPOINT.DIR={run}", f"config.CHECKPOINT.KEEP_BEST_METRIC={metric}"]
    # every other epoch a checkpoint: a best at epoch 0 is written on its own, one at 1 or 2 is linked
    run_train_engine(compose_config([*overrides, "config.CHECKPOINT.CHECKPOINT_FREQUENCY=2"]))
    with open(run / "metrics.json") as f:
        tops = [r["test_accuracy_list_meter"]["top_1"]["0"] for r in map(json.loads, f) if "test_loss" in r]
    best_epoch = tops.index(max(tops))
    best = torch.load(run / "model_best.torch")
    assert best["epoch"] == best_epoch + 1  # epochs done
    assert best["hooks"]["CheckpointHook"] == {"metric": metric, "best": max(tops), "best_epoch": best_epoch}
    final = torch.load(run / "model_phase2.torch")
    assert final["hooks"]["CheckpointHook"]["best"] == max(tops)
    if best_epoch == 2:
        assert os.path.samefile(run / "model_best.torch", run / "model_phase2.torch")


def test_best_metric_without_test_phases_is_a_config_error(tmp_path, monkeypatch):
    _bind_checkpoint_args(monkeypatch, keep_best_metric="test_loss")
    with pytest.raises(
        ConfigError, match=r"KEEP_BEST_METRIC='test_loss' needs test phases: set config.TEST_MODEL=True"
    ):
        run_train_engine(
            compose_config(["config=test/quick_vit", f"config.CHECKPOINT.DIR={tmp_path / 'run'}", "config.TEST_MODEL=False",
                            "config.CHECKPOINT.KEEP_BEST_METRIC=test_loss"])
        )  # fmt: skip
