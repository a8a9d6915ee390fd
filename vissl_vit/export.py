"""Weights out: a weights-only ``.safetensors`` file in timm's names, and the ``timm.create_model``
arguments that rebuild the model for it.

At the end of training (``CHECKPOINT.EXPORT_SAFETENSORS``) the run folder gets::

    model_final.safetensors   the model's weights only, under timm's names (safetensors: no pickle,
                              no code; the format of timm and the Hugging Face hub)
    model_final.timm.json     the keyword arguments of timm.create_model, so that

        args = json.load(open("model_final.timm.json"))
        model = timm.create_model(**args)
        model.load_state_dict(safetensors.torch.load_file("model_final.safetensors"))  # strict

gives the trained model, with the same logits. ``tools/convert_weights.py --to safetensors`` writes
the same two files from any checkpoint or run folder. The arguments come from the run's config:
the trunk's shape (``vision_transformer`` as timm's ``VisionTransformer``, ``convit`` as its
``ConVit``) and the head (none: ``num_classes=0``, timm's pooled features; one linear classifier:
``vision_transformer_head`` without pre-logits, or an ``mlp`` head of one linear layer).
``pretrained_cfg_overlay`` records the input size and the test transforms' mean and std, so that
``timm.data.resolve_data_config(model=model)`` describes this model's input, not the named one's.

A model timm cannot express (other blocks or norms, a custom attention scale, a projection head,
MoCo, a feature-evaluation model) is written under vissl_vit's names (``trunk.*``, ``heads.N.*``),
which ``MODEL.WEIGHTS_INIT`` loads; the log says why in one line, and there is no JSON.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vissl_vit.engine.checkpoint import atomic_write_bytes
from vissl_vit.models.build import method_wrapper
from vissl_vit.models.convert import timm_state_dict

logger = logging.getLogger(__name__)

EXPORT_STEM = "model_final"
# timm's named ViT sizes: (embed_dim, depth, num_heads) -> the size in its model names
_VIT_SIZES = {
    (192, 12, 3): "tiny",
    (384, 12, 6): "small",
    (768, 12, 12): "base",
    (1024, 24, 16): "large",
    (1280, 32, 16): "huge",
}
# timm's ConVit sizes: num_heads at 48 channels per head and 12 blocks
_CONVIT_SIZES = {4: "tiny", 9: "small", 16: "base"}


@dataclass
class TimmSpec:
    """How a config's model is built in timm, or why it cannot be.

    Args:
        args: the keyword arguments of ``timm.create_model``; None when timm has no twin.
        reason: why not (one line), when ``args`` is None.
        global_pool: for the state-dict conversion: "token" or "avg".
        fc_norm: the final norm is timm's ``fc_norm`` (average, then norm).
    """

    args: dict[str, Any] | None
    reason: str = ""
    global_pool: str = "token"
    fc_norm: bool = False


@dataclass
class ExportResult:
    """What :func:`export_weights` wrote: ``layout`` is "timm" or "vissl_vit"; ``json_path`` is
    None for our names; ``note`` says why timm's names were not possible."""

    path: str
    layout: str
    json_path: str | None = None
    args: dict[str, Any] | None = None
    note: str = ""


def json_path_for(path: str) -> str:
    """``x/model_final.safetensors`` -> ``x/model_final.timm.json``."""
    stem = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
    return stem + ".timm.json"


def _num_classes(cfg: DictConfig, width: int) -> tuple[int | None, str]:
    """timm's ``num_classes`` for MODEL.HEAD.PARAMS (0: no head), or None and why not."""
    heads = OmegaConf.to_container(cfg.MODEL.HEAD.PARAMS, resolve=True)
    if not heads:
        return 0, ""
    if len(heads) > 1:
        return None, f"a chain of {len(heads)} heads (timm has one linear classifier)"
    name, kwargs = heads[0][0], heads[0][1] if len(heads[0]) > 1 else {}
    if name == "vision_transformer_head" and not kwargs.get("hidden_dim"):
        if kwargs.get("in_plane", width) != width:
            return None, f"a head of in_plane {kwargs.get('in_plane')} on a trunk of width {width}"
        return int(kwargs["num_classes"]), ""
    if name == "mlp":
        dims = list(kwargs.get("dims", []))
        if len(dims) == 2 and dims[0] == width and kwargs.get("use_bias", True):
            skip = kwargs.get("skip_last_layer_relu_bn", True)
            extra = not skip and any(kwargs.get(k) for k in ("use_bn", "use_relu", "use_dropout"))
            if not extra:
                return int(dims[1]), ""
        return None, f"an mlp head with dims {dims} (timm's head is one linear layer with a bias)"
    return None, f"the head '{name}' (timm's head is one linear classifier)"


