"""Values computed from the config at run time, in one place, and logged.

Nothing here writes back into the config (the run folder's train_config.yaml records these under
``derived`` next to the config they came from), except :func:`resolve_data`: what a user's own
folder of images decides (its train/ and val/ folders, its number of classes for ``auto``) is
written into the config when it is composed, so that the saved config says it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from vissl_vit.errors import ConfigError

logger = logging.getLogger(__name__)

_VALUE_KEYS = ("value", "values", "start_value", "end_value")  # the lr values of a spec


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
    # OPTIMIZER.param_schedulers.weight_decay (not auto-scaled): the decayed groups' weight decay
    weight_decay_schedule: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def schedule_spec(sched: dict[str, Any], where: str) -> dict[str, Any]:
    """Keep the keys of one schedule that its type uses (recursively for composite).

    The types and their keys are those registered in ``vissl_vit.optim.schedulers`` (one declaration).
    """
    from vissl_vit.optim.schedulers import schedule_keys  # optim.build imports this module

    types = schedule_keys()
    name = sched.get("name")
    if name not in types:
        raise ConfigError(f"{where}.name='{name}': expected one of {', '.join(types)}.")
    extra = set(sched) - set(types[name]) - {"name"}
    if where.endswith("]") and extra:  # composite entries are free-form dicts: catch typos there
        raise ConfigError(f"{where}: unknown keys {sorted(extra)} for a {name} schedule; it takes {types[name]}.")
    spec: dict[str, Any] = {"name": name}
    for key in types[name]:
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
    """Auto LR scaling's factor f(global batch / base_lr_batch_size), f = identity or sqrt; 1 when off.

    The scaled learning rate is ``base_value x`` this factor (VISSL's ``infer_learning_rate``).
    """
    auto = cfg.OPTIMIZER.param_schedulers.lr.auto_lr_scaling
    if not auto.auto_scale:
        return 1.0
    world = cfg.DISTRIBUTED.NUM_NODES * cfg.DISTRIBUTED.NUM_PROC_PER_NODE
    global_batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA * world * cfg.OPTIMIZER.grad_accumulation_steps
    ratio = global_batch / auto.base_lr_batch_size
    return ratio if auto.scaling_type == "linear" else math.sqrt(ratio)


def auto_scaled_schedule(spec: dict[str, Any], cfg: DictConfig, where: str) -> tuple[dict[str, Any], list[str]]:
    """The lr schedule as VISSL's ``get_scaled_lr_scheduler`` rewrites it, and notes to log.

    The schedule is set from ``scaled = base_value x lr_scale_factor(cfg)``; the written values only
    give its shape:
      constant, big_vision: value = scaled;  linear: end_value = scaled;
      cosine: start_value = scaled, end_value = scaled x end_value / start_value;
      multistep: gamma = round(values[1] / values[0], 6), values[i] = round(scaled x gamma^i, 8);
      composite: each sub-schedule as above, then each linear sub-schedule (a warm-up) starts at
        base_value x (batch per node / base_lr_batch_size), linear scaling whatever scaling_type
        (VISSL's ``resolve_linear_schedule``).
    One deliberate difference: on one node, where that start is not below the warm-up's end, VISSL
    deletes the warm-up (VISSL issue #106); here it keeps its configured start_value, with a note.
    The spec is returned unchanged when auto_scale is off.

    Args:
        spec: a schedule spec from :func:`schedule_spec`.
        cfg: the ``config`` node (auto_lr_scaling, batch size, world size).
        where: the spec's config key, for messages.
    """
    auto = cfg.OPTIMIZER.param_schedulers.lr.auto_lr_scaling
    if not auto.auto_scale:
        return spec, []
    scaled = auto.base_value * lr_scale_factor(cfg)
    # the warm-up's start follows the batch of one node (VISSL's rule), per optimizer step here
    node_batch = (
        cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA * cfg.DISTRIBUTED.NUM_PROC_PER_NODE * cfg.OPTIMIZER.grad_accumulation_steps
    )
    warm_start = auto.base_value * node_batch / auto.base_lr_batch_size
    notes: list[str] = []
    out = _scale(spec, scaled, warm_start, cfg.DISTRIBUTED.NUM_NODES, where, notes)
    return out, notes


def _scale(
    spec: dict[str, Any], scaled: float, warm_start: float, num_nodes: int, where: str, notes: list[str]
) -> dict[str, Any]:
    """One level of :func:`auto_scaled_schedule` (recursive for composite)."""
    out = dict(spec)
    name = spec["name"]
    if name in ("constant", "big_vision"):
        out["value"] = scaled
    elif name == "linear":
        out["end_value"] = scaled
    elif name == "cosine":
        if spec["start_value"] == 0:
            raise ConfigError(
                f"{where}.start_value=0: auto_lr_scaling keeps a cosine's end/start ratio, so start_value must "
                "be > 0 (the scaled lr replaces it)."
            )
        out["start_value"] = float(scaled)
        out["end_value"] = float(scaled * spec["end_value"] / spec["start_value"])
    elif name == "multistep":
        values = list(spec["values"])
        if values[0] == 0:
            raise ConfigError(
                f"{where}.values[0]=0: auto_lr_scaling keeps the ratio between steps, so the first value must be > 0."
            )
        gamma = round(values[1] / values[0], 6) if len(values) > 1 else 1.0
        out["values"] = [round(float(scaled * gamma**i), 8) for i in range(len(values))]
    elif name == "composite":
        subs = []
        for i, sub in enumerate(spec["schedulers"]):
            key = f"{where}.schedulers[{i}]"
            new = _scale(sub, scaled, warm_start, num_nodes, key, notes)
            if sub["name"] == "linear":
                if num_nodes == 1 and warm_start <= new["end_value"]:
                    notes.append(
                        f"{key}: the linear warm-up keeps start_value={sub['start_value']:g} (VISSL would delete it "
                        "on one node, VISSL issue #106)"
                    )
                else:
                    new["start_value"] = warm_start
            subs.append(new)
        out["schedulers"] = subs
    return out


def check_schedule_epochs(spec: dict[str, Any], num_epochs: int, where: str) -> None:
    """Multistep milestones are epochs: increasing, each in [1, num_epochs) (fvcore's condition).

    Args:
        spec: a schedule spec from :func:`schedule_spec`.
        num_epochs: ``config.OPTIMIZER.num_epochs``.
        where: the spec's config key, for messages.
    """
    if spec["name"] == "multistep":
        milestones = list(spec["milestones"])
        ok = all(0 < m < num_epochs for m in milestones) and all(a < b for a, b in zip(milestones, milestones[1:]))
        if not ok:
            raise ConfigError(
                f"{where}.milestones={milestones} must be increasing epochs within "
                f"config.OPTIMIZER.num_epochs={num_epochs} (each in 1..{num_epochs - 1}): lower the milestones or "
                "raise num_epochs."
            )
    for i, sub in enumerate(spec.get("schedulers", [])):
        check_schedule_epochs(sub, num_epochs, f"{where}.schedulers[{i}]")


def weight_decay_spec(cfg: DictConfig, num_epochs: int | None = None) -> dict[str, Any]:
    """The weight-decay schedule's spec: ``OPTIMIZER.param_schedulers.weight_decay``, or a constant
    ``OPTIMIZER.weight_decay`` when its name is ``none`` (the default: weight decay as before).

    Args:
        cfg: the ``config`` node.
        num_epochs: the run's epochs (derived from a step budget); None for ``OPTIMIZER.num_epochs``.
    """
    where = "config.OPTIMIZER.param_schedulers.weight_decay"
    sched = OmegaConf.to_container(cfg.OPTIMIZER.param_schedulers.weight_decay, resolve=True)
    if sched["name"] == "none":
        return {"name": "constant", "value": cfg.OPTIMIZER.weight_decay}
    spec = schedule_spec(sched, where)
    check_schedule_epochs(spec, cfg.OPTIMIZER.num_epochs if num_epochs is None else num_epochs, where)
    return spec


def check_schedule_steps(spec: dict[str, Any], max_iterations: int, where: str) -> None:
    """A ``big_vision`` schedule (which counts in steps) fits the run: see
    ``optim.schedulers.check_big_vision_schedule``; recursive for composite.

    Args:
        spec: a schedule spec from :func:`schedule_spec`.
        max_iterations: the run's optimizer steps.
        where: the spec's config key, for messages.
    """
    from vissl_vit.optim.schedulers import check_big_vision_schedule

    if spec["name"] == "big_vision":
        check_big_vision_schedule(spec["warmup_steps"], spec["decay_type"], max_iterations, where)
    for i, sub in enumerate(spec.get("schedulers", [])):
        check_schedule_steps(sub, max_iterations, f"{where}.schedulers[{i}]")


EPOCHS_TO_STEPS = ("loader", "big_vision")


def step_budget(cfg: DictConfig, train_dataset_size: int, global_batch: int, iters: int) -> tuple[int, int, str]:
    """The run's optimizer steps and epochs, and a note to log when they were not given as epochs.

    Three ways, by config:
      - ``OPTIMIZER.num_train_steps`` > 0: that many steps (big_vision's ``total_steps``); the
        epochs are ``ceil(steps / iterations per epoch)``, the last one cut short.
      - else ``OPTIMIZER.epochs_to_steps: big_vision``: ``max(1, round(num_epochs x N / global
        batch))`` steps, big_vision's ``utils.py::steps`` over its infinite iterator (N the training
        images: 111,477 for 90 epochs of 1,268,355 at 1024), epochs derived as above;
      - else (``loader``, the default, VISSL's way): ``num_epochs x iterations per epoch``.

    Args:
        cfg: the ``config`` node.
        train_dataset_size: N, the training images.
        global_batch: images per optimizer step.
        iters: the loader's optimizer steps per epoch.
    """
    o = cfg.OPTIMIZER
    steps = o.get("num_train_steps", 0) or 0
    mode = o.get("epochs_to_steps", "loader")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(
            f"config.OPTIMIZER.num_train_steps={steps!r}: expected a whole number of optimizer steps (0: use num_epochs)."
        )
    if mode not in EPOCHS_TO_STEPS:
        raise ConfigError(f"config.OPTIMIZER.epochs_to_steps='{mode}': expected one of {', '.join(EPOCHS_TO_STEPS)}.")
    if steps == 0 and mode == "loader":
        return iters * o.num_epochs, o.num_epochs, ""
    if steps:
        how = f"config.OPTIMIZER.num_train_steps={steps}"
    else:
        steps = max(1, round(o.num_epochs * train_dataset_size / global_batch))
        how = (
            f"config.OPTIMIZER.epochs_to_steps=big_vision: max(1, round({o.num_epochs} epochs x {train_dataset_size} "
            f"images / {global_batch})) = {steps} steps"
        )
    epochs = math.ceil(steps / iters) if iters else 0
    note = (
        f"{how}; the schedules run over these {steps} steps; {epochs} epochs of {iters} steps "
        f"(ceil), the last {'one cut short' if iters and steps % iters else 'one whole'}; "
        "config.OPTIMIZER.num_epochs is not the length"
        if steps != iters * o.num_epochs
        else f"{how} = {o.num_epochs} epochs of {iters} steps"
    )
    return steps, epochs, note


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
    repeats = cfg.DATA.TRAIN.REPEATED_AUGMENTATIONS
    if repeats > 1:  # DeiT's RASampler keeps floor(N // 256 * 256 / W) samples per rank, not N / W
        from vissl_vit.data.sampler import RepeatedAugmentationSampler

        per_rank = RepeatedAugmentationSampler.samples_per_replica(train_dataset_size, world, repeats)
        if cfg.DATA.TRAIN.DROP_LAST:
            iters = per_rank // (per_replica * accum)
        else:
            iters = math.ceil(math.ceil(per_rank / per_replica) / accum)
    elif cfg.DATA.TRAIN.DROP_LAST:
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
    max_iterations, num_epochs, budget_note = step_budget(cfg, train_dataset_size, global_batch, iters)
    lr_cfg = OmegaConf.to_container(cfg.OPTIMIZER.param_schedulers.lr, resolve=True)
    spec = schedule_spec(lr_cfg, "config.OPTIMIZER.param_schedulers.lr")
    check_schedule_epochs(spec, num_epochs, "config.OPTIMIZER.param_schedulers.lr")
    check_schedule_steps(spec, max_iterations, "config.OPTIMIZER.param_schedulers.lr")
    auto = lr_cfg["auto_lr_scaling"]
    factor = lr_scale_factor(cfg)
    spec, notes = auto_scaled_schedule(spec, cfg, "config.OPTIMIZER.param_schedulers.lr")
    wd_spec = weight_decay_spec(cfg, num_epochs)
    check_schedule_steps(wd_spec, max_iterations, "config.OPTIMIZER.param_schedulers.weight_decay")
    derived = DerivedValues(
        world_size=world,
        global_batch_size=global_batch,
        grad_accumulation_steps=accum,
        train_dataset_size=train_dataset_size,
        iterations_per_epoch=iters,
        max_iterations=max_iterations,
        num_epochs=num_epochs,
        lr_scale_factor=factor,
        lr_schedule=spec,
        weight_decay_schedule=wd_spec,
    )
    if budget_note:
        logger.info("Training length: %s", budget_note)
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
            "Auto LR scaling (%s, VISSL's rule): base_value %g at batch %d -> %g at global batch %d (x %.4g); "
            "the schedule's written values give only its shape",
            auto["scaling_type"],
            auto["base_value"],
            auto["base_lr_batch_size"],
            auto["base_value"] * factor,
            global_batch,
            factor,
        )
        for note in notes:
            logger.info("Auto LR scaling: %s", note)
    logger.info("LR schedule: %s", spec)
    logger.info("Weight-decay schedule (groups with weight decay): %s", wd_spec)
    return derived


# ---------------------------------------------------------------------------------------------------
# A user's own folder of images: split folders, the test data that follows the training data, and
# class counts given as "auto". Resolved once, when the config is composed.
# ---------------------------------------------------------------------------------------------------

AUTO = "auto"  # a head's (or mixup's) class count taken from the training set

# the classes of the data sets torchvision_dataset reads
_TORCHVISION_CLASSES = {"MNIST": 10, "FashionMNIST": 10, "CIFAR10": 10, "CIFAR100": 100, "STL10": 10}


def head_classes(head: Any) -> tuple[str, Any] | None:
    """The key and value of a head's output size (its number of classes as a classifier), or None
    for a head without one: ``num_classes`` of vision_transformer_head, ``dims[-1]`` of mlp and
    eval_mlp.

    Args:
        head: one ``MODEL.HEAD.PARAMS`` entry, ``[name, {kwargs}]``.
    """
    if len(head) != 2 or not hasattr(head[1], "keys"):
        return None
    kwargs = head[1]
    if head[0] == "vision_transformer_head" and "num_classes" in kwargs:
        return "num_classes", kwargs["num_classes"]
    if head[0] in ("mlp", "eval_mlp") and "dims" in kwargs and len(kwargs["dims"]):
        return "dims[-1]", kwargs["dims"][-1]
    return None


def class_count(cfg: DictConfig, split: str) -> tuple[int | None, str]:
    """The number of classes of a split's data (the largest over its sources) and where it comes
    from; (None, why) when it cannot be known before reading the data.

    Args:
        cfg: the ``config`` node.
        split: "TRAIN" or "TEST".
    """
    from vissl_vit.data.datasets.disk import class_folders

    d = cfg.DATA[split]
    counts: list[tuple[int, str]] = []
    for k, source in enumerate(d.DATA_SOURCES):
        path = str(d.DATA_PATHS[k]) if k < len(d.DATA_PATHS) else ""
        name = str(d.DATASET_NAMES[k]) if k < len(d.DATASET_NAMES) else ""
        if source != "synthetic" and k >= len(d.DATA_PATHS):
            return (
                None,
                f"config.DATA.{split}.DATA_PATHS has no path for source {k} (e.g. DATA_PATHS=[/path/to/images])",
            )
        if source == "synthetic":
            counts.append((int(cfg.DATA.SYNTHETIC.NUM_CLASSES), "config.DATA.SYNTHETIC.NUM_CLASSES"))
        elif source == "disk_folder":
            if not os.path.isdir(path):
                return None, f"config.DATA.{split}.DATA_PATHS[{k}]='{path}' is not a folder"
            classes = class_folders(path)
            if not classes:
                return None, f"config.DATA.{split}.DATA_PATHS[{k}]='{path}' has no class folders (a flat folder)"
            counts.append((len(classes), f"the class folders of '{path}'"))
        elif source == "tar_shards":
            from vissl_vit.data.datasets.shards import ShardSource

            shards = ShardSource(path)  # reads the shards' index (cached beside them after the first time)
            if shards.flat:
                return None, f"config.DATA.{split}.DATA_PATHS[{k}]='{path}' has no .cls labels (unlabeled shards)"
            counts.append((len(shards.classes), f"the .cls labels of '{path}'"))
        elif source == "torchvision_dataset" and name in _TORCHVISION_CLASSES:
            counts.append((_TORCHVISION_CLASSES[name], name))
        elif source == "disk_filelist" and k < len(d.LABEL_PATHS) and os.path.isfile(str(d.LABEL_PATHS[k])):
            labels = np.load(str(d.LABEL_PATHS[k]), mmap_mode="r", allow_pickle=False)
            counts.append((int(labels.max()) + 1 if len(labels) else 0, f"the labels of '{d.LABEL_PATHS[k]}'"))
        else:
            return None, f"config.DATA.{split}.DATA_SOURCES[{k}]={source} has no known class count"
    if not counts:
        return None, f"config.DATA.{split}.DATA_SOURCES is empty"
    return max(counts)


def _auto_slots(cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """Every place that says "auto" for a class count: (key, container, index) to assign to."""
    slots: list[tuple[str, Any, Any]] = []
    for i, head in enumerate(cfg.MODEL.HEAD.PARAMS):
        found = head_classes(head)
        if found is None or found[1] != AUTO:
            continue
        key = f"config.MODEL.HEAD.PARAMS[{i}] '{head[0]}' {found[0]}"
        if found[0] == "num_classes":
            slots.append((key, head[1], "num_classes"))
        else:
            slots.append((key, head[1]["dims"], len(head[1]["dims"]) - 1))
    for split in ("TRAIN", "TEST"):
        params = cfg.DATA[split].COLLATE_FUNCTION_PARAMS
        if params.get("num_classes") == AUTO:
            slots.append((f"config.DATA.{split}.COLLATE_FUNCTION_PARAMS.num_classes", params, "num_classes"))
    mixup = cfg.DATA.TRAIN.get("DEVICE_MIXUP")
    # only when on: a run without it (self-supervised data without labels) need not know its classes
    if mixup is not None and mixup.get("p", 0) and mixup.get("num_classes") == AUTO:
        slots.append(("config.DATA.TRAIN.DEVICE_MIXUP.num_classes", mixup, "num_classes"))
    return slots


def _resolve_split_folders(cfg: DictConfig, split: str, notes: list[str]) -> None:
    """Rule 1 of :func:`resolve_data`, for one split."""
    from vissl_vit.data.datasets.disk import EVAL_SPLIT_NAMES, TRAIN_SPLIT_NAMES, find_split_folder, split_folders

    d = cfg.DATA[split]
    paths = list(d.DATA_PATHS)
    for k, source in enumerate(d.DATA_SOURCES):
        if source not in ("disk_folder", "disk_filelist") or k >= len(paths):
            continue
        if str(paths[k]).startswith("~"):  # DATA_PATHS=[~/images]: no shell expands a ~ inside brackets
            paths[k] = os.path.expanduser(str(paths[k]))
        root = str(paths[k])
        subs = split_folders(root) if source == "disk_folder" else None
        if subs is None:
            continue
        found = find_split_folder(root, split)
        if found is None:
            names = TRAIN_SPLIT_NAMES if split == "TRAIN" else EVAL_SPLIT_NAMES
            raise ConfigError(
                f"config.DATA.{split}.DATA_PATHS[{k}]='{root}' holds the split folders {subs} but none for {split} "
                f"(looked for {', '.join(names)}): point DATA_PATHS at the folder of class folders."
            )
        paths[k] = found
        notes.append(f"config.DATA.{split}.DATA_PATHS[{k}]: '{root}' holds split folders, {split} reads '{found}'")
    if paths != list(d.DATA_PATHS):
        d.DATA_PATHS = paths


def _eval_folder_next_to(root: str) -> str | None:
    """The val folder of a data set root, or next to its train folder (root/train -> root/val)."""
    from vissl_vit.data.datasets.disk import TRAIN_SPLIT_NAMES, find_split_folder

    found = find_split_folder(root, "TEST")
    if found is None and os.path.basename(os.path.normpath(root)) in TRAIN_SPLIT_NAMES:
        found = find_split_folder(os.path.dirname(os.path.normpath(root)), "TEST")
    return found


def _test_follows_train(cfg: DictConfig, train_roots: dict[int, str], notes: list[str]) -> None:
    """Rule 2 of :func:`resolve_data`."""
    from vissl_vit.data.datasets.disk import EVAL_SPLIT_NAMES

    test, train_sources = cfg.DATA.TEST, list(cfg.DATA.TRAIN.DATA_SOURCES)
    sources = list(test.DATA_SOURCES)
    tested = cfg.ENGINE_NAME == "train" and cfg.TEST_MODEL
    follow = bool(sources) and all(s == "disk_folder" for s in sources) and not len(test.DATA_PATHS)
    synthetic = (
        tested
        and bool(sources)
        and all(s == "synthetic" for s in sources)
        and any(s != "synthetic" for s in train_sources)
    )
    if not (follow or synthetic):
        return
    n = len(sources) if follow else len(train_sources)
    vals = [_eval_folder_next_to(train_roots[k]) if k in train_roots else None for k in range(n)]
    if all(vals):
        if synthetic:
            test.DATA_SOURCES = ["disk_folder"] * n
            test.DATASET_NAMES = list(cfg.DATA.TRAIN.DATASET_NAMES)
        test.DATA_PATHS = vals
        why = "is the synthetic default" if synthetic else "is empty"
        notes.append(f"config.DATA.TEST {why}: the test phase reads the val folder(s) {vals} of DATA.TRAIN")
        return
    k = vals.index(None)
    if k not in train_roots or not os.path.isdir(train_roots[k]):
        return  # no training folder to look in (not given, or missing): reading the data says so
    where = f"'{train_roots[k]}' has no val folder" if k in train_roots else f"source {k} is not a disk_folder"
    looked = f"looked for {', '.join(EVAL_SPLIT_NAMES)} in it and next to a train folder"
    if synthetic:
        raise ConfigError(
            f"config.DATA.TEST.DATA_SOURCES={sources} but config.DATA.TRAIN reads {train_sources} "
            f"({where}; {looked}): a test phase on random images measures nothing. Give the test images "
            "(config.DATA.TEST.DATA_SOURCES=[disk_folder] config.DATA.TEST.DATA_PATHS=[/path/to/val]) or set "
            "config.TEST_MODEL=False."
        )
    if tested or (cfg.ENGINE_NAME != "train" and "TEST" in cfg.EXTRACT_FEATURES.SPLITS):
        raise ConfigError(
            f"config.DATA.TEST.DATA_PATHS is empty and config.DATA.TRAIN's {where} ({looked}): give "
            "config.DATA.TEST.DATA_PATHS=[/path/to/val], or set config.TEST_MODEL=False to train without a test phase."
        )


def resolve_data(cfg: DictConfig) -> list[str]:
    """Fill in what a user's own folders of images decide, in the config itself; return notes to log.

    The one exception to "nothing here writes back into the config", applied when the config is
    composed (before it is frozen): the run folder's train_config.yaml then holds the resolved
    values and reruns that run unchanged, and applying it again changes nothing.
      1. A disk_folder or disk_filelist path starting with ``~`` is expanded (the shell does not
         expand it inside ``[...]``). A disk_folder DATA_PATHS entry that is a folder of splits (root/train, root/val, with
         timm's names: see ``disk.split_folders``) becomes its split's folder: TRAIN reads
         root/train (or training), TEST root/val (or valid, validation, eval, evaluation).
      2. DATA.TEST follows DATA.TRAIN's folders. TEST DATA_SOURCES [disk_folder] with no
         DATA_PATHS reads each TRAIN root's val folder (or the one next to a train folder given
         directly). A TEST that is synthetic (a test config's default) while TRAIN reads real
         images reads those val folders too in a run with a test phase, and is an error when there
         are none: a test phase on random images would report a meaningless accuracy, silently.
      3. "auto" as a class count (vision_transformer_head's num_classes, the last of mlp's and
         eval_mlp's dims, cutmixup_collator's num_classes, DATA.TRAIN.DEVICE_MIXUP's when p > 0)
         becomes the training set's number of classes (the test set's without training data):
         ``class_count``.

    Args:
        cfg: the ``config`` node, not yet read-only.

    Raises:
        ConfigError: a folder of splits without the split, a test phase with no test images to
            read, an "auto" whose class count cannot be known.
    """
    notes: list[str] = []
    d = cfg.DATA.TRAIN
    train_roots = {
        k: str(d.DATA_PATHS[k]) for k, s in enumerate(d.DATA_SOURCES) if s == "disk_folder" and k < len(d.DATA_PATHS)
    }
    for split in ("TRAIN", "TEST"):
        _resolve_split_folders(cfg, split, notes)
    _test_follows_train(cfg, train_roots, notes)
    slots = _auto_slots(cfg)
    if slots:
        split = "TRAIN" if len(cfg.DATA.TRAIN.DATA_SOURCES) else "TEST"
        n, origin = class_count(cfg, split)
        if n is None:
            raise ConfigError(
                f"{slots[0][0]}=auto takes the number of classes of config.DATA.{split}, but {origin}: "
                "give the folder, or a number instead of auto."
            )
        for key, container, index in slots:
            container[index] = n
            notes.append(f"{key}=auto: {n} classes, from {origin}")
    for note in notes:
        logger.info("%s", note)
    return notes
