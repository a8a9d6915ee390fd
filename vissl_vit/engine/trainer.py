"""The training loop: it only loops; hooks do everything else (logs, meters, tests, checkpoints)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from fvcore.common.param_scheduler import ParamScheduler
from torch import nn
from torch.utils.data import DataLoader

from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.optim.schedulers import progress
from vissl_vit.utils.tensors import to_device

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What the last step produced, for the hooks to read."""

    loss: torch.Tensor
    outputs: list[Any]  # the model's outputs (not detached: read them under no_grad)
    target: torch.Tensor
    batch: dict[str, Any]
    lr: float
    batch_size: int
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Runs ``max_iterations`` optimizer steps over ``train_loader``, calling hooks in order.

    ``iteration`` counts completed steps; ``epoch`` is ``iteration // iterations_per_epoch``. A
    resumed trainer starts mid-epoch: the sampler skips the batches already seen.

    Args:
        model: the model (possibly wrapped in DDP).
        loss_fn: ``loss_fn(outputs, target) -> scalar``.
        optimizer: torch optimizer whose param groups get the scheduled lr each step.
        lr_scheduler: fvcore schedule, a function of progress in [0, 1).
        train_loader: loader whose sampler has set_epoch / set_start_iteration.
        iterations_per_epoch: steps per epoch.
        max_iterations: steps in all.
        update_interval: "step" or "epoch" (when the lr changes).
        device: where batches go.
        grad_clip: (max_norm, norm_type), or None for no clipping.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: ParamScheduler,
        train_loader: DataLoader,
        iterations_per_epoch: int,
        max_iterations: int,
        update_interval: str,
        device: torch.device,
        grad_clip: tuple[float, float] | None = None,
    ) -> None:
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.lr_scheduler, self.train_loader = lr_scheduler, train_loader
        self.iterations_per_epoch, self.max_iterations = iterations_per_epoch, max_iterations
        self.update_interval, self.device, self.grad_clip = update_interval, device, grad_clip
        self.iteration = 0
        self.phase_idx = 0  # phases (train and test) written to metrics.json so far
        self.hooks: list[HookBase] = []
        self.last: StepResult | None = None

    @property
    def epoch(self) -> int:
        return self.iteration // self.iterations_per_epoch

    def register_hooks(self, hooks: list[HookBase]) -> None:
        for h in hooks:
            h.trainer = self
        self.hooks.extend(hooks)

    def _call(self, name: str) -> None:
        for h in self.hooks:
            getattr(h, name)()

    def train(self) -> None:
        """Train until max_iterations; after_train runs even when a hook or step raises."""
        logger.info("Training from iteration %d to %d", self.iteration, self.max_iterations)
        self._call("before_train")
        try:
            while self.iteration < self.max_iterations:
                sampler = self.train_loader.sampler
                sampler.set_epoch(self.epoch)
                sampler.set_start_iteration(self.iteration % self.iterations_per_epoch)
                self.model.train()
                self._call("before_epoch")
                epoch_end = (self.epoch + 1) * self.iterations_per_epoch
                for batch in self.train_loader:
                    self._call("before_step")
                    self.run_step(batch)
                    self.iteration += 1
                    self._call("after_step")
                    if self.iteration >= epoch_end:
                        break
                self._call("after_epoch")
        finally:
            self._call("after_train")

    def current_lr(self) -> float:
        where = progress(self.iteration, self.iterations_per_epoch, self.max_iterations, self.update_interval)
        return float(self.lr_scheduler(where))

    def run_step(self, batch: dict[str, Any]) -> None:
        """One optimizer step: lr -> forward -> loss -> backward -> clip -> step."""
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        data = to_device(batch["data"], self.device)
        target = batch["label"].to(self.device, non_blocking=True)
        outputs = self.model(data)
        loss = self.loss_fn(outputs, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._call("after_backward")
        if self.grad_clip is not None:
            max_norm, norm_type = self.grad_clip
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, norm_type)
        self.optimizer.step()
        self.last = StepResult(loss.detach(), outputs, target, batch, lr, batch_size=len(target))
