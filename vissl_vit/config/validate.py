"""Validation of config sources against defaults.yaml, and the cross-key rules.

Every key of a config file or override must exist in defaults.yaml, with a value of the default's
type. Mappings whose default is ``{}`` are free-form (their reader checks them), and so are the
entries of lists. A ``LOSS.<TorchLossName>`` mapping is allowed for torch.nn losses.
"""

from __future__ import annotations

import math
import os
from typing import Any

from omegaconf import DictConfig

from vissl_vit.errors import ConfigError, closest

# Keys whose valid values span more than the default's type.
_UNION_TYPES: dict[str, tuple[type, ...]] = {
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.QK_SCALE": (bool, float, int),
    "config.MODEL.GRAD_CLIP.NORM_TYPE": (int, float, str),
    "config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME": (str, list, type(None)),
    "config.DATA.TRAIN.DEVICE_MIXUP.num_classes": (int, str),  # a class count, or "auto"
}

_TYPE_NAMES = {
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    list: "list",
    dict: "mapping",
    type(None): "null",
}


def _is_torch_loss(name: str) -> bool:
    import torch.nn

    return name.endswith("Loss") and isinstance(getattr(torch.nn, name, None), type)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _check_value(key: str, value: Any, default: Any, source: str) -> Any:
    """Check one leaf or subtree against its default; return the value (coerced) to merge."""
    if key in _UNION_TYPES:
        allowed = _UNION_TYPES[key]
        if not isinstance(value, allowed):
            names = " or ".join(_TYPE_NAMES[t] for t in allowed)
            raise ConfigError(f"{key} in {source}: expected {names}, got {_describe(value)}.")
        return value
    if default is None or (isinstance(value, str) and value.startswith("${")):
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} in {source}: expected a mapping, got {_describe(value)}.")
        if not default:  # free-form mapping
            return value
        checked, problems = {}, []
        for k, v in value.items():  # every bad key of the mapping is reported, not just the first
            try:
                checked[k] = _check_value(f"{key}.{k}", v, _child(key, default, k, source), source)
            except ConfigError as e:
                problems.extend(_problems_of(e))
        if problems:
            raise ConfigError(_join(problems))
        return checked
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} in {source}: expected bool (True or False), got {_describe(value)}.")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} in {source}: expected int, got {_describe(value)}.")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} in {source}: expected float, got {_describe(value)}.")
        return float(value)
    if isinstance(default, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. RUN_ID: 60215
        if not isinstance(value, str):
            raise ConfigError(f"{key} in {source}: expected str, got {_describe(value)}.")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{key} in {source}: expected a list, got {_describe(value)}.")
        return value
    return value


def _child(key: str, default: dict[str, Any], name: str, source: str) -> Any:
    if name in default:
        return default[name]
    if key == "config.LOSS" and _is_torch_loss(name):
        return {}  # kwargs of a torch.nn loss, checked by its constructor
    near = closest(name, default)
    hint = f" Did you mean {key}.{near[0]}?" if near else ""
    known = ", ".join(sorted(default))
    raise ConfigError(
        f"Unknown key {key}.{name} in {source}.{hint} Keys under {key}: {known}. "
        f"Every key is declared and explained in defaults.yaml."
    )


_PROBLEM_SEP = "\n  - "


def _join(problems: list[str]) -> str:
    """One message for several problems: a count, then each on its own line."""
    problems = list(dict.fromkeys(problems))
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the config:{_PROBLEM_SEP}" + _PROBLEM_SEP.join(problems)


def _problems_of(e: ConfigError) -> list[str]:
    """The single problems inside a ConfigError made by :func:`_join` (or the error itself)."""
    text = str(e)
    if _PROBLEM_SEP in text and text.split(_PROBLEM_SEP, 1)[0].endswith("problems in the config:"):
        return text.split(_PROBLEM_SEP)[1:]
    return [text]


def raise_problems(problems: list[str]) -> None:
    """Raise one ConfigError listing every problem (one per line), if there are any."""
    if problems:
        raise ConfigError(_join(problems))


def check_source(
    data: dict[str, Any], defaults: dict[str, Any], source: str, problems: list[str] | None = None
) -> dict[str, Any]:
    """Check ``data`` (a config file's contents) for unknown keys and wrong types; return its valid part.

    Args:
        data: the file's mapping, in vissl_vit's vocabulary (see vissl_compat.translate_source).
        defaults: vissl_vit's defaults.yaml.
        source: the file, for messages.
        problems: collects every problem; without it the first call raises them all at once.
    """
    found: list[str] = []
    checked = _check_keys("config", data.get("config", {}), defaults["config"], source, found)
    if problems is None:
        raise_problems(found)
    else:
        problems.extend(found)
    return {"config": checked}


def _check_keys(key: str, value: Any, default: Any, source: str, problems: list[str]) -> Any:
    """Like _check_value, but a problem is collected and the bad key left out of the result."""
    if not (isinstance(default, dict) and default and isinstance(value, dict)) or key in _UNION_TYPES:
        try:
            return _check_value(key, value, default, source)
        except ConfigError as e:
            problems.extend(_problems_of(e))
            return _BAD
    checked = {}
    for k, v in value.items():
        try:
            child = _child(key, default, k, source)
        except ConfigError as e:
            problems.append(str(e))
            continue
        result = _check_keys(f"{key}.{k}", v, child, source, problems)
        if result is not _BAD:
            checked[k] = result
    return checked


_BAD = object()  # a value left out of the merge because it was reported


def coerce_override(key: str, value: Any, defaults: dict[str, Any], source: str) -> Any:
    """Check a dotted override ``key=value`` against defaults.yaml; return the value to set."""
    parts = key.split(".")
    node: Any = defaults
    path = parts[0]
    node = node[parts[0]]
    for name in parts[1:]:
        if not isinstance(node, dict):
            raise ConfigError(f"{path} in {source} is a {type(node).__name__}, it has no key '{name}'.")
        if not node and path != "config":  # inside a free-form mapping
            return value
        node = _child(path, node, name, source)
        path = f"{path}.{name}"
    return _check_value(key, value, node, source)


def check_cross_keys(cfg: DictConfig) -> None:
    """Rules that involve several keys, checked before anything is built.

    Args:
        cfg: the ``config`` node of a composed config.
    """
    from vissl_vit.config.derive import resolve_data

    resolve_data(cfg)  # first: a user's folders decide the split paths and the "auto" class counts
    _check_ranges(cfg)  # the rules below divide by batch sizes, patch sizes and head counts
    from vissl_vit.models.trunks.base import trunk_class

    trunk = trunk_class(cfg.MODEL.TRUNK)
    trunk.check_config(cfg.MODEL.TRUNK)  # the trunk's own rules (sizes, option combinations)
    norm = cfg.MODEL.GRAD_CLIP.NORM_TYPE
    if isinstance(norm, str) and norm != "inf":
        raise ConfigError(f"config.MODEL.GRAD_CLIP.NORM_TYPE='{norm}': expected a number or 'inf'.")

    heads = cfg.MODEL.HEAD.PARAMS
    if heads and not cfg.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON:
        width = trunk.feature_width_from_config(cfg.MODEL.TRUNK, trunk.default_feature_from_config(cfg.MODEL.TRUNK))
        _check_head_width(heads[0], width, cfg.MODEL.TRUNK.NAME)
    _check_feature_eval(cfg)

    for split in ("TRAIN", "TEST"):
        d = cfg.DATA[split]
        n = len(d.DATA_SOURCES)
        for k in ("DATASET_NAMES", "DATA_PATHS"):
            if len(d[k]) not in (0, n) and not (k == "DATA_PATHS" and all(s == "synthetic" for s in d.DATA_SOURCES)):
                raise ConfigError(
                    f"config.DATA.{split}.{k} has {len(d[k])} entries but DATA_SOURCES has {n}: give one per source."
                )
        if d.LABEL_TYPE not in ("standard", "sample_index", "zero"):
            raise ConfigError(
                f"config.DATA.{split}.LABEL_TYPE='{d.LABEL_TYPE}': expected standard, sample_index or zero."
            )
        if d.COPY_TO_LOCAL_DISK:
            raise ConfigError(f"config.DATA.{split}.COPY_TO_LOCAL_DISK=True is not implemented yet; set it to False.")
    training = cfg.ENGINE_NAME == "train"
    if not cfg.DATA.TRAIN.DATA_SOURCES and not cfg.TEST_ONLY and training:
        raise ConfigError("config.DATA.TRAIN.DATA_SOURCES is empty: say where the training images are.")
    if training and (cfg.TEST_MODEL or cfg.TEST_ONLY) and not cfg.DATA.TEST.DATA_SOURCES:
        raise ConfigError(
            "config.TEST_MODEL=True but config.DATA.TEST.DATA_SOURCES is empty: set up DATA.TEST "
            "or set config.TEST_MODEL=False."
        )
    if cfg.TEST_ONLY and not cfg.TEST_MODEL:
        raise ConfigError("config.TEST_ONLY=True needs config.TEST_MODEL=True.")

    sched = cfg.OPTIMIZER.param_schedulers.lr
    if sched.update_interval not in ("step", "epoch"):
        raise ConfigError(
            f"config.OPTIMIZER.param_schedulers.lr.update_interval='{sched.update_interval}': expected step or epoch."
        )
    if sched.auto_lr_scaling.scaling_type not in ("linear", "sqrt"):
        raise ConfigError(
            "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.scaling_type="
            f"'{sched.auto_lr_scaling.scaling_type}': expected linear or sqrt."
        )
    wd_sched = cfg.OPTIMIZER.param_schedulers.weight_decay
    if wd_sched.name != "none" and wd_sched.update_interval != sched.update_interval:
        raise ConfigError(
            f"config.OPTIMIZER.param_schedulers.weight_decay.update_interval='{wd_sched.update_interval}' differs "
            f"from param_schedulers.lr.update_interval='{sched.update_interval}': one clock moves both; set them equal."
        )
    for kind, node in (("lr", sched), ("weight_decay", wd_sched)):
        if node.name != "composite":
            continue
        where = f"config.OPTIMIZER.param_schedulers.{kind}"
        n = len(node.schedulers)
        if n == 0 or len(node.lengths) != n or len(node.interval_scaling) not in (0, n):
            raise ConfigError(
                f"{where}: a composite schedule needs schedulers, and lengths "
                f"(and interval_scaling) with one entry each; got {n} schedulers, {len(node.lengths)} lengths, "
                f"{len(node.interval_scaling)} interval_scaling."
            )
        if not math.isclose(sum(node.lengths), 1.0, abs_tol=1e-3):
            raise ConfigError(
                f"{where}.lengths={list(node.lengths)} add up to {sum(node.lengths):g}; they must add up to 1."
            )
    _check_ssl_losses(cfg)
    from vissl_vit.data.collators.cutmixup import check_cutmixup_params  # a multi-crop batch needs ssl_method
    from vissl_vit.data.dataset import parse_slice

    for split in ("TRAIN", "TEST"):
        if cfg.DATA[split].COLLATE_FUNCTION == "cutmixup_collator":
            d = cfg.DATA[split]
            check_cutmixup_params(list(d.TRANSFORMS), dict(d.COLLATE_FUNCTION_PARAMS), f"DATA.{split}")
        parse_slice(cfg.DATA[split].get("SLICE", ""), f"config.DATA.{split}.SLICE")  # a bad slice now, not at build
    _check_device_mixup(cfg)
    _check_lr_values(cfg)
    from vissl_vit.engine.hooks.pictures import check_pictures_config  # every rank, before anything runs

    trunk = cfg.MODEL.TRUNK
    depth = trunk.VISION_TRANSFORMERS.NUM_LAYERS if trunk.NAME in ("vision_transformer", "convit") else None
    check_pictures_config(cfg.HOOKS.PICTURES, depth)
    if cfg.MACHINE.DEVICE not in ("cpu", "gpu"):
        raise ConfigError(f"config.MACHINE.DEVICE='{cfg.MACHINE.DEVICE}': expected cpu or gpu.")


def _check_device_mixup(cfg: DictConfig) -> None:
    """DATA.TRAIN.DEVICE_MIXUP: p >= 0, and not on top of another mixing (cutmixup_collator) or on
    multi-crop batches (a list of views has no one image per target to mix)."""
    node = cfg.DATA.TRAIN.get("DEVICE_MIXUP")
    if node is None:
        return
    from vissl_vit.data.collators.device_mixup import WHERE as where
    from vissl_vit.data.collators.device_mixup import check_mixup_args

    p = node.get("p", 0)
    check_mixup_args(p, node.get("partner", "roll"))
    if p == 0:
        return
    if cfg.DATA.TRAIN.COLLATE_FUNCTION == "cutmixup_collator":
        raise ConfigError(
            f"{where}.p={p} and config.DATA.TRAIN.COLLATE_FUNCTION=cutmixup_collator both mix the batch: "
            "keep one (DEVICE_MIXUP is big_vision's mixup, cutmixup_collator timm's / DeiT's)."
        )
    if any(t.get("name") in ("ImgReplicatePil", "ImgPilToMultiCrop") for t in cfg.DATA.TRAIN.TRANSFORMS):
        raise ConfigError(f"{where}.p={p}: mixup needs one image per target; the train transforms make several views.")


ENGINES = ("train", "extract_features", "nearest_neighbor")


def _check_feature_eval(cfg: DictConfig) -> None:
    """FEATURE_EVAL_SETTINGS, WEIGHTS_INIT, EXTRACT_FEATURES and NEAREST_NEIGHBOR."""
    from vissl_vit.models.feature_eval import feature_names
    from vissl_vit.models.trunks.base import trunk_class
    from vissl_vit.models.weights import FORMATS

    if cfg.ENGINE_NAME not in ENGINES:
        raise ConfigError(f"config.ENGINE_NAME='{cfg.ENGINE_NAME}': expected one of {', '.join(ENGINES)}.")
    fe = cfg.MODEL.FEATURE_EVAL_SETTINGS
    where = "config.MODEL.FEATURE_EVAL_SETTINGS"
    frozen_engine = cfg.ENGINE_NAME != "train"
    # both set (a VISSL trunk overlay over its kNN base): FREEZE_TRUNK_ONLY wins, as in VISSL
    freeze_heads = fe.FREEZE_TRUNK_AND_HEAD and not fe.FREEZE_TRUNK_ONLY
    if (fe.FREEZE_TRUNK_ONLY or fe.FREEZE_TRUNK_AND_HEAD) and not fe.EVAL_MODE_ON:
        raise ConfigError(f"{where}: FREEZE_TRUNK_ONLY / FREEZE_TRUNK_AND_HEAD need EVAL_MODE_ON=True.")
    if fe.EVAL_MODE_ON and not frozen_engine and not (fe.FREEZE_TRUNK_ONLY or fe.FREEZE_TRUNK_AND_HEAD):
        raise ConfigError(
            f"{where}.EVAL_MODE_ON=True with the train engine: set FREEZE_TRUNK_ONLY=True (linear evaluation) "
            "or FREEZE_TRUNK_AND_HEAD=True (with TEST_ONLY)."
        )
    if freeze_heads and not frozen_engine and not cfg.TEST_ONLY:
        raise ConfigError(f"{where}.FREEZE_TRUNK_AND_HEAD=True leaves nothing to train: use it with TEST_ONLY=True.")
    w = cfg.MODEL.WEIGHTS_INIT
    if w.FORMAT not in FORMATS:
        raise ConfigError(f"config.MODEL.WEIGHTS_INIT.FORMAT='{w.FORMAT}': expected one of {', '.join(FORMATS)}.")
    if w.SCOPE not in ("auto", "trunk", "model"):
        raise ConfigError(f"config.MODEL.WEIGHTS_INIT.SCOPE='{w.SCOPE}': expected auto, trunk or model.")
    uses_features = frozen_engine and not cfg.NEAREST_NEIGHBOR.FEATURES_DIR
    if (fe.EVAL_MODE_ON or uses_features) and not w.PARAMS_FILE and not w.ALLOW_RANDOM_INIT:
        raise ConfigError(
            "A frozen trunk is evaluated but config.MODEL.WEIGHTS_INIT.PARAMS_FILE is empty, so it would keep its "
            "random initialisation. Give the weights (a file or a run folder), or set "
            "config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True to evaluate random weights on purpose."
        )

    entries = [[e] if isinstance(e, str) else list(e) for e in fe.LINEAR_EVAL_FEAT_POOL_OPS_MAP]
    names = feature_names(entries)
    trunk = trunk_class(cfg.MODEL.TRUNK)
    widths = []
    for i, name in enumerate(names):
        try:
            widths.append(trunk.feature_width_from_config(cfg.MODEL.TRUNK, str(name)))
        except ValueError as e:
            raise ConfigError(f"{where}.LINEAR_EVAL_FEAT_POOL_OPS_MAP[{i}]: {e}.") from None
    heads = cfg.MODEL.HEAD.PARAMS
    if fe.EVAL_MODE_ON and fe.FREEZE_TRUNK_ONLY and heads and not frozen_engine:
        n_feats = max(len(names), 1)
        if len(heads) != n_feats:
            raise ConfigError(
                f"Linear evaluation trains one head per feature: config.MODEL.HEAD.PARAMS has {len(heads)} heads "
                f"but {where}.LINEAR_EVAL_FEAT_POOL_OPS_MAP names {n_feats} feature(s) ({list(names) or 'default'})."
            )
        for i, head in enumerate(heads):
            width = (
                widths[i]
                if names
                else trunk.feature_width_from_config(
                    cfg.MODEL.TRUNK, trunk.default_feature_from_config(cfg.MODEL.TRUNK)
                )
            )
            identity = not names or len(entries[i]) < 2 or entries[i][1][0] == "Identity"
            if width is not None and identity:
                _check_head_width(head, width, f"trunk feature '{names[i] if names else 'default'}'", i)
    if fe.EVAL_MODE_ON and freeze_heads and len(names) > 1:
        raise ConfigError(f"{where}.FREEZE_TRUNK_AND_HEAD runs the heads on one feature; {len(names)} are listed.")

    for split in cfg.EXTRACT_FEATURES.SPLITS:
        if split not in ("TRAIN", "TEST"):
            raise ConfigError(f"config.EXTRACT_FEATURES.SPLITS has '{split}': expected TRAIN and/or TEST.")
        if frozen_engine and uses_features and not cfg.DATA[split].DATA_SOURCES:
            raise ConfigError(
                f"config.EXTRACT_FEATURES.SPLITS has {split} but config.DATA.{split}.DATA_SOURCES is empty."
            )
    nn_cfg = cfg.NEAREST_NEIGHBOR
    if cfg.ENGINE_NAME == "nearest_neighbor":
        if sorted(cfg.EXTRACT_FEATURES.SPLITS) != ["TEST", "TRAIN"]:
            raise ConfigError("nearest_neighbor needs config.EXTRACT_FEATURES.SPLITS=[TRAIN,TEST]: bank and queries.")
        if nn_cfg.BACKEND not in ("faiss", "torch"):
            raise ConfigError(f"config.NEAREST_NEIGHBOR.BACKEND='{nn_cfg.BACKEND}': expected faiss or torch.")
        if nn_cfg.INDEX not in ("flat", "ivf"):
            raise ConfigError(f"config.NEAREST_NEIGHBOR.INDEX='{nn_cfg.INDEX}': expected flat or ivf.")
        if not nn_cfg.TOPK or any(not isinstance(k, int) or k < 1 for k in nn_cfg.TOPK):
            raise ConfigError(f"config.NEAREST_NEIGHBOR.TOPK={list(nn_cfg.TOPK)}: expected positive integers.")
        if nn_cfg.TEMPERATURE <= 0:
            raise ConfigError(f"config.NEAREST_NEIGHBOR.TEMPERATURE={nn_cfg.TEMPERATURE} must be positive.")


def _check_head_width(head: Any, width: int, trunk: str, index: int | None = None) -> None:
    if not (len(head) == 2 and isinstance(head[0], str)):
        raise ConfigError(f"config.MODEL.HEAD.PARAMS entries are [name, {{kwargs}}] pairs; got {list(head)}.")
    name, kwargs = head[0], head[1]
    in_dim = None
    if "in_plane" in kwargs:
        in_dim = kwargs["in_plane"]
    elif "in_channels" in kwargs:
        in_dim = kwargs["in_channels"]
    elif "dims" in kwargs and len(kwargs["dims"]):
        in_dim = kwargs["dims"][0]
    if in_dim is not None and in_dim != width:
        if index is not None:
            raise ConfigError(
                f"config.MODEL.HEAD.PARAMS[{index}] '{name}' takes inputs of width {in_dim}, but the {trunk} "
                f"has width {width}; they must match."
            )
        raise ConfigError(
            f"config.MODEL.HEAD.PARAMS: the first head '{name}' takes inputs of width {in_dim}, but the "
            f"{trunk} trunk's output has width {width}; they must match."
        )


def _last_head_width(cfg: DictConfig) -> int | None:
    heads = cfg.MODEL.HEAD.PARAMS
    if not heads or "dims" not in heads[-1][1]:
        return None
    return heads[-1][1]["dims"][-1]


def _check_ssl_losses(cfg: DictConfig) -> None:
    name = cfg.LOSS.name
    world = cfg.DISTRIBUTED.NUM_NODES * cfg.DISTRIBUTED.NUM_PROC_PER_NODE
    global_batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA * world
    if name == "moco_loss":
        m = cfg.LOSS.moco_loss
        if m.version not in ("v2", "v3"):
            raise ConfigError(f"config.LOSS.moco_loss.version='{m.version}': expected v2 or v3.")
        if m.momentum_schedule not in ("constant", "cosine"):
            raise ConfigError(
                f"config.LOSS.moco_loss.momentum_schedule='{m.momentum_schedule}': expected constant or cosine."
            )
        if m.version == "v2" and m.queue_size % global_batch:
            raise ConfigError(
                f"config.LOSS.moco_loss.queue_size={m.queue_size} must be a multiple of the global batch "
                f"{global_batch} (BATCHSIZE_PER_REPLICA x {world} processes)."
            )
        width = _last_head_width(cfg)
        if width is not None and width != m.embedding_dim:
            raise ConfigError(
                f"config.LOSS.moco_loss.embedding_dim={m.embedding_dim} but the last head of "
                f"config.MODEL.HEAD.PARAMS outputs {width}; they must match."
            )
    if name == "swav_loss":
        s = cfg.LOSS.swav_loss
        head = cfg.MODEL.HEAD.PARAMS[-1] if cfg.MODEL.HEAD.PARAMS else None
        if head is None or head[0] != "swav_head":
            raise ConfigError(
                "config.LOSS.name=swav_loss needs swav_head as the last head of config.MODEL.HEAD.PARAMS."
            )
        # as in VISSL, embedding_dim, num_prototypes and num_crops come from the head and multi-crop
        from vissl_vit.losses.build import infer_swav_kwargs

        num_crops = infer_swav_kwargs(cfg, dict(s), log=False)["num_crops"]
        if any(c >= num_crops for c in s.crops_for_assign):
            raise ConfigError(
                f"config.LOSS.swav_loss.crops_for_assign={list(s.crops_for_assign)} names crops beyond "
                f"num_crops={num_crops}."
            )


# The largest learning rate taken as meant: sgd and adamw train with values of 1e-5 to ~10 (large
# batches with linear scaling); beyond this it is a typo (1e39 also overflows float32 to inf).
MAX_LR = 1000.0
_FLOAT32_MAX = 3.4028234663852886e38


def _check_ranges(cfg: DictConfig) -> None:
    """Values that must be positive, non-negative or finite (issue 10: each was a traceback or a
    silent no-op)."""
    for split in ("TRAIN", "TEST"):
        b = cfg.DATA[split].BATCHSIZE_PER_REPLICA
        if b < 1:
            raise ConfigError(f"config.DATA.{split}.BATCHSIZE_PER_REPLICA={b}: expected at least 1 image per process.")
    workers = cfg.DATA.NUM_DATALOADER_WORKERS
    if workers < 0:
        raise ConfigError(
            f"config.DATA.NUM_DATALOADER_WORKERS={workers}: expected 0 (load in the main process) or more workers."
        )
    if cfg.DATA.PREFETCH_FACTOR < 1:
        raise ConfigError(f"config.DATA.PREFETCH_FACTOR={cfg.DATA.PREFETCH_FACTOR}: expected at least 1.")
    fraction = cfg.DATA.MAX_BAD_IMAGE_FRACTION
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"config.DATA.MAX_BAD_IMAGE_FRACTION={fraction}: expected a fraction in [0, 1].")
    if cfg.DISTRIBUTED.NUM_NODES < 1 or cfg.DISTRIBUTED.NUM_PROC_PER_NODE < 1:
        raise ConfigError("config.DISTRIBUTED.NUM_NODES and NUM_PROC_PER_NODE must be at least 1.")
    o = cfg.OPTIMIZER
    epochs = o.num_epochs
    if epochs < 0 or (epochs == 0 and cfg.ENGINE_NAME == "train" and not cfg.TEST_ONLY):
        raise ConfigError(
            f"config.OPTIMIZER.num_epochs={epochs}: expected at least 1 epoch to train "
            "(config.TEST_ONLY=True tests without training)."
        )
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise ConfigError(f"config.OPTIMIZER.weight_decay={o.weight_decay}: expected a finite value >= 0 (0 for none).")
    auto = o.param_schedulers.lr.auto_lr_scaling
    if auto.auto_scale and auto.base_lr_batch_size < 1:
        raise ConfigError(
            f"config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_lr_batch_size={auto.base_lr_batch_size}: "
            "expected at least 1."
        )


