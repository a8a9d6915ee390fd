"""The training loop: it only loops; hooks do everything else (logs, meters, tests, checkpoints).

The host waits for the device only at sync points (:class:`StepScalars`): every ``sync_every``
steps (LOG_FREQUENCY), at the end of an epoch and at a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from fvcore.common.param_scheduler import ParamScheduler
from torch import nn
from torch.amp.grad_scaler import OptState
from torch.utils.data import DataLoader

from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.optim.schedulers import progress
from vissl_vit.utils.distributed import get_world_size
from vissl_vit.utils.tensors import to_device

logger = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    """One forward/backward of a step: the model's outputs (not detached: read them under
    no_grad), the target on the device, and the loader's batch."""

    outputs: list[Any]
    target: torch.Tensor
    batch: dict[str, Any]


@dataclass
class StepResult:
    """What the last optimizer step produced, for the hooks to read. It is set before the
    optimizer step (``before_optimizer_step`` hooks read it). A guard's verdict is read at the next
    sync point (:class:`StepScalars`), so after a guard stopped the run it describes the step of
    that sync point, which the run then skipped too; the message names the rejected one."""

    loss: torch.Tensor  # mean over the micro-batches, detached
    micro: list[MicroBatch]
    lr: float
    batch_size: int  # images in the step on this process
    # total gradient norm before clipping (unscaled); None when not computed (no clipping, and no
    # hook asked for it: see Trainer.total_grad_norm)
    grad_norm: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Reducer = Callable[[torch.Tensor], torch.Tensor]
# (images, target, micro-batch number) -> (images, target), on the training device; the number
# counts micro-batches from the run's start (iteration x accumulation + i), so a transform that
# draws from it (seeded by it) resumes exactly with no state of its own
BatchTransform = Callable[[Any, torch.Tensor, int], tuple[Any, torch.Tensor]]
# a check of step scalars: [(step, the values as read on the host)] for the steps since the last read
Check = Callable[[list[tuple[int, list[float]]]], None]


class StepScalars:
    """The small numbers of each step that the host must see and the ranks must agree on (a
    non-finite loss or gradient, unreadable images, a stop request, the logged loss), kept on the
    device until a sync point and then reduced and read together.

    Hooks :meth:`add` values during a step (no host read, no collective); at a sync point
    (:meth:`Trainer.sync`: every ``sync_every`` steps, the end of an epoch, a checkpoint) the
    values of all the steps since the last one are concatenated, reduced with one call per
    reducer (the engine gives every hook the same ``all_reduce_sum``: one collective), read with
    one ``tolist`` (one host sync), and each name's check runs on them, in the order the checks
    were first added: a guard's check may raise, before any hook sees the step. timm and DINO
    likewise read their scalars once per log interval, not every step.

    Args:
        device: where the values are reduced (the training device: NCCL carries CUDA tensors).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step = 0  # the step the trainer is in (1-based): what add() files the values under
        self._pending: dict[int, dict[str, tuple[torch.Tensor, Reducer | None]]] = {}
        self._checks: dict[str, Check] = {}
        self._latest: dict[str, list[float]] = {}

    def add(self, name: str, values: torch.Tensor, reducer: Reducer | None = None, check: Check | None = None) -> None:
        """File ``values`` (any shape, flattened) under ``name`` for this step.

        Args:
            name: the values' name (one add per name and step; a second replaces the first).
            values: on any device; moved to ``device`` as float64 without waiting for it.
            reducer: sums over ranks (``all_reduce_sum``), or None to read this rank's values as they are.
            check: called at each read with this name's rows; the first one given for a name is kept.
        """
        values = values.detach().reshape(-1).to(self.device, torch.float64, non_blocking=True)
        self._pending.setdefault(self.step, {})[name] = (values, reducer)
        if check is not None:
            self._checks.setdefault(name, check)

    def has_pending(self, name: str) -> bool:
        """Whether ``name`` was added since the last read."""
        return any(name in row for row in self._pending.values())

    def latest(self, name: str) -> list[float] | None:
        """The values of ``name`` of the latest step read, or None if none was."""
        return self._latest.get(name)

    def read(self) -> None:
        """Reduce and read what was added since the last read, then run the checks (no-op when nothing was)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}  # a check may cause a read (a checkpoint): nothing twice
        groups: dict[Reducer | None, list[torch.Tensor]] = {}
        for row in pending.values():  # the same steps and names, in the same order, on every rank
            for values, reducer in row.values():
                groups.setdefault(reducer, []).append(values)
        parts = [torch.cat(ts) if r is None else r(torch.cat(ts)) for r, ts in groups.items()]
        flat = torch.cat(parts).tolist()  # the one host sync
        start, at = 0, {}
        for r, part in zip(groups, parts):
            at[r], start = start, start + part.numel()
        rows: dict[str, list[tuple[int, list[float]]]] = {}
        for step, row in pending.items():
            for name, (values, reducer) in row.items():
                got = flat[at[reducer] : at[reducer] + values.numel()]
                at[reducer] += values.numel()
                rows.setdefault(name, []).append((step, got))
                self._latest[name] = got
        for name, check in list(self._checks.items()):
            if name in rows:
                check(rows[name])


