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
from vissl_vit.engine.hooks.loggers import CsvLoggerHook, MetricsLogger, MlflowLoggerHook, WandbLoggerHook
from vissl_vit.engine.hooks.logging_hooks import EnvironmentHook, EpochSummaryHook, LogHook, ProgressBarHook
from vissl_vit.engine.hooks.phases import TestHook, TrainMeterHook
from vissl_vit.engine.hooks.pictures import PicturesHook

__all__ = [
    "BadImageHook",
    "CsvLoggerHook",
    "EmaModelHook",
    "EnvironmentHook",
    "EpochSummaryHook",
    "FreezeParamsHook",
    "MomentumEncoderHook",
    "NormalizePrototypesHook",
    "PicturesHook",
    "Preempted",
    "PreemptionHook",
    "CheckpointHook",
    "HookBase",
    "HookContext",
    "LogHook",
    "MetricsLogger",
    "MlflowLoggerHook",
    "NanLossHook",
    "ProgressBarHook",
    "TestHook",
    "TrainMeterHook",
    "WandbLoggerHook",
    "build_hooks",
    "model_hook_names",
    "restore_trainer",
    "trainer_state",
]
