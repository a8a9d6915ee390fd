"""Training budgets in steps: OPTIMIZER.num_train_steps and big_vision's epochs -> steps rule.

big_vision counts ``steps = max(1, round(epochs x N / batch))`` over an infinite iterator
(``utils.py::steps``; RECIPES.md 4.1): 90 / 150 / 300 epochs of train[:99%] (1,268,355 images) at
batch 1024 are 111,477 / 185,794 / 371,588 steps; of the whole train split (1,281,167, mup-vit)
112,603 / 187,671 / 375,342.
"""

from __future__ import annotations

import logging

import pytest

from vissl_vit.config import compose_config, derive_run_values
from vissl_vit.errors import ConfigError

BASE = "test/quick_vit"  # batch 16, DROP_LAST


def _derive(*overrides: str, size: int = 64):
    return derive_run_values(compose_config([f"config={BASE}", *overrides]).config, size)


def test_default_is_epochs_times_loader_steps():
    d = _derive("config.OPTIMIZER.num_epochs=3", size=100)
    assert (d.iterations_per_epoch, d.max_iterations, d.num_epochs) == (6, 18, 3)


def test_num_train_steps_sets_max_iterations_and_derives_epochs(caplog):
    with caplog.at_level(logging.INFO, logger="vissl_vit.config.derive"):
        d = _derive("config.OPTIMIZER.num_train_steps=25", "config.OPTIMIZER.num_epochs=90", size=100)
    assert (d.iterations_per_epoch, d.max_iterations, d.num_epochs) == (6, 25, 5)  # ceil(25 / 6)
    assert "num_train_steps=25" in caplog.text and "5 epochs of 6 steps" in caplog.text
    assert "cut short" in caplog.text
    d = _derive("config.OPTIMIZER.num_train_steps=12", size=100)
    assert (d.max_iterations, d.num_epochs) == (12, 2)


@pytest.mark.parametrize(
    ("images", "epochs", "steps"),
    [
        (1_268_355, 90, 111_477),
        (1_268_355, 150, 185_794),
        (1_268_355, 300, 371_588),
        (1_281_167, 90, 112_603),
        (1_281_167, 150, 187_671),
        (1_281_167, 300, 375_342),
        (10, 1, 1),  # max(1, round(10 / 1024))
    ],
)
def test_big_vision_epochs_to_steps(images, epochs, steps):
    d = _derive(
        "config.OPTIMIZER.epochs_to_steps=big_vision",
        f"config.OPTIMIZER.num_epochs={epochs}",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=1024",
        "config.DATA.TRAIN.DROP_LAST=False",
        size=images,
    )
    assert d.max_iterations == steps
    assert d.num_epochs == -(-steps // d.iterations_per_epoch)


def test_num_train_steps_wins_over_epochs_to_steps():
    d = _derive("config.OPTIMIZER.epochs_to_steps=big_vision", "config.OPTIMIZER.num_train_steps=7", size=100)
    assert d.max_iterations == 7


def test_multistep_milestones_are_checked_against_the_derived_epochs():
    sched = [
        "config.OPTIMIZER.param_schedulers.lr.name=multistep",
        "config.OPTIMIZER.param_schedulers.lr.values=[0.1,0.01]",
        "config.OPTIMIZER.param_schedulers.lr.milestones=[3]",
    ]
    # num_epochs 2 alone would refuse milestone 3; 25 steps are 5 epochs
    assert _derive(*sched, "config.OPTIMIZER.num_epochs=2", "config.OPTIMIZER.num_train_steps=25", size=100)
    with pytest.raises(ConfigError, match="milestones"):
        _derive(*sched, "config.OPTIMIZER.num_epochs=9", "config.OPTIMIZER.num_train_steps=12", size=100)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("config.OPTIMIZER.num_train_steps=-1", "num_train_steps=-1"),
        ("config.OPTIMIZER.num_train_steps=2.5", "num_train_steps=2.5"),
        ("config.OPTIMIZER.epochs_to_steps=tf", "epochs_to_steps='tf'"),
    ],
)
def test_bad_budget_is_a_config_error(override, match):
    with pytest.raises(ConfigError, match=match):
        _derive(override)


def test_a_budget_that_ends_inside_an_epoch_trains_tests_and_checkpoints_its_last_short_epoch(tmp_path):
    import json
    import os

    from vissl_vit import run_train_engine

    run = tmp_path / "run"
    overrides = [
        "config=test/quick_vit",  # 64 images / 16 = 4 steps per epoch
        "config.OPTIMIZER.num_train_steps=6",  # epoch 0 whole, epoch 1 two steps of four
        f"config.CHECKPOINT.DIR={run}",
    ]
    trainer = run_train_engine(compose_config(overrides))
    assert trainer.iteration == 6 and trainer.epochs_done == 2
    phases = [json.loads(line) for line in open(run / "metrics.json")]
    kinds = [("train" if "train_loss" in p else "test", p["train_phase_idx"], p["iteration"]) for p in phases]
    assert kinds == [("train", 0, 4), ("test", 0, 4), ("train", 1, 6), ("test", 1, 6)]
    assert os.path.exists(run / "model_phase1.torch")  # the final, short epoch's checkpoint
    again = run_train_engine(compose_config(overrides))  # the same command again: nothing to do
    assert again.iteration == 6