def _input_overlay(cfg: DictConfig, channels: int, size: int) -> dict[str, Any]:
    """``pretrained_cfg_overlay``: the input size, and the mean and std the test transforms give the
    model (their Normalize's; 0 and 1 after a bare ToTensor)."""
    overlay: dict[str, Any] = {"input_size": [channels, size, size]}
    entries = OmegaConf.to_container(cfg.DATA.TEST.TRANSFORMS, resolve=True) or []
    names = [e.get("name") for e in entries if isinstance(e, dict)]
    norm = next((e for e in entries if isinstance(e, dict) and e.get("name") == "Normalize"), None)
    if norm is not None:
        overlay["mean"], overlay["std"] = list(norm["mean"]), list(norm["std"])
    elif "ToTensor" in names:
        overlay["mean"], overlay["std"] = [0.0] * channels, [1.0] * channels
    return overlay


def _vit_spec(cfg: DictConfig, num_classes: int) -> TimmSpec:
    v = cfg.MODEL.TRUNK.VISION_TRANSFORMERS
    key = "MODEL.TRUNK.VISION_TRANSFORMERS"
    if v.BLOCK != "prenorm":
        return TimmSpec(None, f"{key}.BLOCK={v.BLOCK} (timm's VisionTransformer has prenorm blocks)")
    if v.NORM_LAYER != "layernorm":
        return TimmSpec(None, f"{key}.NORM_LAYER={v.NORM_LAYER} (timm's VisionTransformer uses LayerNorm)")
    head_dim = v.HIDDEN_DIM // v.NUM_HEADS
    if not isinstance(v.QK_SCALE, bool) and float(v.QK_SCALE) != head_dim**-0.5:
        return TimmSpec(None, f"{key}.QK_SCALE={v.QK_SCALE} (timm's attention scale is head_dim ** -0.5)")
    size = _VIT_SIZES.get((v.HIDDEN_DIM, v.NUM_LAYERS, v.NUM_HEADS))
    name = f"vit_{size}_patch{v.PATCH_SIZE}_{v.IMAGE_SIZE}"
    if size is None or not _is_timm_model(name):
        # every shape argument below overrides the named model's: any plain ViT name builds it
        name = "vit_base_patch16_224"
    pool = "token" if v.CLASSIFIER == "token" else "avg"
    fc_norm = bool(v.FC_NORM) and pool == "avg"
    args: dict[str, Any] = {
        "model_name": name,
        "num_classes": num_classes,
        "img_size": int(v.IMAGE_SIZE),
        "patch_size": int(v.PATCH_SIZE),
        "in_chans": int(v.IN_CHANNELS),
        "embed_dim": int(v.HIDDEN_DIM),
        "depth": int(v.NUM_LAYERS),
        "num_heads": int(v.NUM_HEADS),
        "mlp_ratio": v.MLP_DIM / v.HIDDEN_DIM,
        "qkv_bias": bool(v.QKV_BIAS),
        "class_token": bool(v.USE_CLASS_TOKEN),
        "no_embed_class": bool(v.NO_EMBED_CLASS),
        "init_values": None if v.LAYER_SCALE_INIT is None else float(v.LAYER_SCALE_INIT),
        "global_pool": pool,
        "fc_norm": fc_norm,
    }
    if v.ACT_LAYER != "gelu":  # timm's names: gelu_tanh, relu
        args["act_layer"] = str(v.ACT_LAYER)
    args["pretrained_cfg_overlay"] = _input_overlay(cfg, int(v.IN_CHANNELS), int(v.IMAGE_SIZE))
    return TimmSpec(args, global_pool=pool, fc_norm=fc_norm)


def _convit_spec(cfg: DictConfig, num_classes: int) -> TimmSpec:
    v, cv = cfg.MODEL.TRUNK.VISION_TRANSFORMERS, cfg.MODEL.TRUNK.CONVIT
    if cv.LOCALITY_DIM != 1:
        return TimmSpec(None, f"MODEL.TRUNK.CONVIT.LOCALITY_DIM={cv.LOCALITY_DIM} (timm's ConVit has 1)")
    head_dim = v.HIDDEN_DIM // v.NUM_HEADS
    if not isinstance(v.QK_SCALE, bool) and float(v.QK_SCALE) != head_dim**-0.5:
        return TimmSpec(None, f"MODEL.TRUNK.VISION_TRANSFORMERS.QK_SCALE={v.QK_SCALE} (timm's is head_dim ** -0.5)")
    size = _CONVIT_SIZES.get(v.NUM_HEADS) if (head_dim, v.NUM_LAYERS) == (48, 12) else None
    pool = "token" if v.CLASSIFIER == "token" else "avg"
    args: dict[str, Any] = {
        "model_name": f"convit_{size or 'tiny'}",  # the shape arguments override the named model's
        "num_classes": num_classes,
        "img_size": int(v.IMAGE_SIZE),
        "patch_size": int(v.PATCH_SIZE),
        "in_chans": int(v.IN_CHANNELS),
        "embed_dim": int(head_dim),  # timm's ConVit counts channels per head
        "depth": int(v.NUM_LAYERS),
        "num_heads": int(v.NUM_HEADS),
        "mlp_ratio": v.MLP_DIM / v.HIDDEN_DIM,
        "qkv_bias": bool(v.QKV_BIAS),
        "local_up_to_layer": int(cv.N_GPSA_LAYERS),
        "locality_strength": float(cv.LOCALITY_STRENGTH),
        "global_pool": pool,
        "pretrained_cfg_overlay": _input_overlay(cfg, int(v.IN_CHANNELS), int(v.IMAGE_SIZE)),
    }
    return TimmSpec(args, global_pool=pool)


