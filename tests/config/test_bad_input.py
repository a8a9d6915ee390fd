"""Bad input refused up front with one line (ConfigError, exit status 2), not a traceback or a
silent no-op (issue 10, item 14)."""

from __future__ import annotations

import os

import pytest

from vissl_vit.config import compose_config
from vissl_vit.config import validate as validate_module
from vissl_vit.config.compose import load_yaml
from vissl_vit.config.validate import check_model_fits_memory
from vissl_vit.engine.launch import main
from vissl_vit.errors import ConfigError

QUICK = ["config=test/quick_vit"]
LR = "config.OPTIMIZER.param_schedulers.lr"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=0"], r"TRAIN.BATCHSIZE_PER_REPLICA=0: expected at least 1"),
        (["config.DATA.TEST.BATCHSIZE_PER_REPLICA=-4"], r"TEST.BATCHSIZE_PER_REPLICA=-4: expected at least 1"),
        (["config.DATA.NUM_DATALOADER_WORKERS=-1"], r"NUM_DATALOADER_WORKERS=-1: expected 0 .* or more"),
        (["config.DATA.MAX_BAD_IMAGE_FRACTION=1.5"], r"MAX_BAD_IMAGE_FRACTION=1.5: expected a fraction in \[0, 1\]"),
        (["config.MODEL.TRUNK.VISION_TRANSFORMERS.PATCH_SIZE=0"], r"PATCH_SIZE=0: expected at least 1"),
        (["config.OPTIMIZER.num_epochs=-3"], r"num_epochs=-3: expected at least 1 epoch"),
        (["config.OPTIMIZER.num_epochs=0"], r"num_epochs=0: expected at least 1 epoch"),
        (["config.OPTIMIZER.weight_decay=-0.1"], r"weight_decay=-0.1: expected a finite value >= 0"),
        ([f"{LR}.name=constant", f"{LR}.value=1e39"], r"lr.value=1e\+39: not a finite float32 number"),
        ([f"{LR}.name=constant", f"{LR}.value=-0.001"], r"lr.value=-0.001: a negative learning rate"),
        ([f"{LR}.name=multistep", f"{LR}.values=[0.1,5000,0.01]"], r"lr.values\[1\]=5000: an absurd learning rate"),
        (
            [
                f"{LR}.name=composite",
                f"{LR}.schedulers=[{{name: constant, value: 1e39}}]",
                f"{LR}.lengths=[1.0]",
                f"{LR}.interval_scaling=[rescaled]",
            ],
            r"lr.schedulers\[0\].value=1e\+39: not a finite float32",
        ),
        (
            [
                f"{LR}.name=constant",
                f"{LR}.value=100.0",
                f"{LR}.auto_lr_scaling.auto_scale=True",
                f"{LR}.auto_lr_scaling.base_value=100.0",  # VISSL's rule: lr = base_value x 16
                f"{LR}.auto_lr_scaling.base_lr_batch_size=1",
            ],
            r"lr.value=1600 after auto_lr_scaling \(x 16\): an absurd learning rate",
        ),
        (["config.CHECKPOINT.DIR=''"], r"CHECKPOINT.DIR is empty: give the run folder"),
    ],
)
def test_bad_values_are_refused(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        compose_config([*QUICK, f"config.CHECKPOINT.DIR={tmp_path / 'run'}", *overrides])


def test_test_only_runs_accept_zero_epochs(tmp_path):
    compose_config(
        [*QUICK, f"config.CHECKPOINT.DIR={tmp_path}", "config.TEST_ONLY=True", "config.OPTIMIZER.num_epochs=0"]
    )


def test_run_folder_that_is_a_file_under_a_file_or_not_writable(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")

    def compose(folder):
        return compose_config([*QUICK, f"config.CHECKPOINT.DIR={folder}"])

    with pytest.raises(ConfigError, match=r"CHECKPOINT.DIR='.*/file' is a file, not a folder"):
        compose(f)
    with pytest.raises(ConfigError, match=r"CHECKPOINT.DIR='.*/file/run/a' lies under '.*/file', which is a file"):
        compose(f / "run" / "a")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    if os.geteuid() == 0:  # root writes anywhere but on read-only mounts: let os.access say no for ro
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(ro) else real_access(p, m))
    with pytest.raises(ConfigError, match=r"CHECKPOINT.DIR='.*/ro': the folder is not writable"):
        compose(ro)
    with pytest.raises(ConfigError, match=r"CHECKPOINT.DIR='.*/ro/run': it would be made in '.*/ro', which is not"):
        compose(ro / "run")
    assert compose(tmp_path / "new" / "run").config.CHECKPOINT.DIR.endswith("new/run")  # nothing is created
    assert not (tmp_path / "new").exists()


def test_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# @package _global_\nconfig:\n  # caf\xe9\n  SEED_VALUE: 1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 on line 3\); save it as UTF-8"):
        load_yaml(path)


def test_absurd_model_size_is_refused_before_building(tmp_path):
    cfg = compose_config([*QUICK, f"config.CHECKPOINT.DIR={tmp_path}"]).config
    with pytest.raises(ConfigError, match=r"about 0.0194 million parameters .*NUM_LAYERS=2.*weights, gradients"):
        check_model_fits_memory(cfg, memory=19428 * 4 * 3)  # adamw: weights, grads, 2 states = 4 copies
    check_model_fits_memory(cfg, memory=19428 * 4 * 4)
    # NUM_LAYERS=100000 of ViT-B: 709 billion parameters, refused from the keys (nothing allocated)
    with pytest.raises(ConfigError, match=r"about 709 billion parameters \(.*NUM_LAYERS=100000, HIDDEN_DIM=768"):
        compose_config(
            [
                "config=pretrain/vision_transformer/supervised/1gpu_vit_example",
                f"config.CHECKPOINT.DIR={tmp_path}",
                "config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=100000",
            ]
        )


def test_machine_memory_is_known_here():
    assert validate_module.physical_memory_bytes() > 2**28


def test_in_process_cli_exit_status_2_without_traceback(tmp_path, capsys):
    assert main([*QUICK, f"config.CHECKPOINT.DIR={tmp_path}", "config.OPTIMIZER.num_epochs=-3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vissl_vit: error: config.OPTIMIZER.num_epochs=-3") and err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.slow
def test_cli_exit_status_2_for_batch_size_zero_and_a_file_as_run_folder(tmp_path, capfd):
    f = tmp_path / "file"
    f.write_text("x")
    for args, message in (
        (["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=0"], "BATCHSIZE_PER_REPLICA=0: expected at least 1"),
        ([f"config.CHECKPOINT.DIR={f}"], "is a file, not a folder"),
    ):
        assert main([*QUICK, f"config.CHECKPOINT.DIR={tmp_path / 'run'}", *args]) == 2  # what the command runs
        err = capfd.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vissl_vit: error:") and message in lines[0], err
