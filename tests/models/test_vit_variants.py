"""The seeds' ViT variants as options of one trunk: each trains from its config, each init scheme
has its reference's statistics, and bad combinations are refused with the key named."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.engine.resume_utils import read_losses
from vissl_vit import compose_config
from vissl_vit.errors import ConfigError
from vissl_vit.models import build_model
from vissl_vit.models.layers.block import Block
from vissl_vit.models.layers.espa import ESPABlock
from vissl_vit.models.layers.norms import RescaleBlock, TokenBatchNorm, TokenGroupNorm
from vissl_vit.models.trunks.vision_transformer import VisionTransformer

VARIANTS = {  # overlay under configs/config/test/overlays -> what its trunk must contain
    "deit3": lambda t: isinstance(t.blocks[0].ls1, nn.Module) and t.pos_embed.shape[1] == 16,
    "simplevit": lambda t: t.cls_token is None and not t.pos_embed.requires_grad,
    "rescalevit_bn": lambda t: isinstance(t.blocks[0].norm1, TokenBatchNorm),
    "rescalevit_rescale": lambda t: isinstance(t.blocks[0], RescaleBlock),
    "simplest": lambda t: isinstance(t.blocks[0], ESPABlock) and len(t.blocks) == 12,
}


@pytest.mark.parametrize("variant", [*VARIANTS, "rescalevit_gn", "convit"])
def test_variant_trains_two_iterations_from_its_test_config(variant, tmp_path):
    from vissl_vit.engine.train_engine import run_train_engine
    from vissl_vit.models.trunks.convit import ConViT

    overlay = "rescalevit_bn" if variant == "rescalevit_gn" else variant
    extra = ["config.MODEL.TRUNK.VISION_TRANSFORMERS.NORM_LAYER=groupnorm"] if variant == "rescalevit_gn" else []
    base = (
        ["config=test/quick_convit"]
        if variant == "convit"
        else ["config=test/quick_vit", f"+config/test/overlays={overlay}"]
    )
    run = tmp_path / "run"
    cfg_root = compose_config(
        [*base, *extra]
        + ["config.DATA.SYNTHETIC.NUM_IMAGES=32", "config.OPTIMIZER.num_epochs=1", "config.TEST_MODEL=False"]
        + ["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16", f"config.CHECKPOINT.DIR={run}"]
    )
    trunk = build_model(cfg_root.config).trunk
    if variant == "rescalevit_gn":
        assert isinstance(trunk.blocks[0].norm1, TokenGroupNorm)
    elif variant == "convit":
        assert isinstance(trunk, ConViT)
    else:
        assert VARIANTS[variant](trunk)
    torch.manual_seed(0)
    run_train_engine(cfg_root)
    losses = read_losses(run)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())


def _linears(trunk: nn.Module, suffix: str) -> list[torch.Tensor]:
    return [m.weight for n, m in trunk.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffix)]


def test_jax_init_has_big_vision_statistics():
    """big_vision models/vit.py: q, k, v, out kernels xavier-uniform on (D, D) each: U(+-sqrt(3/D)),
    std 1/sqrt(D); MLP kernels xavier-uniform U(+-sqrt(6/(D + M))), biases N(0, 1e-6); the patch
    embedding Flax's lecun_normal (truncated normal at 2 sigma, rescaled so its std is
    sqrt(1/fan_in)); no class token; the head (vision_transformer_head) zeros."""
    torch.manual_seed(0)
    D, M, p, C = 192, 768, 16, 3
    t = VisionTransformer(
        image_size=32, patch_size=p, num_layers=2, num_heads=3, hidden_dim=D, mlp_dim=M, qkv_bias=True,
        use_class_token=False, classifier="gap", pos_embed_type="sincos", weight_init="jax",
    )  # fmt: skip
    for w in _linears(t, "qkv"):
        for part in w.chunk(3):  # each of q, k, v on its own (D, D): not xavier over the fused (3D, D)
            assert part.abs().max() <= math.sqrt(3 / D)
            assert part.std().item() == pytest.approx(D**-0.5, rel=0.03)
    for w in _linears(t, "attn.proj"):
        assert w.std().item() == pytest.approx(D**-0.5, rel=0.03)
    for w in _linears(t, "fc1") + _linears(t, "fc2"):
        assert w.abs().max() <= math.sqrt(6 / (D + M))
        assert w.std().item() == pytest.approx(math.sqrt(2 / (D + M)), rel=0.03)
    fc1_bias = t.blocks[0].mlp.fc1.bias
    assert 0 < fc1_bias.std().item() < 3e-6 and t.blocks[0].attn.qkv.bias.abs().max() == 0
    w = t.patch_embed.proj.weight  # fan_in 3 x 16 x 16 = 768: std sqrt(1/768), cut at 2 / 0.8796 of it
    fan_in = C * p * p
    assert w.std().item() == pytest.approx(fan_in**-0.5, rel=0.03)
    assert w.abs().max().item() <= 2 * fan_in**-0.5 / 0.87962566103423978 + 1e-6
    assert t.cls_token is None and t.patch_embed.proj.bias.abs().max() == 0
    from vissl_vit.models.heads.vision_transformer_head import VisionTransformerHead

    assert VisionTransformerHead(D, 10).layers.head.weight.abs().max() == 0


def _one_block(D: int, M: int, p: int, scheme: str) -> VisionTransformer:
    """A 1-block trunk (qkv bias on) initialised by ``scheme``, for the init statistics."""
    return VisionTransformer(
        image_size=32, patch_size=p, num_layers=1, num_heads=3, hidden_dim=D, mlp_dim=M, qkv_bias=True,
        weight_init=scheme,
    )  # fmt: skip


def test_moco_init_is_moco_v3s():
    """moco-v3 vits.py: qkv U(+-sqrt(6 / (3D/3 + D))), other linears xavier-uniform, zero biases; the
    patch projection xavier-uniform over (C p p, D)."""
    torch.manual_seed(0)
    D, M, p = 192, 768, 16
    t = _one_block(D, M, p, "moco")
    qkv = t.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (D + D))
    assert qkv.abs().max() <= bound and qkv.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    fc1 = t.blocks[0].mlp.fc1.weight
    assert fc1.std().item() == pytest.approx(math.sqrt(2 / (D + M)), rel=0.03)
    w = t.patch_embed.proj.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (3 * p * p + D)), rel=0.03)
    assert t.blocks[0].attn.qkv.bias.abs().max() == 0 and t.cls_token.std().item() < 1e-5


def test_rescalevit_init_is_jeonsworlds():
    """RescaleViT's modeling.py: zero position embedding and class token, PyTorch's default
    U(+-1/sqrt(fan_in)) for the patch projection and q, k, v, out (weights and biases), xavier MLP
    kernels with biases N(0, 1e-6); its classifier is PyTorch's default too."""
    from vissl_vit.models.heads.mlp import MLP

    torch.manual_seed(0)
    D, M, p = 192, 768, 16
    t = _one_block(D, M, p, "rescalevit")
    assert t.pos_embed.abs().max() == 0 and t.cls_token.abs().max() == 0
    for lin in (t.blocks[0].attn.qkv, t.blocks[0].attn.proj):
        bound = 1 / math.sqrt(D)
        assert lin.weight.abs().max() <= bound and lin.weight.std().item() == pytest.approx(
            bound / math.sqrt(3), rel=0.03
        )
        assert lin.bias.abs().max() <= bound and lin.bias.abs().max() > bound / 2
    fc1 = t.blocks[0].mlp.fc1
    assert fc1.weight.std().item() == pytest.approx(math.sqrt(2 / (D + M)), rel=0.03)
    assert 0 < fc1.bias.std().item() < 3e-6
    w = t.patch_embed.proj.weight
    assert w.abs().max() <= 1 / math.sqrt(3 * p * p)
    head = MLP([D, 10], weight_init="default").clf[0]
    assert head.weight.abs().max() <= 1 / math.sqrt(D) and head.weight.std().item() > 0.03
    assert MLP([D, 10]).clf[0].weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_pool_dropout_and_torch_init_are_the_seeds_simplevits():
    """SimplEsT-ViT's simple_vit.py: one dropout, on the last block's output before the pooling, and
    no re-initialisation (PyTorch's defaults); E-SPA's dropout sits there by default."""
    torch.manual_seed(0)
    kw = dict(image_size=32, patch_size=16, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=384)
    t = VisionTransformer(**kw, classifier="gap", use_class_token=False, pool_dropout_rate=0.2, weight_init="torch")
    assert isinstance(t.final_drop, nn.Dropout) and t.final_drop.p == 0.2 and t.pos_drop.p == 0.0
    t.train()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(t(x)[0], t(x)[0])  # the dropout is live in training
    t.eval()
    assert torch.equal(t(x)[0], t(x)[0])
    qkv = t.blocks[0].attn.qkv.weight  # PyTorch's default U(+-1/sqrt(fan_in))
    assert qkv.abs().max() <= 192**-0.5 and qkv.std().item() == pytest.approx(192**-0.5 / math.sqrt(3), rel=0.05)
    assert VisionTransformer(**kw).final_drop.__class__ is nn.Identity  # prenorm: none by default
    espa = VisionTransformer(
        **kw, block="espa", norm_layer="none", use_class_token=False, classifier="gap", dropout_rate=0.1,
        pos_embed_type="sincos", weight_init="simplest", tat_eta=0.5,
    )  # fmt: skip
    assert espa.final_drop.p == 0.1 and espa.pos_drop.p == 0.0


