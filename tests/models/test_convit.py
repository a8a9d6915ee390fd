"""The convit trunk: parity with timm's ConVit, the local init, the late class token, features, config."""

from __future__ import annotations

import functools

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from vissl_vit.errors import ConfigError
from vissl_vit.models.heads.vision_transformer_head import VisionTransformerHead
from vissl_vit.models.model import TrunkHeadModel
from vissl_vit.models.trunks.convit import GPSA, ConViT
from vissl_vit.models.weights import map_names
from vissl_vit.registry import TRUNKS

timm = pytest.importorskip("timm")
from timm.models.convit import ConVit as TimmConVit  # noqa: E402

# timm/models/convit.py convit_{tiny,small,base}: embed_dim is per head (48), 12 blocks, 10 GPSA
TIMM_SHAPES = {"tiny": 4, "small": 9, "base": 16}
# VISSL's defaults.yaml MODEL.TRUNK.CONVIT (l.826-852), with LOCALITY_DIM 1 (timm's layout)
CONVIT_SECTION = {
    "N_GPSA_LAYERS": 10,
    "CLASS_TOKEN_IN_LOCAL_LAYERS": False,
    "LOCALITY_STRENGTH": 1.0,
    "LOCALITY_DIM": 1,
    "USE_LOCAL_INIT": True,
}


@functools.lru_cache(maxsize=1)
def _default_trunk() -> dict:
    from vissl_vit.config.paths import defaults_path

    return yaml.safe_load(defaults_path().read_text())["config"]["MODEL"]["TRUNK"]


def _trunk_cfg(vit: dict | None = None, convit: dict | None = None):
    """A MODEL.TRUNK node: defaults.yaml's VISION_TRANSFORMERS (and its CONVIT section if it has one)."""
    trunk = _default_trunk()
    section = dict(CONVIT_SECTION, **trunk.get("CONVIT", {}))
    node = {
        "NAME": "convit",
        "VISION_TRANSFORMERS": dict(trunk["VISION_TRANSFORMERS"], **(vit or {})),
        "CONVIT": dict(section, **(convit or {})),
    }
    return OmegaConf.create(node)


def _timm_pair(heads: int, img: int = 64, global_pool: str = "token"):
    """timm's ConVit at a timm variant's shape and our trunk + head, holding the same random weights.

    Both are built on the meta device and filled afterwards: the full-depth models then cost no
    initialisation time. img 64 with patch 16: a 4x4 grid (GPSA needs a square one)."""
    with torch.device("meta"):
        ref = TimmConVit(
            img_size=img, embed_dim=48, num_heads=heads, local_up_to_layer=10, num_classes=7, global_pool=global_pool
        )
        ours = ConViT(
            image_size=img,
            num_heads=heads,
            hidden_dim=48 * heads,
            mlp_dim=4 * 48 * heads,
            classifier="token" if global_pool == "token" else "gap",
        )
    ref.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(heads)
    with torch.no_grad():  # weights far from any init: norms, gates and biases all matter
        for name, p in ref.named_parameters():
            p.normal_(std=0.05, generator=gen)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.add_(1.0)
    ref.eval()
    ours.to_empty(device="cpu")
    model = TrunkHeadModel(ours, [VisionTransformerHead(in_plane=48 * heads, num_classes=7)]).eval()
    # timm names -> ours through the weights loader's timm mapping (head.* -> heads.0.layers.head.*)
    model.load_state_dict(map_names(ref.state_dict(), "timm"), strict=True)
    return ref, model


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_logits_match_timm(variant):
    ref, model = _timm_pair(TIMM_SHAPES[variant])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x), rtol=1e-5, atol=1e-5)


def test_gap_matches_timm_avg_pool():
    # timm's global_pool="avg": x[:, 1:].mean(1) after the final norm, the class token left out
    ref, model = _timm_pair(TIMM_SHAPES["tiny"], global_pool="avg")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_state_dict_names_and_shapes_are_timms(variant):
    heads = TIMM_SHAPES[variant]
    with torch.device("meta"):
        ref = TimmConVit(embed_dim=48, num_heads=heads, local_up_to_layer=10)
        ours = ConViT(num_heads=heads, hidden_dim=48 * heads, mlp_dim=4 * 48 * heads)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith("head.")}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert ours.pos_embed.shape == (1, 196, 48 * heads)  # no class-token slot (RECIPES 1.3)
    # the parameter count from the config is the built one, and timm's (without its classifier)
    vit = {"NUM_HEADS": heads, "HIDDEN_DIM": 48 * heads, "MLP_DIM": 4 * 48 * heads, "IMAGE_SIZE": 224}
    n = ConViT.num_params_from_config(_trunk_cfg(vit))
    assert n == sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for k, p in ref.named_parameters() if not k.startswith("head."))


