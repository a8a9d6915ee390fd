"""Checkpoint hook: saves the whole training state at epoch and iteration boundaries; resumes it."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from vissl_vit.engine.checkpoint import VERSION, group_model_state, rng_state, save_checkpoint, set_rng_state
from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.errors import UserError
from vissl_vit.registry import HOOKS
from vissl_vit.utils.distributed import all_gather_object, get_rank, get_world_size

logger = logging.getLogger(__name__)


def unwrap(model: Any) -> Any:
    """The model inside a DDP wrapper (FSDP shards in place: the model is itself)."""
    return getattr(model, "module", model)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _cpu(tree: Any) -> Any:
    """A state dict with every tensor on the CPU (to gather it between ranks and to save it)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu(v) for v in tree)
    return tree


def trainer_state(trainer: Any, config_yaml: str = "") -> dict[str, Any]:
    """Everything a resume needs: model, optimizer, grad scaler, loss, RNGs, iteration, phase, hooks.

    Model and optimizer states are gathered whole (torch.distributed.checkpoint's full state
    dicts), so DDP, FSDP and single-process runs write the same layout and resume from each
    other's checkpoints. Every rank must call this (it gathers); rank 0 writes. Each rank's RNG
    states are gathered (each rank draws its own dropout / drop-path), and so is each rank's loss
    state when the loss keeps one per rank (``state_is_per_rank``: SwAV's queue holds that rank's
    own past embeddings; MoCo's queue is the same on every rank and is saved once).

    Args:
        trainer: the Trainer.
        config_yaml: the run's composed config, stored so that a resume can tell what changed.
    """
    model_sd, optim_sd = get_state_dict(unwrap(trainer.model), trainer.optimizer, options=_FULL)
    loss_sd = _cpu(trainer.loss_fn.state_dict())
    own = trainer.state_dict()  # grad scaler, position, hooks (Trainer.state_dict)
    state = {
        "classy_state_dict": {
            "base_model": {"model": group_model_state(model_sd), "meta": {}},
            "optimizer": optim_sd,
            "loss": loss_sd,
            "train_phase_idx": own["epoch"],
            "iteration": own["iteration"],
        },
        "grad_scaler": own["grad_scaler"],
        "iteration": own["iteration"],
        "epoch": own["epoch"],
        "phase_idx": own["phase_idx"],
        "iterations_per_epoch": own["iterations_per_epoch"],
        "world_size": own["world_size"],
        "rng_per_rank": all_gather_object(_cpu(rng_state())),
        "config_yaml": config_yaml,
        "hooks": own["hooks"],
        "version": VERSION,
    }
    if getattr(trainer.loss_fn, "state_is_per_rank", False):
        state["loss_per_rank"] = all_gather_object(loss_sd)
    return state


def check_model_fits(model: Any, model_sd: dict[str, Any]) -> None:
    """Raise a UserError when the checkpoint's model keys or shapes differ from the model's.

    The model's keys and (global) shapes come from its local state dict, which every rank has
    (a full, CPU-offloaded state dict is empty on every rank but 0).
    """
    expected = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    missing, unexpected = sorted(set(expected) - set(model_sd)), sorted(set(model_sd) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"The checkpoint does not fit the model: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}. "
            "Was it written with another MODEL config?"
        )
    wrong = [
        f"{k} {tuple(model_sd[k].shape)} (model: {s})" for k, s in expected.items() if tuple(model_sd[k].shape) != s
    ]
    if wrong:
        raise UserError(
            f"The checkpoint does not fit the model: {len(wrong)} tensors have another shape in the checkpoint: "
            f"{', '.join(wrong[:10])}{' ...' if len(wrong) > 10 else ''}. Was it written with another MODEL config?"
        )


def _loss_state(loss_fn: Any, state: dict[str, Any]) -> dict[str, Any]:
    """This rank's loss state: its own at the same world size; redistributed by the loss (SwAV's
    queue) at another; the one saved state when the loss keeps the same state on every rank."""
    world, rank = get_world_size(), get_rank()
    if "loss_per_rank" in state:
        states = state["loss_per_rank"]
    else:  # a loss without per-rank state, or an older checkpoint: rank 0's stands for every rank's
        states = [state["classy_state_dict"]["loss"]] * state["world_size"]
    if len(states) == world:
        return states[rank]
    redistribute = getattr(loss_fn, "redistribute_state", None)
    return redistribute(states, rank, world) if redistribute is not None else states[0]


