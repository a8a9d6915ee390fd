"""Checkpoint hook: saves the whole training state at epoch and iteration boundaries (and the best
by a test metric), exports the final weights; resumes it."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from vissl_vit.engine.checkpoint import (
    VERSION,
    group_model_state,
    rng_state,
    save_best,
    save_checkpoint,
    set_rng_state,
)
from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.errors import ConfigError, UserError
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


def metric_value(values: dict[str, Any], metric: str) -> float | None:
    """The value of ``metric`` (a metrics.json name: ``test_accuracy_list_meter.top_1.0``,
    ``test_loss``) in a test phase's values (``{"loss": ..., "accuracy_list_meter": {"top_1":
    {"0": ...}}}``), or None when the path does not lead to a number."""
    node: Any = {f"test_{k}": v for k, v in values.items()}
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def metric_names(values: dict[str, Any], prefix: str = "test") -> list[str]:
    """Every number's name in a test phase's values, as :func:`metric_value` reads them."""
    names: list[str] = []
    for k, v in values.items():
        if isinstance(v, dict):
            names += metric_names(v, f"{prefix}{'_' if prefix == 'test' else '.'}{k}")
        else:
            names.append(f"{prefix}{'_' if prefix == 'test' else '.'}{k}")
    return names


def last_test_values(trainer: Any) -> tuple[int, dict[str, Any]] | None:
    """The newest test phase's (train_phase_idx, values), from the trainer's TestHook, or None."""
    for h in trainer.hooks:
        if isinstance(h, _test_hook_class()):
            return getattr(h, "last_values", None)
    return None


def _test_hook_class() -> type:
    from vissl_vit.engine.hooks.phases import TestHook

    return TestHook


@HOOKS.register("checkpoint_hook")
class CheckpointHook(HookBase):
    """Save ``model_phase{epoch}.torch`` every ``epoch_frequency`` epochs (and at the end) and
    ``model_iteration{it}.torch`` every ``iter_frequency`` steps (-1: never). Rank 0 writes.

    With ``keep_best_metric``, ``model_best.torch`` holds the checkpoint of the best test value so
    far (a hard link to the epoch's checkpoint when one is written at that epoch, else its own
    file); the best value is part of the hook's state, so a resumed run keeps comparing with it.
    At the end of training, ``model_final.safetensors`` (+ ``model_final.timm.json``) holds the
    final weights (:mod:`vissl_vit.export`).

    Registered last among the step hooks, so a step that a guard rejected is never saved; after
    the test hook, so an epoch's test values are known when its checkpoint is written.

    Args:
        folder: the run folder.
        epoch_frequency: CHECKPOINT_FREQUENCY.
        iter_frequency: CHECKPOINT_ITER_FREQUENCY.
        keep_last: KEEP_LAST (-1 keeps all).
        is_primary: whether this rank writes.
        config_yaml: the run's composed config, stored in each checkpoint (see ``check_resume_config``);
            the export reads the model's shape from it.
        latest_as_copy: LATEST_AS_COPY: checkpoint.torch as a regular file, not a symlink.
        keep_best_metric: KEEP_BEST_METRIC: a test value's metrics.json name, "" for no model_best.torch.
        keep_best_mode: KEEP_BEST_MODE: "max", "min", or "auto" (min for a loss, else max).
        export_safetensors: EXPORT_SAFETENSORS: write model_final.safetensors at the end of training.
        test_values: returns the newest test phase's (train_phase_idx, values), or None before the
            first; default: the trainer's TestHook's (:func:`last_test_values`).
    """

    def __init__(
        self,
        folder: str,
        epoch_frequency: int,
        iter_frequency: int,
        keep_last: int,
        is_primary: bool,
        config_yaml: str = "",
        latest_as_copy: bool = False,
        keep_best_metric: str = "",
        keep_best_mode: str = "auto",
        export_safetensors: bool = True,
        test_values: Callable[[], tuple[int, dict[str, Any]] | None] | None = None,
    ) -> None:
        if keep_last == 0 or keep_last < -1:
            raise ConfigError(
                f"config.CHECKPOINT.KEEP_LAST={keep_last}: expected -1 (keep every checkpoint) or N >= 1 "
                "(keep the newest N)."
            )
        if keep_best_mode not in ("auto", "max", "min"):
            raise ConfigError(f"config.CHECKPOINT.KEEP_BEST_MODE={keep_best_mode!r}: expected auto, max or min.")
        if keep_best_metric and not keep_best_metric.startswith("test_"):
            raise ConfigError(
                f"config.CHECKPOINT.KEEP_BEST_METRIC={keep_best_metric!r}: expected a test phase's value as "
                "metrics.json names it, e.g. test_accuracy_list_meter.top_1.0 or test_loss."
            )
        self.folder, self.epoch_frequency, self.iter_frequency = folder, epoch_frequency, iter_frequency
        self.keep_last, self.is_primary, self.config_yaml = keep_last, is_primary, config_yaml
        self.latest_as_copy, self.export_safetensors = latest_as_copy, export_safetensors
        self.metric = keep_best_metric
        if keep_best_mode == "auto":
            keep_best_mode = "min" if "loss" in keep_best_metric.rsplit(".", 1)[-1] else "max"
        self.mode = keep_best_mode
        self._test_values = test_values
        self.best: float | None = None
        self.best_epoch = -1
        self._seen_phase: int | None = None  # the test phase last compared

    def before_train(self) -> None:
        if not self.metric or self._test_values is not None:
            return
        tests = [h for h in self.trainer.hooks if isinstance(h, _test_hook_class())]
        if not tests:
            raise ConfigError(
                f"config.CHECKPOINT.KEEP_BEST_METRIC={self.metric!r} needs test phases: set config.TEST_MODEL=True "
                "(and DATA.TEST), or KEEP_BEST_METRIC=''."
            )
        self._test_values = lambda: last_test_values(self.trainer)

    def _save(self, name: str) -> tuple[str | None, dict[str, Any]]:
        """Gather the state on every rank (FSDP gathers, RNGs are gathered); rank 0 writes ``name``."""
        state = trainer_state(self.trainer, self.config_yaml)
        path = None
        if self.is_primary:
            path = save_checkpoint(self.folder, name, state, self.keep_last, self.latest_as_copy)
        return path, state

    def after_step(self) -> None:
        t = self.trainer
        at_epoch_end = t.iteration % t.iterations_per_epoch == 0
        if self.iter_frequency > 0 and t.iteration % self.iter_frequency == 0 and not at_epoch_end:
            self._save(f"model_iteration{t.iteration}.torch")

    def _new_best(self) -> bool:
        """Whether this epoch's test phase gave the best value so far (records it). The test values
        are reduced over ranks, so every rank decides alike."""
        if not self.metric or self._test_values is None:
            return False
        latest = self._test_values()
        if latest is None or latest[0] == self._seen_phase:
            return False  # no test phase this epoch
        self._seen_phase, values = latest
        value = metric_value(values, self.metric)
        if value is None:
            raise ConfigError(
                f"config.CHECKPOINT.KEEP_BEST_METRIC={self.metric!r} is not a value of the test phase: "
                f"it has {', '.join(metric_names(values))}."
            )
        if math.isnan(value):
            return False
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_epoch = value, latest[0]
        return better

    def after_epoch(self) -> None:
        t = self.trainer
        done = t.epochs_done
        best = self._new_best()
        final = t.iteration >= t.max_iterations
        path, state = None, None
        if done % self.epoch_frequency == 0 or final:
            path, state = self._save(f"model_phase{done - 1}.torch")
        if best:
            if state is None:
                state = trainer_state(self.trainer, self.config_yaml)
            if self.is_primary:
                save_best(self.folder, state if path is None else None, same_as=path)
                logger.info("New best %s = %g (epoch %d): %s", self.metric, self.best, done - 1,
                            os.path.join(self.folder, "model_best.torch"))  # fmt: skip
        if final and self.export_safetensors and self.is_primary:
            self._export(state)

    def _export(self, state: dict[str, Any]) -> None:
        """model_final.safetensors (+ .timm.json) from the final checkpoint's model state."""
        from omegaconf import OmegaConf

        from vissl_vit.export import EXPORT_STEM, export_weights, log_export

        if not self.config_yaml:
            logger.warning("No config given to the checkpoint hook: model_final.safetensors is not written.")
            return
        groups = state["classy_state_dict"]["base_model"]["model"]
        ours = {f"{top}.{k}": v for top, group in groups.items() for k, v in group.items()}
        cfg = OmegaConf.create(self.config_yaml).config
        log_export(export_weights(ours, cfg, os.path.join(self.folder, f"{EXPORT_STEM}.safetensors")))

    def state_dict(self) -> dict[str, Any]:
        if not self.metric:
            return {}
        return {"metric": self.metric, "best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("metric") == self.metric:  # another metric starts its own comparison
            self.best, self.best_epoch = state["best"], state["best_epoch"]


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

    One process stops after the step in which the signal came (its flag is a Python bool: reading
    it costs nothing). Several processes must agree on the step they stop after, even when the
    signal reached them at different times: each files its flag with the step scalars
    (:class:`~vissl_vit.engine.trainer.StepScalars`), which are reduced together with the NaN
    verdict and the bad-image count at the next sync point (every LOG_FREQUENCY steps, an epoch's
    end), so the stop costs no collective of its own. They all stop after that sync step: at most
    LOG_FREQUENCY - 1 steps after the signal, which must fit in the scheduler's grace period (on
    SLURM, the time between SIGTERM and SIGKILL, often 30-120 s). The check only records the
    verdict; the checkpoint is written in ``after_step``, outside the sync (a sync may run inside
    a checkpoint's ``state_dict``).

    Args:
        checkpoint_hook: writes the checkpoint.
        all_reduce: sums a tensor over ranks.
        world_size: processes (no collective on one process).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, checkpoint_hook: CheckpointHook, all_reduce: Any, world_size: int) -> None:
        self.checkpoint_hook, self.all_reduce, self.world_size = checkpoint_hook, all_reduce, world_size
        self.requested = False  # a signal came to this process
        self._stop = False  # the ranks agreed to stop (several processes)
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

    def _agree(self, rows: list[tuple[int, list[float]]]) -> None:
        """The step scalars' check: some rank was asked to stop by one of the steps read."""
        if any(values[0] > 0 for _, values in rows):
            self._stop = True

    def before_optimizer_step(self) -> None:
        if self.world_size > 1:  # filed with the step's scalars; read at the next sync point
            t = self.trainer
            flag = torch.full((1,), float(self.requested), dtype=torch.float64, device=t.scalars.device)
            t.scalars.add("preempt", flag, reducer=self.all_reduce, check=self._agree)

    def after_step(self) -> None:
        if self._stop if self.world_size > 1 else self.requested:
            t = self.trainer
            self.checkpoint_hook._save(f"model_iteration{t.iteration}.torch")
            raise Preempted(f"preempted at iteration {t.iteration}: checkpoint written; rerun to resume")