def test_espa_blocks_keep_their_own_init_under_every_scheme():
    kw = dict(image_size=16, patch_size=4, num_layers=8, num_heads=2, hidden_dim=32, mlp_dim=64)
    kw |= dict(block="espa", norm_layer="none", use_class_token=False, classifier="gap")
    for scheme in ("timm", "jax", "simplest"):
        t = VisionTransformer(**kw, weight_init=scheme)
        q = t.blocks[0].attn.qkv.weight[:32]
        assert q.abs().max() == 0, scheme  # E-SPA's zero queries: the attention at init is its target kernel
    t = VisionTransformer(**kw, weight_init="simplest")
    w = t.patch_embed.proj.weight  # SimplEsT-ViT's stem: N(0, 1 / (C p p))
    assert w.std().item() == pytest.approx((3 * 16) ** -0.5, rel=0.1)


def test_layer_scale_and_no_embed_class_are_timms():
    t = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          init_values=1e-4, no_embed_class=True)  # fmt: skip
    names = dict(t.named_parameters())
    assert torch.equal(names["blocks.1.ls2.gamma"], torch.full((32,), 1e-4))
    assert names["pos_embed"].shape == (1, 16, 32)
    # the class token carries no position: shifting every position embedding moves only the patch tokens
    x = torch.randn(2, 3, 32, 32)
    tokens = t.embed(x)
    with torch.no_grad():
        t.pos_embed.add_(1.0)
    moved = t.embed(x) - tokens
    assert moved[:, 0].abs().max() == 0 and torch.allclose(moved[:, 1:], torch.ones_like(moved[:, 1:]))


