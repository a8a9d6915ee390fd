"""Config composition: sources, overlays, overrides and the errors a user can make."""

from __future__ import annotations

import time

import pytest

from tests.conftest import run_cli
from vissl_vit.config import compose_config, list_configs
from vissl_vit.errors import ConfigError


def test_defaults_then_file_then_overlay_then_override():
    cfg = compose_config(["config=test/quick_vit"]).config
    assert cfg.OPTIMIZER.num_epochs == 2  # file over defaults (90)
    assert cfg.OPTIMIZER.momentum == 0.9  # untouched default
    cfg = compose_config(["config=test/quick_vit", "+config/test/overlays=one_epoch"]).config
    assert cfg.OPTIMIZER.num_epochs == 1  # overlay over file
    cfg = compose_config(
        ["config=test/quick_vit", "+config/test/overlays=one_epoch", "config.OPTIMIZER.num_epochs=7"]
    ).config
    assert cfg.OPTIMIZER.num_epochs == 7  # override over overlay


def test_override_value_types_are_parsed():
    cfg = compose_config(
        [
            "config=test/quick_vit",
            "config.OPTIMIZER.betas=[0.9,0.95]",
            "config.OPTIMIZER.weight_decay=1",
            "config.DISTRIBUTED.RUN_ID=60215",
            "config.MODEL.TRUNK.VISION_TRANSFORMERS.QK_SCALE=0.125",
        ]
    ).config
    assert list(cfg.OPTIMIZER.betas) == [0.9, 0.95]
    assert cfg.OPTIMIZER.weight_decay == 1.0 and isinstance(cfg.OPTIMIZER.weight_decay, float)
    assert cfg.DISTRIBUTED.RUN_ID == "60215"
    assert cfg.MODEL.TRUNK.VISION_TRANSFORMERS.QK_SCALE == 0.125


def test_misspelled_override_names_closest_key():
    with pytest.raises(ConfigError, match=r"config\.OPTIMIZER\.num_epoch.*Did you mean config\.OPTIMIZER\.num_epochs"):
        compose_config(["config=test/quick_vit", "config.OPTIMIZER.num_epoch=1"])


def test_misspelled_key_in_file_names_file(tmp_path, monkeypatch):
    import vissl_vit.config.compose as compose

    root = tmp_path / "config"
    (root / "x").mkdir(parents=True)
    (root / "x" / "bad.yaml").write_text("# @package _global_\nconfig:\n  OPTIMIZER:\n    weight_dekay: 0.1\n")
    monkeypatch.setattr(compose, "configs_dir", lambda: root)
    with pytest.raises(ConfigError, match=r"weight_dekay in .*bad\.yaml.*Did you mean config\.OPTIMIZER\.weight_decay"):
        compose.compose_config(["config=x/bad"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"config\.OPTIMIZER\.num_epochs.*expected int, got str 'ten'"):
        compose_config(["config=test/quick_vit", "config.OPTIMIZER.num_epochs=ten"])
    with pytest.raises(ConfigError, match=r"USE_GRAD_CLIP.*expected bool"):
        compose_config(["config=test/quick_vit", "config.MODEL.GRAD_CLIP.USE_GRAD_CLIP=3"])
    with pytest.raises(ConfigError, match=r"DATA_SOURCES.*expected a list"):
        compose_config(["config=test/quick_vit", "config.DATA.TRAIN.DATA_SOURCES=synthetic"])


def test_unknown_config_path_lists_nearest():
    with pytest.raises(ConfigError, match=r"Unknown config 'test/quick_vitt'.*Nearest existing: test/quick_vit"):
        compose_config(["config=test/quick_vitt"])
    with pytest.raises(ConfigError, match=r"Unknown overlay 'test/overlays/one_epok'.*test/overlays/one_epoch"):
        compose_config(["config=test/quick_vit", "+config/test/overlays=one_epok"])


def test_adding_keys_and_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="keys cannot be added"):
        compose_config(["config=test/quick_vit", "+config.OPTIMIZER.foo=1"])
    with pytest.raises(ConfigError, match="not understood"):
        compose_config(["config=test/quick_vit", "optimizer=adam"])
    with pytest.raises(ConfigError, match="only one config"):
        compose_config(["config=test/quick_vit", "config=test/quick_vit"])


