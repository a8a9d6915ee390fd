"""Convert weights between vissl_vit checkpoints and timm ``VisionTransformer`` / ``ConVit`` state dicts.

    python tools/convert_weights.py --to safetensors RUN_FOLDER_OR_CHECKPOINT OUT.safetensors [--config YAML]
    python tools/convert_weights.py --to timm RUN_FOLDER_OR_FILE OUT.pth [--global-pool token|avg] [--fc-norm]
    python tools/convert_weights.py --to vissl_vit TIMM_DEIT_DINO_MOCOV3_OR_JAX_FILE OUT.torch

``--to safetensors`` is the end-of-training export (:mod:`vissl_vit.export`) on request: the
weights alone under timm's names, ``OUT.timm.json`` beside them with the ``timm.create_model``
arguments read from the run's config, and the call printed; a model timm cannot build is written
under our names, and the reason printed. The config is the checkpoint's own (vissl_vit checkpoints
store it), or ``--config`` (a run's train_config.yaml or any config file).

Every mode reads any file MODEL.WEIGHTS_INIT reads (ours, VISSL's, timm's, DeiT's and DeiT-III's,
DINO's, MoCo v3's, Google's JAX ``.npz``), as a torch file or ``.safetensors``. ``--to timm``
writes the trunk (and a single linear classifier head, as timm's ``head``) under timm's names, for
``timm.create_model(..., num_classes=N).load_state_dict(torch.load(OUT.pth))`` (the call is printed
when the file holds its config). ``--global-pool avg``
(the default for trunks without a class token) writes an average-pooling model in one of timm's two
orders: VISSL's (``CLASSIFIER: gap``: norm the tokens, then average), which timm builds with
``global_pool="avg", fc_norm=False`` and keeps the norm under ``norm``; or with ``--fc-norm`` timm's
default order (a trunk trained with ``FC_NORM: True``: average, then norm), ``global_pool="avg",
fc_norm=True``, the norm under ``fc_norm`` (timm's ``norm`` is then an Identity).

A trunk with LayerScale writes timm's ``ls1.gamma`` / ``ls2.gamma`` (build timm's model with
``init_values``); one whose position embedding has no class-token slot needs ``no_embed_class=True``.

``--to vissl_vit`` writes ``{"classy_state_dict": {"base_model": {"model": {"trunk": ..., "heads": ...}}}}``,
which MODEL.WEIGHTS_INIT loads with its defaults (and which this tool reads back).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vissl_vit.engine.checkpoint import atomic_save, group_model_state
from vissl_vit.errors import UserError
from vissl_vit.models.weights import detect_format, map_names, read_weights_file, select_state_dict
from vissl_vit.utils.cli import cli_main, split_options

USAGE = """usage: python tools/convert_weights.py --to safetensors|timm|vissl_vit IN OUT [--config YAML]
                                       [--global-pool token|avg] [--fc-norm] [--state-dict-key KEY]
                                       [--allow-pickle-code-execution]
  --to safetensors  OUT.safetensors in timm's names + OUT.timm.json (the timm.create_model arguments)
  --config YAML  the run's config (train_config.yaml) when IN does not hold it (vissl_vit checkpoints do)
  --fc-norm  with --global-pool avg: the trunk averages, then norms (FC_NORM: True); timm's fc_norm=True
  --allow-pickle-code-execution  also read an IN that pickles Python objects besides tensors; loading
                                 it runs the code it names: only for files you trust
"""
_TIMM_HEAD = "heads.0.layers.head."


def read_as_ours(
    path: str, state_dict_key: str = "classy_state_dict", allow_pickle_code_execution: bool = False
) -> dict[str, torch.Tensor]:
    """Any supported weights file -> a flat state dict under our names (trunk.*, heads.N.*, ...).

    A file that pickles Python objects is refused unless ``allow_pickle_code_execution``."""
    return _ours(_read(path, allow_pickle_code_execution), path, state_dict_key)


def _read(path: str, allow_pickle_code_execution: bool) -> Any:
    return read_weights_file(path, allow_pickle_code_execution, allow_key="--allow-pickle-code-execution")


def _ours(obj: Any, path: str, state_dict_key: str) -> dict[str, torch.Tensor]:
    sd, _ = select_state_dict(obj, state_dict_key)
    fmt = detect_format(list(sd))
    if not fmt:
        raise UserError(f"Cannot tell the layout of {path} (keys such as {', '.join(list(sd)[:6])}).")
    return map_names(sd, fmt)


def _config_of(obj: Any, config_file: str | None) -> DictConfig | None:
    """The run's ``config`` node: from ``--config`` (composed), else the checkpoint's own, else None."""
    if config_file:
        from vissl_vit.config import compose_config

        return compose_config([f"config={os.path.abspath(config_file)}"]).config
    text = obj.get("config_yaml") if isinstance(obj, dict) else None
    return OmegaConf.create(text).config if isinstance(text, str) and text else None


def timm_state_dict(
    ours: dict[str, torch.Tensor], global_pool: str | None = None, fc_norm: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our names -> timm's (VisionTransformer, ConVit), and the keys that have no timm counterpart.

    Args:
        ours: a flat state dict under our names.
        global_pool: "token" or "avg"; None: token when there is a class token.
        fc_norm: with "avg", write the final norm as timm's ``fc_norm`` (a trunk with FC_NORM: True).
    """
    if global_pool is None:
        global_pool = "token" if "trunk.cls_token" in ours else "avg"
    if fc_norm and global_pool != "avg":
        raise UserError("--fc-norm is timm's order of average pooling: it needs --global-pool avg.")
    out, dropped = {}, []
    for key, value in ours.items():
        if key.startswith("trunk."):
            name = key[len("trunk.") :]
            if fc_norm and name.startswith("norm."):
                name = "fc_norm." + name[len("norm.") :]
            out[name] = value
        elif key.startswith(_TIMM_HEAD):
            out["head." + key[len(_TIMM_HEAD) :]] = value
        elif key.startswith("heads.0.clf.0.") and not any(k.startswith("heads.0.clf.1") for k in ours):
            out["head." + key[len("heads.0.clf.0.") :]] = value  # an mlp head of one linear layer
        else:
            dropped.append(key)
    return out, dropped