def test_uniform_drop_path_is_deit3s_constant_rate():
    t = VisionTransformer(image_size=16, patch_size=4, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64,
                          drop_path_rate=0.2, drop_path_uniform=True)  # fmt: skip
    assert [b.drop_path.drop_prob for b in t.blocks] == [0.2] * 4


def test_token_norm_features_normalise_every_token_before_taking_the_class_token():
    """With BatchNorm over batch x tokens, the class token's normed value depends on the other tokens'
    statistics (RescaleViT normalises all tokens, then reads x[:, 0])."""
    torch.manual_seed(0)
    t = VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                          norm_layer="batchnorm").eval()  # fmt: skip
    with torch.no_grad():
        t.norm.bn.running_mean.normal_()
        t.norm.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 16, 16)
    last = t(x, ["lastBLK"])[0]
    assert torch.allclose(t(x, ["lastCLS"])[0], last[:, 0], atol=1e-6)
    assert torch.allclose(t(x, ["lastPOOL"])[0], last[:, 1:].mean(1), atol=1e-6)


def test_moco_shuffle_bn_and_sync_bn_work_with_the_batchnorm_trunk():
    from vissl_vit.models.heads.mlp import MLP
    from vissl_vit.models.moco import MoCoModel
    from vissl_vit.models.model import TrunkHeadModel

    trunk = VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                              norm_layer="batchnorm")  # fmt: skip
    model = MoCoModel(TrunkHeadModel(trunk, [MLP(dims=[32, 16])]), "v2", 0.99, "constant", shuffle_bn=True)
    out = model([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)])
    assert all(torch.isfinite(o).all() for o in out)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(trunk)
    assert isinstance(synced.blocks[0].norm1.bn, nn.SyncBatchNorm) and isinstance(synced.norm.bn, nn.SyncBatchNorm)


BAD = [
    ("BLOCK=espa", "NORM_LAYER='none'"),
    ("BLOCK=rescale", "NORM_LAYER='none'"),
    ("NORM_LAYER=batchnorm,FC_NORM=True,CLASSIFIER=gap", "FC_NORM=True .* needs NORM_LAYER='layernorm'"),
    ("BLOCK=espa,NORM_LAYER=none,DROP_PATH_RATE=0.0", "attends over the patch grid only: set USE_CLASS_TOKEN=False"),
    ("BLOCK=espa,NORM_LAYER=none,USE_CLASS_TOKEN=False,CLASSIFIER=gap,DROP_PATH_RATE=0.1", "no residual branches"),
    ("BLOCK=espa,NORM_LAYER=none,USE_CLASS_TOKEN=False,CLASSIFIER=gap,DROP_PATH_RATE=0.0", "NUM_LAYERS=2: .*no"),
    ("NORM_LAYER=rmsnorm", "NORM_LAYER='rmsnorm': expected one of layernorm, batchnorm, groupnorm, none"),
    ("WEIGHT_INIT=xavier", "WEIGHT_INIT='xavier': expected one of timm, jax, moco, rescalevit, torch, simplest"),
    ("POS_EMBED=sincos,HIDDEN_DIM=30,NUM_HEADS=2", "needs HIDDEN_DIM divisible by 4"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_option_combinations_are_refused_naming_the_key(overrides, message):
    keys = [f"config.MODEL.TRUNK.VISION_TRANSFORMERS.{kv}" for kv in overrides.split(",")]
    with pytest.raises(ConfigError, match=r"config\.MODEL\.TRUNK\.VISION_TRANSFORMERS\..*" + message):
        compose_config(["config=test/quick_vit", *keys])


def test_layer_ids_and_block_type():
    t = VisionTransformer(image_size=16, patch_size=4, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64)
    ids = {n: t.layer_id(n) for n, _ in t.named_parameters()}
    assert ids["cls_token"] == ids["pos_embed"] == ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.2.mlp.fc2.bias"] == 3
    assert ids["norm.weight"] == 4 and t.block_types == (Block,) and len(t.shard_units()) == 3
