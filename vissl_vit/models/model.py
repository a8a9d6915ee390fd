"""A trunk followed by heads: the model every engine trains."""

from __future__ import annotations

import torch
from torch import nn


class TrunkHeadModel(nn.Module):
    """Run the trunk, then the heads one after the other on its (single) feature.

    State-dict keys are ``trunk.*`` and ``heads.N.*``, as in VISSL's checkpoints.

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

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images [B, C, H, W] -> a list of outputs (one per head chain; the features if no heads)."""
        feats = self.trunk(x, self.out_feat_keys)
        if not len(self.heads):
            return feats
        out = feats[0]
        for head in self.heads:
            out = head(out)
        return [out]
