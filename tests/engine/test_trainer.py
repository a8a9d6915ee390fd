"""The Trainer and its hooks on a toy regression, without composing a config (detectron2's
tests/test_engine.py style); then build_hooks from a config: the order, the model's own hooks, the
user's hooks by name and from Python."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from tests.engine.toy import ToyLoader, toy_trainer
from vissl_vit import compose_config
from vissl_vit.engine.hooks import (
    CheckpointHook,
    HookBase,
    HookContext,
    LogHook,
    MomentumEncoderHook,
    NanLossHook,
    NormalizePrototypesHook,
    PreemptionHook,
    TrainMeterHook,
    build_hooks,
)
from vissl_vit.engine.hooks.loggers import CsvLoggerHook
from vissl_vit.engine.hooks.logging_hooks import EnvironmentHook, EpochSummaryHook
from vissl_vit.engine.hooks.phases import PhaseWriter
from vissl_vit.engine.trainer import Trainer, resume_iteration
from vissl_vit.errors import ConfigError
from vissl_vit.models import build_model
from vissl_vit.registry import HOOKS

EVENTS = ("before_train", "before_epoch", "before_step", "after_backward", "before_optimizer_step", "after_step")
EVENTS += ("after_epoch", "after_train")


def _trainer(n_batches: int = 4, iterations_per_epoch: int = 2, epochs: int = 2, accumulation: int = 1) -> Trainer:
    return toy_trainer(
        ToyLoader(n_batches),
        iterations_per_epoch=iterations_per_epoch,
        max_iterations=iterations_per_epoch * epochs,
        accumulation=accumulation,
    )


class _Recorder(HookBase):
    """Appends (its tag, the event, the trainer's iteration) to a shared list at every event."""

    def __init__(self, tag: str, calls: list) -> None:
        self.tag, self.calls = tag, calls
        for event in EVENTS:
            setattr(self, event, self._record(event))

    def _record(self, event: str):
        return lambda: self.calls.append((self.tag, event, self.trainer.iteration))


class _Counter(HookBase):
    """A hook with state: counts its steps; registered by name for the config tests."""

    def __init__(self, start: int = 0) -> None:
        self.steps = start

    def after_step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


def test_hooks_are_called_in_order_for_every_event():
    calls: list = []
    trainer = _trainer(n_batches=4, iterations_per_epoch=2, epochs=2)
    trainer.register_hooks([_Recorder("a", calls), _Recorder("b", calls)])
    trainer.train()
    # the sequence by definition (HookBase's docstrings), hook "a" before "b" at each event
    step = ("before_step", "after_backward", "before_optimizer_step")
    expected_events = [("before_train", 0)]
    for epoch in range(2):
        expected_events.append(("before_epoch", 2 * epoch))
        for i in range(2):
            it = 2 * epoch + i
            expected_events += [(e, it) for e in step] + [("after_step", it + 1)]
        expected_events.append(("after_epoch", 2 * epoch + 2))
    expected_events.append(("after_train", 4))
    assert calls == [(tag, e, it) for e, it in expected_events for tag in ("a", "b")]


def test_after_train_runs_when_a_hook_raises():
    calls: list = []

    class _Boom(HookBase):
        def after_step(self) -> None:
            raise RuntimeError("boom")

    trainer = _trainer()
    trainer.register_hooks([_Boom(), _Recorder("r", calls)])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert calls[-1] == ("r", "after_train", 1)


def test_accumulation_makes_one_step_of_the_mean_gradient():
    # 4 batches of 4, 2 micro-batches per step: step 1 is one SGD step on batches 0 and 1 together
    trainer = _trainer(n_batches=4, iterations_per_epoch=2, epochs=1, accumulation=2)
    model = trainer.model
    w0 = [p.detach().clone() for p in model.parameters()]
    seen = []

    class _AfterFirst(HookBase):
        def after_step(self) -> None:
            seen.append((self.trainer.iteration, len(self.trainer.last.micro), self.trainer.last.batch_size))
            if self.trainer.iteration == 1:
                self.weights = [p.detach().clone() for p in self.trainer.model.parameters()]

    hook = _AfterFirst()
    trainer.register_hooks([hook])
    trainer.train()
    assert seen == [(1, 2, 8), (2, 2, 8)]
    # reference: plain autograd on the 8 samples at once (equal micro-batches: mean of means = mean)
    ref = nn.Linear(3, 1)
    with torch.no_grad():
        for p, w in zip(ref.parameters(), w0):
            p.copy_(w)
    batches = trainer.train_loader.batches
    x = torch.cat([batches[0]["data"], batches[1]["data"]])
    y = torch.cat([batches[0]["label"], batches[1]["label"]])
    grads = torch.autograd.grad(nn.functional.mse_loss(ref(x), y), list(ref.parameters()))
    for w, p0, g in zip(hook.weights, w0, grads):
        torch.testing.assert_close(w, p0 - 0.1 * g)


def test_hooks_hold_the_trainer_weakly():
    trainer = _trainer()
    hook = _Counter()
    trainer.register_hooks([hook])
    trainer.train()
    assert hook.trainer.iteration == 4  # the proxy reads the trainer while it lives
    ref = weakref.ref(trainer)
    gc.collect()
    gc.disable()  # freed by reference counting alone: no cycle runs through the hooks
    try:
        del trainer
        assert ref() is None
    finally:
        gc.enable()
    with pytest.raises(ReferenceError):
        _ = hook.trainer.iteration


def test_trainer_state_round_trip():
    trainer = _trainer()
    trainer.register_hooks([_Counter()])
    trainer.train()
    trainer.phase_idx = 3
    state = trainer.state_dict()
    # the checkpoint's top-level keys it stood for before Trainer.state_dict (layout unchanged)
    assert set(state) == {"grad_scaler", "iteration", "epoch", "phase_idx", "iterations_per_epoch", "world_size"} | {
        "hooks"
    }
    fresh = _trainer()
    fresh.register_hooks([_Counter()])
    fresh.load_state_dict(state)
    assert (fresh.iteration, fresh.epoch, fresh.phase_idx) == (4, 2, 3)
    assert fresh.hooks[0].steps == 4 and fresh.state_dict() == state


def test_resume_iteration_keeps_the_point_of_the_epoch():
    # 6 of 4-step epochs = epoch 1, half through; at 8 steps per epoch that is 8 + 4
    state = {"iteration": 6, "iterations_per_epoch": 4, "world_size": 2}
    assert resume_iteration(state, 4) == 6
    assert resume_iteration(state, 8) == 12


# --------------------------------------------------------------------------------------------------
# build_hooks
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def counter_hook():
    """``_Counter`` registered as "test_counter_hook" for one test only."""
    HOOKS.register("test_counter_hook")(_Counter)
    yield
    HOOKS._obj_map.pop("test_counter_hook")


def _context(tmp_path) -> HookContext:
    return HookContext(
        run_dir=str(tmp_path),
        primary=True,
        world_size=1,
        train_size=0,
        test_loader=None,
        stdout_json=None,
        tb=None,
        phase_writer=PhaseWriter(None, None, "meter"),
        config_yaml="",
    )


_QUIET = ("config.HOOKS.CHECK_NAN=True", "config.HOOKS.PROGRESS_BAR.USE_PROGRESS_BAR=False")


def _cfg(name: str = "test/quick_vit", *overrides: str):
    return compose_config([f"config={name}", "config.METERS.name=", *overrides]).config


def test_user_hooks_by_name_and_from_python_are_called_before_the_checkpoint(tmp_path, counter_hook):
    cfg = _cfg("test/quick_vit", "config.HOOKS.EXTRA=[[test_counter_hook,{start:10}]]", *_QUIET)
    trainer = _trainer()
    from_python = _Recorder("py", [])
    hooks = build_hooks(cfg, _context(tmp_path), trainer.model, extra_hooks=[from_python])
    kinds = [type(h) for h in hooks]
    loggers = [EnvironmentHook, EpochSummaryHook, CsvLoggerHook]  # rank 0's (the context is primary)
    assert kinds == [
        NanLossHook,
        TrainMeterHook,
        LogHook,
        *loggers,
        _Counter,
        _Recorder,
        CheckpointHook,
        PreemptionHook,
    ]
    trainer.register_hooks(hooks)
    trainer.train()
    assert hooks[kinds.index(_Counter)].steps == 14  # its kwargs reached it: 10 + 4 steps
    assert [e for _, e, _ in from_python.calls].count("after_step") == 4


def test_misspelled_hook_name_lists_the_known_hooks(tmp_path):
    cfg = _cfg("test/quick_vit", "config.HOOKS.EXTRA=[[log_hok]]")
    with pytest.raises(ConfigError, match=r"config\.HOOKS\.EXTRA\[0\].*'log_hok'.*Known hook names:.*log_hook"):
        build_hooks(cfg, _context(tmp_path), nn.Linear(3, 1))


def test_hook_kwargs_are_checked_against_the_constructor(tmp_path, counter_hook):
    cfg = _cfg("test/quick_vit", "config.HOOKS.EXTRA=[[test_counter_hook,{strat:1}]]")
    with pytest.raises(ConfigError, match=r"config\.HOOKS\.EXTRA\[0\] 'test_counter_hook': unknown argument 'strat'"):
        build_hooks(cfg, _context(tmp_path), nn.Linear(3, 1))


@pytest.mark.parametrize(
    "name, overrides, method_hooks",
    [
        ("test/quick_vit", [], []),
        ("test/quick_moco", [], [MomentumEncoderHook]),
        ("test/quick_swav", [], [NormalizePrototypesHook]),
        ("test/quick_swav", ["config.LOSS.swav_loss.normalize_last_layer=False"], []),  # VISSL's switch
    ],
)
def test_method_hooks_come_from_the_model_right_after_the_guards(tmp_path, name, overrides, method_hooks):
    cfg = _cfg(name, "config.HOOKS.CHECK_NAN=True", *overrides)
    hooks = build_hooks(cfg, _context(tmp_path), build_model(cfg))
    kinds = [type(h) for h in hooks]
    guards = kinds.index(NanLossHook) + 1 + bool(cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP)
    assert kinds[guards : kinds.index(TrainMeterHook)] == method_hooks