def test_free_form_mappings_and_torch_loss_sections():
    cfg = compose_config(
        [
            "config=test/quick_vit",
            "config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS={a: 1}",
            "config.LOSS.name=BCEWithLogitsLoss",
            "config.LOSS.BCEWithLogitsLoss={reduction: sum}",
        ]
    ).config
    assert cfg.DATA.TRAIN.COLLATE_FUNCTION_PARAMS.a == 1
    assert cfg.LOSS.BCEWithLogitsLoss.reduction == "sum"
    with pytest.raises(ConfigError, match="Unknown key config.LOSS.NotALoss"):
        compose_config(["config=test/quick_vit", "config.LOSS.NotALoss={a: 1}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("config.MODEL.TRUNK.VISION_TRANSFORMERS.PATCH_SIZE=5", "multiple of PATCH_SIZE"),
        ("config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_HEADS=3", "multiple of NUM_HEADS"),
        ("config.MODEL.TRUNK.VISION_TRANSFORMERS.USE_CLASS_TOKEN=False", "CLASSIFIER='token' needs"),
        (
            "config.MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM=64",
            "first head 'vision_transformer_head' takes inputs of width 32",
        ),
        ("config.OPTIMIZER.param_schedulers.lr.lengths=[0.5,0.4]", "add up to 0.9"),
        ("config.DATA.TRAIN.LABEL_TYPE=sample", "expected standard, sample_index or zero"),
        ("config.MACHINE.DEVICE=tpu", "expected cpu or gpu"),
    ],
)
def test_cross_key_rules(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(["config=test/quick_vit", override])


def test_every_config_is_listed():
    names = list_configs()
    assert "quickstart/vit_fashion_mnist" in names
    assert "pretrain/vision_transformer/supervised/1gpu_vit_example" in names


def test_cli_misspelled_override_fails_fast_without_traceback():
    start = time.monotonic()
    proc = run_cli("config=test/quick_vit", "config.OPTIMIZER.num_epoch=1")
    elapsed = time.monotonic() - start
    assert proc.returncode == 2
    assert "Did you mean config.OPTIMIZER.num_epochs" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert elapsed < 60, f"the error took {elapsed:.0f}s"


def test_cli_unknown_config_path(capfd):
    from vissl_vit.engine.launch import main  # what the command runs

    assert main(["config=pretrain/vision_transformer/supervised/1gpu_vit_exampel"]) == 2
    err = capfd.readouterr().err
    assert "Nearest existing: pretrain/vision_transformer/supervised/1gpu_vit_example" in err
    assert "Traceback" not in err


def test_duplicate_key_in_a_file_is_an_error(tmp_path, monkeypatch):
    import vissl_vit.config.compose as compose

    root = tmp_path / "config"
    root.mkdir()
    (root / "dup.yaml").write_text(
        "# @package _global_\nconfig:\n  MODEL:\n    TRUNK:\n      VISION_TRANSFORMERS:\n"
        "        DROP_PATH_RATE: 0.1\n        DROP_PATH_RATE: 0\n"
    )
    monkeypatch.setattr(compose, "configs_dir", lambda: root)
    with pytest.raises(ConfigError, match=r"key 'DROP_PATH_RATE' is set twice in the same mapping \(lines 6 and 7\)"):
        compose.compose_config(["config=dup"])


def test_vissl_top_level_keys_are_accepted_and_others_refused(tmp_path, monkeypatch):
    import vissl_vit.config.compose as compose

    root = tmp_path / "config"
    root.mkdir()
    monkeypatch.setattr(compose, "configs_dir", lambda: root)
    (root / "ok.yaml").write_text(
        "# @package _global_\nengine_name: extract_features\nVERSION: 1\nconfig:\n  DATA:\n"
        "    TRAIN: {DATA_SOURCES: [synthetic]}\n    TEST: {DATA_SOURCES: [synthetic]}\n"
    )
    cfg = compose.compose_config(
        ["config=ok", "config.MACHINE.DEVICE=cpu", "config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True"]
    )
    assert cfg.config.ENGINE_NAME == "extract_features"  # VISSL's top-level engine_name, mapped
    (root / "bad.yaml").write_text("# @package _global_\nengine: train\nconfig: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: a config file holds one top-level mapping `config:`"):
        compose.compose_config(["config=bad"])
