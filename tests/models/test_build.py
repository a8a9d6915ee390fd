"""build_model reads MODEL.* and nothing else; bad head arguments name the head."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

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


# --------------------------------------------------------------------------------------------------
# MODEL.WRAPPER: the method wrapper chosen by a model-side key; old configs choose it by LOSS.name
# --------------------------------------------------------------------------------------------------


def _moco_cfg(*overrides: str):
    return compose_config(["config=test/quick_moco", *overrides]).config


def test_old_configs_choose_the_wrapper_from_the_loss_name():
    from vissl_vit.models.build import estimate_num_params, method_wrapper
    from vissl_vit.models.moco import MoCoModel
    from vissl_vit.models.model import TrunkHeadModel

    moco = _moco_cfg()  # written before MODEL.WRAPPER: its default "" keeps the old choice
    assert moco.MODEL.WRAPPER == "" and moco.LOSS.name == "moco_loss" and method_wrapper(moco) == "moco"
    model = build_model(moco)
    assert type(model) is MoCoModel
    # the size guard counts the momentum encoder: twice the online model's estimate
    assert estimate_num_params(moco) == 2 * estimate_num_params(_moco_cfg("config.MODEL.WRAPPER=none"))
    vit = compose_config(["config=test/quick_vit"]).config
    assert method_wrapper(vit) == "none" and type(build_model(vit)) is TrunkHeadModel


def test_the_wrapper_key_wins_over_the_loss_name():
    from vissl_vit.models.moco import MoCoModel
    from vissl_vit.models.model import TrunkHeadModel

    plain = _moco_cfg("config.MODEL.WRAPPER=none")  # MoCo's loss, but no momentum encoder asked for
    model = build_model(plain)
    assert type(model) is TrunkHeadModel and not hasattr(model, "momentum_encoder")
    explicit = _moco_cfg("config.MODEL.WRAPPER=moco")
    moco = build_model(explicit)
    assert type(moco) is MoCoModel
    assert moco.momentum == explicit.LOSS.moco_loss.momentum and moco.version == explicit.LOSS.moco_loss.version


def test_an_unknown_wrapper_is_a_config_error_listing_the_valid_ones():
    from vissl_vit.models.build import method_wrapper

    message = r"^config\.MODEL\.WRAPPER='mocoo': expected one of '' \(auto.*\), none, moco\.$"
    with pytest.raises(ConfigError, match=message):  # refused when the config is composed (the size guard asks)
        _moco_cfg("config.MODEL.WRAPPER=mocoo")
    cfg = _moco_cfg()
    with open_dict(cfg):
        cfg.MODEL.WRAPPER = "mocoo"
    with pytest.raises(ConfigError, match=message):
        method_wrapper(cfg)
