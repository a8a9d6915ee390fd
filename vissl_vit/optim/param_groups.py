"""Split parameters into regularized (weight decay) and non-regularized groups."""

from __future__ import annotations

from torch import nn

from vissl_vit.errors import ConfigError

# VISSL's names for the ViT's position embedding and class token -> ours (timm's)
ALIASES = {"pos_embedding": "pos_embed", "class_token": "cls_token"}
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def get_param_groups(
    model: nn.Module,
    weight_decay: float,
    regularize_bn: bool,
    regularize_bias: bool,
    non_regularized_parameters: list[str],
) -> list[dict]:
    """Two param groups: ``{"params", "weight_decay": weight_decay}`` and ``{..., 0.0}``.

    Args:
        model: the model.
        weight_decay: weight decay of the regularized group.
        regularize_bn: weight decay on normalisation layers (BN, LN, GN).
        regularize_bias: weight decay on biases.
        non_regularized_parameters: substrings of parameter names without weight decay; VISSL's
            ``pos_embedding`` / ``class_token`` are accepted. An entry that matches nothing raises.
    """
    patterns = [ALIASES.get(p, p) for p in non_regularized_parameters]
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    matched = dict.fromkeys(non_regularized_parameters, False)
    reg, no_reg = [], []
    names = []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen: no group, but an entry naming it is not a typo
            matched.update({o: True for o, pat in zip(non_regularized_parameters, patterns) if pat in name})
            continue
        names.append(name)
        skip = False
        for orig, pat in zip(non_regularized_parameters, patterns):
            if pat in name:
                matched[orig] = True
                skip = True
        if id(p) in norm_params and not regularize_bn:
            skip = True
        if name.endswith(".bias") and not regularize_bias:
            skip = True
        (no_reg if skip else reg).append(p)
    missing = [k for k, hit in matched.items() if not hit]
    if missing:
        sample = ", ".join(n for n in names if "." not in n or n.count(".") <= 2)[:600]
        raise ConfigError(
            f"config.OPTIMIZER.non_regularized_parameters: {missing} match no parameter name. Entries are "
            f"substrings of names such as: {sample} ..."
        )
    groups = [{"params": reg, "weight_decay": weight_decay}]
    if no_reg:
        groups.append({"params": no_reg, "weight_decay": 0.0})
    return groups
