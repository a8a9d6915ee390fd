"""Schedules at exact values, and the lr the trainer sets at each step."""

from __future__ import annotations

import math

import pytest

from vissl_vit.config.derive import schedule_spec
from vissl_vit.optim import build_param_scheduler, progress


def _sched(spec: dict, num_epochs: int = 10):
    return build_param_scheduler(schedule_spec(spec, "lr"), num_epochs)


def test_constant_linear_cosine():
    assert _sched({"name": "constant", "value": 0.3})(0.7) == 0.3
    lin = _sched({"name": "linear", "start_value": 0.0, "end_value": 1.0})
    assert lin(0.25) == pytest.approx(0.25)
    cos = _sched({"name": "cosine", "start_value": 1.0, "end_value": 0.0})
    assert (
        cos(0.0) == 1.0
        and cos(0.5) == pytest.approx(0.5)
        and cos(0.25) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    )


def test_multistep_milestones_are_epochs():
    ms = _sched({"name": "multistep", "values": [0.1, 0.01, 0.001], "milestones": [3, 6]}, num_epochs=10)
    assert [ms(e / 10) for e in range(10)] == pytest.approx([0.1] * 3 + [0.01] * 3 + [0.001] * 4)


def test_composite_warmup_then_cosine():
    sched = _sched(
        {
            "name": "composite",
            "lengths": [0.2, 0.8],
            "interval_scaling": ["rescaled", "rescaled"],
            "schedulers": [
                {"name": "linear", "start_value": 0.0, "end_value": 1.0},
                {"name": "cosine", "start_value": 1.0, "end_value": 0.0},
            ],
        }
    )
    assert sched(0.0) == 0.0
    assert sched(0.1) == pytest.approx(0.5)
    assert sched(0.2) == pytest.approx(1.0)
    assert sched(0.6) == pytest.approx(0.5)  # half-way through the cosine


def test_composite_fixed_interval_scaling():
    sched = _sched(
        {
            "name": "composite",
            "lengths": [0.5, 0.5],
            "interval_scaling": ["rescaled", "fixed"],
            "schedulers": [
                {"name": "constant", "value": 2.0},
                {"name": "linear", "start_value": 0.0, "end_value": 1.0},
            ],
        }
    )
    assert sched(0.75) == pytest.approx(0.75)  # fixed: evaluated at the global progress


def test_progress_per_step_and_per_epoch():
    assert progress(15, 10, 100, "step") == 0.15
    assert progress(15, 10, 100, "epoch") == 0.10
