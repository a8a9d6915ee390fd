"""Parameter schedules from fvcore, built from the specs of config.derive.schedule_spec.

The registrations below are the one declaration of the schedule types: :func:`schedule_keys` reads
each type's keys from its constructor, and config.derive and config.validate ask it. A constructor
receives ``num_epochs`` and, when its signature names it, ``max_iterations`` (the run's optimizer
steps): those two come from the engine, not from YAML.

Every schedule is a function of the progress ``where = iteration / max_iterations`` (see
:func:`progress`). fvcore's ``composite`` measures its lengths in fractions of training, so a
warm-up of a fixed number of steps (big_vision's 10,000) can only be written once the run's length
is known, and its value at a step goes through that fraction's rounding. The ``big_vision`` type
counts in steps: ``value x min(1, t / warmup_steps) x decay(clip((t - W) / (T - W), 0, 1))``, with
``t = round(where x T)`` recovered exactly (``where = t / T``), so step 0 is 0 and the value at each
step is big_vision's ``utils.py::create_learning_rate_schedule`` (which computes in float32; this,
in float64).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)

from vissl_vit.errors import ConfigError
from vissl_vit.registry import SCHEDULERS

ENGINE_ARGUMENTS = ("num_epochs", "max_iterations")  # passed by the engine, not written in YAML
BIG_VISION_DECAYS = ("cosine", "linear")

SCHEDULERS.register("constant")(lambda value, num_epochs: ConstantParamScheduler(value))
SCHEDULERS.register("linear")(lambda start_value, end_value, num_epochs: LinearParamScheduler(start_value, end_value))
SCHEDULERS.register("cosine")(lambda start_value, end_value, num_epochs: CosineParamScheduler(start_value, end_value))
# milestones are epochs: fvcore maps progress `where` to an epoch with num_updates=num_epochs
SCHEDULERS.register("multistep")(
    lambda values, milestones, num_epochs: MultiStepParamScheduler(list(values), num_epochs, list(milestones))
)


@SCHEDULERS.register("composite")
def _composite(
    schedulers: list[dict], lengths: list[float], interval_scaling: list[str], num_epochs: int, max_iterations: int
):
    return CompositeParamScheduler(
        [build_param_scheduler(s, num_epochs, max_iterations) for s in schedulers],
        list(lengths),
        list(interval_scaling),
    )


class BigVisionParamScheduler(ParamScheduler):
    """big_vision's warm-up and decay, in steps (``utils.py::create_learning_rate_schedule``).

    At step ``t`` of ``T``: ``value x min(1, t / W) x d(p)``, ``p = clip((t - W) / (T - W), 0, 1)``,
    ``d(p) = 0.5 (1 + cos(pi p))`` (cosine, to 0) or ``1 - p`` (linear, to 0); no warm-up factor
    when ``W`` is 0. The warm-up starts at exactly 0, so the first update (t = 0) has value 0, as
    in big_vision (``sched(0) = 0``). Called with progress ``where``, it takes ``t = round(where x
    T)``: ``where = t / T`` as the trainer computes it, so ``t`` is the step itself.

    Args:
        value: the peak value (reached at ``t = W``).
        warmup_steps: W, the steps of the linear warm-up from 0; 0 for none.
        decay_type: cosine or linear.
        max_iterations: T, the run's optimizer steps.
    """

    def __init__(self, value: float, warmup_steps: int, decay_type: str, max_iterations: int) -> None:
        super().__init__()
        self.value, self.warmup_steps, self.decay_type, self.total = value, warmup_steps, decay_type, max_iterations

    def at_step(self, t: int) -> float:
        """The value at optimizer step ``t`` (0-based)."""
        w, total = self.warmup_steps, self.total
        p = min(max((t - w) / float(total - w), 0.0), 1.0)
        decay = 0.5 * (1.0 + math.cos(math.pi * p)) if self.decay_type == "cosine" else 1.0 - p
        lr = self.value * decay
        return lr * min(1.0, t / w) if w else lr

    def __call__(self, where: float) -> float:
        return self.at_step(round(where * self.total))


@SCHEDULERS.register("big_vision")
def _big_vision(
    value: float, warmup_steps: int, decay_type: str, num_epochs: int, max_iterations: int
) -> BigVisionParamScheduler:
    if max_iterations < 1:
        raise ConfigError("A big_vision schedule counts in steps: it needs the run's max_iterations (>= 1).")
    check_big_vision_schedule(warmup_steps, decay_type, max_iterations, "the big_vision schedule")
    return BigVisionParamScheduler(float(value), int(warmup_steps), decay_type, int(max_iterations))


def check_big_vision_schedule(warmup_steps: Any, decay_type: Any, max_iterations: int, where: str) -> None:
    """A ``big_vision`` schedule's keys: an integer warm-up in [0, max_iterations) and a known decay.

    Args:
        warmup_steps: the spec's warmup_steps.
        decay_type: the spec's decay_type.
        max_iterations: the run's optimizer steps.
        where: the spec's config key, for messages.
    """
    if decay_type not in BIG_VISION_DECAYS:
        raise ConfigError(f"{where}.decay_type='{decay_type}': expected one of {', '.join(BIG_VISION_DECAYS)}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ConfigError(f"{where}.warmup_steps={warmup_steps!r}: expected a whole number of steps >= 0.")
    if max_iterations and warmup_steps >= max_iterations:
        raise ConfigError(
            f"{where}.warmup_steps={warmup_steps}: expected fewer steps than the run's {max_iterations} "
            "(the decay needs at least one step after the warm-up)."
        )


def schedule_keys() -> dict[str, tuple[str, ...]]:
    """The keys each schedule type takes in YAML (``{"cosine": ("start_value", "end_value"), ...}``):
    its constructor's arguments but ``num_epochs`` and ``max_iterations``, which the engine passes."""
    return {
        name: tuple(p for p in inspect.signature(SCHEDULERS.get(name)).parameters if p not in ENGINE_ARGUMENTS)
        for name in SCHEDULERS.names()
    }


def build_param_scheduler(spec: dict[str, Any], num_epochs: int, max_iterations: int = 0) -> ParamScheduler:
    """A fvcore ParamScheduler (a function of progress ``where`` in [0, 1)) from a schedule spec.

    Args:
        spec: a schedule spec (config.derive.schedule_spec).
        num_epochs: the run's epochs (multistep milestones are epochs).
        max_iterations: the run's optimizer steps, for the types that count in steps (big_vision);
            0 when unknown, which those types refuse.
    """
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    fn = SCHEDULERS.get(spec["name"])
    if "max_iterations" in inspect.signature(fn).parameters:
        kwargs["max_iterations"] = max_iterations
    return fn(num_epochs=num_epochs, **kwargs)


def progress(iteration: int, iterations_per_epoch: int, max_iterations: int, update_interval: str) -> float:
    """Training progress in [0, 1) at ``iteration``: per step, or frozen within each epoch."""
    if update_interval == "epoch":
        iteration = (iteration // iterations_per_epoch) * iterations_per_epoch
    return iteration / max_iterations
