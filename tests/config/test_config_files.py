"""Config files outside configs/config: your own YAML, a run folder's train_config.yaml, and the
command line's --print-config / --list-configs."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from vissl_vit import compose_config, derive_run_values
from vissl_vit.engine.launch import main
from vissl_vit.errors import ConfigError


def test_a_yaml_file_anywhere_is_a_config(tmp_path):
    from vissl_vit.config import configs_dir

    own = (configs_dir() / "test" / "quick_vit.yaml").read_text().replace("NUM_LAYERS: 2", "NUM_LAYERS: 1")
    (tmp_path / "my_run.yaml").write_text(own)
    cfg = compose_config([f"config={tmp_path / 'my_run.yaml'}"]).config
    assert cfg.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS == 1
    with pytest.raises(ConfigError, match="Unknown config .*no_such.yaml"):
        compose_config([f"config={tmp_path / 'no_such.yaml'}"])


def test_a_run_folders_train_config_reruns_that_run(tmp_path):
    from vissl_vit.engine.train_engine import write_run_config

    run = tmp_path / "run"
    run.mkdir()
    original = compose_config(
        ["config=test/quick_vit", "config.OPTIMIZER.num_epochs=3", f"config.CHECKPOINT.DIR={run}"]
    )
    write_run_config(str(run), original, derive_run_values(original.config, 64))
    again = compose_config([f"config={run / 'train_config.yaml'}"])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(original)


def test_print_config_and_list_configs(capsys):
    assert main(["config=test/quick_vit", "config.OPTIMIZER.num_epochs=3", "--print-config"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.config.OPTIMIZER.num_epochs == 3
    assert printed.derived.global_batch_size == 16 and printed.derived.iterations_per_epoch == 4  # 64 images
    assert main(["--list-configs"]) == 0
    listed = capsys.readouterr().out.split()
    assert "test/quick_vit" in listed and "quickstart/vit_fashion_mnist" in listed
