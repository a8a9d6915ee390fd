"""Weight-decay groups: names, VISSL aliases, norms, biases, and entries that match nothing."""

from __future__ import annotations

import pytest

from vissl_vit import build_model, build_optimizer, compose_config
from vissl_vit.errors import ConfigError
from vissl_vit.optim import get_param_groups


def _model():
    return build_model(compose_config(["config=test/quick_vit"]).config)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_vissl_aliases_match_real_names():
    m = _model()
    groups = get_param_groups(m, 0.05, True, True, ["pos_embedding", "class_token"])
    assert _names(m, groups[1]) == {"trunk.pos_embed", "trunk.cls_token"}
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.05


def test_norms_and_biases():
    m = _model()
    groups = get_param_groups(m, 0.05, False, False, [])
    no_decay = _names(m, groups[1])
    assert "trunk.norm.weight" in no_decay and "trunk.blocks.0.norm1.weight" in no_decay
    assert "trunk.blocks.0.attn.qkv.bias" in no_decay
    assert "trunk.blocks.0.attn.qkv.weight" in _names(m, groups[0])
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in m.parameters())


def test_entry_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match=r"\['pos_embeding'\] match no parameter name"):
        get_param_groups(_model(), 0.05, True, True, ["pos_embeding"])


def test_build_optimizer_kinds():
    cfg = compose_config(["config=test/quick_vit", "config.OPTIMIZER.betas=[0.9,0.95]"]).config
    opt = build_optimizer(cfg, build_model(cfg))
    assert type(opt).__name__ == "AdamW" and opt.param_groups[0]["betas"] == (0.9, 0.95)
    cfg = compose_config(
        ["config=test/quick_vit", "config.OPTIMIZER.name=sgd", "config.OPTIMIZER.nesterov=True"]
    ).config
    opt = build_optimizer(cfg, build_model(cfg))
    assert type(opt).__name__ == "SGD" and opt.param_groups[0]["nesterov"] is True
    cfg = compose_config(["config=test/quick_vit", "config.OPTIMIZER.name=adan"]).config
    with pytest.raises(ConfigError, match="Unknown optimizer 'adan'.*Did you mean 'adam'"):
        build_optimizer(cfg, build_model(cfg))
