"""MODEL.WEIGHTS_INIT: timm, DeiT, DINO, MoCo v3 and VISSL files give timm's features; strict
errors; position-embedding resampling; the timm converter round trip."""

from __future__ import annotations

import pytest
import torch

from vissl_vit import compose_config
from vissl_vit.errors import ConfigError, UserError
from vissl_vit.models import apply_weights_init, build_model
from vissl_vit.models.convert import main as convert_main
from vissl_vit.models.weights import init_model_from_weights

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

DIM, DEPTH, HEADS, CLASSES = 32, 2, 2, 4


def _timm(img=16, global_pool="token", class_token=True, seed=0, fc_norm=None) -> TimmViT:
    torch.manual_seed(seed)
    m = TimmViT(
        img_size=img,
        patch_size=4,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=2.0,
        qkv_bias=True,
        num_classes=CLASSES,
        global_pool=global_pool,
        class_token=class_token,
        fc_norm=fc_norm,
        dynamic_img_size=True,
    ).eval()
    with torch.no_grad():  # non-trivial values everywhere (timm inits the head and cls token at 0)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _overrides(tmp_path, path, *extra) -> list[str]:
    return [
        "config=test/quick_vit",
        f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
        "config.MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=64",
        f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={path}",
        *extra,
    ]


def _our_model(tmp_path, path, *extra):
    cfg = compose_config(_overrides(tmp_path, path, *extra)).config
    model = build_model(cfg)
    apply_weights_init(model, cfg)
    return model.eval(), cfg


def _timm_feature(m: TimmViT, x: torch.Tensor) -> torch.Tensor:
    return m.forward_head(m.forward_features(x), pre_logits=True)


def test_timm_state_dict_gives_timm_logits_and_features(tmp_path):
    ref = _timm()
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    ours, _ = _our_model(tmp_path, tmp_path / "timm.pth")  # defaults: FORMAT auto, SCOPE model
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ours.trunk(x)[0], _timm_feature(ref, x), atol=1e-5)
        assert torch.allclose(ours(x)[0], ref(x), atol=1e-5)  # head -> vision_transformer_head
        # and the loaded model is not simply the random init (the test would pass vacuously)
        fresh = build_model(compose_config(_overrides(tmp_path, "")).config).eval()
        assert not torch.allclose(fresh.trunk(x)[0], _timm_feature(ref, x), atol=1e-3)


GAP = [
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.CLASSIFIER=gap",
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.USE_CLASS_TOKEN=False",
]
FC_NORM = "config.MODEL.TRUNK.VISION_TRANSFORMERS.FC_NORM=True"


