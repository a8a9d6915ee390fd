"""Parameter groups from rules: which parameters get weight decay, and each group's LR factor.

Each group is ``{"params", "lr_scale", "weight_decay", "wd_scale"}``. The trainer sets, at every
step, ``lr = scheduled lr x lr_scale`` (timm's ``lr_scale``, detectron2's ``LRMultiplier``) and,
where ``wd_scale`` is not None, ``weight_decay = scheduled weight decay x wd_scale`` (1 for a
decayed group, 0 for an exempt one). A group whose weight decay was set by an override has
``wd_scale`` None: it keeps that value through training.

Rules, in order:
  1. decay or not: names in ``non_regularized_parameters`` (substrings), norm layers (unless
     ``regularize_bn``), ``*.bias`` (unless ``regularize_bias``), every parameter with ndim <= 1
     (unless ``regularize_1d_params``: timm's and DINO's rule, which also exempts LayerScale gammas),
     and with ``regularize_only_kernels`` everything but kernels: parameters named ``*weight``
     with ndim >= 2 (Linear and Conv weights). That is big_vision's ``.*/kernel$`` (flax names
     Dense/Conv weights ``kernel``) and mup-vit's ``ndim >= 2 and name.endswith('weight')``: it
     also exempts what ndim <= 1 does not reach, the position embedding, class and register
     tokens (ndim 3, not ``weight``) without naming them. An ``nn.Embedding`` weight counts as a
     kernel here; flax's ``Embed`` (``embedding``) does not.
  2. layer-wise LR decay (BEiT's rule): ``lr_scale = decay ** (num_layers + 1 - layer_id)`` with
     the trunk's ``layer_id``: 0 for embeddings, i + 1 for ``blocks.i``, num_layers + 1 for the
     final norm; parameters outside the trunk (heads) get num_layers + 1, scale 1.
  3. per-name overrides: the first ``[pattern, {lr_scale, weight_decay}]`` whose regular expression
     is found in the parameter's name replaces what rules 1-2 gave.

About the layer-decay convention: the exponent ``num_layers + 1 - layer_id`` is BEiT's and MAE's
(``lr_decay.py``) and VISSL's ``lr_decay`` constructor's; timm's ``param_groups_layer_decay``
gives the same scales to embeddings, blocks and head, but merges the final norm into the last
block (scale ``decay``, here 1). deit3-jax's ``decay ** (L - i)`` (``utils.py::get_layer_index_fn``)
is one factor ``decay`` higher everywhere (its last block is not decayed). We follow BEiT/timm:
the reference implementations of layer decay for ViT fine-tuning use it, and no DeiT-III recipe
uses layer decay (``--lr-decay 1.0``), so none depends on deit3-jax's offset (RECIPES.md 3.5).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from vissl_vit.errors import ConfigError

# VISSL's names for the ViT's position embedding and class token -> ours (timm's)
ALIASES = {"pos_embedding": "pos_embed", "class_token": "cls_token"}
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
OVERRIDE_KEYS = ("lr_scale", "weight_decay")


def layer_ids(model: nn.Module) -> tuple[dict[int, int], int]:
    """``id(parameter) -> layer id`` from every trunk inside ``model``, and the trunks' depth.

    Parameters are matched by identity, so prefixes (``trunk.``, ``module.``, a MoCo wrapper) do
    not matter. Raises ConfigError when the model holds no trunk (nothing to decay by layer).
    """
    from vissl_vit.models.trunks.base import Trunk  # models import optim-free modules only; keep it local

    ids: dict[int, int] = {}
    depth = None
    for module in model.modules():
        if isinstance(module, Trunk):
            depth = module.num_layers if depth is None else max(depth, module.num_layers)
            ids.update({id(p): module.layer_id(n) for n, p in module.named_parameters()})
    if depth is None:
        raise ConfigError(
            "config.OPTIMIZER.param_group_constructor=lr_decay: the model has no trunk with layer ids "
            "(vissl_vit.models.trunks.base.Trunk); use param_group_constructor=default."
        )
    return ids, depth


def _check_overrides(overrides: list[Any]) -> list[tuple[re.Pattern, dict[str, float]]]:
    out = []
    for i, entry in enumerate(overrides):
        where = f"config.OPTIMIZER.param_group_overrides[{i}]"
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
            raise ConfigError(f"{where}={entry!r}: expected [pattern, {{lr_scale: x, weight_decay: y}}].")
        pattern, values = entry
        unknown = sorted(set(values) - set(OVERRIDE_KEYS))
        if unknown or not values:
            raise ConfigError(f"{where}: keys {unknown or '{}'}; expected one or both of {', '.join(OVERRIDE_KEYS)}.")
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"{where}.{k}={v!r}: expected a number >= 0.")
        try:
            out.append((re.compile(str(pattern)), {k: float(v) for k, v in values.items()}))
        except re.error as e:
            raise ConfigError(f"{where}: '{pattern}' is not a regular expression ({e}).") from None
    return out


def get_param_groups(
    model: nn.Module,
    weight_decay: float,
    regularize_bn: bool,
    regularize_bias: bool,
    non_regularized_parameters: list[str],
    regularize_1d_params: bool = True,
    layer_decay: float | None = None,
    overrides: Sequence[Any] = (),
    regularize_only_kernels: bool = False,
) -> list[dict]:
    """Parameter groups with their own ``lr_scale`` and weight decay (see the module docstring).

    Parameters that share (lr_scale, weight_decay, wd_scale) share a group; groups come in the order
    their first parameter appears in ``model.named_parameters()``, except that without layer decay
    and overrides the decayed group always comes first (two groups, as before these rules).

    Args:
        model: the model.
        weight_decay: weight decay of the regularized parameters (the schedule's value at the start).
        regularize_bn: weight decay on normalisation layers (BN, LN, GN).
        regularize_bias: weight decay on biases.
        non_regularized_parameters: substrings of parameter names without weight decay; VISSL's
            ``pos_embedding`` / ``class_token`` are accepted. An entry that matches nothing raises.
        regularize_1d_params: weight decay on parameters with ndim <= 1; False is timm's/DINO's rule.
        layer_decay: layer-wise LR decay factor, or None for none (every lr_scale 1).
        overrides: ``[pattern, {lr_scale, weight_decay}]`` entries; an entry matching nothing raises.
        regularize_only_kernels: weight decay only on kernels (``*weight``, ndim >= 2), big_vision's rule.
    """
    patterns = [ALIASES.get(p, p) for p in non_regularized_parameters]
    rules = _check_overrides(list(overrides))
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    ids, depth = layer_ids(model) if layer_decay is not None else ({}, 0)
    matched = dict.fromkeys(non_regularized_parameters, False)
    hit_rules = [False] * len(rules)
    groups: dict[tuple[float, float, float | None], dict] = {}
    if layer_decay is None and not rules:
        # the decayed group first, even when empty: the order of the two groups before layer decay
        # existed, which the optimizer state of older checkpoints follows
        groups[(1.0, weight_decay, 1.0)] = {
            "params": [],
            "lr_scale": 1.0,
            "weight_decay": weight_decay,
            "wd_scale": 1.0,
        }
    names = []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen: no group, but an entry naming it is not a typo
            matched.update({o: True for o, pat in zip(non_regularized_parameters, patterns) if pat in name})
            hit_rules = [hit or bool(rx.search(name)) for hit, (rx, _) in zip(hit_rules, rules)]
            continue
        names.append(name)
        skip = False
        for orig, pat in zip(non_regularized_parameters, patterns):
            if pat in name:
                matched[orig] = True
                skip = True
        skip |= id(p) in norm_params and not regularize_bn
        skip |= name.endswith(".bias") and not regularize_bias
        skip |= p.ndim <= 1 and not regularize_1d_params
        skip |= regularize_only_kernels and not (p.ndim >= 2 and name.endswith("weight"))
        wd_scale: float | None = 0.0 if skip else 1.0
        wd = weight_decay * wd_scale
        lr_scale = 1.0
        if layer_decay is not None:
            lr_scale = float(layer_decay ** (depth + 1 - ids.get(id(p), depth + 1)))
        for i, (rx, values) in enumerate(rules):
            if rx.search(name):
                hit_rules[i] = True
                lr_scale = values.get("lr_scale", lr_scale)
                if "weight_decay" in values:
                    wd, wd_scale = values["weight_decay"], None  # fixed: the schedule leaves it alone
                break
        key = (lr_scale, wd, wd_scale)
        if key not in groups:
            groups[key] = {"params": [], "lr_scale": lr_scale, "weight_decay": wd, "wd_scale": wd_scale}
        groups[key]["params"].append(p)
    missing = [k for k, hit in matched.items() if not hit]
    missing_rules = [overrides[i][0] for i, hit in enumerate(hit_rules) if not hit]
    if missing or missing_rules:
        sample = ", ".join(n for n in names if "." not in n or n.count(".") <= 2)[:600]
        key = "non_regularized_parameters" if missing else "param_group_overrides"
        raise ConfigError(
            f"config.OPTIMIZER.{key}: {missing or missing_rules} match no parameter name. Entries are "
            f"{'substrings' if missing else 'regular expressions searched in'} names such as: {sample} ..."
        )
    return list(groups.values())
