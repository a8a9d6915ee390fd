"""Hooks that keep self-supervised algorithms' state: momentum encoders, prototypes, frozen params.

The state itself lives in modules (MoCoModel's momentum encoder, SwAV's prototypes); these hooks
only call them at the right moment of each step.
"""

from __future__ import annotations

import logging

from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.engine.hooks.checkpoint_hook import unwrap
from vissl_vit.errors import ConfigError
from vissl_vit.models.heads.swav_head import SwAVPrototypesHead
from vissl_vit.registry import HOOKS

logger = logging.getLogger(__name__)


@HOOKS.register("momentum_encoder_hook")
class MomentumEncoderHook(HookBase):
    """After each optimizer step: EMA of the online network into MoCo's momentum encoder, with
    the momentum of the current progress (constant, or cosine to 1)."""

    def after_step(self) -> None:
        t = self.trainer
        m = unwrap(t.model).update_momentum_encoder(t.iteration / t.max_iterations)
        t.last.extra["momentum"] = m


@HOOKS.register("normalize_prototypes_hook")
class NormalizePrototypesHook(HookBase):
    """L2-normalise SwAV's prototypes before training and after each optimizer step, so that
    every forward sees unit prototypes (LOSS.swav_loss.normalize_last_layer)."""

    def _normalize(self) -> None:
        for m in unwrap(self.trainer.model).modules():
            if isinstance(m, SwAVPrototypesHead):
                m.normalize_prototypes()

    def before_train(self) -> None:
        self._normalize()

    def after_step(self) -> None:
        self._normalize()


@HOOKS.register("freeze_params_hook")
class FreezeParamsHook(HookBase):
    """Drop the gradients of some parameters for their first N iterations
    (MODEL.TEMP_FROZEN_PARAMS_ITER_MAP, e.g. SwAV's prototypes for the first epoch).

    Args:
        iter_map: [[parameter name, number of iterations], ...]. VISSL's files name parameters as
            DDP's wrapper does (``module.heads.0.prototypes0.weight``); that prefix is dropped.
    """

    def __init__(self, iter_map: list[list]) -> None:
        self.iter_map = {str(name).removeprefix("module."): int(n) for name, n in iter_map}

    def before_train(self) -> None:
        names = {n for n, _ in unwrap(self.trainer.model).named_parameters()}
        unknown = [n for n in self.iter_map if n not in names]
        if unknown:
            sample = ", ".join(sorted(n for n in names if "heads" in n)[:8])
            raise ConfigError(
                f"config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP names parameters the model does not have: {unknown}. "
                f"Head parameters are named like: {sample}"
            )

    def after_backward(self) -> None:
        it = self.trainer.iteration
        for name, p in unwrap(self.trainer.model).named_parameters():
            if name in self.iter_map and it < self.iter_map[name]:
                p.grad = None  # the optimizer skips it: no update, no weight decay
