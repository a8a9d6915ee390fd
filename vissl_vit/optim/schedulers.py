"""Parameter schedules from fvcore, built from the specs of config.derive.schedule_spec.

The registrations below are the one declaration of the schedule types: :func:`schedule_keys` reads
each type's keys from its constructor, and config.derive and config.validate ask it.
"""

from __future__ import annotations

import inspect
from typing import Any

from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)

from vissl_vit.registry import SCHEDULERS

SCHEDULERS.register("constant")(lambda value, num_epochs: ConstantParamScheduler(value))
SCHEDULERS.register("linear")(lambda start_value, end_value, num_epochs: LinearParamScheduler(start_value, end_value))
SCHEDULERS.register("cosine")(lambda start_value, end_value, num_epochs: CosineParamScheduler(start_value, end_value))
# milestones are epochs: fvcore maps progress `where` to an epoch with num_updates=num_epochs
SCHEDULERS.register("multistep")(
    lambda values, milestones, num_epochs: MultiStepParamScheduler(list(values), num_epochs, list(milestones))
)


@SCHEDULERS.register("composite")
def _composite(schedulers: list[dict], lengths: list[float], interval_scaling: list[str], num_epochs: int):
    return CompositeParamScheduler(
        [build_param_scheduler(s, num_epochs) for s in schedulers], list(lengths), list(interval_scaling)
    )


def schedule_keys() -> dict[str, tuple[str, ...]]:
    """The keys each schedule type takes in YAML (``{"cosine": ("start_value", "end_value"), ...}``):
    its constructor's arguments but ``num_epochs``, which the engine passes."""
    return {
        name: tuple(p for p in inspect.signature(SCHEDULERS.get(name)).parameters if p != "num_epochs")
        for name in SCHEDULERS.names()
    }


def build_param_scheduler(spec: dict[str, Any], num_epochs: int) -> ParamScheduler:
    """A fvcore ParamScheduler (a function of progress ``where`` in [0, 1)) from a schedule spec."""
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return SCHEDULERS.get(spec["name"])(num_epochs=num_epochs, **kwargs)


def progress(iteration: int, iterations_per_epoch: int, max_iterations: int, update_interval: str) -> float:
    """Training progress in [0, 1) at ``iteration``: per step, or frozen within each epoch."""
    if update_interval == "epoch":
        iteration = (iteration // iterations_per_epoch) * iterations_per_epoch
    return iteration / max_iterations
