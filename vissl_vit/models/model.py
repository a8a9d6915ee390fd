"""A trunk followed by heads: the model every engine trains."""

from __future__ import annotations

import torch
from torch import nn


def forward_views(trunk: nn.Module, views: list[torch.Tensor], out_feat_keys: list[str] | None) -> torch.Tensor:
    """Trunk features of several views, one trunk pass per run of views of the same resolution.

    Multi-crop (SwAV, DINO): views [B, C, H_v, W_v] in order -> features [V*B, D] in the same order.
    """
    sizes = [v.shape[-2:] for v in views]
    feats, start = [], 0
    while start < len(views):
        end = start
        while end < len(views) and sizes[end] == sizes[start]:
            end += 1
        feats.append(trunk(torch.cat(views[start:end]), out_feat_keys)[0])
        start = end
    return torch.cat(feats)


class TrunkHeadModel(nn.Module):
    """Run the trunk, then the heads one after the other on its (single) feature.

    The input is a batch [B, C, H, W], or a list of views (multi-crop), whose features are
    concatenated in order before the heads. State-dict keys are ``trunk.*`` and ``heads.N.*``,
    as in VISSL's checkpoints.

    Args:
        trunk: a trunk whose forward(x, out_feat_keys) returns a list of tensors.
        heads: heads applied in order; none returns the trunk's features.
        out_feat_keys: trunk features to request; None for the trunk's default.
    """

    def __init__(self, trunk: nn.Module, heads: list[nn.Module], out_feat_keys: list[str] | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.out_feat_keys = out_feat_keys

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> list:
        """Images (or a list of views) -> a list of outputs (one head chain; the features if no heads)."""
        if isinstance(x, (list, tuple)):
            feats = [forward_views(self.trunk, list(x), self.out_feat_keys)]
        else:
            feats = self.trunk(x, self.out_feat_keys)
        if not len(self.heads):
            return feats
        out = feats[0]
        for head in self.heads:
            out = head(out)
        return [out]