def _check_lr(key: str, value: Any, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r}{note}: a learning rate is a number.")
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise ConfigError(
            f"{key}={value}{note}: not a finite float32 number; expected a learning rate in [0, {MAX_LR:g}]."
        )
    if value < 0:
        raise ConfigError(f"{key}={value}{note}: a negative learning rate climbs the loss; expected [0, {MAX_LR:g}].")
    if value > MAX_LR:
        raise ConfigError(
            f"{key}={value:g}{note}: an absurd learning rate (usual values: 1e-5 to 10); expected [0, {MAX_LR:g}]."
        )


def _check_lr_values(cfg: DictConfig) -> None:
    """Every value of the lr schedule, as written and after auto LR scaling, and of the weight-decay
    schedule."""
    from omegaconf import OmegaConf

    from vissl_vit.config.derive import auto_scaled_schedule, lr_scale_factor, schedule_spec, schedule_values

    where = "config.OPTIMIZER.param_schedulers.lr"
    spec = schedule_spec(OmegaConf.to_container(cfg.OPTIMIZER.param_schedulers.lr, resolve=True), where)
    for key, value in schedule_values(spec, where):
        _check_lr(key, value)
    factor = lr_scale_factor(cfg)
    if factor != 1.0:
        note = f" after auto_lr_scaling (x {factor:g})"
        for key, value in schedule_values(auto_scaled_schedule(spec, cfg, where)[0], where):
            _check_lr(key, value, note)
    if cfg.OPTIMIZER.param_schedulers.weight_decay.name != "none":  # weight decay: finite and >= 0
        where = "config.OPTIMIZER.param_schedulers.weight_decay"
        spec = schedule_spec(OmegaConf.to_container(cfg.OPTIMIZER.param_schedulers.weight_decay, resolve=True), where)
        for key, value in schedule_values(spec, where):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key}={value!r}: a weight decay is a finite number >= 0 (0 for none).")