def to_timm(
    ours: dict[str, torch.Tensor], global_pool: str | None = None, fc_norm: bool = False
) -> dict[str, torch.Tensor]:
    """Our names -> timm VisionTransformer's. Keys with no timm counterpart are left out (listed on stderr).

    Args:
        ours: a flat state dict under our names.
        global_pool: "token" or "avg"; None: token when there is a class token.
        fc_norm: with "avg", write the final norm as timm's ``fc_norm`` (a trunk with FC_NORM: True).
    """
    out, dropped = timm_state_dict(ours, global_pool, fc_norm)
    if dropped:
        print(f"left out (no timm counterpart): {len(dropped)} keys, e.g. {', '.join(dropped[:4])}", file=sys.stderr)
    return out


def to_vissl_vit(ours: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Our names -> a checkpoint MODEL.WEIGHTS_INIT reads with its defaults."""
    return {"classy_state_dict": {"base_model": {"model": group_model_state(ours)}}}


def _export(obj: Any, ours: dict[str, torch.Tensor], opts: dict[str, Any], args: list[str]) -> None:
    """--to safetensors: :func:`vissl_vit.export.export_weights`, and what to call to load it."""
    from vissl_vit.export import create_model_call, export_weights

    if not args[1].endswith(".safetensors"):
        raise UserError(f"--to safetensors: OUT={args[1]} should end in .safetensors.")
    cfg = _config_of(obj, opts["config"])
    if cfg is None:
        raise UserError(
            f"--to safetensors needs the run's config to name timm's model: {args[0]} holds none; "
            "give --config RUN/train_config.yaml."
        )
    result = export_weights(ours, cfg, args[1])
    if result.layout == "timm":
        print(f"wrote {result.path} (timm layout) and {result.json_path}; load it with:")
        print(f"  model = {create_model_call(result.args or {})}")
        print(f"  model.load_state_dict(safetensors.torch.load_file({result.path!r}))")
    else:
        print(f"wrote {result.path} (vissl_vit layout; MODEL.WEIGHTS_INIT loads it): timm cannot build {result.note}")


def run(argv: list[str]) -> None:
    args, opts = split_options(
        argv,
        values={
            "--to": ("to", str),
            "--global-pool": ("global_pool", str),
            "--state-dict-key": ("key", str),
            "--config": ("config", str),
        },
        switches={"--allow-pickle-code-execution": ("allow_code", True), "--fc-norm": ("fc_norm", True)},
        defaults={
            "to": None,
            "global_pool": None,
            "key": "classy_state_dict",
            "allow_code": False,
            "fc_norm": False,
            "config": None,
        },
        usage=USAGE,
    )
    if opts["to"] not in ("safetensors", "timm", "vissl_vit") or len(args) != 2:
        raise UserError(f"Give --to safetensors, --to timm or --to vissl_vit, an input and an output path.\n{USAGE}")
    if opts["global_pool"] not in (None, "token", "avg"):
        raise UserError(f"--global-pool {opts['global_pool']}: expected token or avg.")
    obj = _read(args[0], opts["allow_code"])
    ours = _ours(obj, args[0], opts["key"])
    if opts["to"] == "safetensors":
        _export(obj, ours, opts, args)
        return
    out = to_timm(ours, opts["global_pool"], opts["fc_norm"]) if opts["to"] == "timm" else to_vissl_vit(ours)
    atomic_save(out, args[1])
    note = ""
    if opts["to"] == "timm":
        pool = opts["global_pool"] or ("token" if "trunk.cls_token" in ours else "avg")
        note = f"; build it with global_pool={pool!r}" + (f", fc_norm={opts['fc_norm']}" if pool == "avg" else "")
        pos = ours.get("trunk.pos_embed")
        if "trunk.cls_token" in ours and pos is not None and round(pos.shape[1] ** 0.5) ** 2 == pos.shape[1]:
            note += ", no_embed_class=True"  # the position embedding has no class-token slot (DeiT-III)
    print(f"wrote {args[1]} ({opts['to']} layout{note})")
    cfg = _config_of(obj, opts["config"]) if opts["to"] == "timm" else None
    if cfg is not None:
        from vissl_vit.export import create_model_call, timm_spec

        spec = timm_spec(cfg)
        if spec.args is not None and (spec.global_pool, spec.fc_norm) == (pool, opts["fc_norm"]):
            print(f"  model = {create_model_call(spec.args)}")


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli_main(run, sys.argv[1:] if argv is None else argv, USAGE)
