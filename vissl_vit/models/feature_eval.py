"""Frozen-trunk evaluation (``MODEL.FEATURE_EVAL_SETTINGS``): linear probes on several features at once.

VISSL's protocol: the trunk is frozen and stays in eval mode (no dropout, no drop-path, whatever
``model.train()`` says), the features named in ``LINEAR_EVAL_FEAT_POOL_OPS_MAP`` are computed in
one trunk pass, each goes through its pool op (and is flattened), and head i of
``MODEL.HEAD.PARAMS`` is trained on feature i. The model's outputs are one logits tensor per
head, and ``accuracy_list_meter`` reports each one. As in VISSL's ``heads_forward``
(base_ssl_model.py), several heads on a single feature are instead one chain (a frozen model's
projection, for feature extraction and kNN).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vissl_vit.errors import ConfigError
from vissl_vit.models.model import TrunkHeadModel


def feature_names(entries: Any) -> list[str]:
    """The feature names of LINEAR_EVAL_FEAT_POOL_OPS_MAP entries (``[name, ...]`` or a bare name)."""
    return [e if isinstance(e, str) else e[0] for e in entries]


def parse_pool_ops_map(entries: list[Any]) -> tuple[list[str], list[nn.Module]]:
    """LINEAR_EVAL_FEAT_POOL_OPS_MAP -> (feature names, pool modules).

    Each entry is ``[feature]`` or ``[feature, [torch.nn module name, [args]]]``, e.g.
    ``["concatCLS4", ["Identity", []]]`` or ``["lastBLK", ["AdaptiveAvgPool1d", [1]]]``.
    """
    names, pools = [], []
    for i, entry in enumerate(entries):
        where = f"config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP[{i}]"
        entry = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not entry or not isinstance(entry[0], str) or len(entry) > 2:
            raise ConfigError(f"{where}: expected [feature name, [pool op, [args]]], got {entry}.")
        names.append(entry[0])
        op: nn.Module = nn.Identity()
        if len(entry) == 2:
            spec = list(entry[1])
            if not spec or not isinstance(spec[0], str):
                raise ConfigError(f"{where}: the pool op is [name of a torch.nn module, [args]], got {entry[1]}.")
            cls = getattr(nn, spec[0], None)
            if not isinstance(cls, type) or not issubclass(cls, nn.Module):
                raise ConfigError(f"{where}: '{spec[0]}' is not a torch.nn module (e.g. Identity, AdaptiveAvgPool1d).")
            args = list(spec[1]) if len(spec) > 1 else []
            try:
                op = cls(*args)
            except TypeError as e:
                raise ConfigError(f"{where}: {spec[0]}{tuple(args)}: {e}") from None
        pools.append(op)
    return names, pools


class FeatureEvalModel(TrunkHeadModel):
    """A frozen trunk with a head per feature (linear eval), or a frozen trunk and head chain.

    Args:
        trunk: the trunk; frozen, always in eval mode.
        heads: one head per feature, or a chain of several heads on a single feature (VISSL's
            rule: the counts decide); trained unless ``freeze_heads``.
        feat_names: the features; None for the trunk's default one.
        pools: a pool op per feature.
        flatten: flatten each pooled feature to [B, -1].
        freeze_heads: FREEZE_TRUNK_AND_HEAD.
    """

    def __init__(
        self,
        trunk: nn.Module,
        heads: list[nn.Module],
        feat_names: list[str] | None,
        pools: list[nn.Module],
        flatten: bool,
        freeze_heads: bool,
    ) -> None:
        super().__init__(trunk, heads, feat_names)
        n_feats = len(feat_names) if feat_names else 1
        self.pools = nn.ModuleList(pools or [nn.Identity() for _ in range(n_feats)])
        self.flatten = flatten
        self.freeze_heads = freeze_heads
        if heads and len(heads) != n_feats and n_feats != 1:
            raise ConfigError(
                f"Linear evaluation trains one head per feature: config.MODEL.HEAD.PARAMS has {len(heads)} heads "
                f"for {n_feats} features ({feat_names or 'the default one'})."
            )
        if freeze_heads and n_feats != 1:
            raise ConfigError("FREEZE_TRUNK_AND_HEAD runs the head chain on one feature; list at most one.")
        self.chain = len(heads) > 1 and n_feats == 1
        frozen = [self.trunk] + ([self.heads] if freeze_heads else [])
        for module in frozen:
            for p in module.parameters():
                p.requires_grad = False
        self.train()

    def train(self, mode: bool = True) -> FeatureEvalModel:
        super().train(mode)
        self.trunk.eval()  # no dropout or drop-path, fixed statistics
        if self.freeze_heads:
            self.heads.eval()
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The pooled (and flattened) features, one per name."""
        with torch.no_grad():
            feats = self.trunk(x, self.out_feat_keys)
        out = []
        for f, pool in zip(feats, self.pools):
            f = pool(f)
            out.append(f.flatten(1) if self.flatten else f)
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images -> a logits tensor per head (the features themselves when there are no heads)."""
        if isinstance(x, (list, tuple)):
            raise ValueError("linear evaluation takes one view per image (no multi-crop collator)")
        feats = self.features(x)
        if not len(self.heads):
            return feats
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_heads):
            if self.chain:
                out = feats[0]
                for head in self.heads:
                    out = head(out)
                return [out]
            return [head(f) for f, head in zip(feats, self.heads)]