def restore_trainer(trainer: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`trainer_state` (call after the hooks are registered, on every rank)."""
    csd = state["classy_state_dict"]
    model_sd = {f"{top}.{k}": v for top, group in csd["base_model"]["model"].items() for k, v in group.items()}
    model = unwrap(trainer.model)
    check_model_fits(model, model_sd)
    set_state_dict(
        model,
        trainer.optimizer,
        model_state_dict=model_sd,
        optim_state_dict=csd["optimizer"],
        # model keys were checked above; the optimizer may lack state for parameters that have not
        # been updated yet (e.g. prototypes frozen by TEMP_FROZEN_PARAMS_ITER_MAP)
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    # set_state_dict initialises state for every parameter (a zero-gradient step); parameters the
    # checkpoint had none for (not updated yet) must start fresh, as in an uninterrupted run
    saved = set(csd["optimizer"]["state"])
    for name, param in model.named_parameters():
        if name not in saved:
            trainer.optimizer.state.pop(param, None)
    trainer.loss_fn.load_state_dict(_loss_state(trainer.loss_fn, state))
    trainer.load_state_dict(state)  # grad scaler, position, hooks
    if state["world_size"] == get_world_size():  # another world size draws other streams anyway
        # each rank its own streams (version 1 checkpoints saved rank 0's only)
        rngs = state["rng_per_rank"] if "rng_per_rank" in state else [state["rng"]] * state["world_size"]
        set_rng_state(rngs[get_rank()])


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
        config_yaml: the run's composed config, stored in each checkpoint (see ``check_resume_config``).
    """

    def __init__(
        self,
        folder: str,
        epoch_frequency: int,
        iter_frequency: int,
        keep_last: int,
        is_primary: bool,
        config_yaml: str = "",
    ) -> None:
        self.folder, self.epoch_frequency, self.iter_frequency = folder, epoch_frequency, iter_frequency
        self.keep_last, self.is_primary, self.config_yaml = keep_last, is_primary, config_yaml

    def _save(self, name: str) -> None:
        state = trainer_state(self.trainer, self.config_yaml)  # every rank: FSDP gathers, RNGs are gathered
        if self.is_primary:
            save_checkpoint(self.folder, name, state, self.keep_last)

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


# A stop signal that arrives while the run is still being built (data, model, resume), before
# PreemptionHook installs its own handler: recorded here, so that the run stops cleanly (exit 0)
# before its first step instead of dying from the signal's default action.
_EARLY_SIGNALS: list[str] = []


def _record_early_signal(signum: int, _frame: Any) -> None:
    _EARLY_SIGNALS.append(signal.Signals(signum).name)


def catch_early_preemption(already: list[int] | tuple[int, ...] = ()) -> None:
    """Record SIGTERM / SIGUSR1 from now on until PreemptionHook takes over (main thread only).

    Args:
        already: signals a caller recorded before it could import this module (the command-line
            tool catches them from its first line, while torch is still being imported).
    """
    _EARLY_SIGNALS.extend(signal.Signals(s).name for s in already)
    if threading.current_thread() is threading.main_thread():
        for s in PreemptionHook.SIGNALS:
            signal.signal(s, _record_early_signal)


def early_preemption() -> str | None:
    """The first stop signal received while the run was being built, or None."""
    return _EARLY_SIGNALS[0] if _EARLY_SIGNALS else None


class Preempted(Exception):
    """Raised after a signal-triggered checkpoint, to stop training cleanly."""


@HOOKS.register("preemption_hook")
class PreemptionHook(HookBase):
    """On SIGTERM or SIGUSR1 (cluster preemption): finish the current step, write a checkpoint
    on every rank's behalf, and stop; rerunning the same command resumes from it.

    The ranks agree on the stop (the flag is all-reduced after each step), so they all stop after
    the same step even if the signal reached them at different times.

    Args:
        checkpoint_hook: writes the checkpoint.
        all_reduce: sums a tensor over ranks.
        world_size: processes (no collective on one process).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, checkpoint_hook: CheckpointHook, all_reduce: Any, world_size: int) -> None:
        self.checkpoint_hook, self.all_reduce, self.world_size = checkpoint_hook, all_reduce, world_size
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        self.requested = True
        logger.warning("Received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def before_train(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        early = bool(_EARLY_SIGNALS)
        if early:
            logger.warning("Received %s while the run was being built: stopping before training", _EARLY_SIGNALS[0])
            _EARLY_SIGNALS.clear()
        flag = torch.tensor([float(early)], dtype=torch.float64)
        if self.world_size > 1:
            flag = self.all_reduce(flag)  # every rank stops, or none
        if flag.item() > 0:
            # nothing new to save: the run folder holds what a rerun resumes from
            raise Preempted(f"preempted before training resumed at iteration {self.trainer.iteration}; rerun to resume")

    def after_train(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def after_step(self) -> None:
        flag = torch.tensor([float(self.requested)], dtype=torch.float64)
        if self.world_size > 1:
            flag = self.all_reduce(flag)
        if flag.item() > 0:
            t = self.trainer
            self.checkpoint_hook._save(f"model_iteration{t.iteration}.torch")
            raise Preempted(f"preempted at iteration {t.iteration}: checkpoint written; rerun to resume")
