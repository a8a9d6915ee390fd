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


def _pair(classifier: str, qkv_bias: bool = True):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    pool = "token" if classifier == "token" else "avg"
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
        dynamic_img_size=True,
    ).eval()
    ours = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=3,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=256,
        qkv_bias=qkv_bias,
        classifier=classifier,
    ).eval()
    # timm names the final norm fc_norm when it pools; the head is ours to build separately
    sd = {k.replace("fc_norm", "norm"): v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    ours.load_state_dict(sd, strict=True)
    head = VisionTransformerHead(in_plane=64, num_classes=10).eval()
    head.layers.head.load_state_dict(ref.head.state_dict())
    return ref, ours, head


@pytest.mark.parametrize("classifier", ["token", "gap"])
@pytest.mark.parametrize("size", [32, 48])  # 48: position embeddings interpolated to a 6x6 grid
def test_logits_match_timm(classifier, size):
    torch.manual_seed(0)
    ref, ours, head = _pair(classifier)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = ref(x)
        got = head(ours(x)[0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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


def test_registry_lookup_lists_known_names():
    assert {"mlp", "vision_transformer_head", "eval_mlp"} <= set(HEADS.names())
    with pytest.raises(
        ConfigError,
        match=r"Unknown trunk 'vision_transfomer'.*Did you mean 'vision_transformer'.*Known trunk names: vision_transformer",
    ):
        TRUNKS.get("vision_transfomer")
