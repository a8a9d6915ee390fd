"""Optimizers (registered in OPTIMIZERS), parameter groups and schedules (SCHEDULERS)."""

from vissl_vit.optim.build import build_lr_scheduler, build_optimizer, build_wd_scheduler
from vissl_vit.optim.param_groups import get_param_groups
from vissl_vit.optim.schedulers import build_param_scheduler, progress, schedule_keys

__all__ = [
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_scheduler",
    "build_wd_scheduler",
    "get_param_groups",
    "progress",
    "schedule_keys",
]
