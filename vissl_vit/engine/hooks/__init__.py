"""Trainer hooks, registered by name in HOOKS."""

from vissl_vit.engine.hooks.algorithms import FreezeParamsHook, MomentumEncoderHook, NormalizePrototypesHook
from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.engine.hooks.build import HookContext, build_hooks, model_hook_names
from vissl_vit.engine.hooks.checkpoint_hook import (
    CheckpointHook,
    Preempted,
    PreemptionHook,
    restore_trainer,
    trainer_state,
)
from vissl_vit.engine.hooks.ema import EmaModelHook
from vissl_vit.engine.hooks.guards import BadImageHook, NanLossHook
from vissl_vit.engine.hooks.logging_hooks import LogHook, ProgressBarHook
from vissl_vit.engine.hooks.phases import TestHook, TrainMeterHook

__all__ = [
    "BadImageHook",
    "EmaModelHook",
    "FreezeParamsHook",
    "MomentumEncoderHook",
    "NormalizePrototypesHook",
    "Preempted",
    "PreemptionHook",
    "CheckpointHook",
    "HookBase",
    "HookContext",
    "LogHook",
    "NanLossHook",
    "ProgressBarHook",
    "TestHook",
    "TrainMeterHook",
    "build_hooks",
    "model_hook_names",
    "restore_trainer",
    "trainer_state",
]
