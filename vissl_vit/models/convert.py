"""Convert weights between vissl_vit checkpoints and timm ``VisionTransformer`` state dicts.

    python tools/convert_weights.py --to timm RUN_FOLDER_OR_FILE OUT.pth [--global-pool token|avg] [--fc-norm]
    python tools/convert_weights.py --to vissl_vit TIMM_DEIT_DINO_MOCOV3_OR_JAX_FILE OUT.torch

Either reads any file MODEL.WEIGHTS_INIT reads (ours, VISSL's, timm's, DeiT's and DeiT-III's,
DINO's, MoCo v3's, Google's JAX ``.npz``), as a torch file or ``.safetensors``. ``--to timm``
writes the trunk (and a single linear classifier head, as timm's ``head``) under timm's names, for
``timm.create_model(..., num_classes=N).load_state_dict(torch.load(OUT.pth))``. ``--global-pool avg``
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

import sys
from typing import Any

import torch

from vissl_vit.engine.checkpoint import atomic_save, group_model_state
from vissl_vit.errors import UserError
from vissl_vit.models.weights import detect_format, map_names, read_weights_file, select_state_dict
from vissl_vit.utils.cli import cli_main, split_options

USAGE = """usage: python tools/convert_weights.py --to timm|vissl_vit IN OUT [--global-pool token|avg]
                                       [--fc-norm] [--state-dict-key KEY] [--allow-pickle-code-execution]
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
    obj = read_weights_file(path, allow_pickle_code_execution, allow_key="--allow-pickle-code-execution")
    sd, _ = select_state_dict(obj, state_dict_key)
    fmt = detect_format(list(sd))
    if not fmt:
        raise UserError(f"Cannot tell the layout of {path} (keys such as {', '.join(list(sd)[:6])}).")
    return map_names(sd, fmt)


def to_timm(
    ours: dict[str, torch.Tensor], global_pool: str | None = None, fc_norm: bool = False
) -> dict[str, torch.Tensor]:
    """Our names -> timm VisionTransformer's. Keys with no timm counterpart are left out (listed on stderr).

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
    if dropped:
        print(f"left out (no timm counterpart): {len(dropped)} keys, e.g. {', '.join(dropped[:4])}", file=sys.stderr)
    return out


def to_vissl_vit(ours: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Our names -> a checkpoint MODEL.WEIGHTS_INIT reads with its defaults."""
    return {"classy_state_dict": {"base_model": {"model": group_model_state(ours)}}}


def run(argv: list[str]) -> None:
    args, opts = split_options(
        argv,
        values={
            "--to": ("to", str),
            "--global-pool": ("global_pool", str),
            "--state-dict-key": ("key", str),
        },
        switches={"--allow-pickle-code-execution": ("allow_code", True), "--fc-norm": ("fc_norm", True)},
        defaults={"to": None, "global_pool": None, "key": "classy_state_dict", "allow_code": False, "fc_norm": False},
        usage=USAGE,
    )
    if opts["to"] not in ("timm", "vissl_vit") or len(args) != 2:
        raise UserError(f"Give --to timm or --to vissl_vit, an input and an output path.\n{USAGE}")
    if opts["global_pool"] not in (None, "token", "avg"):
        raise UserError(f"--global-pool {opts['global_pool']}: expected token or avg.")
    ours = read_as_ours(args[0], opts["key"], opts["allow_code"])
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


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli_main(run, sys.argv[1:] if argv is None else argv, USAGE)
