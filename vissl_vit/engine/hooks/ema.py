"""The model EMA hook (VISSL's HOOKS.EMA_MODEL): an exponential moving average of the whole model,
updated after optimizer steps, saved with each checkpoint and evaluated by test phases.

VISSL's semantics (``vissl/hooks/ema_hooks.py``): after the optimizer step of iteration ``k``
(counted from 1), nothing happens unless ``k % UPDATE_ITER == 0``; then, while the progress at
which that step was taken, ``(k - 1) / max_iterations`` (classy's ``task.where``), is below
``WARMUP``, the EMA is overwritten with the model; after it, ``ema = DECAY * ema + (1 - DECAY) *
model`` over the whole state dict (timm's ModelEma v1, as DeiT keeps it).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.errors import ConfigError
from vissl_vit.models.ema import ModelEma
from vissl_vit.registry import HOOKS

logger = logging.getLogger(__name__)

EMA_DEVICES = ("gpu", "cpu")


def _model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@HOOKS.register("ema_model_hook")
class EmaModelHook(HookBase):
    """Keep a :class:`ModelEma` of the trained model (VISSL's HOOKS.EMA_MODEL).

    The EMA is made when the hook is built (a copy of the model as built, so that a test-only run
    has one to load), and made again from the model in ``before_train`` unless a checkpoint gave
    it (a run resumed from a checkpoint without an EMA starts it from the resumed weights). Its
    weights are this hook's ``state_dict``, so each checkpoint holds the EMA of its step and a
    resume continues it exactly.

    Args:
        model: the trained model (DDP's or torch.compile's wrapper is looked through).
        decay: DECAY, the weight of the old average in [0, 1] (DeiT: 0.99996).
        update_iter: UPDATE_ITER: update after every N-th optimizer step (N >= 1).
        warmup: WARMUP: the fraction of training, in [0, 1], before which the EMA is overwritten
            with the model instead of averaged.
        ema_device: EMA_DEVICE: "gpu" keeps the EMA on the model's device, "cpu" on the CPU.
    """

    def __init__(self, model: nn.Module, decay: float, update_iter: int, warmup: float, ema_device: str) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"config.HOOKS.EMA_MODEL.DECAY={decay}: expected a number in [0, 1] (e.g. 0.9999).")
        if isinstance(update_iter, bool) or not isinstance(update_iter, int) or update_iter < 1:
            raise ConfigError(f"config.HOOKS.EMA_MODEL.UPDATE_ITER={update_iter!r}: expected an integer >= 1.")
        if not 0.0 <= warmup <= 1.0:
            raise ConfigError(f"config.HOOKS.EMA_MODEL.WARMUP={warmup}: expected a fraction of training in [0, 1].")
        if ema_device not in EMA_DEVICES:
            raise ConfigError(f"config.HOOKS.EMA_MODEL.EMA_DEVICE={ema_device!r}: expected one of {list(EMA_DEVICES)}.")
        self.decay, self.update_iter, self.warmup = float(decay), update_iter, float(warmup)
        device = _model_device(model) if ema_device == "gpu" else torch.device("cpu")
        self.ema = ModelEma(model, device)
        self._loaded = False  # whether load_state_dict gave the EMA its weights

    def action(self, iteration: int, max_iterations: int) -> str:
        """What the hook does after the optimizer step of ``iteration`` (from 1): "skip", "set"
        (overwrite with the model: warm-up) or "update" (average)."""
        if iteration % self.update_iter != 0:
            return "skip"
        return "set" if (iteration - 1) / max_iterations < self.warmup else "update"

    def before_train(self) -> None:
        if not self._loaded:
            if self.trainer.iteration > 0:
                logger.warning(
                    "The checkpoint holds no model EMA (HOOKS.EMA_MODEL was off): it starts from the resumed "
                    "weights at iteration %d.",
                    self.trainer.iteration,
                )
            self.ema.set(self.trainer.model)

    def after_step(self) -> None:
        t = self.trainer
        what = self.action(t.iteration, t.max_iterations)
        if what == "set":
            self.ema.set(t.model)
        elif what == "update":
            self.ema.update(t.model, self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])
        self._loaded = True
