"""Derived values: global batch, iterations, auto LR scaling (warm-up kept)."""

from __future__ import annotations

import logging
import math

import pytest

from vissl_vit.config import compose_config, derive_run_values
from vissl_vit.errors import ConfigError
from vissl_vit.optim import build_lr_scheduler, progress

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


# ---------------------------------------------------------------------------------------------------
# auto_lr_scaling as VISSL does it: vissl/utils/hydra_config.py, infer_learning_rate (scaled =
# base_value x f(batch / base_lr_batch_size)), get_scaled_lr_scheduler (what each schedule type keeps)
# and resolve_linear_schedule (a composite's linear warm-up starts at base_value x batch per node /
# base_lr_batch_size). Each expected sequence below is written from those formulas by hand.
# ---------------------------------------------------------------------------------------------------


def _lr_sequence(d) -> list[float]:
    sched = build_lr_scheduler(d)
    return [sched(progress(i, d.iterations_per_epoch, d.max_iterations, "step")) for i in range(d.max_iterations)]


def _cosine(start: float, end: float, t: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def test_vissl_moco_vit_b16_schedule():
    # VISSL's configs/config/pretrain/vision_transformer/moco/vit_b16.yaml: base_value 5e-4 at 4096,
    # written warm-up 0 -> 3e-3 and cosine 3e-3 -> 0 over [0.1, 0.9]; 4 nodes x 8 x 128 = 4096.
    # VISSL: scaled = 5e-4 x 4096/4096 = 5e-4 (not 3e-3: the written values are only the shape);
    # warm-up start = 5e-4 x (8 x 128)/4096 = 1.25e-4 (4 nodes: kept).
    d = _derive(
        "config.DISTRIBUTED.NUM_NODES=4",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=8",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=128",
        "config.OPTIMIZER.num_epochs=10",
        "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value=0.0005",
        "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_lr_batch_size=4096",
        "config.OPTIMIZER.param_schedulers.lr.schedulers=[{name: linear, start_value: 0.0, end_value: 0.003},"
        "{name: cosine, start_value: 0.003, end_value: 0}]",
        "config.OPTIMIZER.param_schedulers.lr.lengths=[0.1,0.9]",
        size=4096 * 10,
    )
    assert d.max_iterations == 100
    expected = []
    for i in range(100):
        w = i / 100
        expected.append(1.25e-4 + (5e-4 - 1.25e-4) * w / 0.1 if w < 0.1 else _cosine(5e-4, 0.0, (w - 0.1) / 0.9))
    assert _lr_sequence(d) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert max(_lr_sequence(d)) == pytest.approx(5e-4)


def test_one_node_warmup_kept_not_deleted(caplog):
    # VISSL (resolve_linear_schedule): on one node the warm-up would start at 5e-4 x 128/1024 =
    # 6.25e-5 = its end, so VISSL deletes it (issue #106); here it keeps its written start 0.
    with caplog.at_level(logging.INFO, logger="vissl_vit.config.derive"):
        d = _derive("config.OPTIMIZER.num_epochs=1", size=128 * 100)
    assert "keeps start_value=0 (VISSL would delete it on one node, VISSL issue #106)" in caplog.text
    warm, cos = d.lr_schedule["schedulers"]
    assert (warm["start_value"], warm["end_value"]) == (0.0, pytest.approx(6.25e-5))
    expected = [
        6.25e-5 * (i / 100) / 0.017 if i / 100 < 0.017 else _cosine(6.25e-5, 0.0, (i / 100 - 0.017) / 0.983)
        for i in range(100)
    ]
    assert _lr_sequence(d) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_one_node_warmup_start_above_end_follows_vissl():
    # sqrt scaling, 4 x 512 = 2048 on one node, base 0.1 at 256: scaled = 0.1 x sqrt(8); the warm-up
    # start uses linear scaling (0.1 x 2048/256 = 0.8 > its end), so VISSL keeps it with start 0.8.
    d = _derive(
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=4",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=512",
        "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.scaling_type=sqrt",
        "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value=0.1",
        "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_lr_batch_size=256",
        size=2048 * 10,
    )
    warm, cos = d.lr_schedule["schedulers"]
    assert (warm["start_value"], warm["end_value"]) == (pytest.approx(0.8), pytest.approx(0.1 * math.sqrt(8)))
    assert (cos["start_value"], cos["end_value"]) == (pytest.approx(0.1 * math.sqrt(8)), 0.0)


def _single(name_and_keys: str, *extra: str, size: int = 10_000):
    return _derive(
        "config.OPTIMIZER.param_schedulers.lr.schedulers=[]",
        "config.OPTIMIZER.param_schedulers.lr.lengths=[]",
        "config.OPTIMIZER.param_schedulers.lr.interval_scaling=[]",
        *[f"config.OPTIMIZER.param_schedulers.lr.{kv}" for kv in name_and_keys.split()],
        *extra,
        size=size,
    )


def test_multistep_cosine_constant_linear_follow_vissl():
    # base 0.1 at 256, 32 x 1 process: scaled = 0.1 x 32/256 = 0.0125 (linear scaling)
    base = (
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32",
        "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value=0.1",
    )
    base += ("config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_lr_batch_size=256",)
    # multistep: gamma = round(0.03/0.3, 6) = 0.1; values = round(0.0125 x 0.1^i, 8)
    d = _single(
        "name=multistep values=[0.3,0.03,0.003] milestones=[3,6]", *base, "config.OPTIMIZER.num_epochs=9", size=32 * 2
    )
    assert d.lr_schedule["values"] == [0.0125, 0.00125, 0.000125]
    assert _lr_sequence(d) == pytest.approx([0.0125] * 6 + [0.00125] * 6 + [0.000125] * 6)
    # cosine: start = scaled, end = scaled x (0.004 / 0.4)
    d = _single("name=cosine start_value=0.4 end_value=0.004", *base)
    assert (d.lr_schedule["start_value"], d.lr_schedule["end_value"]) == (0.0125, pytest.approx(0.000125))
    d = _single("name=constant value=0.5", *base)
    assert d.lr_schedule["value"] == 0.0125
    # linear alone: only end_value is set
    d = _single("name=linear start_value=0.2 end_value=0.7", *base)
    assert (d.lr_schedule["start_value"], d.lr_schedule["end_value"]) == (0.2, 0.0125)


def test_cosine_from_zero_with_auto_scaling_is_an_error():
    with pytest.raises(ConfigError, match="start_value=0"):
        _single("name=cosine start_value=0.0 end_value=0.1")


def test_milestones_past_num_epochs_is_a_config_error():
    with pytest.raises(ConfigError, match=r"milestones=\[30, 60\].*config.OPTIMIZER.num_epochs=20"):
        _single("name=multistep values=[0.1,0.01,0.001] milestones=[30,60]", "config.OPTIMIZER.num_epochs=20")
