"""build_model reads MODEL.* and nothing else; bad head arguments name the head."""

from __future__ import annotations

import pytest
import torch

from vissl_vit import build_model, compose_config
from vissl_vit.errors import ConfigError


def test_build_from_config():
    cfg = compose_config(["config=test/quick_vit", "config.MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER=gap"]).config
    model = build_model(cfg)
    assert model.trunk.classifier == "gap" and model.trunk.blocks[0].attn.qkv.bias is not None
    out = model(torch.randn(2, 3, 16, 16))
    assert len(out) == 1 and out[0].shape == (2, 4)
    assert set(model.state_dict()) >= {"trunk.cls_token", "trunk.pos_embed", "heads.0.layers.head.weight"}


def test_bad_head_argument_is_named():
    cfg = compose_config(
        ["config=test/quick_vit", "config.MODEL.HEAD.PARAMS=[[vision_transformer_head, {in_plane: 32, num_clases: 4}]]"]
    ).config
    with pytest.raises(
        ConfigError,
        match=r"HEAD.PARAMS\[0\] 'vision_transformer_head': unknown argument 'num_clases'.*Did you mean 'num_classes'",
    ):
        build_model(cfg)