def _is_timm_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name))


def timm_spec(cfg: DictConfig) -> TimmSpec:
    """The ``timm.create_model`` arguments of the model ``cfg`` (the ``config`` node) builds.

    Returns a spec whose ``args`` is None, with the reason, for a model timm cannot express.
    """
    trunk = cfg.MODEL.TRUNK
    if cfg.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON:
        return TimmSpec(None, "a feature-evaluation model (a frozen trunk with a head per feature)")
    if method_wrapper(cfg) == "moco":
        return TimmSpec(None, "MoCo's model (online and momentum encoders, projector, predictor)")
    if trunk.NAME not in ("vision_transformer", "convit"):
        return TimmSpec(None, f"the trunk '{trunk.NAME}'")
    num_classes, why = _num_classes(cfg, int(trunk.VISION_TRANSFORMERS.HIDDEN_DIM))
    if num_classes is None:
        return TimmSpec(None, why)
    return _vit_spec(cfg, num_classes) if trunk.NAME == "vision_transformer" else _convit_spec(cfg, num_classes)


def create_model_call(args: dict[str, Any]) -> str:
    """``timm.create_model('vit_...', img_size=16, ...)``: the call the arguments stand for."""
    rest = ", ".join(f"{k}={v!r}" for k, v in args.items() if k != "model_name")
    return f"timm.create_model({args['model_name']!r}, {rest})"


def _timm_mismatch(args: dict[str, Any], sd: dict[str, torch.Tensor]) -> str:
    """ "" when timm's model of ``args`` has exactly ``sd``'s keys and shapes (built on the meta
    device: no memory, no init time), else what differs; "" also when timm is not installed."""
    try:
        import timm
    except ImportError:
        return ""
    with torch.device("meta"):
        model = timm.create_model(**args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = [k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k]]
    if not (missing or unexpected or wrong):
        return ""
    return f"timm's model differs (missing {missing[:4]}, unexpected {unexpected[:4]}, shapes {sorted(wrong)[:4]})"


def _safetensors_bytes(sd: dict[str, torch.Tensor], layout: str) -> bytes:
    from safetensors.torch import save

    # safetensors stores each tensor's own contiguous bytes: no views into shared storage
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    return save(tensors, metadata={"format": "pt", "layout": layout})


def export_weights(ours: dict[str, torch.Tensor], cfg: DictConfig, path: str) -> ExportResult:
    """Write ``ours`` (a flat state dict under our names) to ``path`` as safetensors, atomically:
    in timm's names with the create_model JSON beside it when timm can build the model, else in
    ours (and a stale JSON of an earlier export is removed).

    Args:
        ours: the model's state dict (``trunk.*``, ``heads.N.*``).
        cfg: the run's ``config`` node.
        path: the ``.safetensors`` file.
    """
    spec = timm_spec(cfg)
    jpath = json_path_for(path)
    note = spec.reason
    if spec.args is not None:
        sd, dropped = timm_state_dict(ours, spec.global_pool, spec.fc_norm)
        note = f"no timm counterpart for {dropped[:4]}" if dropped else _timm_mismatch(spec.args, sd)
        if not note:
            atomic_write_bytes(_safetensors_bytes(sd, "timm"), path)
            atomic_write_bytes((json.dumps(spec.args, indent=2) + "\n").encode(), jpath)
            return ExportResult(path, "timm", jpath, spec.args)
    atomic_write_bytes(_safetensors_bytes(ours, "vissl_vit"), path)
    if os.path.exists(jpath):
        os.remove(jpath)
    return ExportResult(path, "vissl_vit", note=note)


def log_export(result: ExportResult) -> None:
    """One log line: where the weights went and how to load them."""
    if result.layout == "timm":
        logger.info("Exported %s (timm names; arguments in %s): %s", result.path, os.path.basename(result.json_path or ""),
                    create_model_call(result.args or {}))  # fmt: skip
    else:
        logger.info("Exported %s under vissl_vit's names (MODEL.WEIGHTS_INIT loads it): timm cannot build %s",
                    result.path, result.note)  # fmt: skip
