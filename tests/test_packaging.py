"""A plain `pip install .` (not editable) carries defaults.yaml and configs/ inside the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_plain_install_finds_defaults_and_configs(tmp_path):
    src, target = tmp_path / "src", tmp_path / "site"
    # build from a copy, so that the checkout's build/ and egg-info stay untouched
    shutil.copytree(
        REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__")
    )
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr
    code = (
        "from vissl_vit.config.paths import resource_root\n"
        "from vissl_vit import compose_config\n"
        "cfg = compose_config(['config=pretrain/vision_transformer/supervised/1gpu_vit_example']).config\n"
        "print(resource_root(), cfg.MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    root, width = out.stdout.split()
    assert root == str(target / "vissl_vit" / "_resources") and width == "768"
