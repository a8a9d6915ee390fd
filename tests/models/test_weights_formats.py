"""MODEL.WEIGHTS_INIT reads Google's JAX .npz ViT checkpoints, .safetensors files and DeiT-III's
LayerScale / no_embed_class files, each checked against timm (its own loaders and models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vissl_vit import compose_config
from vissl_vit.errors import UserError
from vissl_vit.models import apply_weights_init, build_model
from vissl_vit.models.convert import main as convert_main
from vissl_vit.models.heads.vision_transformer_head import VisionTransformerHead
from vissl_vit.models.jax_weights import read_npz
from vissl_vit.models.model import TrunkHeadModel
from vissl_vit.models.trunks.vision_transformer import VisionTransformer
from vissl_vit.models.weights import init_model_from_weights

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from timm.models.vision_transformer import _load_weights as timm_load_npz  # noqa: E402

# the tiny ViT of the brief: width 32, 2 blocks, 2 heads, patch 8, image 32 (a 4x4 grid)
DIM, DEPTH, HEADS, HEAD_DIM, MLP, PATCH, IMG, CLASSES = 32, 2, 2, 16, 64, 8, 32, 4
GRID = (IMG // PATCH) ** 2
SIZE = [
    f"config.MODEL.TRUNK.VISION_TRANSFORMERS.IMAGE_SIZE={IMG}",
    f"config.MODEL.TRUNK.VISION_TRANSFORMERS.PATCH_SIZE={PATCH}",
    f"config.MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM={MLP}",
]
GAP = [
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER=gap",
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.USE_CLASS_TOKEN=False",
]


def _timm(seed: int = 0, perturb: bool = False, **kwargs) -> TimmViT:
    torch.manual_seed(seed)
    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / DIM)
    m = TimmViT(**{**args, "qkv_bias": True, "num_classes": CLASSES, **kwargs}).eval()
    if perturb:  # non-trivial values everywhere (timm inits the head at 0 and LayerScale at init_values)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return m


def _our_model(tmp_path, path, *extra):
    cfg = compose_config(
        [
            "config=test/quick_vit",
            f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
            *SIZE,
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={path}",
            *extra,
        ]
    ).config
    model = build_model(cfg)
    apply_weights_init(model, cfg)
    return model.eval()


def _timm_feature(m: TimmViT, x: torch.Tensor) -> torch.Tensor:
    return m.forward_head(m.forward_features(x), pre_logits=True)


# ---------------------------------------------------------------------------------------------------
# Google's .npz checkpoints
# ---------------------------------------------------------------------------------------------------


def _jax_arrays(layout: str, class_token: bool, seed: int = 0, head: int | None = CLASSES) -> dict[str, np.ndarray]:
    """Random arrays under a Flax ViT's names and shapes.

    layout: "vit" (google-research/vision_transformer: MultiHeadDotProductAttention_1, LayerNorm_2,
    MlpBlock_3, Transformer/posembed_input/pos_embedding with the class-token slot), "big_vision"
    (per-type numbering _0 / _1 / _0, a root pos_embedding without class-token slot) or
    "big_vision_scanned" (the same with every block stacked on a leading [depth] axis).
    """
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.3, mean=0.0):
        return (mean + scale * rng.standard_normal(shape)).astype(np.float32)

    w = {"embedding/kernel": r(PATCH, PATCH, 3, DIM, scale=0.05), "embedding/bias": r(DIM)}
    if class_token:
        w["cls"] = r(1, 1, DIM)
    if layout == "vit":
        w["Transformer/posembed_input/pos_embedding"] = r(1, GRID + int(class_token), DIM)
        mha, ln2, mlp = 1, 2, 3
    else:
        w["pos_embedding"] = r(1, GRID, DIM)
        mha, ln2, mlp = 0, 1, 0
    stacked = layout == "big_vision_scanned"
    for i in range(DEPTH):
        lead = (DEPTH,) if stacked else ()
        if stacked and i > 0:
            break
        bp = "Transformer/encoderblock/" if stacked else f"Transformer/encoderblock_{i}/"
        for ln in (0, ln2):
            w[f"{bp}LayerNorm_{ln}/scale"] = r(*lead, DIM, mean=1.0, scale=0.1)
            w[f"{bp}LayerNorm_{ln}/bias"] = r(*lead, DIM, scale=0.1)
        for n in ("query", "key", "value"):
            w[f"{bp}MultiHeadDotProductAttention_{mha}/{n}/kernel"] = r(*lead, DIM, HEADS, HEAD_DIM)
            w[f"{bp}MultiHeadDotProductAttention_{mha}/{n}/bias"] = r(*lead, HEADS, HEAD_DIM, scale=0.1)
        w[f"{bp}MultiHeadDotProductAttention_{mha}/out/kernel"] = r(*lead, HEADS, HEAD_DIM, DIM, scale=0.1)
        w[f"{bp}MultiHeadDotProductAttention_{mha}/out/bias"] = r(*lead, DIM, scale=0.1)
        w[f"{bp}MlpBlock_{mlp}/Dense_0/kernel"] = r(*lead, DIM, MLP, scale=0.2)
        w[f"{bp}MlpBlock_{mlp}/Dense_0/bias"] = r(*lead, MLP, scale=0.1)
        w[f"{bp}MlpBlock_{mlp}/Dense_1/kernel"] = r(*lead, MLP, DIM, scale=0.2)
        w[f"{bp}MlpBlock_{mlp}/Dense_1/bias"] = r(*lead, DIM, scale=0.1)
    w["Transformer/encoder_norm/scale"] = r(DIM, mean=1.0, scale=0.1)
    w["Transformer/encoder_norm/bias"] = r(DIM, scale=0.1)
    if head:
        w["head/kernel"] = r(DIM, head)
        w["head/bias"] = r(head)
    return w


def _timm_for_npz(path, class_token: bool, embed_class: bool, num_classes: int = CLASSES) -> TimmViT:
    """timm's model of the file's shape, loaded by timm's own .npz reader (vision_transformer._load_weights)."""
    kwargs = {} if class_token else {"class_token": False, "global_pool": "avg", "fc_norm": False}
    ref = _timm(seed=5, no_embed_class=not embed_class, num_classes=num_classes, **kwargs)
    with torch.no_grad():
        timm_load_npz(ref, str(path))
    return ref


