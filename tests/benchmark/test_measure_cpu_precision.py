"""tools/measure_cpu_precision.py: the runs it makes (each precision's overrides) and its summary."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import REPO


def _tool():
    spec = importlib.util.spec_from_file_location("measure_cpu_precision", REPO / "tools" / "measure_cpu_precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_run_gets_its_precision_and_its_own_output(tmp_path):
    tool = _tool()
    runs = dict(tool.commands(str(tmp_path)))
    qs = runs["quickstart_bfloat16"]
    assert "config.MODEL.AMP_PARAMS.AMP_ARGS.dtype=bfloat16" in qs and "config.MODEL.AMP_PARAMS.USE_AMP=True" in qs
    assert f"config.CHECKPOINT.DIR={tmp_path / 'quickstart_bfloat16'}" in qs
    assert "config.MODEL.AMP_PARAMS.USE_AMP=False" in runs["quickstart_float32"]
    fast = runs["bench_bfloat16_compiled_vs_timm_defaults"]
    assert {"--compile", "--timm-defaults", "config.MODEL.AMP_PARAMS.AMP_ARGS.dtype=bfloat16"} <= set(fast)
    assert "--compile" not in runs["bench_float32_eager"] and "--timm-defaults" not in runs["bench_bfloat16_eager"]
    assert len({argv[-1] for label, argv in runs.items() if label.startswith("bench_")}) == 6  # one JSON each
    assert "quickstart_float32" not in dict(tool.commands(str(tmp_path), quickstart=False))


def test_summary_reads_the_last_test_top1_and_the_benchmark_ratios(tmp_path):
    tool = _tool()
    run = tmp_path / "quickstart_bfloat16"
    run.mkdir()
    rows = [
        {"phase_idx": 0, "train_accuracy_list_meter": {"top_1": {"0": 50.0}}},
        {"phase_idx": 1, "test_loss": 0.5, "test_accuracy_list_meter": {"top_1": {"0": 80.0}, "top_5": {"0": 99.0}}},
        {"phase_idx": 3, "test_loss": 0.4, "test_accuracy_list_meter": {"top_1": {"0": 88.5}, "top_5": {"0": 99.6}}},
    ]
    (run / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "stdout.json").write_text(json.dumps({"iteration": 1, "loss": 2.0, "lr": 0.1}) + "\n")
    model = {"train_images_per_sec": 130.0, "infer_images_per_sec": 600.0, "precision": "bfloat16", "compiled": True}
    timm = {**model, "train_images_per_sec": 80.0, "precision": "float32", "compiled": False}
    bench = {"models": {"vissl_vit": model, "timm": timm}, "ratio_train": 1.625, "ratio_infer": 2.1}
    (tmp_path / "bench_bfloat16_compiled_vs_timm_defaults.json").write_text(json.dumps(bench))
    cpu = {"name": "Test CPU", "flags": ["avx512_bf16"], "why": "the CPU reports AVX512-BF16", "cores": 2}
    text = tool.summary(str(tmp_path), cpu, {"quickstart_bfloat16": 450.0})
    assert "| bfloat16 | 88.50% | 7.5 min |" in text  # the last test phase, not the first, not a train phase
    assert "| float32 |" not in text  # no float32 quickstart run: no row
    assert (
        "| bfloat16 compiled_vs_timm_defaults | bfloat16, compiled | float32, eager | 130.0 | 80.0 | 1.625x | 2.100x |"
        in text
    )
    assert "avx512_bf16" in text and "Test CPU" in text