@pytest.mark.parametrize("fc_norm", [False, True])
def test_average_pooling_timm_models_load_in_their_order(tmp_path, fc_norm):
    # fc_norm=False: VISSL's order (norm every token, then average; its norm is "norm");
    # fc_norm=True: timm's default avg order (average, then "fc_norm"), our FC_NORM
    ref = _timm(global_pool="avg", class_token=False, fc_norm=fc_norm)
    assert any(k.startswith("fc_norm.weight") for k in ref.state_dict()) == fc_norm
    torch.save(ref.state_dict(), tmp_path / "timm_gap.pth")
    right = [*GAP, FC_NORM] if fc_norm else GAP
    ours, _ = _our_model(tmp_path, tmp_path / "timm_gap.pth", *right)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x), atol=1e-5, rtol=1e-5)
    # the other order would load every tensor and compute something else: refused, naming the key
    wrong = GAP if fc_norm else [*GAP, FC_NORM]
    with pytest.raises(UserError, match=f"FC_NORM={fc_norm}"):
        _our_model(tmp_path, tmp_path / "timm_gap.pth", *wrong)
    # the converter writes each order back in timm's names
    assert convert_main(["--to", "vissl_vit", str(tmp_path / "timm_gap.pth"), str(tmp_path / "ours.torch")]) == 0
    extra = ["--fc-norm"] if fc_norm else []
    assert convert_main(["--to", "timm", *extra, str(tmp_path / "ours.torch"), str(tmp_path / "back.pth")]) == 0
    back = _timm(global_pool="avg", class_token=False, fc_norm=fc_norm, seed=3)
    back.load_state_dict(torch.load(tmp_path / "back.pth"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref(x), atol=1e-6, rtol=1e-6)
    assert convert_main(["--to", "timm", "--fc-norm", "--global-pool", "token", str(tmp_path / "ours.torch"), "o"]) == 2


def _trunk_only(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


@pytest.mark.parametrize("layout", ["deit", "dino_release", "dino_training", "mocov3", "vissl"])
def test_released_checkpoint_layouts_give_timm_features(tmp_path, layout):
    ref = _timm()
    sd = ref.state_dict()
    if layout == "deit":
        obj = {"model": sd, "epoch": 299}
    elif layout == "dino_release":  # dino_deitsmall16_pretrain.pth: a bare backbone
        obj = _trunk_only(sd)
    elif layout == "dino_training":  # checkpoint.pth of DINO's main_dino.py
        teacher = {f"backbone.{k}": v for k, v in _trunk_only(sd).items()}
        teacher.update({"head.mlp.0.weight": torch.randn(8, DIM), "head.last_layer.weight_g": torch.ones(16, 1)})
        student = {f"module.{k}": torch.randn_like(v) for k, v in teacher.items()}
        obj = {"teacher": teacher, "student": student, "epoch": 100}
    elif layout == "mocov3":  # vit-s-300ep.pth.tar
        base = {f"module.base_encoder.{k}": v for k, v in _trunk_only(sd).items()}
        base["module.base_encoder.head.0.weight"] = torch.randn(64, DIM)  # the projector
        base.update({f"module.momentum_encoder.{k}": torch.randn_like(v) for k, v in _trunk_only(sd).items()})
        base["module.predictor.0.weight"] = torch.randn(64, 16)
        obj = {"state_dict": base, "epoch": 300, "arch": "vit_small"}
    else:  # VISSL's own checkpoints: its ViT calls them class_token / pos_embedding
        names = {"cls_token": "class_token", "pos_embed": "pos_embedding"}
        trunk = {names.get(k, k): v for k, v in _trunk_only(sd).items()}
        heads = {"0.layers.head.weight": sd["head.weight"], "0.layers.head.bias": sd["head.bias"]}
        obj = {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}}, "phase_idx": 3}
    torch.save(obj, tmp_path / "w.pth")
    # the heads of these files are not a classifier (or absent): load the trunk only
    ours, _ = _our_model(tmp_path, tmp_path / "w.pth", "config.MODEL.WEIGHTS_INIT.SCOPE=trunk")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ours.trunk(x)[0], _timm_feature(ref, x), atol=1e-5)


def test_misnamed_prefix_stops_with_the_keys(tmp_path):
    ref = _timm()
    torch.save({f"encoder.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "w.pth")
    with pytest.raises(UserError, match="Cannot tell the layout"):
        _our_model(tmp_path, tmp_path / "w.pth")
    # told it is timm's, the names still carry the prefix: every key is listed as unmatched
    with pytest.raises(UserError) as err:
        _our_model(tmp_path, tmp_path / "w.pth", "config.MODEL.WEIGHTS_INIT.FORMAT=timm")
    msg = str(err.value)
    assert "model keys the file does not provide" in msg and "trunk.cls_token" in msg
    assert "file keys the model does not have" in msg and "trunk.encoder.cls_token" in msg
    assert "did you mean trunk.cls_token?" in msg and "REMOVE_PREFIX" in msg
    # the fix the message suggests works
    ours, _ = _our_model(tmp_path, tmp_path / "w.pth", "config.MODEL.WEIGHTS_INIT.REMOVE_PREFIX=encoder.")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ours(x)[0], ref(x), atol=1e-5)


def test_missing_head_is_an_error_unless_skipped_or_not_strict(tmp_path):
    ref = _timm()
    torch.save(_trunk_only(ref.state_dict()), tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"heads\.0\.layers\.head\.weight"):
        _our_model(tmp_path, tmp_path / "w.pth")  # SCOPE model: the classifier is not in the file
    fresh = build_model(compose_config(_overrides(tmp_path, "")).config)
    for extra in ("config.MODEL.WEIGHTS_INIT.SKIP_LAYERS=[heads]", "config.MODEL.WEIGHTS_INIT.STRICT=False"):
        ours, _ = _our_model(tmp_path, tmp_path / "w.pth", extra)
        assert torch.equal(ours.trunk.cls_token, ref.cls_token)
        assert torch.equal(ours.heads[0].layers.head.weight, fresh.heads[0].layers.head.weight)  # its init


def test_shape_mismatch_is_listed(tmp_path):
    ref = _timm()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    with pytest.raises(
        UserError, match=r"shapes that differ .*blocks\.0\.mlp\.fc1\.weight: file \(64, 32\), model \(128, 32\)"
    ):
        _our_model(tmp_path, tmp_path / "w.pth", "config.MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=128")


def test_pos_embed_is_resampled_for_another_image_size(tmp_path):
    ref = _timm(img=16)  # a 4x4 grid of patches
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    ours, _ = _our_model(tmp_path, tmp_path / "w.pth", "config.MODEL.TRUNK.VISION_TRANSFORMERS.IMAGE_SIZE=24")
    assert ours.trunk.pos_embed.shape == (1, 1 + 36, DIM)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():  # timm resamples at run time (dynamic_img_size) the same way: bicubic, antialiased
        assert torch.allclose(ours(x)[0], ref(x), atol=1e-5)


def test_missing_file_and_bad_key_name_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        _our_model(tmp_path, tmp_path / "nope.pth")
    torch.save({"model": _timm().state_dict()}, tmp_path / "w.pth")
    with pytest.raises(ConfigError, match=r"has no key 'teacher' \(its keys: model\)"):
        _our_model(tmp_path, tmp_path / "w.pth", "config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME=teacher")
    ours, _ = _our_model(tmp_path, tmp_path / "w.pth", "config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME=[model]")
    assert torch.equal(ours.trunk.cls_token, _timm().cls_token)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="Could not read weights file"):
        _our_model(tmp_path, tmp_path / "junk.pth")