@pytest.mark.parametrize(
    "layout, class_token, prefix",
    [
        ("vit", True, ""),  # ViT paper / AugReg releases
        ("big_vision", False, "params/"),  # big_vision gap model (no class token), as RescaleViT fine-tunes
        ("big_vision_scanned", False, ""),
        ("big_vision", True, ""),  # big_vision "tok": its pos_embedding has no class-token slot
    ],
)
def test_npz_checkpoint_gives_timm_features_and_logits(tmp_path, layout, class_token, prefix):
    w = _jax_arrays(layout, class_token)
    np.savez(tmp_path / "vit.npz", **{prefix + k: v for k, v in w.items()})
    embed_class = layout == "vit"  # big_vision adds positions before the class token: timm's no_embed_class
    ref = _timm_for_npz(tmp_path / "vit.npz", class_token, embed_class)
    # our trunk (with the class-token slot in pos_embed where it has a class token: a zero row is padded)
    ours = _our_model(tmp_path, tmp_path / "vit.npz", *([] if class_token else GAP))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(ours.trunk(x)[0], _timm_feature(ref, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x)[0], ref(x), atol=1e-5, rtol=1e-5)  # head/kernel -> our classifier
        # the comparison is not vacuous: a model of another random init is far from it
        assert not torch.allclose(_timm(seed=1)(x), ref(x), atol=1e-2)


