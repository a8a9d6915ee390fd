"""Derived values: global batch, iterations, auto LR scaling (warm-up kept)."""

from __future__ import annotations

import math

import pytest

from vissl_vit.config import compose_config, derive_run_values
from vissl_vit.errors import ConfigError
from vissl_vit.optim import build_lr_scheduler

BASE = "pretrain/vision_transformer/supervised/1gpu_vit_example"


def _derive(*overrides: str, size: int = 10_000):
    cfg = compose_config([f"config={BASE}", *overrides]).config
    return derive_run_values(cfg, size)


def test_global_batch_and_iterations():
    d = _derive(
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=100",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=4",
        "config.OPTIMIZER.num_epochs=3",
        size=1050,
    )
    assert (d.world_size, d.global_batch_size) == (4, 400)
    assert d.iterations_per_epoch == 2  # drop_last: 1050 // 400
    assert d.max_iterations == 6
    d = _derive(
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=100",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=4",
        "config.DATA.TRAIN.DROP_LAST=False",
        size=1050,
    )
    assert d.iterations_per_epoch == 3  # ceil(ceil(1050 / 4) / 100)


def test_linear_auto_scaling_keeps_warmup():
    # tutorial: base 5e-4 at 1024; 128 x 1 process -> factor 1/8, warm-up 0 -> 6.25e-5 then cosine to 0
    d = _derive()
    assert d.lr_scale_factor == pytest.approx(128 / 1024)
    warm, cos = d.lr_schedule["schedulers"]
    assert (warm["name"], warm["start_value"], warm["end_value"]) == ("linear", 0.0, pytest.approx(6.25e-5))
    assert (cos["start_value"], cos["end_value"]) == (pytest.approx(6.25e-5), 0.0)
    sched = build_lr_scheduler(d)
    assert sched(0.0) == 0.0
    assert sched(0.017) == pytest.approx(6.25e-5)
    assert sched(0.0085) == pytest.approx(6.25e-5 / 2)  # half-way through the warm-up


def test_sqrt_scaling_and_off():
    d = _derive(
        "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.scaling_type=sqrt",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=256",
    )
    assert d.lr_scale_factor == pytest.approx(math.sqrt(256 / 1024))
    d = _derive("config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale=False")
    assert d.lr_scale_factor == 1.0 and d.lr_schedule["schedulers"][0]["end_value"] == 0.0005


def test_too_small_dataset_is_an_error():
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        _derive(size=10)


def test_typo_inside_composite_entry():
    with pytest.raises(ConfigError, match=r"schedulers\[1\].*unknown keys \['end_valu'\]"):
        _derive(
            "config.OPTIMIZER.param_schedulers.lr.schedulers=[{name: linear, start_value: 0, end_value: 1},"
            "{name: cosine, start_value: 1, end_valu: 0}]"
        )
