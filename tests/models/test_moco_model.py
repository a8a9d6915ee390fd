"""MoCo's model: the momentum update formula and schedule, view handling, v3's trunk options."""

from __future__ import annotations

import math

import pytest
import torch

from vissl_vit import build_model, compose_config
from vissl_vit.models.heads.mlp import MLP
from vissl_vit.models.layers import sincos_2d_pos_embed
from vissl_vit.models.moco import MoCoModel, momentum_at
from vissl_vit.models.model import TrunkHeadModel, forward_views
from vissl_vit.models.trunks.vision_transformer import VisionTransformer


def _trunk(**kw):
    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, **kw)


def _moco(version):
    torch.manual_seed(0)
    heads = [MLP([16, 32, 8], use_bn=True, use_relu=True)] + (
        [MLP([8, 32, 8], use_relu=True)] if version == "v3" else []
    )
    return MoCoModel(TrunkHeadModel(_trunk(), heads), version, 0.9, "constant", shuffle_bn=True)


def test_momentum_schedule_values():
    assert momentum_at(0.99, "constant", 0.7) == 0.99
    assert momentum_at(0.99, "cosine", 0.0) == pytest.approx(0.99)
    assert momentum_at(0.99, "cosine", 0.5) == pytest.approx(0.995)
    assert momentum_at(0.99, "cosine", 1.0) == pytest.approx(1.0)
    assert momentum_at(0.9, "cosine", 0.25) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_momentum_update_equals_formula(version):
    model = _moco(version)
    names = [n for n, _ in model.momentum_encoder.named_parameters()]
    assert all(torch.equal(model.momentum_encoder.get_parameter(n), model.get_parameter(n)) for n in names)
    with torch.no_grad():
        for p in list(model.trunk.parameters()) + list(model.heads.parameters()):
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.momentum_encoder.named_parameters()}
    m = model.update_momentum_encoder(progress=0.3)
    assert m == 0.9
    for n in names:  # theta_k <- m theta_k + (1 - m) theta_q, for every mirrored parameter
        torch.testing.assert_close(
            model.momentum_encoder.get_parameter(n), 0.9 * before[n] + 0.1 * model.get_parameter(n)
        )
    if version == "v3":  # the predictor (last head) has no momentum copy
        assert len(model.momentum_encoder.heads) == 1 and len(model.heads) == 2
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    assert any(k.startswith("momentum_encoder.") for k in model.state_dict())


def test_views_per_version():
    x = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)]
    q, k = _moco("v2")(x)
    assert q.shape == (3, 8) and k.shape == (3, 8)
    q, k = _moco("v3")(x)
    assert q.shape == (6, 8) and k.shape == (6, 8)
    with pytest.raises(ValueError, match="two views"):
        _moco("v3")(x[0])


def test_multicrop_forward_groups_by_resolution():
    trunk = _trunk().eval()
    views = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    calls = []
    trunk.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    feats = forward_views(trunk, views, None)
    assert calls == [4, 4]  # one pass per resolution
    torch.testing.assert_close(feats, torch.cat([trunk(v)[0] for v in views]), atol=1e-5, rtol=1e-5)


def test_v3_trunk_options():
    trunk = _trunk(pos_embed_type="sincos", freeze_patch_embed=True)
    assert not trunk.pos_embed.requires_grad and not trunk.patch_embed.proj.weight.requires_grad
    torch.testing.assert_close(trunk.pos_embed, sincos_2d_pos_embed(4, 16, 1))
    assert torch.equal(trunk.pos_embed[0, 0], torch.zeros(16))  # class token: no position
    # a position's embedding: sin/cos of the row, then of the column (MoCo v3's vits.py order),
    # at frequencies 1 / 10000^(i / 4)
    pe = sincos_2d_pos_embed(4, 16, 0)[0]
    x, y = 2, 1  # token 1 * 4 + 2: row 1, column 2
    omega = 1.0 / 10000 ** (torch.arange(4) / 4)
    torch.testing.assert_close(
        pe[6], torch.cat([(y * omega).sin(), (y * omega).cos(), (x * omega).sin(), (x * omega).cos()])
    )


def test_build_model_wraps_for_moco_only():
    assert isinstance(build_model(compose_config(["config=test/quick_moco"]).config), MoCoModel)
    assert not isinstance(build_model(compose_config(["config=test/quick_swav"]).config), MoCoModel)
