"""Initialising a model from a weights file (``MODEL.WEIGHTS_INIT``), strictly.

A file of any of these layouts loads into the model without renaming by hand:

===========  ======================================================================================
format       what the file holds
===========  ======================================================================================
vissl_vit    our checkpoints: ``classy_state_dict.base_model.model.{trunk,heads,...}``
vissl        VISSL's checkpoints: the same layout, with VISSL's ViT names (``class_token``,
             ``pos_embedding``)
timm         a timm ``VisionTransformer`` state dict (``cls_token``, ``blocks.N...``, ``head``)
deit         DeiT's released files: ``{"model": <timm state dict>}``
dino         DINO's released backbones (a timm state dict), or its training checkpoints
             (``teacher`` / ``student`` with ``backbone.`` and ``head.`` prefixes)
mocov3       MoCo v3's checkpoints: ``state_dict`` with ``module.base_encoder.*`` (the trunk and
             its projector), ``module.momentum_encoder.*`` and ``module.predictor.*``
jax          Google's JAX/Flax ViT checkpoints (``.npz``: google-research/vision_transformer,
             AugReg, big_vision; ``embedding/kernel``, ``Transformer/encoderblock_N/...``), mapped
             to timm's names by :mod:`vissl_vit.models.jax_weights`
===========  ======================================================================================

The file itself may be a torch file, a ``.safetensors`` file or a numpy ``.npz`` archive (told
apart by their contents, not their names); none of the last two can hold code. DeiT-III's released
files name LayerScale ``blocks.N.gamma_1`` / ``gamma_2``: they load as timm's ``ls1.gamma`` /
``ls2.gamma``.

The pipeline: read the file (iopath) -> pick the state dict (STATE_DICT_KEY_NAME) -> REMOVE_PREFIX,
APPEND_PREFIX -> map the names of FORMAT (detected by default) to ours -> drop SKIP_LAYERS -> load.

Unlike VISSL, which logged keys it could not match and went on from random weights (VISSL issues
#577, #545), a key of the model that the file does not provide, a key of the file that the model
does not have, or a shape that does not fit stops the run with the lists, unless STRICT is False.
When only the file's head does not fit (a classifier for another number of classes, an SSL
projector), the message says how to fine-tune with a new head: SCOPE trunk.
A position embedding made for another image size is resampled (bicubic) to the model's grid.
One made without a class-token slot (timm's ``no_embed_class``: DeiT-III, big_vision) loads into a
trunk that has the slot with a zero row there, which computes the same (the file's model added no
position to its class token).

timm keeps the final norm of an average-pooling model under ``fc_norm`` when it averages first
(``fc_norm=True``, its default for ``global_pool="avg"``) and under ``norm`` when it norms the
tokens first (``fc_norm=False``, VISSL's and DINO's order). Both load into our ``norm``; a file
whose order differs from the trunk's (``VISION_TRANSFORMERS.FC_NORM`` with ``CLASSIFIER: gap``)
is refused, since it would load without error and compute something else.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vissl_vit.errors import ConfigError, UserError, closest
from vissl_vit.models.jax_weights import UNMAPPED as _JAX_UNMAPPED
from vissl_vit.models.jax_weights import is_jax_layout, is_npz, jax_to_timm, read_npz
from vissl_vit.models.layers import resample_pos_embed
from vissl_vit.utils.safe_load import load_torch_file

logger = logging.getLogger(__name__)

FORMATS = ("auto", "vissl_vit", "vissl", "timm", "deit", "dino", "mocov3", "jax")
# the state dict's key in each known wrapper, tried in order when STATE_DICT_KEY_NAME is not in the file
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "module")
_VISSL_NAMES = {"class_token": "cls_token", "pos_embedding": "pos_embed"}


@dataclass
class LoadReport:
    """What :func:`init_model_from_weights` did (also logged)."""

    path: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    not_in_scope: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def resolve_weights_path(path: str) -> str:
    """A run folder means its newest checkpoint; a missing path is a clear error."""
    from iopath.common.file_io import g_pathmgr

    from vissl_vit.engine.checkpoint import find_latest

    if not path:
        raise ConfigError("config.MODEL.WEIGHTS_INIT.PARAMS_FILE is empty: give the weights file (or a run folder).")
    if os.path.isdir(path):
        latest = find_latest(path)
        if latest is None:
            raise ConfigError(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={path} is a folder without checkpoints.")
        return latest
    if not g_pathmgr.exists(path):
        raise ConfigError(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={path}: no such file.")
    return path


def read_weights_file(path: str, allow_pickle_code_execution: bool = False, allow_key: str = "") -> Any:
    """Load a weights file (any iopath path, or a run folder) on the CPU, running no code from it.

    ``.safetensors`` files and numpy ``.npz`` archives (JAX checkpoints: a flat dict under their
    ``/``-joined names) hold only arrays. Torch files of tensors, containers, numbers and strings
    load (``weights_only=True``, plus the numpy types older vissl_vit checkpoints hold); a torch
    file that pickles other Python objects is refused with a message naming what it would import,
    unless ``allow_pickle_code_execution`` is set.

    Args:
        path: the file.
        allow_pickle_code_execution: load such files in full (runs the code they name).
        allow_key: the setting that sets it, named in the refusal
            (default: ``config.MODEL.WEIGHTS_INIT.ALLOW_PICKLE_CODE_EXECUTION``).
    """
    from iopath.common.file_io import g_pathmgr

    path = resolve_weights_path(path)
    with g_pathmgr.open(path, "rb") as f:
        data = f.read()
    if _is_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as e:  # noqa: BLE001  a truncated or damaged file
            raise UserError(f"Could not read weights file {path} as safetensors: {e}") from None
    if is_npz(data):
        return read_npz(data, name=f"weights file {path}")
    return load_torch_file(
        data,
        name=f"weights file {path}",
        allow_code_key=allow_key or "config.MODEL.WEIGHTS_INIT.ALLOW_PICKLE_CODE_EXECUTION",
        allow_code=allow_pickle_code_execution,
    )


def _is_safetensors(data: bytes) -> bool:
    """safetensors' layout: an 8-byte little-endian header length, then the JSON header."""
    if len(data) < 10:
        return False
    header = int.from_bytes(data[:8], "little")
    return 8 + header <= len(data) and data[8:9] == b"{"


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> {"a.b.c": tensor}; non-tensor leaves are dropped."""
    flat: dict[str, torch.Tensor] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            flat[f"{prefix}{k}"] = v
    return flat


def _key_path(key_name: Any) -> list[str]:
    if key_name is None or key_name == "" or key_name == []:
        return []
    if isinstance(key_name, str):
        return [key_name]
    return [str(k) for k in key_name]


def select_state_dict(obj: Any, key_name: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The file's state dict, flat, and a description of where it was found.

    Args:
        obj: what the file holds.
        key_name: STATE_DICT_KEY_NAME: "classy_state_dict" (VISSL's and our checkpoints), another
            key, a list of nested keys, or "" for a file that is the state dict itself. When the
            default "classy_state_dict" is not in the file, the known wrappers are tried
            (state_dict, model, teacher, module), then the file itself.
    """
    if not isinstance(obj, dict):
        raise UserError(f"The weights file holds a {type(obj).__name__}, not a state dict (a mapping of tensors).")
    path = _key_path(key_name)
    if path == ["classy_state_dict"]:
        if "classy_state_dict" in obj:
            classy = obj["classy_state_dict"]
            try:
                model = classy["base_model"]["model"]
            except (KeyError, TypeError):
                raise UserError(
                    "The file's classy_state_dict has no base_model.model: not a VISSL or vissl_vit checkpoint."
                ) from None
            return _flatten(model), "classy_state_dict.base_model.model"
        for key in _WRAPPER_KEYS:
            inner = _flatten(obj[key]) if isinstance(obj.get(key), dict) else {}
            if inner:
                return inner, f"'{key}' (no classy_state_dict in the file)"
        return _flatten(obj), "the file itself (no classy_state_dict in the file)"
    node: Any = obj
    for i, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(path[:i]) or "the file"
            keys = sorted(map(str, node)) if isinstance(node, dict) else []
            raise ConfigError(
                f"config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME={key_name}: {where} has no key '{key}'"
                f" (its keys: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''})."
            )
        node = node[key]
    if not isinstance(node, dict):
        raise ConfigError(
            f"config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME={key_name} leads to a {type(node).__name__}, not a state dict."
        )
    return _flatten(node), ".".join(path) if path else "the file itself"


