"""Values computed from the config at run time, in one place, and logged.

Nothing here writes back into the config: the run folder's train_config.yaml records these under
``derived`` next to the config they came from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vissl_vit.errors import ConfigError

logger = logging.getLogger(__name__)

# The keys of each schedule type, as fvcore's constructors name them (milestones in epochs).
SCHEDULE_KEYS: dict[str, tuple[str, ...]] = {
    "constant": ("value",),
    "linear": ("start_value", "end_value"),
    "cosine": ("start_value", "end_value"),
    "multistep": ("values", "milestones"),
    "composite": ("schedulers", "lengths", "interval_scaling"),
}
_VALUE_KEYS = ("value", "values", "start_value", "end_value")


@dataclasses.dataclass(frozen=True)
class DerivedValues:
    """What a run derives from its config and the size of its training set."""

    world_size: int
    global_batch_size: int  # images per optimizer step: per replica x world size x accumulation
    grad_accumulation_steps: int
    train_dataset_size: int
    iterations_per_epoch: int
    max_iterations: int
    num_epochs: int
    lr_scale_factor: float
    lr_schedule: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def schedule_spec(sched: dict[str, Any], where: str) -> dict[str, Any]:
    """Keep the keys of one schedule that its type uses (recursively for composite)."""
    name = sched.get("name")
    if name not in SCHEDULE_KEYS:
        raise ConfigError(f"{where}.name='{name}': expected one of {', '.join(SCHEDULE_KEYS)}.")
    extra = set(sched) - set(SCHEDULE_KEYS[name]) - {"name"}
    if where.endswith("]") and extra:  # composite entries are free-form dicts: catch typos there
        raise ConfigError(
            f"{where}: unknown keys {sorted(extra)} for a {name} schedule; it takes {SCHEDULE_KEYS[name]}."
        )
    spec: dict[str, Any] = {"name": name}
    for key in SCHEDULE_KEYS[name]:
        if key not in sched:
            raise ConfigError(f"{where}: a {name} schedule needs '{key}'.")
        spec[key] = sched[key]
    if name == "composite":
        spec["schedulers"] = [
            schedule_spec(dict(s), f"{where}.schedulers[{i}]") for i, s in enumerate(sched["schedulers"])
        ]
        if not spec["interval_scaling"]:
            spec["interval_scaling"] = ["rescaled"] * len(spec["schedulers"])
    if name == "multistep" and len(spec["values"]) != len(spec["milestones"]) + 1:
        raise ConfigError(
            f"{where}: multistep needs one more value than milestones; got {spec['values']} and {spec['milestones']}."
        )
    return spec


def scale_schedule(spec: dict[str, Any], factor: float) -> dict[str, Any]:
    """Multiply every value of a schedule spec by ``factor``; warm-ups and shapes are kept."""
    out = dict(spec)
    for key in _VALUE_KEYS:
        if key in out:
            out[key] = [v * factor for v in out[key]] if isinstance(out[key], list) else out[key] * factor
    if "schedulers" in out:
        out["schedulers"] = [scale_schedule(s, factor) for s in out["schedulers"]]
    return out


def schedule_values(spec: dict[str, Any], where: str) -> list[tuple[str, float]]:
    """Every value of a schedule spec with the key it came from, e.g. ``("...lr.values[1]", 0.01)``."""
    out: list[tuple[str, float]] = []
    for key in _VALUE_KEYS:
        if key in spec:
            vals = spec[key] if isinstance(spec[key], list) else [spec[key]]
            names = (
                [f"{where}.{key}[{i}]" for i in range(len(vals))] if isinstance(spec[key], list) else [f"{where}.{key}"]
            )
            out += list(zip(names, vals))
    for i, sub in enumerate(spec.get("schedulers", [])):
        out += schedule_values(sub, f"{where}.schedulers[{i}]")
    return out


def lr_scale_factor(cfg: DictConfig) -> float:
    """Auto LR scaling's factor (global batch / base_lr_batch_size, or its sqrt); 1 when off."""
    auto = cfg.OPTIMIZER.param_schedulers.lr.auto_lr_scaling
    if not auto.auto_scale:
        return 1.0
    world = cfg.DISTRIBUTED.NUM_NODES * cfg.DISTRIBUTED.NUM_PROC_PER_NODE
    global_batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA * world * cfg.OPTIMIZER.grad_accumulation_steps
    ratio = global_batch / auto.base_lr_batch_size
    return ratio if auto.scaling_type == "linear" else math.sqrt(ratio)


def derive_run_values(cfg: DictConfig, train_dataset_size: int) -> DerivedValues:
    """Compute world size, global batch, iterations and the (auto-scaled) LR schedule, and log them.

    Args:
        cfg: the ``config`` node.
        train_dataset_size: number of images of the training set (after DATA_LIMIT).
    """
    world = cfg.DISTRIBUTED.NUM_NODES * cfg.DISTRIBUTED.NUM_PROC_PER_NODE
    per_replica = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    accum = cfg.OPTIMIZER.grad_accumulation_steps
    if accum < 1:
        raise ConfigError(f"config.OPTIMIZER.grad_accumulation_steps={accum} must be at least 1.")
    global_batch = per_replica * world * accum  # images per optimizer step
    if cfg.DATA.TRAIN.DROP_LAST:
        iters = train_dataset_size // global_batch
    else:
        iters = math.ceil(math.ceil(math.ceil(train_dataset_size / world) / per_replica) / accum)
    if iters == 0 and not cfg.TEST_ONLY:
        raise ConfigError(
            f"The training set has {train_dataset_size} images, fewer than one global batch of {global_batch} "
            f"(config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={per_replica} x {world} processes x {accum} accumulation "
            "steps) with DROP_LAST=True: "
            "lower the batch size or set DROP_LAST=False."
        )
    lr_cfg = OmegaConf.to_container(cfg.OPTIMIZER.param_schedulers.lr, resolve=True)
    spec = schedule_spec(lr_cfg, "config.OPTIMIZER.param_schedulers.lr")
    auto = lr_cfg["auto_lr_scaling"]
    factor = lr_scale_factor(cfg)
    if auto["auto_scale"]:
        spec = scale_schedule(spec, factor)
    derived = DerivedValues(
        world_size=world,
        global_batch_size=global_batch,
        grad_accumulation_steps=accum,
        train_dataset_size=train_dataset_size,
        iterations_per_epoch=iters,
        max_iterations=iters * cfg.OPTIMIZER.num_epochs,
        num_epochs=cfg.OPTIMIZER.num_epochs,
        lr_scale_factor=factor,
        lr_schedule=spec,
    )
    logger.info(
        "Derived: world size %d, global batch %d (%d per replica), %d training images, %d iterations/epoch, "
        "%d iterations in all",
        world,
        global_batch,
        per_replica,
        train_dataset_size,
        iters,
        derived.max_iterations,
    )
    if auto["auto_scale"]:
        logger.info(
            "Auto LR scaling (%s): base lr %g at batch %d -> %g at global batch %d (every schedule value x %.4g)",
            auto["scaling_type"],
            auto["base_value"],
            auto["base_lr_batch_size"],
            auto["base_value"] * factor,
            global_batch,
            factor,
        )
    logger.info("LR schedule: %s", spec)
    return derived
