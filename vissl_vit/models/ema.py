"""Exponential moving averages of weights: one routine, used by the model EMA and by MoCo's momentum encoder.

``ema = decay * ema + (1 - decay) * source`` on floating tensors; other tensors (integer buffers
such as BatchNorm's ``num_batches_tracked``) are copied, since an average of counters means
nothing (timm's ModelEmaV3 copies them too; its v1 averages them and truncates).

:class:`ModelEma` is timm's ``ModelEma`` (v1, the one DeiT trains with, ``timm/utils/model_ema.py``):
a frozen copy of the whole model, averaged over its whole state dict (parameters and buffers)
after each optimizer step. VISSL's HOOKS.EMA_MODEL builds one (engine/hooks/ema.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def ema_update_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], decay: float) -> None:
    """In place: ``t = decay * t + (1 - decay) * s`` for each floating target, ``t = s`` for the others.

    Two fused multi-tensor kernels (``torch._foreach_mul_`` then ``torch._foreach_add_`` with
    ``alpha = 1 - decay``) over all the floating tensors, whatever their number.

    Args:
        targets: the averages, updated in place.
        sources: the current values, in the same order and of the same shapes (and devices).
        decay: the weight of the old average, in [0, 1] (1 keeps it, 0 copies the source).
    """
    if len(targets) != len(sources):
        raise ValueError(f"ema_update_: {len(targets)} targets but {len(sources)} sources")
    floats = [i for i, t in enumerate(targets) if t.is_floating_point()]
    others = [i for i, t in enumerate(targets) if not t.is_floating_point()]
    if floats:
        avg = [targets[i] for i in floats]
        torch._foreach_mul_(avg, decay)
        torch._foreach_add_(avg, [sources[i] for i in floats], alpha=1.0 - decay)
    for i in others:
        targets[i].copy_(sources[i])


def plain_module(model: nn.Module) -> nn.Module:
    """The module inside DDP's wrapper and torch.compile's (its ``module`` / ``_orig_mod``)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class ModelEma:
    """A frozen copy of a model that follows it as an exponential moving average.

    The copy (``module``) is in eval mode, without gradients, on ``device``: it is read by test
    phases and saved in checkpoints, never trained. It is made from the unwrapped model (after
    ``.to(device)``, without DDP's or torch.compile's wrapper), as timm's ModelEma is built before DDP.

    Args:
        model: the model to follow (a DDP or compiled wrapper is looked through).
        device: where the copy lives (None: the model's own device). On another device than the
            model (a CPU copy of a GPU model saves GPU memory), each update copies the model's
            tensors there.
    """

    def __init__(self, model: nn.Module, device: torch.device | None = None) -> None:
        self.module = copy.deepcopy(plain_module(model))
        if device is not None:
            self.module.to(device)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        # the averaged tensors, in state-dict order: parameters and buffers (they share storage)
        self._names = list(self.module.state_dict(keep_vars=True))
        self._tensors = [t.detach() for t in self.module.state_dict(keep_vars=True).values()]

    @property
    def device(self) -> torch.device:
        """The device of the copy (of its first tensor; the CPU for a model without any)."""
        return self._tensors[0].device if self._tensors else torch.device("cpu")

    def _sources(self, model: nn.Module) -> list[torch.Tensor]:
        """The model's tensors in the copy's order, on the copy's device."""
        state = plain_module(model).state_dict(keep_vars=True)
        if list(state) != self._names:
            missing = sorted(set(self._names) - set(state))
            extra = sorted(set(state) - set(self._names))
            raise ValueError(
                f"ModelEma: the model's state-dict keys differ from the copy's: missing {missing[:5]}, extra {extra[:5]}"
            )
        device = self.device
        # a blocking copy: a non-blocking one to the CPU could be read before it lands
        return [t.detach().to(device) for t in state.values()]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """``ema = decay * ema + (1 - decay) * model`` over the whole state dict (non-floats copied)."""
        ema_update_(self._tensors, self._sources(model), decay)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Make the copy equal to the model (VISSL's warm-up overwrites the EMA so)."""
        torch._foreach_copy_(self._tensors, self._sources(model))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The copy's state dict, on the CPU (detached copies: the file does not follow later updates)."""
        return {k: t.detach().to("cpu", copy=True) for k, t in zip(self._names, self._tensors)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy a :meth:`state_dict` into the copy, in place (on its device)."""
        self.module.load_state_dict(state, strict=True)
