"""Hooks that stop a run that cannot go on: a NaN/Inf loss, too many unreadable images."""

from __future__ import annotations

import logging
from typing import Any

import torch

from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.errors import DataError, TrainingError
from vissl_vit.registry import HOOKS

logger = logging.getLogger(__name__)


@HOOKS.register("nan_loss_hook")
class NanLossHook(HookBase):
    """Raise TrainingError when the step's loss is NaN or infinite. Runs before the checkpoint
    hook, so the poisoned weights are never saved: the newest checkpoint is the last good one."""

    def after_step(self) -> None:
        loss = self.trainer.last.loss
        if not torch.isfinite(loss).all():
            t = self.trainer
            raise TrainingError(
                f"The loss is {loss.item()} at iteration {t.iteration} (epoch {t.epoch}, lr {t.last.lr:.4g}). "
                "Training stopped; the last checkpoint is untouched. Usual fixes: a lower learning rate or a "
                "longer warm-up, config.MODEL.GRAD_CLIP.USE_GRAD_CLIP=True, or checking the data for bad values."
            )


@HOOKS.register("bad_image_hook")
class BadImageHook(HookBase):
    """Count unreadable images (replaced by others in the dataset) and stop past a fraction.

    Args:
        dataset_len: images in the training set.
        max_fraction: the run stops when more than this fraction of them has failed.
        all_reduce: sums a tensor over ranks.
    """

    def __init__(self, dataset_len: int, max_fraction: float, all_reduce: Any) -> None:
        self.dataset_len, self.max_fraction, self.all_reduce = dataset_len, max_fraction, all_reduce
        self.count = 0
        self.examples: list[str] = []

    def after_step(self) -> None:
        batches = [m.batch for m in self.trainer.last.micro]
        local = sum(int(b["bad"].sum()) for b in batches)
        bad = int(self.all_reduce(torch.tensor([float(local)], dtype=torch.float64)).item())
        if not bad:
            return
        self.count += bad
        for b in batches:
            self.examples += [p for p in b["bad_path"] if p][: 10 - len(self.examples)]
        if self.count > self.max_fraction * self.dataset_len:
            raise DataError(
                f"{self.count} training images could not be read, more than config.DATA.MAX_BAD_IMAGE_FRACTION="
                f"{self.max_fraction} of the {self.dataset_len} images. Some of them: {', '.join(self.examples)}."
            )

    def after_epoch(self) -> None:
        if self.count:
            logger.warning("%d unreadable training images so far (replaced by others)", self.count)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "examples": list(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.examples = state["count"], list(state["examples"])
