"""The throughput benchmark: attention FLOPs counted by formula; a tiny run reports every figure."""

from __future__ import annotations

import json

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from vissl_vit.benchmark.throughput import flops_per_image, main, measure_models
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


class _AutocastProbe(torch.nn.Module):
    """A linear classifier that records the autocast state of each of its forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(12, 3)
        self.seen: set[tuple[bool, torch.dtype]] = set()

    def forward(self, x):
        self.seen.add((torch.is_autocast_enabled("cpu"), self.fc(x.flatten(1)).dtype))
        return self.fc(x.flatten(1))


def test_each_model_runs_under_its_own_precision():
    ours, timm = _AutocastProbe(), _AutocastProbe()
    r = measure_models(
        {"vissl_vit": ours, "timm": timm}, 2, (3, 2, 2), 3, torch.device("cpu"), 1, 1, 1, {"vissl_vit": torch.bfloat16}
    )
    assert ours.seen == {(True, torch.bfloat16)}  # training and inference steps alike
    assert timm.seen == {(False, torch.float32)}  # not in the dict: full precision, no autocast
    assert (r["vissl_vit"]["precision"], r["timm"]["precision"]) == ("bfloat16", "float32")


def test_timm_defaults_runs_timm_in_float32_next_to_ours_in_bfloat16(tmp_path, capsys):
    bf16 = ("config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_ARGS.dtype=bfloat16")
    layers = "config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=1"
    r = _tiny_run(tmp_path / "d.json", 2, layers, *bf16, "--no-e2e", "--timm-defaults")
    assert r["timm_defaults"] is True
    assert (r["models"]["vissl_vit"]["precision"], r["models"]["timm"]["precision"]) == ("bfloat16", "float32")
    assert "each at its own defaults" in capsys.readouterr().out
    same = _tiny_run(tmp_path / "s.json", 2, layers, *bf16, "--no-e2e")  # without it: the same precision
    assert (same["models"]["vissl_vit"]["precision"], same["models"]["timm"]["precision"]) == ("bfloat16",) * 2