def check_run_folder(path: str, key: str) -> None:
    """Refuse a run folder that cannot be made or written, before any process starts.

    Args:
        path: the folder (absolute, or relative to the working directory).
        key: its config key, for the message.
    """
    if not path.strip():
        raise ConfigError(
            f"{key} is empty: give the run folder (e.g. ./checkpoints/my_run); '' would write into '{os.getcwd()}'."
        )
    full = os.path.abspath(path)
    existing = full
    while not os.path.lexists(existing):  # the nearest existing folder above: makedirs starts there
        existing = os.path.dirname(existing)
    if not os.path.exists(existing):
        raise ConfigError(
            f"{key}='{path}': '{existing}' is a broken symbolic link; point it at a folder or choose another path."
        )
    if not os.path.isdir(existing):
        if existing == full:
            raise ConfigError(f"{key}='{path}' is a file, not a folder: choose a folder for the run.")
        raise ConfigError(
            f"{key}='{path}' lies under '{existing}', which is a file, not a folder: choose another path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the folder is" if existing == full else f"it would be made in '{existing}', which is"
        raise ConfigError(f"{key}='{path}': {what} not writable by this user; choose a writable folder.")


def physical_memory_bytes() -> int | None:
    """This machine's RAM, or None where the OS does not say (non-Linux)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_fits_memory(cfg: DictConfig, memory: int | None = None) -> None:
    """Refuse a model whose weights (+ gradients and optimizer state when training) could not fit
    in this machine's memory, before building it: every process builds the whole model in host
    memory first, and an absurd size (NUM_LAYERS=100000) would allocate until the OS kills it.

    Args:
        cfg: the ``config`` node.
        memory: bytes available; this machine's physical memory by default.
    """
    from vissl_vit.models.build import estimate_num_params

    memory = physical_memory_bytes() if memory is None else memory
    if not memory:
        return
    n = estimate_num_params(cfg)
    copies = 1  # float32 weights
    training = cfg.ENGINE_NAME == "train" and not cfg.TEST_ONLY
    if training:
        o = cfg.OPTIMIZER
        state = 2 if o.name in ("adamw", "adam", "lamb") else int(o.momentum != 0)
        copies += 1 + state  # gradients, optimizer state
    need = 4 * n * copies
    if need > memory:
        from vissl_vit.models.trunks.base import trunk_class

        size = trunk_class(cfg.MODEL.TRUNK).size_summary(cfg.MODEL.TRUNK)
        parts = "weights, gradients and optimizer state" if training else "weights"
        count = f"{n / 1e9:.3g} billion" if n >= 1e9 else f"{n / 1e6:.3g} million"
        raise ConfigError(
            f"The model would have about {count} parameters (config.MODEL.TRUNK '{cfg.MODEL.TRUNK.NAME}' "
            f"{size}): about "
            f"{need / 2**30:,.1f} GiB for its {parts}, more than this machine's {memory / 2**30:,.1f} GiB of memory."
        )


def check_environment(cfg: DictConfig) -> None:
    """Checks against this machine, after the config rules: the data folders suit the model and the
    loss, the run folders can be written, the model fits in memory.

    Args:
        cfg: the ``config`` node of a composed config.
    """
    check_data_folders(cfg)
    check_run_folder(cfg.CHECKPOINT.DIR, "config.CHECKPOINT.DIR")
    if cfg.ENGINE_NAME != "train" and cfg.EXTRACT_FEATURES.OUTPUT_DIR:
        check_run_folder(cfg.EXTRACT_FEATURES.OUTPUT_DIR, "config.EXTRACT_FEATURES.OUTPUT_DIR")
    check_model_fits_memory(cfg)


# ---------------------------------------------------------------------------------------------------
# The data a run reads: each mistake here was a traceback at the first step (issue 17).
# ---------------------------------------------------------------------------------------------------

# vissl_vit's losses whose target is a class per image (the SSL losses ignore the labels)
CLASS_LOSSES = ("cross_entropy_multiple_output_single_target", "bce_logits_multiple_output_single_target")


def used_splits(cfg: DictConfig) -> list[str]:
    """The data splits the engine reads: TRAIN to train, TEST for the test phases, the
    EXTRACT_FEATURES.SPLITS of feature extraction and kNN (when it has no FEATURES_DIR)."""
    if cfg.ENGINE_NAME == "train":
        splits = ([] if cfg.TEST_ONLY else ["TRAIN"]) + (["TEST"] if cfg.TEST_MODEL else [])
    elif cfg.ENGINE_NAME == "nearest_neighbor" and cfg.NEAREST_NEIGHBOR.FEATURES_DIR:
        splits = []
    else:
        splits = [s for s in cfg.EXTRACT_FEATURES.SPLITS if s in ("TRAIN", "TEST")]
    return [s for s in splits if len(cfg.DATA[s].DATA_SOURCES)]


def needs_class_labels(cfg: DictConfig, split: str) -> str | None:
    """Why a split's images need a class each (a loss on classes, kNN's vote), or None.

    Labels are classes with LABEL_TYPE standard, or whenever LABEL_SOURCES is set (VISSL's rule,
    see ``vissl_vit.data.dataset.effective_label_type``).
    """
    d = cfg.DATA[split]
    if not len(d.LABEL_SOURCES) and d.LABEL_TYPE != "standard":
        return None
    if cfg.ENGINE_NAME == "nearest_neighbor":
        return "config.ENGINE_NAME=nearest_neighbor votes with the classes"
    if cfg.ENGINE_NAME == "train" and (cfg.LOSS.name in CLASS_LOSSES or _is_torch_loss(cfg.LOSS.name)):
        return f"config.LOSS.name={cfg.LOSS.name} needs a class per image"
    return None


def _classifier_heads(cfg: DictConfig) -> list[tuple[int, str, str, Any]]:
    """(index, name, key, value) of the heads whose output is the class scores: the last head of the
    chain, or each head of a linear evaluation (one per feature)."""
    from vissl_vit.config.derive import head_classes

    heads = list(cfg.MODEL.HEAD.PARAMS)
    fe = cfg.MODEL.FEATURE_EVAL_SETTINGS
    chosen = list(enumerate(heads)) if fe.EVAL_MODE_ON and fe.FREEZE_TRUNK_ONLY else list(enumerate(heads))[-1:]
    out = []
    for i, head in chosen:
        found = head_classes(head)
        if found is not None and isinstance(found[1], int) and not isinstance(found[1], bool):
            out.append((i, str(head[0]), found[0], found[1]))
    return out


def check_data_folders(cfg: DictConfig) -> None:
    """The disk_folder folders of the splits the engine reads, against the loss and the heads.

    - A flat folder (images, no class folders) is refused where classes are needed
      (:func:`needs_class_labels`); self-supervised methods read it (labels unused).
    - In training with a loss on classes, the classifier head's output size equals the training
      folder's number of classes (fewer outputs: "Target 2 is out of bounds" at the first step;
      more: a head that trains classes no image has), and the test folders hold the training
      folders' classes (a label is its folder's index among the sorted names: a missing class
      shifts the others'), or without training folders no more classes than the head outputs.
    Folders that do not exist are left to the data source's own error when it is read.
    """
    from vissl_vit.data.datasets.base import name_list
    from vissl_vit.data.datasets.disk import class_folders, loose_images

    folders: dict[str, list[tuple[int, str, list[str]]]] = {}
    for split in used_splits(cfg):
        d = cfg.DATA[split]
        why = needs_class_labels(cfg, split)
        folders[split] = []
        for k, source in enumerate(d.DATA_SOURCES):
            path = str(d.DATA_PATHS[k]) if k < len(d.DATA_PATHS) else ""
            if source == "tar_shards" and why:
                from vissl_vit.data.datasets.shards import ShardSource

                if ShardSource(path).flat:
                    raise ConfigError(
                        f"config.DATA.{split}.DATA_PATHS[{k}]='{path}': the shards have no .cls labels, but {why}: "
                        "write them from a folder of class folders (tools/make_shards.py), or train self-supervised."
                    )
            if source != "disk_folder" or not os.path.isdir(path):
                continue
            classes = class_folders(path)
            if not classes and why and loose_images(path):
                raise ConfigError(
                    f"config.DATA.{split}.DATA_PATHS[{k}]='{path}' is a flat folder of images (no class "
                    f"sub-folders), but {why}: put each class's images in {path}/<class>/, or train "
                    f"self-supervised (e.g. config=test/quick_moco) with config.DATA.{split}.LABEL_TYPE=sample_index."
                )
            folders[split].append((k, path, classes))
        if not why or cfg.ENGINE_NAME != "train":
            folders.pop(split)
    heads = _classifier_heads(cfg)
    train = folders.get("TRAIN", [])
    all_train = bool(train) and len(train) == len(cfg.DATA.TRAIN.DATA_SOURCES) and all(c for _, _, c in train)
    if all_train:
        k, path, classes = max(train, key=lambda t: len(t[2]))
        for i, name, key, value in heads:
            if value != len(classes):
                raise ConfigError(
                    f"config.MODEL.HEAD.PARAMS[{i}] '{name}' outputs {value} classes ({key}={value}) but the "
                    f"training folder '{path}' has {len(classes)} class folders ({name_list(classes)}): set {key} "
                    f"to {len(classes)}, or to auto to follow the folder."
                )
    for k, path, classes in folders.get("TEST", []):
        if all_train and k < len(train) and train[k][0] == k and classes and classes != train[k][2]:
            missing = sorted(set(train[k][2]) - set(classes))
            extra = sorted(set(classes) - set(train[k][2]))
            raise ConfigError(
                f"config.DATA.TEST.DATA_PATHS[{k}]='{path}' does not hold the class folders of the training "
                f"folder '{train[k][1]}' (missing: {name_list(missing) or 'none'}; not in training: "
                f"{name_list(extra) or 'none'}): a label is its folder's index among the sorted names, so both "
                "need the same class folders."
            )
        for i, name, key, value in heads:
            if len(classes) > value:
                raise ConfigError(
                    f"config.DATA.TEST.DATA_PATHS[{k}]='{path}' has {len(classes)} class folders "
                    f"({name_list(classes)}), more than the {value} classes config.MODEL.HEAD.PARAMS[{i}] "
                    f"'{name}' outputs ({key}={value})."
                )
