"""The train engine end to end on synthetic data: run folder, phases, checkpoints, guards."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from tests.data.test_datasets import make_folder
from vissl_vit import compose_config, run_train_engine
from vissl_vit.engine import train_engine
from vissl_vit.engine.checkpoint import LATEST, atomic_save, list_checkpoints
from vissl_vit.engine.launch import main
from vissl_vit.errors import ConfigError, TrainingError, UserError


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_run_folder_has_every_file(quick_overrides, tmp_path):
    run_train_engine(compose_config(quick_overrides + ["config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=True"]))
    run = tmp_path / "run"
    assert {
        "train_config.yaml",
        "log.txt",
        "stdout.json",
        "metrics.json",
        "tb_logs",
        LATEST,
        "model_phase0.torch",
        "model_phase1.torch",
    } <= set(os.listdir(run))
    assert os.listdir(run / "tb_logs")
    assert os.readlink(run / LATEST) == "model_phase1.torch"
    lines = read_jsonl(run / "stdout.json")
    assert [r["iteration"] for r in lines] == list(range(1, 9))  # 64 images / 16 per batch x 2 epochs
    assert {"iteration", "epoch", "loss", "lr", "images_per_sec", "eta_seconds"} <= set(lines[0])
    metrics = read_jsonl(run / "metrics.json")
    assert [(m["phase_idx"], m["train_phase_idx"]) for m in metrics] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert set(metrics[1]["test_accuracy_list_meter"]) == {"top_1", "top_2"}
    assert 0.0 <= metrics[1]["test_accuracy_list_meter"]["top_1"]["0"] <= 100.0
    text = (run / "train_config.yaml").read_text()
    assert "derived:" in text and "global_batch_size: 16" in text and "NUM_LAYERS: 2" in text
    assert "iter 8/8" in (run / "log.txt").read_text()


def test_rerun_of_a_finished_run_does_nothing(quick_overrides, tmp_path):
    cfg = compose_config(quick_overrides)
    run_train_engine(cfg)
    before = read_jsonl(tmp_path / "run" / "stdout.json")
    trainer = run_train_engine(cfg)
    assert trainer.iteration == 8 and read_jsonl(tmp_path / "run" / "stdout.json") == before


def test_existing_checkpoints_without_auto_resume(quick_overrides, tmp_path):
    run_train_engine(compose_config(quick_overrides))
    with pytest.raises(ConfigError, match="already holds checkpoints.*OVERWRITE_EXISTING"):
        run_train_engine(compose_config(quick_overrides + ["config.CHECKPOINT.AUTO_RESUME=False"]))
    trainer = run_train_engine(
        compose_config(
            quick_overrides + ["config.CHECKPOINT.AUTO_RESUME=False", "config.CHECKPOINT.OVERWRITE_EXISTING=True"]
        )
    )
    assert trainer.iteration == 8


def test_keep_last_and_iteration_checkpoints(quick_overrides, tmp_path):
    run_train_engine(
        compose_config(
            quick_overrides + ["config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3", "config.CHECKPOINT.KEEP_LAST=2"]
        )
    )
    names = [os.path.basename(p) for p in list_checkpoints(tmp_path / "run")]
    assert names == ["model_iteration6.torch", "model_phase1.torch"]


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.torch"
    atomic_save({"a": 1}, str(path))

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(UserError, match="Could not write .*ckpt.torch: disk full"):  # one message
        atomic_save({"a": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["ckpt.torch"]


def test_nan_loss_stops_with_a_clear_message_and_keeps_checkpoint(quick_overrides, tmp_path, monkeypatch, capsys):
    real_build_loss = train_engine.build_loss

    class NanAfter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = real_build_loss(compose_config(quick_overrides).config), 0

        def forward(self, out, target):
            self.calls += torch.is_grad_enabled()  # count training steps, not test batches
            loss = self.inner(out, target)
            return loss * float("nan") if self.calls == 6 else loss

    monkeypatch.setattr(train_engine, "build_loss", lambda cfg: NanAfter())
    with pytest.raises(TrainingError, match="The loss is nan at iteration 6 \\(epoch 1"):
        run_train_engine(compose_config(quick_overrides))
    run = tmp_path / "run"
    assert os.readlink(run / LATEST) == "model_phase0.torch"
    assert max(r["iteration"] for r in read_jsonl(run / "stdout.json")) == 5
    # and through the command line: exit status 2, the message, no traceback
    assert main(quick_overrides + ["config.CHECKPOINT.DIR=" + str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "vissl_vit: error: The loss is nan" in err and "Traceback" not in err


def _folder_overrides(tmp_path, max_fraction):
    root = tmp_path / "imgs"
    paths = make_folder(root, per_class=8, size=16)
    for p in paths[:2]:
        with open(p, "wb") as f:
            f.write(b"\x89PNG broken")
    Image.new("RGB", (16, 16)).save(root / "cat" / "extra.jpg")
    return [
        "config=test/quick_vit",
        f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
        "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
        f"config.DATA.TRAIN.DATA_PATHS=[{root}]",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=17",
        "config.TEST_MODEL=False",
        'config.MODEL.HEAD.PARAMS=[["vision_transformer_head", {"in_plane": 32, "num_classes": "auto"}]]',  # 2 class folders
        f"config.DATA.MAX_BAD_IMAGE_FRACTION={max_fraction}",
    ]


def test_bad_images_past_the_limit_stop_the_run(tmp_path, capsys):
    assert main(_folder_overrides(tmp_path, 0.05)) == 2
    err = capsys.readouterr().err
    assert "2 training images could not be read, more than config.DATA.MAX_BAD_IMAGE_FRACTION=0.05" in err
    assert "cat/0.png" in err


def test_bad_images_under_the_limit_are_counted(tmp_path):
    trainer = run_train_engine(compose_config(_folder_overrides(tmp_path, 0.3)))
    bad = next(h for h in trainer.hooks if type(h).__name__ == "BadImageHook")
    assert trainer.iteration == 2 and bad.count == 2  # 2 distinct bad images, each read in both epochs


def test_gpu_without_cuda_is_a_clear_error(quick_overrides):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA device; set config.MACHINE.DEVICE=cpu"):
        run_train_engine(compose_config(quick_overrides + ["config.MACHINE.DEVICE=gpu"]))


def test_test_only(quick_overrides, tmp_path):
    run_train_engine(compose_config(quick_overrides))
    run_train_engine(compose_config(quick_overrides + ["config.TEST_ONLY=True"]))
    metrics = read_jsonl(tmp_path / "run" / "metrics.json")
    assert "test_accuracy_list_meter" in metrics[-1] and len(metrics) == 5
    assert metrics[-1]["test_accuracy_list_meter"] == metrics[-2]["test_accuracy_list_meter"]


def test_json_lines_writer_drops_a_partial_last_line(tmp_path):
    from vissl_vit.utils.logging import JsonLinesWriter

    path = tmp_path / "stdout.json"
    path.write_text('{"iteration": 1}\n{"itera')
    w = JsonLinesWriter(str(path))
    w.write({"iteration": 2})
    w.close()
    assert read_jsonl(path) == [{"iteration": 1}, {"iteration": 2}]


def test_config_is_frozen_during_the_run(quick_overrides):
    root = compose_config(quick_overrides)
    run_train_engine(root)
    with pytest.raises(Exception, match="read-only"):
        root.config.OPTIMIZER.num_epochs = 3
