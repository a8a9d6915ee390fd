"""The throughput benchmark: attention FLOPs counted by formula; a tiny run reports every figure."""

from __future__ import annotations

import json

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from vissl_vit.benchmark.throughput import flops_per_image, main
from vissl_vit.models.trunks.vision_transformer import VisionTransformer


def test_attention_flops_are_counted_by_formula():
    m = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    x = torch.randn(3, 3, 16, 16)
    with_attention = flops_per_image(m, x)
    analysis = FlopCountAnalysis(m.eval(), (x,))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    without = 2.0 * analysis.total() / 3
    L, D, layers = 17, 16, 2  # 16 patches + the class token
    # per layer Q K^T and A V: 2 x L x L x D multiply-adds, i.e. 4 L^2 D FLOPs
    assert with_attention - without == layers * 4 * L * L * D


def _tiny_run(out, batch: int, *extra: str) -> dict:
    """The benchmark of the tiny throughput config, one step per figure; returns its JSON."""
    args = [
        "config=benchmark/throughput/vit_tiny_32",
        *extra,
        "--batch-size",
        str(batch),
        "--steps",
        "1",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    return json.loads(out.read_text())


def test_tiny_run_reports_every_figure(tmp_path, capsys):
    r = _tiny_run(tmp_path / "r.json", 8, "config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=2")
    assert set(r["models"]) == {"vissl_vit", "timm"}
    ours, timm = r["models"]["vissl_vit"], r["models"]["timm"]
    assert ours["train_images_per_sec"] > 0 and ours["infer_images_per_sec"] > 0
    # the same shape: the same count, but for timm norming every token at the end (ours: the class token)
    assert ours["gflops_per_image"] == pytest.approx(timm["gflops_per_image"], rel=2e-3)
    assert r["ratio_train"] > 0 and 0 <= r["end_to_end"]["data_wait_fraction"] < 1
    assert "vissl_vit / timm: training" in capsys.readouterr().out


def test_compiled_model_is_measured_and_its_flops_counted(tmp_path):
    # FLOPs are counted by tracing, which a compiled module refuses: they must be taken before compiling
    r = _tiny_run(
        tmp_path / "c.json",
        4,
        "config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=1",
        "config.MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM=32",
        "config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_HEADS=2",
        "config.MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=64",
        "config.MODEL.HEAD.PARAMS=[[vision_transformer_head,{in_plane:32,num_classes:10}]]",
        "--no-timm",
        "--no-e2e",
        "--compile",
    )
    assert r["compiled"] is True
    assert r["models"]["vissl_vit"]["gflops_per_image"] > 0 and r["models"]["vissl_vit"]["train_images_per_sec"] > 0
