"""Checkpoint hook: saves the whole training state at epoch and iteration boundaries; resumes it."""

from __future__ import annotations

import logging
from typing import Any

from vissl_vit.engine.checkpoint import (
    VERSION,
    load_model_state,
    model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.registry import HOOKS

logger = logging.getLogger(__name__)


def unwrap(model: Any) -> Any:
    """The model inside a DDP/FSDP wrapper."""
    return getattr(model, "module", model)


def trainer_state(trainer: Any) -> dict[str, Any]:
    """Everything a resume needs: model, optimizer, loss, RNGs, iteration, phase and hook states."""
    return {
        "classy_state_dict": {
            "base_model": {"model": model_state(unwrap(trainer.model)), "meta": {}},
            "optimizer": trainer.optimizer.state_dict(),
            "loss": trainer.loss_fn.state_dict(),
            "train_phase_idx": trainer.epoch,
            "iteration": trainer.iteration,
        },
        "iteration": trainer.iteration,
        "epoch": trainer.epoch,
        "phase_idx": trainer.phase_idx,
        "rng": rng_state(),
        "hooks": {type(h).__name__: h.state_dict() for h in trainer.hooks if h.state_dict()},
        "version": VERSION,
    }


def restore_trainer(trainer: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`trainer_state` (call after the hooks are registered)."""
    csd = state["classy_state_dict"]
    load_model_state(unwrap(trainer.model), csd["base_model"]["model"])
    trainer.optimizer.load_state_dict(csd["optimizer"])
    trainer.loss_fn.load_state_dict(csd["loss"])
    trainer.iteration = state["iteration"]
    trainer.phase_idx = state["phase_idx"]
    for h in trainer.hooks:
        if type(h).__name__ in state["hooks"]:
            h.load_state_dict(state["hooks"][type(h).__name__])
    set_rng_state(state["rng"])


@HOOKS.register("checkpoint_hook")
class CheckpointHook(HookBase):
    """Save ``model_phase{epoch}.torch`` every ``epoch_frequency`` epochs (and at the end) and
    ``model_iteration{it}.torch`` every ``iter_frequency`` steps (-1: never). Rank 0 writes.

    Registered last among the step hooks, so a step that a guard rejected is never saved.

    Args:
        folder: the run folder.
        epoch_frequency: CHECKPOINT_FREQUENCY.
        iter_frequency: CHECKPOINT_ITER_FREQUENCY.
        keep_last: KEEP_LAST (-1 keeps all).
        is_primary: whether this rank writes.
    """

    def __init__(
        self, folder: str, epoch_frequency: int, iter_frequency: int, keep_last: int, is_primary: bool
    ) -> None:
        self.folder, self.epoch_frequency, self.iter_frequency = folder, epoch_frequency, iter_frequency
        self.keep_last, self.is_primary = keep_last, is_primary

    def _save(self, name: str) -> None:
        if self.is_primary:
            save_checkpoint(self.folder, name, trainer_state(self.trainer), self.keep_last)

    def after_step(self) -> None:
        t = self.trainer
        at_epoch_end = t.iteration % t.iterations_per_epoch == 0
        if self.iter_frequency > 0 and t.iteration % self.iter_frequency == 0 and not at_epoch_end:
            self._save(f"model_iteration{t.iteration}.torch")

    def after_epoch(self) -> None:
        t = self.trainer
        done = t.epoch
        if done % self.epoch_frequency == 0 or t.iteration >= t.max_iterations:
            self._save(f"model_phase{done - 1}.torch")