def detect_format(keys: list[str]) -> str:
    """The layout a flat state dict's names follow (see the module docstring); "" if none fits."""
    ks = set(keys)
    if any(k.startswith("module.base_encoder.") for k in ks):
        return "mocov3"
    if any(k.startswith(("backbone.", "module.backbone.")) for k in ks):
        return "dino"
    if is_jax_layout(keys):
        return "jax"
    if any(k.startswith("trunk.") for k in ks):
        return "vissl" if any(k in ks for k in ("trunk.class_token", "trunk.pos_embedding")) else "vissl_vit"
    if any(k in ks for k in ("cls_token", "pos_embed", "patch_embed.proj.weight")) or any(
        k.startswith("blocks.0.") for k in ks
    ):
        return "timm"
    return ""


_DEIT3_GAMMA_RE = re.compile(r"^blocks\.(\d+)\.gamma_([12])$")


def _timm_to_ours(key: str) -> str:
    """One timm / DeiT / DINO backbone name -> ours."""
    # DeiT-III's released files (models_v2.py) name LayerScale gamma_1 / gamma_2; timm's
    # checkpoint_filter_fn renames them the same way
    key = _DEIT3_GAMMA_RE.sub(r"blocks.\1.ls\2.gamma", key)
    if key.startswith("fc_norm."):  # timm's final norm with average pooling
        return "trunk.norm." + key[len("fc_norm.") :]
    if key.startswith("head."):  # the linear classifier -> vision_transformer_head without pre-logits
        return "heads.0.layers.head." + key[len("head.") :]
    if key.startswith("pre_logits.fc."):
        return "heads.0.layers.pre_logits." + key[len("pre_logits.fc.") :]
    return "trunk." + key