def test_timm_file_for_another_image_size_loads_with_resampled_pos_embed():
    # ConViT's pos_embed has no class-token slot (timm's no_embed_class): all 9 rows are the 3x3 grid
    from vissl_vit.models.layers import resample_pos_embed
    from vissl_vit.models.weights import load_weights

    torch.manual_seed(0)
    ref = TimmConVit(img_size=48, embed_dim=8, num_heads=4, depth=2, local_up_to_layer=1, num_classes=3)
    ours = ConViT(image_size=32, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=128, n_gpsa_layers=1)
    model = TrunkHeadModel(ours, [VisionTransformerHead(in_plane=32, num_classes=3)])
    report = load_weights(model, map_names(ref.state_dict(), "timm"), path="timm.pth", fmt="timm")
    assert report.resized and not report.missing
    torch.testing.assert_close(ours.pos_embed, resample_pos_embed(ref.pos_embed, (2, 2), 0))


def _local_init_closed_form(heads: int, alpha: float) -> torch.Tensor:
    """RECIPES 1.2 (convit.py GPSA.local_init): head h1 + K*h2 of the first K² heads gets
    [2(h2 - c), 2(h1 - c), -1] * alpha, with K = floor(sqrt(heads)), c = (K-1)/2 for even K, K//2 for odd."""
    k = int(heads**0.5)
    c = (k - 1) / 2 if k % 2 == 0 else k // 2
    rows = {h1 + k * h2: [2 * (h2 - c), 2 * (h1 - c), -1.0] for h1 in range(k) for h2 in range(k)}
    return torch.tensor([rows[h] for h in sorted(rows)]) * alpha


@pytest.mark.parametrize("heads", [4, 9, 16, 6])  # 6: only the first 4 heads get a local init
def test_local_init_survives_construction(heads):
    torch.manual_seed(0)
    m = ConViT(
        image_size=32, patch_size=8, num_layers=3, num_heads=heads, hidden_dim=4 * heads, mlp_dim=16, n_gpsa_layers=2
    )
    k2 = int(heads**0.5) ** 2
    for blk in m.blocks[:2]:
        a = blk.attn
        assert isinstance(a, GPSA)
        torch.testing.assert_close(a.v.weight, torch.eye(4 * heads))  # VISSL's final re-init would break this
        torch.testing.assert_close(a.pos_proj.weight[:k2], _local_init_closed_form(heads, 1.0))
        assert torch.all(a.pos_proj.bias == 0) and torch.all(a.gating_param == 1)
    if k2 < heads:  # the other heads keep trunc-normal(0.02) weights
        assert m.blocks[0].attn.pos_proj.weight[k2:].abs().max() < 0.1
    assert not isinstance(m.blocks[2].attn, GPSA) and hasattr(m.blocks[2].attn, "qkv")


def test_locality_strength_and_vissls_per_layer_rule():
    m = ConViT(image_size=32, patch_size=8, num_layers=3, num_heads=9, hidden_dim=36, mlp_dim=16, n_gpsa_layers=2,
               locality_strength=2.5)  # fmt: skip
    torch.testing.assert_close(m.blocks[1].attn.pos_proj.weight, _local_init_closed_form(9, 2.5))
    # VISSL convit.py l.516-519: LOCALITY_STRENGTH <= 0 gives GPSA block i the strength 1 / (i + 1)
    m = ConViT(image_size=32, patch_size=8, num_layers=3, num_heads=9, hidden_dim=36, mlp_dim=16, n_gpsa_layers=2,
               locality_strength=0.0)  # fmt: skip
    for i in range(2):
        torch.testing.assert_close(m.blocks[i].attn.pos_proj.weight, _local_init_closed_form(9, 1 / (i + 1)))
    m = ConViT(image_size=32, patch_size=8, num_layers=3, num_heads=9, hidden_dim=36, mlp_dim=16, n_gpsa_layers=2,
               use_local_init=False)  # fmt: skip
    assert not torch.allclose(m.blocks[0].attn.v.weight, torch.eye(36))