def plain_norm(norm: torch.Tensor) -> torch.Tensor:
    """A norm from clip_grad_norm_ / get_total_norm as a plain tensor: an FSDP (DTensor) norm is
    reduced over the shards, so that every rank sees the same value."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def resume_iteration(state: dict[str, Any], iterations_per_epoch: int) -> int:
    """The iteration to resume at: the same one, or the same point of the same epoch when the
    steps per epoch changed (another world size, batch size or accumulation)."""
    old_ipe = state["iterations_per_epoch"]
    if old_ipe == iterations_per_epoch:
        return state["iteration"]
    epoch, within = divmod(state["iteration"], old_ipe)
    new = epoch * iterations_per_epoch + (within * iterations_per_epoch) // old_ipe
    logger.warning(
        "The checkpoint was written with %d iterations per epoch (world size %d), this run has %d (world size %d): "
        "resuming at iteration %d (epoch %d, %d%% through it) instead of %d.",
        old_ipe,
        state["world_size"],
        iterations_per_epoch,
        get_world_size(),
        new,
        epoch,
        100 * within // old_ipe,
        state["iteration"],
    )
    return new


class Trainer:
    """Runs ``max_iterations`` optimizer steps over ``train_loader``, calling hooks in order.

    ``iteration`` counts completed optimizer steps; ``epoch`` is ``iteration // iterations_per_epoch``.
    Each step takes ``accumulation`` micro-batches from the loader. A resumed trainer starts
    mid-epoch: the sampler skips the steps already taken.

    Args:
        model: the model (possibly wrapped in DDP or sharded with FSDP).
        loss_fn: ``loss_fn(outputs, target) -> scalar``.
        optimizer: torch optimizer whose param groups get the scheduled lr each step.
        lr_scheduler: fvcore schedule, a function of progress in [0, 1).
        train_loader: loader whose sampler has set_epoch / set_start_iteration.
        iterations_per_epoch: optimizer steps per epoch.
        max_iterations: optimizer steps in all.
        update_interval: "step" or "epoch" (when the lr changes).
        device: where batches go.
        grad_clip: (max_norm, norm_type), or None for no clipping.
        accumulation: micro-batches per optimizer step.
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16), or None for full precision.
        wd_scheduler: fvcore schedule of the weight decay, a function of progress (set every step
            in each group with a ``wd_scale``, times it); None leaves the groups' weight decay as built.
        sync_every: steps between the host's reads of the step scalars (LOG_FREQUENCY in the
            engine; see :class:`StepScalars`); the end of each epoch and the last step are read too.
        batch_transform: applied to each micro-batch on the device before the forward (see
            ``BatchTransform``), e.g. big_vision's mixup; None for none.
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
        accumulation: int = 1,
        amp_dtype: torch.dtype | None = None,
        wd_scheduler: ParamScheduler | None = None,
        sync_every: int = 1,
        batch_transform: BatchTransform | None = None,
    ) -> None:
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.lr_scheduler, self.train_loader = lr_scheduler, train_loader
        self.wd_scheduler = wd_scheduler
        self.iterations_per_epoch, self.max_iterations = iterations_per_epoch, max_iterations
        self.update_interval, self.device, self.grad_clip = update_interval, device, grad_clip
        self.accumulation, self.amp_dtype = accumulation, amp_dtype
        self.batch_transform = batch_transform
        # float16 needs loss scaling; bfloat16 has float32's range
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.iteration = 0
        self.phase_idx = 0  # phases (train and test) written to metrics.json so far
        self.hooks: list[HookBase] = []
        self.last: StepResult | None = None
        self.sync_every = max(int(sync_every), 1)
        self.scalars = StepScalars(device)
        self._skip: torch.Tensor | None = None  # set on the device by a guard: no update until the next sync
        # on the CPU the host is the device: reading a flag waits for nothing, so a flagged step is
        # skipped by reading it (exact, optimizer state included) instead of restoring the weights
        # (a copy of every parameter per step, about 2% of a ViT-Ti step on 2 cores); tests set it
        # False to run the path a GPU takes
        self.read_flags_on_host = device.type == "cpu"

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to (0-based)."""
        return self.iteration // self.iterations_per_epoch

    @property
    def epochs_done(self) -> int:
        """Epochs begun and ended so far: at an epoch's end, its number + 1. A step budget
        (OPTIMIZER.num_train_steps) may end the last epoch early; it still counts as one."""
        return -(-self.iteration // self.iterations_per_epoch)

    def register_hooks(self, hooks: list[HookBase]) -> None:
        """Append hooks, called in list order; each gets ``hook.trainer``, a weak proxy of this trainer.

        The trainer owns its hooks, the hooks only borrow the trainer (detectron2's
        ``weakref.proxy(self)``): no reference cycle keeps a finished trainer, its model and its
        loader alive after the caller drops it; a hook used after that raises ReferenceError.
        """
        for h in hooks:
            h.trainer = weakref.proxy(self)
        self.hooks.extend(hooks)

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own state, as checkpoints store it at their top level: the grad scaler,
        the position (iteration, epoch, phase_idx, and the steps per epoch and world size it was
        counted with), and each hook's state under its class name. Model, optimizer, loss and RNG
        states are the checkpoint hook's to gather (they take collectives).

        The step scalars are read first (:meth:`sync`, on every rank, as checkpoints are taken): a
        step a guard rejects raises there, so no checkpoint holds an unchecked step."""
        self.sync()
        hooks = {type(h).__name__: h.state_dict() for h in self.hooks}
        return {
            "grad_scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "epoch": self.epoch,
            "phase_idx": self.phase_idx,
            "iterations_per_epoch": self.iterations_per_epoch,
            "world_size": get_world_size(),
            "hooks": {name: s for name, s in hooks.items() if s},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (after the hooks are registered). A checkpoint counted with
        another number of steps per epoch resumes at the same point of the same epoch."""
        self.scaler.load_state_dict(state["grad_scaler"])
        self.iteration = resume_iteration(state, self.iterations_per_epoch)
        self.phase_idx = state["phase_idx"]
        for h in self.hooks:
            if type(h).__name__ in state["hooks"]:
                h.load_state_dict(state["hooks"][type(h).__name__])

    def _call(self, name: str) -> None:
        for h in self.hooks:
            getattr(h, name)()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for forward and loss when AMP is on (also used by test phases)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train(self) -> None:
        """Train until max_iterations; after_train runs even when a hook or step raises."""
        logger.info("Training from iteration %d to %d", self.iteration, self.max_iterations)
        self.completed = False  # True once the last step and its epoch's hooks have run without error
        self._call("before_train")
        try:
            while self.iteration < self.max_iterations:
                sampler = self.train_loader.sampler
                sampler.set_epoch(self.epoch)
                sampler.set_start_iteration(self.iteration % self.iterations_per_epoch)
                self.model.train()
                self._call("before_epoch")
                for micro in self._epoch_steps():
                    self.step(micro)
                self.sync()  # what the last after_step added, before the epoch's test phase and checkpoint
                self._call("after_epoch")
            self.completed = True
        finally:
            self._call("after_train")

    def _epoch_steps(self) -> Iterator[list[dict[str, Any]]]:
        """The rest of this epoch's steps, each a list of ``accumulation`` loader batches (the
        epoch's last step may have fewer, when the loader runs out)."""
        # a step budget (OPTIMIZER.num_train_steps) may end the run inside an epoch
        epoch_end = min((self.epoch + 1) * self.iterations_per_epoch, self.max_iterations)
        micro: list[dict[str, Any]] = []
        for batch in self.train_loader:
            micro.append(batch)
            if len(micro) < self.accumulation:
                continue
            yield micro
            micro = []
            if self.iteration >= epoch_end:
                return
        if micro and self.iteration < epoch_end:
            yield micro

    def sync(self) -> None:
        """A sync point: reduce and read the step scalars (:class:`StepScalars`); their checks may raise.

        Called by the loop every ``sync_every`` steps, at the end of each epoch and after the
        last step, by :meth:`state_dict`, and by any hook that needs the values now (a no-op when
        nothing was added since the last read). A step flagged by a guard raises here at the latest.
        """
        self.scalars.read()
        self._skip = None  # the checks passed: no rank flagged a step since the last sync

    def skip_optimizer_step(self, flag: torch.Tensor) -> None:
        """Leave the weights untouched at this step where ``flag`` (a bool tensor on the device) is
        True, and at every step until the next sync point, decided on the device (no host read).
        The guard that flags a step raises at the sync (see :meth:`_optimizer_step`)."""
        self._skip = flag if self._skip is None else self._skip | flag

    def total_grad_norm(self) -> torch.Tensor:
        """The 2-norm of all the model's gradients together (as clip_grad_norm_ computes it)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return plain_norm(torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False))

    def current_lr(self) -> float:
        where = progress(self.iteration, self.iterations_per_epoch, self.max_iterations, self.update_interval)
        return float(self.lr_scheduler(where))

    def current_weight_decay(self) -> float | None:
        """The scheduled weight decay of the decayed groups now, None without a schedule."""
        if self.wd_scheduler is None:
            return None
        where = progress(self.iteration, self.iterations_per_epoch, self.max_iterations, self.update_interval)
        return float(self.wd_scheduler(where))

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch (DDP's no_sync; FSDP's
        requires_gradient_sync)."""
        if last:
            if hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def step(self, micro: list[dict[str, Any]]) -> None:
        """One optimizer step over micro-batches, with its hook events: before_step -> lr ->
        (forward -> loss -> backward) x N -> after_backward -> clip -> before_optimizer_step (the
        guards) -> optimizer step -> iteration + 1 -> the step scalars read, at a sync point ->
        after_step."""
        self.scalars.step = self.iteration + 1
        self._call("before_step")
        lr, wd = self.current_lr(), self.current_weight_decay()
        for group in self.optimizer.param_groups:
            # each group's factor (layer decay, overrides: optim/param_groups.py); a plain torch
            # optimizer (toy tests) has none
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if wd is not None and group.get("wd_scale") is not None:  # None: a fixed weight decay
                group["weight_decay"] = wd * group["wd_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        done, total, images = [], torch.zeros((), device=self.device), 0
        for i, batch in enumerate(micro):
            data = to_device(batch["data"], self.device)
            target = batch["label"].to(self.device, non_blocking=True)
            if self.batch_transform is not None:  # on the device, after the transfer (big_vision's mixup)
                data, target = self.batch_transform(data, target, self.iteration * self.accumulation + i)
            with self._no_sync(last=i == len(micro) - 1):
                with self.autocast():
                    outputs = self.model(data)
                    loss = self.loss_fn(outputs, target)
                # each micro-batch's mean loss counts 1/N: the step's gradient is the mean over all
                self.scaler.scale(loss / len(micro)).backward()
            total += loss.detach().float() / len(micro)
            images += len(target)
            done.append(MicroBatch(outputs, target, batch))
        self._call("after_backward")  # hooks may drop gradients here (frozen parameters)
        grad_norm = None
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            max_norm, norm_type = self.grad_clip
            grad_norm = plain_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, norm_type))
        self.last = StepResult(total, done, lr, batch_size=images, grad_norm=grad_norm)
        # guards run here: a step they reject never reaches the weights (issue 10, item 8)
        self._call("before_optimizer_step")
        self._optimizer_step()
        self.iteration += 1
        at_end = self.iteration % self.iterations_per_epoch == 0 or self.iteration == self.max_iterations
        if at_end or self.iteration % self.sync_every == 0:
            self.sync()  # the guards' verdict before any hook sees the step
        self._call("after_step")

    def _optimizer_step(self) -> None:
        """``scaler.step(optimizer)``; where a guard flagged the step (:meth:`skip_optimizer_step`)
        the weights stay as they were, decided on the device, so the host need not wait for it.

        - float16 AMP: the flag joins the GradScaler's own inf/NaN record, which skips the step;
        - fused optimizers (torch's SGD, Adam, AdamW on CUDA): ``found_inf``, as GradScaler passes
          it to them, skips the update in the kernel, optimizer state included;
        - on the CPU (``read_flags_on_host``): the flag is read (no device to wait for) and the
          step skipped, optimizer state included;
        - any other optimizer: the step runs and the weights are put back where the flag is set
          (one copy of the parameters per step); its state may then hold the rejected step, but
          the run raises at the next sync point, before any checkpoint.
        """
        opt, skip = self.optimizer, self._skip
        if skip is None:
            self.scaler.step(opt)
        elif self.scaler.is_enabled():
            state = self.scaler._per_optimizer_states[id(opt)]  # torch's record of this optimizer's step
            if state["stage"] is not OptState.UNSCALED:
                self.scaler.unscale_(opt)
            for found in state["found_inf_per_device"].values():
                found.add_(skip.to(found))
            self.scaler.step(opt)
        elif getattr(opt, "_step_supports_amp_scaling", False):
            opt.grad_scale, opt.found_inf = None, skip.to(torch.float32)
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf
        elif self.read_flags_on_host:
            if not skip.item():
                opt.step()
        else:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            local = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # FSDP: this rank's shard
            with torch.no_grad():
                before = [p.detach().clone() for p in local]
                opt.step()
                for p, b in zip(local, before):
                    p.copy_(torch.where(skip, b, p))
        self.scaler.update()
