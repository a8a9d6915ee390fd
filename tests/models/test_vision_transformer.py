"""The ViT trunk: parity with timm, features, attention maps, options; and the heads."""

from __future__ import annotations

import pytest
import torch

from vissl_vit.errors import ConfigError
from vissl_vit.models.heads.eval_mlp import LinearEvalMLP
from vissl_vit.models.heads.mlp import MLP
from vissl_vit.models.heads.vision_transformer_head import VisionTransformerHead
from vissl_vit.models.trunks.vision_transformer import VisionTransformer
from vissl_vit.registry import HEADS, TRUNKS

timm = pytest.importorskip("timm")


def _pair(pooling: str, qkv_bias: bool = True):
    """timm's ViT and ours with the same weights. pooling: "token"; "gap" (VISSL's order: timm's
    global_pool="avg", fc_norm=False); "gap_fc_norm" (timm's default avg order, fc_norm=True)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    pool = "token" if pooling == "token" else "avg"
    ref = TimmViT(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=3,
        num_heads=4,
        mlp_ratio=4.0,
        qkv_bias=qkv_bias,
        num_classes=10,
        global_pool=pool,
        fc_norm=pooling == "gap_fc_norm",
        dynamic_img_size=True,
    ).eval()
    with torch.no_grad():  # a norm that is not the identity, so that the two orders differ
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    ours = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=3,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=256,
        qkv_bias=qkv_bias,
        classifier="token" if pooling == "token" else "gap",
        fc_norm=pooling == "gap_fc_norm",
    ).eval()
    # timm names the final norm fc_norm when it pools first; the head is ours to build separately
    sd = {k.replace("fc_norm", "norm"): v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    ours.load_state_dict(sd, strict=True)
    head = VisionTransformerHead(in_plane=64, num_classes=10).eval()
    head.layers.head.load_state_dict(ref.head.state_dict())
    with torch.no_grad():
        head.layers.head.weight.normal_(std=0.1)  # timm inits the head at 0: logits would all be equal
        ref.head.weight.copy_(head.layers.head.weight)
    return ref, ours, head


@pytest.mark.parametrize("pooling", ["token", "gap", "gap_fc_norm"])
@pytest.mark.parametrize("size", [32, 48])  # 48: position embeddings interpolated to a 6x6 grid
def test_logits_match_timm(pooling, size):
    torch.manual_seed(0)
    ref, ours, head = _pair(pooling)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = ref(x)
        got = head(ours(x)[0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pooling_orders_are_vissls_features_and_differ():
    # VISSL's vision_transformer.py get_intermediate_features: lastPOOL = FeatAvgPool(norm(x)), the
    # mean of the normed tokens; the fc_norm trunk's default output is norm(mean) instead
    torch.manual_seed(0)
    _, vissl, _ = _pair("gap")
    _, timm_order, _ = _pair("gap_fc_norm")
    timm_order.load_state_dict(vissl.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        blk = vissl(x, ["lastBLK"])[0][:, 1:]  # every patch token after the final norm
        assert vissl.default_feature() == "lastPOOL" and timm_order.default_feature() == "lastFCNORM"
        torch.testing.assert_close(vissl(x)[0], blk.mean(1))
        for m in (vissl, timm_order):  # the feature names mean the same in both trunks
            pool, cat2, fc = m(x, ["lastPOOL", "concatPOOL2", "lastFCNORM"])
            torch.testing.assert_close(pool, blk.mean(1))
            torch.testing.assert_close(cat2[:, 64:], blk.mean(1))
            assert not torch.allclose(fc, pool, atol=1e-3)
        torch.testing.assert_close(timm_order(x)[0], timm_order(x, ["lastFCNORM"])[0])
    with pytest.raises(ValueError, match="needs classifier='gap'"):
        VisionTransformer(
            image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, fc_norm=True
        )


def test_no_qkv_bias_matches_timm():
    torch.manual_seed(1)
    ref, ours, head = _pair("token", qkv_bias=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(ours(x)[0]), ref(x), rtol=1e-5, atol=1e-5)


def test_features_shapes_and_values():
    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=64, mlp_dim=128).eval()
    x = torch.randn(2, 3, 32, 32)
    keys = ["lastCLS", "concatCLS2", "blkCLS0", "blkCLS2", "lastBLK", "lastMAP", "lastPOOL", "concatPOOL3"]
    feats = dict(zip(keys, m(x, keys)))
    assert feats["lastCLS"].shape == (2, 64)
    assert feats["concatCLS2"].shape == (2, 128)
    assert feats["lastBLK"].shape == (2, 17, 64)
    assert feats["lastMAP"].shape == (2, 4, 17, 17)
    assert feats["concatPOOL3"].shape == (2, 192)
    torch.testing.assert_close(feats["blkCLS2"], feats["lastCLS"])  # block 2 is the last block
    torch.testing.assert_close(feats["concatCLS2"][:, 64:], feats["lastCLS"])
    torch.testing.assert_close(feats["lastBLK"][:, 0], feats["lastCLS"])
    torch.testing.assert_close(feats["lastPOOL"], feats["lastBLK"][:, 1:].mean(1))
    torch.testing.assert_close(feats["concatPOOL3"][:, 128:], feats["lastPOOL"])
    assert not torch.allclose(feats["blkCLS0"], feats["lastCLS"])
    # attention rows are distributions, and the explicit path equals SDPA's output
    torch.testing.assert_close(feats["lastMAP"].sum(-1), torch.ones(2, 4, 17))
    torch.testing.assert_close(m(x, ["lastMAP", "lastCLS"])[1], feats["lastCLS"])
    torch.testing.assert_close(m.get_last_selfattention(x), feats["lastMAP"])


@pytest.mark.parametrize("bad", ["lastCL", "concatCLS9", "blkCLS3", "concatCLS0"])
def test_unknown_or_impossible_features_raise(bad):
    m = VisionTransformer(image_size=16, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32)
    with pytest.raises(ValueError):
        m(torch.randn(1, 3, 16, 16), ["lastCLS", bad])


def test_gap_without_class_token():
    m = VisionTransformer(
        image_size=16,
        patch_size=4,
        in_chans=1,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        classifier="gap",
        use_class_token=False,
    )
    assert m.cls_token is None and m.pos_embed.shape == (1, 16, 16)
    assert m(torch.randn(2, 1, 16, 16))[0].shape == (2, 16)
    with pytest.raises(ValueError, match="needs a class token"):
        m(torch.randn(2, 1, 16, 16), ["lastCLS"])


def test_drop_path_is_linear_over_depth_and_off_in_eval():
    m = VisionTransformer(
        image_size=16,
        patch_size=8,
        num_layers=5,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        drop_path_rate=0.4,
        dropout_rate=0.2,
    )
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    x = torch.randn(4, 3, 16, 16)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    assert not torch.allclose(m(x)[0], m(x)[0])


def test_qk_scale_changes_attention():
    torch.manual_seed(0)
    a = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    b = VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, qk_scale=2.0
    ).eval()
    b.load_state_dict(a.state_dict())
    assert b.blocks[0].attn.scale == 2.0 and a.blocks[0].attn.scale == pytest.approx(8**-0.5)
    x = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(a(x)[0], b(x)[0])


@pytest.mark.parametrize("flag", ["checkpoint_mlp", "checkpoint_block"])
def test_activation_checkpointing_gives_same_gradients(flag):
    torch.manual_seed(0)
    kw = dict(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    plain, ckpt = VisionTransformer(**kw), VisionTransformer(**kw, **{flag: True})
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    plain(x)[0].sum().backward()
    ckpt(x)[0].sum().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_heads():
    x = torch.randn(4, 32)
    assert MLP([32, 64, 10], use_bn=True, use_relu=True)(x).shape == (4, 10)
    mlp = MLP([32, 64, 10], use_bn=True, use_relu=True)
    assert [type(m).__name__ for m in mlp.clf] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    head = VisionTransformerHead(in_plane=32, num_classes=5, hidden_dim=16)
    assert [n for n, _ in head.layers.named_children()] == ["pre_logits", "act", "head"]
    assert torch.count_nonzero(head(x)) == 0  # classifier initialised at zero
    assert LinearEvalMLP(in_channels=32, dims=[32, 10])(x.view(4, 32, 1, 1)).shape == (4, 10)


def test_the_pre_logits_layer_starts_as_flax_dense_lecun_normal():
    # big_vision's pre_logits is a Flax Dense: lecun normal = a normal truncated at 2 sd, widened by
    # 1/0.87962566 so that its sd is sqrt(1/fan_in); bias 0
    torch.manual_seed(0)
    w = VisionTransformerHead(in_plane=384, num_classes=10, hidden_dim=384).layers.pre_logits.weight.detach()
    sd = (1 / 384) ** 0.5
    assert abs(w.std().item() / sd - 1) < 0.01  # 147k draws: the sd's relative noise is ~0.2%
    assert w.abs().max().item() <= 2 * sd / 0.87962566103423978 + 1e-7  # truncated at 2 of its own sd
    assert w.abs().max().item() > 0.99 * 2 * sd / 0.87962566103423978


def test_registry_lookup_lists_known_names():
    assert {"mlp", "vision_transformer_head", "eval_mlp"} <= set(HEADS.names())
    with pytest.raises(
        ConfigError,
        match=r"Unknown trunk 'vision_transfomer'.*Did you mean 'vision_transformer'.*Known trunk names: convit, vision_transformer",
    ):
        TRUNKS.get("vision_transfomer")


def _mocov3_sincos(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's VisionTransformerMoCo.build_2d_sincos_position_embedding (facebookresearch/moco-v3,
    vits.py), transcribed: meshgrid (default ij indexing) of arange(w) and arange(h), the "w" grid
    first, omega_d = 1 / temperature^(d / (dim/4)), [sin(w), cos(w), sin(h), cos(h)], a zero row for
    the class token in front. Returns [1, 1 + h*w, dim]."""
    gw, gh = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    ow, oh = gw.flatten()[:, None] * omega[None], gh.flatten()[:, None] * omega[None]
    pe = torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pe])[None]


@pytest.mark.parametrize("grid,dim", [(4, 16), (14, 384), (7, 96)])
def test_sincos_pos_embed_equals_mocov3_exactly(grid, dim):
    from vissl_vit.models.layers import sincos_2d_pos_embed

    ref = _mocov3_sincos(grid, grid, dim)
    assert torch.equal(sincos_2d_pos_embed(grid, dim, 1), ref)
    # the old order (column quarters first) is a different embedding: the test can tell
    q = dim // 4
    swapped = torch.cat([ref[..., 2 * q :], ref[..., : 2 * q]], dim=-1)
    assert not torch.equal(sincos_2d_pos_embed(grid, dim, 1), swapped)
    trunk = VisionTransformer(
        image_size=grid * 4,
        patch_size=4,
        num_layers=1,
        num_heads=4,
        hidden_dim=dim,
        mlp_dim=dim,
        pos_embed_type="sincos",
    )
    assert torch.equal(trunk.pos_embed.data, ref) and not trunk.pos_embed.requires_grad