def test_our_run_folder_loads_into_moco_and_resets_its_momentum_encoder(tmp_path):
    ref = _timm()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    cfg = compose_config(
        [
            "config=test/quick_moco",
            "config.MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=64",
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={tmp_path / 'w.pth'}",
            "config.MODEL.WEIGHTS_INIT.SCOPE=trunk",
        ]
    ).config
    assert cfg.MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM == DIM  # test/quick_moco's trunk is this test's
    model = build_model(cfg)
    init_model_from_weights(model, cfg.MODEL.WEIGHTS_INIT, "trunk")
    assert torch.equal(model.trunk.cls_token, ref.cls_token)
    for a, b in zip(model.momentum_encoder.trunk.parameters(), model.trunk.parameters()):
        assert torch.equal(a, b)


def test_converter_round_trip_with_timm(tmp_path):
    ref = _timm(seed=1)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    assert convert_main(["--to", "vissl_vit", str(tmp_path / "timm.pth"), str(tmp_path / "ours.torch")]) == 0
    ours, _ = _our_model(tmp_path, tmp_path / "ours.torch")  # read with the defaults (classy_state_dict)
    assert convert_main(["--to", "timm", str(tmp_path / "ours.torch"), str(tmp_path / "back.pth")]) == 0
    back = _timm(seed=2)
    back.load_state_dict(torch.load(tmp_path / "back.pth"), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(back(x), ref(x), atol=1e-6)
        assert torch.allclose(ours(x)[0], ref(x), atol=1e-5)
    assert convert_main(["--to", "onnx", "a", "b"]) == 2


class _RunsCode:
    """Unpickling this object calls os.system: it creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _planted_file(tmp_path, marker):
    """Real timm weights with an object that runs code, as a planted or doctored file would hold."""
    path = tmp_path / "planted.pth"
    torch.save({"model": _timm().state_dict(), "args": _RunsCode(str(marker))}, path)
    return path


def test_weights_file_that_would_run_code_is_refused_unless_allowed(tmp_path):
    marker = tmp_path / "code_ran"
    path = _planted_file(tmp_path, marker)
    with pytest.raises(UserError) as e:
        _our_model(tmp_path, path)
    assert not marker.exists()  # refused before any of its code ran (the old retry ran it, then warned)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "system" in msg
    assert "config.MODEL.WEIGHTS_INIT.ALLOW_PICKLE_CODE_EXECUTION=True" in msg
    ours, _ = _our_model(tmp_path, path, "config.MODEL.WEIGHTS_INIT.ALLOW_PICKLE_CODE_EXECUTION=True")
    assert marker.exists() and torch.equal(ours.trunk.cls_token, _timm().cls_token)


def test_converter_refuses_a_file_that_would_run_code_unless_allowed(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    path, out = _planted_file(tmp_path, marker), tmp_path / "ours.torch"
    assert convert_main(["--to", "vissl_vit", str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert not marker.exists() and not out.exists()
    assert "pass --allow-pickle-code-execution" in err and "Traceback" not in err
    assert convert_main(["--to", "vissl_vit", "--allow-pickle-code-execution", str(path), str(out)]) == 0
    assert marker.exists()
    torch.load(out, weights_only=True)  # the converted file is plain: it loads without the opt-in
