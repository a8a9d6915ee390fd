"""Weights out: model_final.safetensors at the end of training, loaded into
``timm.create_model(**model_final.timm.json)`` strictly with the same logits; the converter's
export; models timm cannot build; ``load_run``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from vissl_vit import compose_config, load_run, run_train_engine
from vissl_vit.export import export_weights, json_path_for, timm_spec
from vissl_vit.models import apply_weights_init, build_model
from vissl_vit.models.convert import main as convert_main

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

# 32 images / 16 per batch, 1 epoch: 2 iterations
TWO_ITERATIONS = ["config.OPTIMIZER.num_epochs=1", "config.DATA.SYNTHETIC.NUM_IMAGES=32"]


def _timm_model(run_dir, stem: str = "model_final"):
    """timm's model built from the exported JSON, the exported weights loaded strictly."""
    with open(os.path.join(run_dir, f"{stem}.timm.json")) as f:
        args = json.load(f)
    model = timm.create_model(**args).eval()
    model.load_state_dict(safetensors_torch.load_file(os.path.join(run_dir, f"{stem}.safetensors")), strict=True)
    return model


def _same_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", ["test/quick_vit", "test/quick_convit"])
def test_trained_run_exports_weights_timm_loads_strictly_with_the_same_logits(tmp_path, config):
    run = tmp_path / "run"
    trainer = run_train_engine(compose_config([f"config={config}", f"config.CHECKPOINT.DIR={run}", *TWO_ITERATIONS]))
    assert trainer.iteration == 2
    assert oct(os.stat(run / "model_final.safetensors").st_mode & 0o777) == oct(0o644 & ~_umask())
    ref = _timm_model(run)
    ours = trainer.model.eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(x)[0]
        _same_logits(ref(x), logits)
        assert logits.std(0).abs().sum() > 0  # trained: not the zero-initialised head's constant output
    # the same file through MODEL.WEIGHTS_INIT (timm layout, detected)
    cfg = compose_config(
        [f"config={config}", f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={run / 'model_final.safetensors'}"]
    )
    model = build_model(cfg.config).eval()
    apply_weights_init(model, cfg.config)
    with torch.no_grad():
        _same_logits(model(x)[0], logits)
    # load_run: the model from train_config.yaml and the newest checkpoint, and the test transform
    loaded, transform = load_run(str(run))
    assert not loaded.training
    with torch.no_grad():
        _same_logits(loaded(x)[0], logits)
    image = transform(Image.new("RGB", (16, 16), (200, 30, 90)))
    assert image.shape == (3, 16, 16) and abs(image[0, 0, 0].item() - 200 / 255) < 1e-6  # quick_vit: ToTensor
    # and from model_final.safetensors alone (no checkpoint left)
    loaded, _ = load_run(str(run), weights="model_final.safetensors")
    with torch.no_grad():
        _same_logits(loaded(x)[0], logits)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


VIT = "config.MODEL.TRUNK.VISION_TRANSFORMERS"


@pytest.mark.parametrize(
    "overrides",
    [
        # timm's fc_norm order, LayerScale, JAX's tanh GELU, no class token
        [f"{VIT}.CLASSIFIER=gap", f"{VIT}.FC_NORM=True", f"{VIT}.USE_CLASS_TOKEN=False",
         f"{VIT}.LAYER_SCALE_INIT=0.1", f"{VIT}.ACT_LAYER=gelu_tanh"],
        # VISSL's gap order (norm, then average), DeiT-III's position embedding without a class slot
        [f"{VIT}.CLASSIFIER=gap", f"{VIT}.NO_EMBED_CLASS=True", f"{VIT}.QKV_BIAS=False"],
        # no head: timm's num_classes=0, the pooled features
        ["config.MODEL.HEAD.PARAMS=[]"],
        # an mlp head of one linear layer
        ['config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [32, 5]}]]'],
    ],
    ids=["gap_fc_norm_layerscale_notoken", "gap_no_embed_class", "no_head", "mlp_linear_head"],
)  # fmt: skip
def test_vit_variants_export_to_timm_with_the_same_outputs(tmp_path, overrides):
    cfg = compose_config(["config=test/quick_vit", *overrides]).config
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # weights far from the init (the zero head, unit norms) so that all of them matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    result = export_weights(model.state_dict(), cfg, str(tmp_path / "w.safetensors"))
    assert result.layout == "timm" and result.json_path == str(tmp_path / "w.timm.json")
    ref = _timm_model(tmp_path, "w")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        _same_logits(ref(x), model(x)[0])


def test_a_model_timm_cannot_build_is_written_under_our_names(tmp_path, caplog):
    cfg = compose_config(["config=test/quick_vit", 'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [32, 16, 4]}]]']).config
    assert timm_spec(cfg).args is None and "mlp head with dims [32, 16, 4]" in timm_spec(cfg).reason
    model = build_model(cfg).eval()
    path = tmp_path / "w.safetensors"
    (tmp_path / "w.timm.json").write_text("{}")  # an earlier export's: must not describe these weights
    result = export_weights(model.state_dict(), cfg, str(path))
    assert result.layout == "vissl_vit" and not os.path.exists(json_path_for(str(path)))
    assert set(safetensors_torch.load_file(path)) == set(model.state_dict())
    cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE = str(path)  # and MODEL.WEIGHTS_INIT loads it
    again = build_model(cfg).eval()
    apply_weights_init(again, cfg)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x)[0], model(x)[0])


def test_convert_weights_exports_a_checkpoint_and_prints_the_create_model_call(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = ["config=test/quick_vit", f"config.CHECKPOINT.DIR={run}", *TWO_ITERATIONS]
    run_train_engine(compose_config([*overrides, "config.CHECKPOINT.EXPORT_SAFETENSORS=False"]))
    capsys.readouterr()
    out = tmp_path / "out.safetensors"
    assert convert_main(["--to", "safetensors", str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    with open(tmp_path / "out.timm.json") as f:
        args = json.load(f)
    assert "timm.create_model('vit_base_patch16_224', num_classes=4, img_size=16, patch_size=4" in printed
    assert args["model_name"] == "vit_base_patch16_224" and args["embed_dim"] == 32 and args["depth"] == 2
    ref = _timm_model(tmp_path, "out")
    model, _ = load_run(str(run))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _same_logits(ref(x), model(x)[0])
    # a timm file holds no config: --config names the run's
    assert convert_main(["--to", "timm", str(run), str(tmp_path / "t.pth")]) == 0
    assert "timm.create_model(" in capsys.readouterr().out
    assert convert_main(["--to", "safetensors", str(tmp_path / "t.pth"), str(tmp_path / "b.safetensors")]) == 2
    assert "give --config RUN/train_config.yaml" in capsys.readouterr().err
    cfg_file = str(run / "train_config.yaml")
    assert (
        convert_main(
            ["--to", "safetensors", str(tmp_path / "t.pth"), str(tmp_path / "b.safetensors"), "--config", cfg_file]
        )
        == 0
    )
    with torch.no_grad():
        _same_logits(_timm_model(tmp_path, "b")(x), model(x)[0])