def test_npz_pre_logits_feed_our_tanh_head(tmp_path):
    # google-research/vision_transformer models.py: x = tanh(Dense(representation_size, name="pre_logits")(x)),
    # then head; timm no longer loads pre_logits, so the reference is that formula on timm's features
    rep = 16
    w = _jax_arrays("vit", True, head=None)
    rng = np.random.default_rng(3)
    w.update(
        {
            "pre_logits/kernel": rng.standard_normal((DIM, rep)).astype(np.float32),
            "pre_logits/bias": rng.standard_normal(rep).astype(np.float32),
        }
    )
    w.update(
        {
            "head/kernel": rng.standard_normal((rep, CLASSES)).astype(np.float32),
            "head/bias": rng.standard_normal(CLASSES).astype(np.float32),
        }
    )
    np.savez(tmp_path / "vit.npz", **w)
    ref = _timm_for_npz(tmp_path / "vit.npz", True, True, num_classes=0)
    head = f"config.MODEL.HEAD.PARAMS=[[vision_transformer_head,{{in_plane:{DIM},num_classes:{CLASSES},hidden_dim:{rep}}}]]"
    ours = _our_model(tmp_path, tmp_path / "vit.npz", head)
    x = torch.randn(2, 3, IMG, IMG)
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    with torch.no_grad():
        expected = torch.tanh(_timm_feature(ref, x) @ t["pre_logits/kernel"] + t["pre_logits/bias"])
        expected = expected @ t["head/kernel"] + t["head/bias"]
        torch.testing.assert_close(ours(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_npz_keys_without_counterpart_are_listed_or_left_out(tmp_path):
    w = _jax_arrays("big_vision", False)
    w["MAPHead_0/probe"] = np.zeros((1, 1, DIM), np.float32)  # an attention-pooling head: not ours
    np.savez(tmp_path / "map.npz", **w)
    with pytest.raises(UserError, match=r"file keys the model does not have .*jax\.MAPHead_0/probe"):
        _our_model(tmp_path, tmp_path / "map.npz", *GAP)
    ours = _our_model(tmp_path, tmp_path / "map.npz", *GAP, "config.MODEL.WEIGHTS_INIT.SCOPE=trunk")
    assert torch.equal(ours.trunk.norm.weight, torch.from_numpy(w["Transformer/encoder_norm/scale"]))


def test_npz_block_of_unknown_numbering_and_wrong_pool_order_are_refused(tmp_path):
    w = _jax_arrays("big_vision", False)
    np.savez(tmp_path / "gap.npz", **w)
    # a block with neither numbering is named, not loaded half-way
    del w["Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"]
    np.savez(tmp_path / "bad.npz", **w)
    with pytest.raises(UserError, match="Transformer/encoderblock_1 has neither MlpBlock_3"):
        _our_model(tmp_path, tmp_path / "bad.npz", *GAP)
    # big_vision's gap norms the tokens, then averages: timm's fc_norm order is refused
    with pytest.raises(UserError, match="FC_NORM=False"):
        _our_model(tmp_path, tmp_path / "gap.npz", *GAP, "config.MODEL.TRUNK.VISION_TRANSFORMERS.FC_NORM=True")


def test_npz_bfloat16_arrays_read_as_bfloat16(tmp_path):
    # numpy without ml_dtypes keeps bfloat16 arrays as 2-byte records ('V2'): the bits are bfloat16's
    value = torch.randn(3, 5).bfloat16()
    np.savez(tmp_path / "bf16.npz", a=value.view(torch.int16).numpy().view("V2"), b=np.ones(2, np.float32))
    got = read_npz((tmp_path / "bf16.npz").read_bytes(), "bf16.npz")
    assert got["a"].dtype == torch.bfloat16 and torch.equal(got["a"], value)
    assert torch.equal(got["b"], torch.ones(2))


# ---------------------------------------------------------------------------------------------------
# .safetensors
# ---------------------------------------------------------------------------------------------------


def test_safetensors_timm_state_dict_gives_timm_logits(tmp_path):
    from safetensors.torch import save_file

    ref = _timm(perturb=True)
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    ours = _our_model(tmp_path, tmp_path / "model.safetensors")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x), atol=1e-5, rtol=1e-5)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(UserError, match="as safetensors"):
        _our_model(tmp_path, tmp_path / "cut.safetensors")


# ---------------------------------------------------------------------------------------------------
# DeiT-III: LayerScale and position embeddings without the class-token slot
# ---------------------------------------------------------------------------------------------------


def _deit3_reference(**kwargs) -> TimmViT:
    # timm's deit3_small_patch16_224 at the brief's tiny size (timm/models/deit.py: init_values=1e-6 and
    # no_embed_class=True on a VisionTransformer)
    return _timm(perturb=True, init_values=1e-4, no_embed_class=True, class_token=True, **kwargs)


