"""build_optimizer and build_lr_scheduler: OPTIMIZER.* -> torch optimizer and fvcore schedule."""

from __future__ import annotations

import torch
from fvcore.common.param_scheduler import ParamScheduler
from omegaconf import DictConfig
from torch import nn

from vissl_vit.config.derive import DerivedValues
from vissl_vit.errors import ConfigError
from vissl_vit.optim.param_groups import get_param_groups
from vissl_vit.optim.schedulers import build_param_scheduler
from vissl_vit.registry import OPTIMIZERS


def _fused(groups: list[dict]) -> bool:
    return all(p.is_cuda for g in groups for p in g["params"])


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict], lr: float, momentum: float, nesterov: bool, **_: object) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=_fused(groups) or None)


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict], lr: float, betas: list[float], eps: float, **_: object) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=_fused(groups) or None)


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``OPTIMIZER.name`` over the model's parameter groups.

    The learning rate is set by the schedule at every step; the initial value here is its start.

    Args:
        cfg: the ``config`` node.
        model: the model (on its device already, for fused kernels).
    """
    o = cfg.OPTIMIZER
    groups = get_param_groups(
        model, o.weight_decay, o.regularize_bn, o.regularize_bias, list(o.non_regularized_parameters)
    )
    if not any(g["params"] for g in groups):
        if not cfg.TEST_ONLY:
            raise ConfigError("The model has no trainable parameter (all frozen): nothing to train.")
        # TEST_ONLY of a frozen model: the trainer still holds an optimizer; it never steps
        groups = [{"params": [nn.Parameter(torch.zeros(1))], "weight_decay": 0.0}]
    return OPTIMIZERS.get(o.name)(
        groups, lr=0.0, momentum=o.momentum, nesterov=o.nesterov, betas=list(o.betas), eps=o.eps
    )


def build_lr_scheduler(derived: DerivedValues) -> ParamScheduler:
    """The learning-rate schedule (already auto-scaled in ``derived``)."""
    return build_param_scheduler(derived.lr_schedule, derived.num_epochs)