def map_names(sd: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Rename a state dict of format ``fmt`` to our model's names.

    Keys that have no counterpart in our models keep a recognisable name outside ``trunk.`` /
    ``heads.`` (e.g. ``dino_head.*``, ``mocov3_predictor.*``), so that they show up as unexpected
    keys when the whole model is loaded and are left out when only the trunk is.
    """
    if fmt == "jax":  # the arrays are re-laid out, not only renamed
        sd, fmt = jax_to_timm(sd), "timm"
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key
        if fmt == "vissl":
            top, _, rest = key.partition(".")
            if top == "trunk":
                first, dot, tail = rest.partition(".")
                new = f"trunk.{_VISSL_NAMES.get(first, first)}{dot}{tail}"
        elif fmt in ("timm", "deit"):
            new = key if key.startswith(_JAX_UNMAPPED) else _timm_to_ours(key)
        elif fmt == "dino":
            k = key[len("module.") :] if key.startswith("module.") else key
            if k.startswith("backbone."):
                new = _timm_to_ours(k[len("backbone.") :])
            elif k.startswith("head."):
                new = "dino_head." + k[len("head.") :]
            else:
                new = _timm_to_ours(k)
        elif fmt == "mocov3":
            k = key[len("module.") :] if key.startswith("module.") else key
            if k.startswith("base_encoder.head."):
                new = "mocov3_projector." + k[len("base_encoder.head.") :]
            elif k.startswith("base_encoder."):
                new = _timm_to_ours(k[len("base_encoder.") :])
            elif k.startswith("momentum_encoder."):
                new = "mocov3_momentum_encoder." + k[len("momentum_encoder.") :]
            elif k.startswith("predictor."):
                new = "mocov3_predictor." + k[len("predictor.") :]
        out[new] = value
    return out


_FC_NORM_RE = re.compile(r"(^|\.)fc_norm\.(weight|bias)$")
_TIMM_LIKE = ("timm", "deit", "dino", "mocov3", "jax")


def check_pool_order(raw_keys: list[str], fmt: str, model: nn.Module, path: str) -> None:
    """Refuse a timm-layout file whose average-pooling order differs from the gap trunk's.

    Args:
        raw_keys: the file's names, before :func:`map_names`.
        fmt: their format.
        model: the model being initialised (its ``trunk`` is checked).
        path: for the message.
    """
    trunk = getattr(model, "trunk", None)
    if fmt not in _TIMM_LIKE or getattr(trunk, "classifier", None) != "gap":
        return
    key = "config.MODEL.TRUNK.VISION_TRANSFORMERS.FC_NORM"
    file_fc_norm = any(_FC_NORM_RE.search(k) for k in raw_keys)
    if file_fc_norm and not trunk.fc_norm:
        raise UserError(
            f"The weights in {path} hold timm's fc_norm (average the tokens, then norm), but the trunk norms the "
            f"tokens before averaging (VISSL's order): set {key}=True for the outputs the file was trained with."
        )
    # a JAX checkpoint calls its class token "cls" (and always norms the tokens before averaging)
    has_cls = any(k.endswith("cls_token") or k == "cls" or k.endswith("/cls") for k in raw_keys)
    if trunk.fc_norm and not file_fc_norm and not has_cls:
        raise UserError(
            f"The weights in {path} are an average-pooling timm model with fc_norm=False (norm the tokens, then "
            f"average: VISSL's order), but {key}=True averages first: set {key}=False."
        )


def _matches(key: str, patterns: list[str]) -> bool:
    return any(p in key for p in patterns)


def _summarise(keys: list[str], limit: int = 12) -> str:
    """Keys, with those that differ only in their block numbers shown once: blocks.N.attn.qkv.weight (x12)."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(re.sub(r"\.\d+\.", ".N.", k), []).append(k)
    items = [f"{pattern} (x{len(ks)})" if len(ks) > 1 else ks[0] for pattern, ks in groups.items()]
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _is_square(n: int) -> bool:
    return n > 0 and int(round(n**0.5)) ** 2 == n


def _fit_pos_embed(value: torch.Tensor, target: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, str] | None:
    """A checkpoint's [1, prefix + n, D] position embedding fitted to the model's [1, num_prefix + m, D]
    (a zero row for each prefix slot the file lacks, the grid resampled), and what was done; or None.

    A file without the model's prefix slots comes from a model that added no position to its class
    token (timm's ``no_embed_class``): zeros there compute the same.
    """
    if value.ndim != 3 or value.shape[0] != 1 or value.shape[2] != target.shape[2]:
        return None
    new = target.shape[1] - num_prefix
    side = int(round(new**0.5))
    if not _is_square(new):
        return None
    done = []
    if not _is_square(value.shape[1] - num_prefix) and num_prefix and _is_square(value.shape[1]):
        value = torch.cat([value.new_zeros(1, num_prefix, value.shape[2]), value], dim=1)
        done.append("zero class-token slot added (the file has none, as timm's no_embed_class)")
    old = value.shape[1] - num_prefix
    if not _is_square(old):
        return None
    if old != new:
        value = resample_pos_embed(value, (side, side), num_prefix)
        done.append("resampled")
    return value, ", ".join(done)


def load_weights(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    scope: str = "model",
    skip_layers: list[str] | tuple[str, ...] = (),
    strict: bool = True,
    path: str = "",
    fmt: str = "",
) -> LoadReport:
    """Copy a (mapped) state dict into ``model``; see the module docstring for the rules.

    Args:
        model: a TrunkHeadModel (or any module).
        state_dict: names already mapped to the model's.
        scope: "model" (every key of the model must be provided) or "trunk" (only ``trunk.*``;
            the file's other keys are left out, and said so in the log).
        skip_layers: substrings: matching keys are neither loaded nor required (they keep their
            initialisation), on both sides.
        strict: stop on missing, unexpected or mismatched keys. False loads what fits and warns.
        path, fmt: for the messages.
    """
    report = LoadReport(path=path, format=fmt)
    own = model.state_dict()
    prefix = "trunk." if scope == "trunk" else ""
    trunk = getattr(model, "trunk", None)
    # prefix slots of the trunk's position embedding: none with timm's no_embed_class
    num_prefix = 0 if getattr(trunk, "no_embed_class", False) else getattr(trunk, "num_prefix_tokens", 1)
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if _matches(key, list(skip_layers)):
            report.skipped.append(key)
            continue
        if not key.startswith(prefix):
            report.not_in_scope.append(key)
            continue
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if value.shape != target.shape:
            if key.endswith("pos_embed"):
                fitted = _fit_pos_embed(value, target, num_prefix)
                if fitted is not None:
                    report.resized.append(f"{key} {tuple(value.shape)} -> {tuple(target.shape)} ({fitted[1]})")
                    value = fitted[0]
            if value.shape != target.shape:
                report.mismatched.append(f"{key}: file {tuple(value.shape)}, model {tuple(target.shape)}")
                continue
        to_load[key] = value
    mismatched_keys = {m.split(":", 1)[0] for m in report.mismatched}  # reported as such, not as missing
    report.missing = [
        k
        for k in own
        if k.startswith(prefix) and k not in to_load and k not in mismatched_keys and not _matches(k, list(skip_layers))
    ]
    problems = _problems(report, list(own))
    if problems and strict:
        hint = _new_head_hint(report, scope)
        generic = (
            "Fix the names with config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME / REMOVE_PREFIX / APPEND_PREFIX / "
            "FORMAT, leave layers out on purpose with SKIP_LAYERS, or set STRICT=False to load only what fits."
        )
        # only the head does not fit: the new-head fix alone; else the name fixes (and the hint)
        fixes = hint if hint and _trunk_fits(report) else [generic, *hint]
        raise UserError(f"The weights in {path} ({fmt} format) do not fit the model:\n{problems}\n" + "\n".join(fixes))
    if problems:
        logger.warning("Loading %s with STRICT=False; these keys were not loaded:\n%s", path, problems)
    with torch.no_grad():
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        for key, value in to_load.items():
            params[key].copy_(value.to(dtype=params[key].dtype))
    report.loaded = sorted(to_load)
    return report


def _problem_keys(report: LoadReport) -> list[str]:
    return report.missing + report.unexpected + [m.split(":", 1)[0] for m in report.mismatched]


def _trunk_fits(report: LoadReport) -> bool:
    """Every problem is outside the trunk (a head, an SSL projector): SCOPE trunk alone fixes them."""
    return not any(k.startswith("trunk.") for k in _problem_keys(report))


def _new_head_hint(report: LoadReport, scope: str) -> list[str]:
    """The one-line fix for fine-tuning with a new head, when the file's head is what does not fit.

    The usual case: a classifier trained for another number of classes (a shape mismatch of
    ``heads.*``), or a self-supervised file whose heads are a projector, or none.
    """
    head_mismatch = [m for m in report.mismatched if m.startswith("heads.")]
    if scope == "trunk" or not (head_mismatch or (_problem_keys(report) and _trunk_fits(report))):
        return []
    what = f" ({head_mismatch[0]})" if head_mismatch else ""
    return [
        f"The file's head does not fit the model's{what}: to fine-tune with a new head, set "
        "config.MODEL.WEIGHTS_INIT.SCOPE=trunk (loads trunk.* only; the heads keep their initialisation)."
    ]


def _problems(report: LoadReport, model_keys: list[str]) -> str:
    lines = []
    if report.missing:
        lines.append(f"  model keys the file does not provide ({len(report.missing)}): {_summarise(report.missing)}")
    if report.unexpected:
        hints = []
        for k in report.unexpected[:5]:
            near = closest(k, model_keys, n=1)
            hints.append(f"{k} -> did you mean {near[0]}?" if near else k)
        lines.append(
            f"  file keys the model does not have ({len(report.unexpected)}): {_summarise(report.unexpected)}"
            + ("\n    " + "\n    ".join(hints) if hints else "")
        )
    if report.mismatched:
        lines.append(f"  shapes that differ ({len(report.mismatched)}): " + "; ".join(report.mismatched[:8]))
    return "\n".join(lines)


def init_model_from_weights(model: nn.Module, weights_cfg: Any, scope: str) -> LoadReport:
    """Apply ``MODEL.WEIGHTS_INIT`` to a freshly built model (before any wrapping).

    Args:
        model: a TrunkHeadModel or MoCoModel.
        weights_cfg: the ``MODEL.WEIGHTS_INIT`` node.
        scope: "trunk" or "model" (see :func:`load_weights`).
    """
    w = weights_cfg
    fmt = w.FORMAT
    if fmt not in FORMATS:
        raise ConfigError(f"config.MODEL.WEIGHTS_INIT.FORMAT='{fmt}': expected one of {', '.join(FORMATS)}.")
    path = resolve_weights_path(w.PARAMS_FILE)
    sd, where = select_state_dict(read_weights_file(path, w.ALLOW_PICKLE_CODE_EXECUTION), w.STATE_DICT_KEY_NAME)
    if w.REMOVE_PREFIX:
        sd = {(k[len(w.REMOVE_PREFIX) :] if k.startswith(w.REMOVE_PREFIX) else k): v for k, v in sd.items()}
    if w.APPEND_PREFIX:
        sd = {w.APPEND_PREFIX + k: v for k, v in sd.items()}
    if fmt == "auto":
        fmt = detect_format(list(sd))
        if not fmt:
            raise UserError(
                f"Cannot tell the layout of the weights in {path} (state dict from {where}; keys such as "
                f"{', '.join(list(sd)[:6])}). Set config.MODEL.WEIGHTS_INIT.FORMAT (one of {', '.join(FORMATS[1:])}), "
                "or REMOVE_PREFIX / APPEND_PREFIX so the names become ours (trunk.*, heads.N.*) or timm's."
            )
    check_pool_order(list(sd), fmt, model, path)
    sd = map_names(sd, fmt)
    report = load_weights(model, sd, scope=scope, skip_layers=list(w.SKIP_LAYERS), strict=w.STRICT, path=path, fmt=fmt)
    sync = getattr(model, "reset_momentum_encoder", None)
    if sync is not None and not any(k.startswith("momentum_encoder.") for k in report.loaded):
        sync()  # MoCo starting from loaded weights: the key encoder starts as a copy of them
    logger.info(
        "Initialised %s from %s (%s format, state dict from %s): %d tensors loaded%s%s%s",
        "the trunk" if scope == "trunk" else "the model",
        path,
        fmt,
        where,
        len(report.loaded),
        f"; position embedding fitted: {', '.join(report.resized)}" if report.resized else "",
        f"; skipped (SKIP_LAYERS): {_summarise(report.skipped, 6)}" if report.skipped else "",
        f"; left out (not part of the trunk): {_summarise(report.not_in_scope, 6)}" if report.not_in_scope else "",
    )
    return report