def _our_deit3(tmp_path, path, no_embed_class: bool, image_size: int = IMG) -> TrunkHeadModel:
    trunk = VisionTransformer(
        image_size=image_size,
        patch_size=PATCH,
        num_layers=DEPTH,
        num_heads=HEADS,
        hidden_dim=DIM,
        mlp_dim=MLP,
        qkv_bias=True,
        init_values=1e-4,  # timm's init_values
        no_embed_class=no_embed_class,
    )
    model = TrunkHeadModel(trunk, [VisionTransformerHead(in_plane=DIM, num_classes=CLASSES)])
    cfg = compose_config(["config=test/quick_vit", f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={path}"]).config
    init_model_from_weights(model, cfg.MODEL.WEIGHTS_INIT, "model")  # STRICT (the default)
    return model.eval()


@pytest.mark.parametrize("no_embed_class", [True, False])
@pytest.mark.parametrize("layout", ["timm", "deit3_release"])
def test_deit3_layer_scale_and_no_embed_class_give_timm_logits(tmp_path, layout, no_embed_class):
    ref = _deit3_reference()
    sd = ref.state_dict()
    assert sd["pos_embed"].shape == (1, GRID, DIM)  # no class-token slot
    if layout == "deit3_release":
        # facebookresearch/deit models_v2.py names LayerScale gamma_1 / gamma_2 and wraps the state in "model"
        names = {".ls1.gamma": ".gamma_1", ".ls2.gamma": ".gamma_2"}
        sd = {next((k.replace(a, b) for a, b in names.items() if a in k), k): v for k, v in sd.items()}
        assert "blocks.0.gamma_1" in sd
        obj = {"model": sd, "epoch": 799}
    else:
        obj = sd
    torch.save(obj, tmp_path / "deit3.pth")
    ours = _our_deit3(tmp_path, tmp_path / "deit3.pth", no_embed_class)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x), atol=1e-5, rtol=1e-5)
    if not no_embed_class:  # the class-token slot is a zero row
        assert torch.equal(ours.trunk.pos_embed[:, :1], torch.zeros(1, 1, DIM))


@pytest.mark.parametrize("no_embed_class", [True, False])
def test_deit3_pos_embed_is_resampled_for_another_image_size(tmp_path, no_embed_class):
    ref = _deit3_reference(dynamic_img_size=True)  # timm resamples its [1, 16, D] grid at run time
    torch.save(ref.state_dict(), tmp_path / "deit3.pth")
    ours = _our_deit3(tmp_path, tmp_path / "deit3.pth", no_embed_class, image_size=48)  # a 6x6 grid
    assert ours.trunk.pos_embed.shape == (1, 36 + int(not no_embed_class), DIM)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# tools/convert_weights.py
# ---------------------------------------------------------------------------------------------------


def test_converter_writes_deit3_for_timm(tmp_path, capsys):
    ref = _deit3_reference()
    torch.save({"model": ref.state_dict()}, tmp_path / "deit3.pth")
    assert convert_main(["--to", "timm", str(tmp_path / "deit3.pth"), str(tmp_path / "back.pth")]) == 0
    assert "no_embed_class=True" in capsys.readouterr().out
    back = _timm(seed=2, init_values=1e-4, no_embed_class=True)
    back.load_state_dict(torch.load(tmp_path / "back.pth"), strict=True)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref(x), atol=1e-6, rtol=1e-6)


def test_converter_reads_npz_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    np.savez(tmp_path / "vit.npz", **_jax_arrays("vit", True))
    ref = _timm_for_npz(tmp_path / "vit.npz", True, True)
    assert convert_main(["--to", "vissl_vit", str(tmp_path / "vit.npz"), str(tmp_path / "ours.torch")]) == 0
    ours = _our_model(tmp_path, tmp_path / "ours.torch")
    save_file(ref.state_dict(), str(tmp_path / "ref.safetensors"))
    assert convert_main(["--to", "timm", str(tmp_path / "ref.safetensors"), str(tmp_path / "back.pth")]) == 0
    back = _timm(seed=2)
    back.load_state_dict(torch.load(tmp_path / "back.pth"), strict=True)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(x), ref(x), atol=1e-6, rtol=1e-6)