def test_local_init_attends_to_each_heads_offset():
    # RECIPES 1.8.1: with zero content attention and a gate near 1, head h's positional attention from
    # the centre of a 5x5 grid peaks at the key offset (h2 - 1, h1 - 1) (H = 9: the 3x3 offsets)
    gpsa = GPSA(36, 9, locality_strength=3.0)
    gpsa.local_init()
    with torch.no_grad():
        gpsa.qk.weight.zero_()
        gpsa.gating_param.fill_(20.0)
    _, attn = gpsa(torch.randn(1, 25, 36), return_attention=True)
    centre = 2 * 5 + 2
    for h1 in range(3):
        for h2 in range(3):
            key = int(attn[0, h1 + 3 * h2, centre].argmax())
            assert (key // 5 - 2, key % 5 - 2) == (h1 - 1, h2 - 1)  # (Δy, Δx)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 9, 25))


def test_vissl_locality_dim_is_timms_layout_with_averaged_weights():
    # RECIPES 1.5: VISSL's pos_proj reads each offset channel LOCALITY_DIM times and divides the score
    # by it, so W'[:, g] = mean(W[:, g*ld:(g+1)*ld]) and b' = b / ld give the same attention
    torch.manual_seed(0)
    ld = 10
    vissl, plain = GPSA(36, 9, locality_dim=ld), GPSA(36, 9)
    with torch.no_grad():
        vissl.pos_proj.weight.normal_()
        vissl.pos_proj.bias.normal_()
        plain.load_state_dict(
            {
                **{k: v for k, v in vissl.state_dict().items() if not k.startswith("pos_proj")},
                "pos_proj.weight": vissl.pos_proj.weight.reshape(9, 3, ld).mean(-1),
                "pos_proj.bias": vissl.pos_proj.bias / ld,
            }
        )
    assert vissl.pos_proj.weight.shape == (9, 30)
    x = torch.randn(2, 16, 36)
    torch.testing.assert_close(vissl(x)[0], plain(x)[0])
    # VISSL's init_local fills each group's ld columns with the timm value: the same init forward
    vissl.local_init()
    plain.local_init()
    torch.testing.assert_close(vissl.pos_proj.weight.reshape(9, 3, ld).mean(-1), plain.pos_proj.weight)


def _tiny(**kw):
    torch.manual_seed(0)
    args = dict(image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=32, mlp_dim=64, n_gpsa_layers=2)
    return ConViT(**{**args, **kw}).eval()


def test_class_token_joins_after_the_gpsa_blocks():
    m = _tiny()
    seen = []
    for blk in m.blocks:
        blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = m(x, ["lastBLK"])[0]
    assert seen == [16, 16, 17, 17]  # 4x4 patches in the GPSA blocks, + the class token after them
    assert out.shape == (2, 17, 32)
    # the class token enters without a position embedding: shifting pos_embed leaves its input unchanged
    grabbed = []
    m.blocks[2].register_forward_pre_hook(lambda mod, args: grabbed.append(args[0][:, 0].clone()))
    with torch.no_grad():
        m(x)
        m.pos_embed.add_(1.0)
        m(x)
    torch.testing.assert_close(grabbed[-2], m.cls_token[:, 0].expand(2, -1))
    torch.testing.assert_close(grabbed[-1], grabbed[-2])


def test_features():
    m = _tiny()
    x = torch.randn(2, 3, 32, 32)
    keys = ["lastCLS", "concatCLS2", "blkCLS2", "blkCLS3", "lastBLK", "lastMAP", "lastPOOL", "concatPOOL3"]
    with torch.no_grad():
        f = dict(zip(keys, m(x, keys)))
        default = m(x)[0]
    assert f["lastCLS"].shape == (2, 32) and f["concatCLS2"].shape == (2, 64) and f["concatPOOL3"].shape == (2, 96)
    assert f["lastMAP"].shape == (2, 4, 17, 17)
    torch.testing.assert_close(default, f["lastCLS"])
    torch.testing.assert_close(f["blkCLS3"], f["lastCLS"])
    torch.testing.assert_close(f["lastBLK"][:, 0], f["lastCLS"])
    torch.testing.assert_close(f["concatCLS2"], torch.cat([f["blkCLS2"], f["blkCLS3"]], -1))
    torch.testing.assert_close(f["lastPOOL"], f["lastBLK"][:, 1:].mean(1))
    torch.testing.assert_close(f["concatPOOL3"][:, 64:], f["lastPOOL"])
    torch.testing.assert_close(f["lastMAP"].sum(-1), torch.ones(2, 4, 17))
    assert [m.feature_width(k) for k in keys] == [32, 64, 32, 32, None, None, 32, 96]
    # block 1 is the last GPSA block: its pooled feature averages its 16 patch tokens (no class token yet)
    pooled = m(x, ["concatPOOL3"])[0][:, :32]
    manual = []
    m.blocks[1].register_forward_hook(lambda mod, args, out: manual.append(m.norm(out[0]).mean(1)))
    with torch.no_grad():
        m(x)
    torch.testing.assert_close(pooled, manual[0])
    for bad, match in [("blkCLS1", "before it joins"), ("concatCLS3", "before it joins"), ("lastFOO", "unknown")]:
        with pytest.raises(ValueError, match=match):
            m(x, [bad])
    # all-GPSA with gap: the last attention map is GPSA's, over the patch tokens
    g = _tiny(n_gpsa_layers=4, classifier="gap")
    with torch.no_grad():
        assert g(x, ["lastMAP"])[0].shape == (2, 4, 16, 16)
        torch.testing.assert_close(g(x)[0], g(x, ["lastBLK"])[0].mean(1))


def test_pos_embed_interpolates_to_other_sizes_and_backward_runs():
    m = _tiny(drop_path_rate=0.1, dropout_rate=0.1).train()
    out = m(torch.randn(2, 3, 48, 48))[0]  # 6x6 grid
    out.sum().backward()
    assert m.blocks[0].attn.pos_proj.weight.grad is not None and m.pos_embed.grad is not None


def test_config_rules_and_contract():
    cfg = _trunk_cfg()
    ConViT.check_config(cfg)
    assert ConViT.kwargs_from_config(cfg)["qk_scale"] is None
    for convit, vit, match in [
        ({"CLASS_TOKEN_IN_LOCAL_LAYERS": True}, {}, "CLASS_TOKEN_IN_LOCAL_LAYERS"),
        ({"N_GPSA_LAYERS": 13}, {}, "N_GPSA_LAYERS"),
        ({"N_GPSA_LAYERS": 12}, {}, "leaves no block"),
        ({"LOCALITY_DIM": 0}, {}, "LOCALITY_DIM"),
        ({}, {"POS_EMBED": "sincos"}, "POS_EMBED"),
    ]:
        with pytest.raises(ConfigError, match=match):
            ConViT.check_config(_trunk_cfg(vit, convit))
    small = _tiny()
    assert small.no_weight_decay() == {"pos_embed", "cls_token"}
    assert small.default_feature() == "lastCLS" and small.block_types
    assert small.layer_id("cls_token") == 0 and small.layer_id("blocks.3.attn.qkv.weight") == 4


def test_registered_trunk_builds_from_composed_config_and_loads_timm_weights(tmp_path):
    from vissl_vit.config import compose_config
    from vissl_vit.models.build import apply_weights_init, build_model

    cfg = compose_config(["config=test/quick_vit"]).config
    if "CONVIT" not in cfg.MODEL.TRUNK:
        pytest.skip("defaults.yaml has no MODEL.TRUNK.CONVIT section yet")
    cfg = compose_config(["config=test/quick_convit", "config.MACHINE.DEVICE=cpu"]).config
    cls = TRUNKS.get("convit")
    cls.check_config(cfg.MODEL.TRUNK)
    trunk = cls.from_config(cfg.MODEL.TRUNK)
    assert isinstance(trunk, ConViT) and trunk.n_gpsa_layers == cfg.MODEL.TRUNK.CONVIT.N_GPSA_LAYERS
    assert isinstance(trunk.blocks[0].attn, GPSA)
    # a timm ConVit state dict of the same shape loads through MODEL.WEIGHTS_INIT (timm format)
    torch.manual_seed(0)
    ref = cls.timm_reference(cfg.MODEL.TRUNK, num_classes=4).eval()
    with torch.no_grad():
        ref.head.weight.normal_(std=0.1)  # not the zero init of our head
    torch.save(ref.state_dict(), tmp_path / "timm_convit.pth")
    cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE = str(tmp_path / "timm_convit.pth")
    model = build_model(cfg).eval()
    apply_weights_init(model, cfg)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x), rtol=1e-5, atol=1e-5)
    # ... and converts back: tools/convert_weights.py --to timm gives a file timm's ConVit loads strictly
    from vissl_vit.models.convert import main as convert_main
    from vissl_vit.models.convert import to_vissl_vit

    torch.save(to_vissl_vit(model.state_dict()), tmp_path / "ours.torch")
    assert convert_main(["--to", "timm", str(tmp_path / "ours.torch"), str(tmp_path / "back.pth")]) == 0
    back = cls.timm_reference(cfg.MODEL.TRUNK, num_classes=4).eval()
    back.load_state_dict(torch.load(tmp_path / "back.pth"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref(x), rtol=1e-6, atol=1e-6)
