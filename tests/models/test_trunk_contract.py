"""A new trunk is one file: a 2-block toy, written here, is built, validated, extracted from,
FSDP-wrapped and benchmarked by the engine without any edit outside this file.

The toy reads the VISION_TRANSFORMERS section (a real trunk would add its own section to
defaults.yaml) and outputs features twice as wide as its tokens, so that a rule copied from the ViT
(width = HIDDEN_DIM) instead of asked of the trunk fails here.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from vissl_vit import compose_config
from vissl_vit.errors import ConfigError
from vissl_vit.models import build_model
from vissl_vit.models.layers import Block, PatchEmbed
from vissl_vit.models.trunks.base import Trunk
from vissl_vit.registry import TRUNKS

NAME = "toy_trunk_for_tests"


class ToyTrunk(Trunk):
    """Patch embedding, 2 blocks, then [mean, max] of the tokens: features of width 2 D."""

    CONFIG_SECTIONS = ("VISION_TRANSFORMERS",)
    FEATURE_PATTERNS = {"meanmax": "mean and max of the last block's tokens ([B, 2D])", "tokens": "[B, L, D]"}
    block_types = (Block,)

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.blocks = nn.ModuleList(Block(dim, 2, 2 * dim) for _ in range(2))

    @classmethod
    def kwargs_from_config(cls, trunk_cfg: DictConfig) -> dict:
        v = trunk_cfg.VISION_TRANSFORMERS
        return {"patch_size": v.PATCH_SIZE, "in_chans": v.IN_CHANNELS, "dim": v.HIDDEN_DIM}

    def feature_width(self, key: str) -> int | None:
        if key not in self.FEATURE_PATTERNS:
            raise ValueError(f"unknown feature '{key}' of the toy trunk; known: meanmax, tokens")
        return 2 * self.dim if key == "meanmax" else None

    def default_feature(self) -> str:
        return "meanmax"

    def forward(self, x: torch.Tensor, out_feat_keys: list[str] | None = None) -> list[torch.Tensor]:
        x, _ = self.patch_embed(x)
        for blk in self.blocks:
            x, _ = blk(x)
        out = {"meanmax": torch.cat([x.mean(1), x.amax(1)], dim=-1), "tokens": x}
        return [out[k] for k in out_feat_keys or ["meanmax"]]


@pytest.fixture(autouse=True)
def toy_registered():
    TRUNKS._obj_map[NAME] = ToyTrunk  # what @TRUNKS.register(NAME) does in a trunk's own file
    yield
    del TRUNKS._obj_map[NAME]


def _cfg(*extra: str, run: str = "/tmp/unused"):
    return compose_config(
        ["config=test/quick_vit", f"config.MODEL.TRUNK.NAME={NAME}", f"config.CHECKPOINT.DIR={run}"]
        + ['config.MODEL.HEAD.PARAMS=[["vision_transformer_head", {"in_plane": 64, "num_classes": 4}]]', *extra]
    )


def test_built_and_validated_by_asking_the_trunk():
    cfg = _cfg().config
    model = build_model(cfg)
    assert isinstance(model.trunk, ToyTrunk) and model(torch.randn(2, 3, 16, 16))[0].shape == (2, 4)
    # the head's width is checked against the toy's own default feature (2 D = 64), not HIDDEN_DIM
    with pytest.raises(ConfigError, match="takes inputs of width 32, but the .* has width 64"):
        _cfg('config.MODEL.HEAD.PARAMS=[["vision_transformer_head", {"in_plane": 32, "num_classes": 4}]]')
    with pytest.raises(ConfigError, match="LINEAR_EVAL_FEAT_POOL_OPS_MAP\\[0\\]: unknown feature 'lastCLS' of the toy"):
        _cfg("+config/test/overlays=linear_eval", "config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True")
    # its parameter count (for the memory check) comes from its structure, built on the meta device
    n = ToyTrunk.num_params_from_config(cfg.MODEL.TRUNK)
    assert n == sum(p.numel() for p in model.trunk.parameters())


def test_extracted_from_with_its_default_feature(tmp_path):
    from vissl_vit.engine.extract_engine import load_features, run_extract_features_engine

    cfg_root = _cfg(
        "config.ENGINE_NAME=extract_features",
        "config.MODEL.HEAD.PARAMS=[]",
        "config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True",
        "config.DATA.SYNTHETIC.NUM_IMAGES=8",
        run=str(tmp_path / "run"),
    )
    folder, names = run_extract_features_engine(cfg_root)
    assert names == ["meanmax"]
    feats, labels = load_features(folder, "TRAIN", "meanmax")
    assert feats.shape == (8, 64) and len(labels) == 8 and np.isfinite(feats.numpy()).all()


def test_fsdp_shards_its_blocks(tmp_path):
    from vissl_vit.engine.parallel import wrap_model

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29671")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'pg'}")
    try:
        cfg = _cfg("config.MODEL.FSDP.USE_FSDP=True").config
        model = wrap_model(build_model(cfg), cfg, torch.device("cpu"), 0, world_size=2)
        from torch.distributed.fsdp import FSDPModule

        sharded = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
        assert sharded == ["", "trunk.blocks.0", "trunk.blocks.1"]
    finally:
        dist.destroy_process_group()


def test_benchmarked_without_a_timm_twin(tmp_path, capsys):
    from vissl_vit.benchmark.throughput import main

    out = tmp_path / "r.json"
    args = ["config=benchmark/throughput/vit_tiny_32", f"config.MODEL.TRUNK.NAME={NAME}", "config.MODEL.HEAD.PARAMS=[]"]
    args += ["--batch-size", "4", "--steps", "1", "--warmup", "1", "--repeats", "1", "--no-e2e", "--json", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert set(r["models"]) == {"vissl_vit"} and r["models"]["vissl_vit"]["train_images_per_sec"] > 0
    assert "timm has no model like trunk 'toy_trunk_for_tests'" in capsys.readouterr().out
