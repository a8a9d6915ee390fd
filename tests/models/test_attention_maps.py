"""``get_attention_maps(x, blocks)`` of the trunks: the weights of any chosen blocks in one pass,
for every block kind (prenorm with each norm, rescale, espa; ConViT's GPSA and MHSA blocks)."""

from __future__ import annotations

import pytest
import torch

from vissl_vit.models.layers.espa import espa_attention_matrix
from vissl_vit.models.trunks.convit import ConViT
from vissl_vit.models.trunks.vision_transformer import VisionTransformer

TINY = dict(image_size=16, patch_size=4, num_heads=2, hidden_dim=16, mlp_dim=32)
VARIANTS = {
    "layernorm": dict(num_layers=3),
    "batchnorm": dict(num_layers=3, norm_layer="batchnorm"),
    "groupnorm": dict(num_layers=3, norm_layer="groupnorm"),
    "rescale": dict(num_layers=3, block="rescale", norm_layer="none"),
    # TAT's slope for eta = 0.9 needs at least 7 blocks
    "espa": dict(
        num_layers=8, block="espa", norm_layer="none", use_class_token=False, classifier="gap", weight_init="simplest"
    ),
}


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _trunk(kind: str) -> VisionTransformer:
    torch.manual_seed(0)
    trunk = VisionTransformer(**TINY, **VARIANTS[kind])
    if kind == "espa":  # W_q = 0 at init makes every map the fixed A_l: give the queries weights
        with torch.no_grad():
            for blk in trunk.blocks:
                blk.attn.qkv.weight[:16].normal_(std=0.5)
    return trunk.eval()


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_every_block_kind_returns_the_maps_of_the_chosen_blocks(kind):
    trunk = _trunk(kind)
    x = _images()
    last = len(trunk.blocks) - 1
    maps = trunk.get_attention_maps(x, [last, 0, 1, 0])
    assert list(maps) == [last, 0, 1]  # the order given, duplicates once
    tokens = 16 + (0 if kind == "espa" else 1)
    for a in maps.values():
        assert a.shape == (2, 2, tokens, tokens) and not a.requires_grad
    # the same weights as the last-block feature (lastMAP): bit for bit when no other map is built
    # (earlier blocks then run the same fused SDPA kernel as forward), to round-off otherwise
    assert torch.equal(trunk.get_attention_maps(x, [last])[last], trunk.get_last_selfattention(x))
    torch.testing.assert_close(maps[last], trunk.get_last_selfattention(x), rtol=0, atol=1e-5)
    assert not torch.equal(maps[0], maps[1])
    if kind == "espa":  # E-SPA's rows sum to d_l = rowsum(A_l), not 1 (ESPAttention's contract)
        for i, a in maps.items():
            d_l = trunk.blocks[i].attn.row_scale.reshape(1, 1, tokens).expand(2, 2, tokens)
            torch.testing.assert_close(a.sum(-1), d_l)
            assert (d_l - 1).abs().max() > 1e-3  # a property that differs from softmax's
    else:
        for a in maps.values():
            torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, tokens))


def test_a_prenorm_map_is_softmax_of_q_k_by_hand():
    trunk = _trunk("layernorm")
    x = _images()
    got = trunk.get_attention_maps(x, [1])[1]
    with torch.no_grad():
        t = trunk.blocks[0](trunk.embed(x))[0]
        blk = trunk.blocks[1]
        h = blk.norm1(t)  # [B, L, D]
        w = blk.attn.qkv.weight
        b = torch.zeros(48) if blk.attn.qkv.bias is None else blk.attn.qkv.bias
        q = (h @ w[:16].T + b[:16]).reshape(2, 17, 2, 8).transpose(1, 2)  # [B, heads, L, head_dim]
        k = (h @ w[16:32].T + b[16:32]).reshape(2, 17, 2, 8).transpose(1, 2)
        want = torch.softmax(q @ k.transpose(-2, -1) * 8**-0.5, dim=-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_espa_map_at_init_is_the_fixed_matrix_a_l():
    """At init W_q = 0, so E-SPA's weights are A_l = Sigma_l^1/2 Sigma_{l-1}^-1/2 whatever the input."""
    torch.manual_seed(0)
    trunk = VisionTransformer(**TINY, **VARIANTS["espa"]).eval()
    maps = trunk.get_attention_maps(_images(), [0, 7])
    for i, a in maps.items():
        want = espa_attention_matrix(16, i + 1, 8).to(torch.float32)
        torch.testing.assert_close(a, want.expand(2, 2, 16, 16), rtol=1e-5, atol=1e-6)


def test_blocks_out_of_range_are_refused():
    trunk = _trunk("layernorm")
    with pytest.raises(ValueError, match=r"block 3 is out of range \(it has 3 blocks: 0\.\.2\)"):
        trunk.get_attention_maps(_images(), [0, 3])
    with pytest.raises(ValueError, match="block -1 is out of range"):
        trunk.get_attention_maps(_images(), [-1])
    with pytest.raises(ValueError, match="not an integer"):
        trunk.get_attention_maps(_images(), [1.0])
    assert trunk.get_attention_maps(_images(), []) == {}


def test_one_pass_up_to_the_deepest_chosen_block_and_forward_builds_no_maps():
    trunk = _trunk("layernorm")
    calls: list[tuple[int, bool]] = []
    for i, blk in enumerate(trunk.blocks):
        blk.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: calls.append((i, kwargs.get("return_attention", False))), with_kwargs=True
        )
    trunk.get_attention_maps(_images(), [1])
    assert calls == [(0, False), (1, True)]  # block 2 never runs; block 0 builds no map
    calls.clear()
    trunk(_images())
    trunk(_images(), ["lastCLS", "concatCLS2"])
    assert calls and not any(wants for _, wants in calls)


def test_convit_gpsa_and_mhsa_blocks():
    torch.manual_seed(0)
    trunk = ConViT(image_size=16, patch_size=4, num_layers=3, num_heads=4, hidden_dim=16, mlp_dim=32, n_gpsa_layers=2)
    trunk.eval()
    x = _images()
    maps = trunk.get_attention_maps(x, [0, 1, 2])
    assert maps[0].shape == maps[1].shape == (2, 4, 16, 16)  # GPSA: patches only
    assert maps[2].shape == (2, 4, 17, 17)  # the class token has joined
    assert torch.equal(maps[2], trunk.get_last_selfattention(x))
    for a in maps.values():
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    with torch.no_grad():  # block 1's gated attention, recomputed from its own GPSA on block 0's output
        t = trunk.blocks[0](trunk.pos_drop(trunk.patch_embed(x)[0] + trunk.pos_embed))[0]
        want = trunk.blocks[1].attn.get_attention(trunk.blocks[1].norm1(t))
    assert torch.equal(maps[1], want)
    with pytest.raises(ValueError, match="convit trunk: block 3 is out of range"):
        trunk.get_attention_maps(x, [3])
