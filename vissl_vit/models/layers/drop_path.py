"""Stochastic depth (Huang et al., 2016): drop a residual branch per sample."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Zero a residual branch for a random subset of samples, scaling the rest by 1 / keep.

    Args:
        drop_prob: probability of dropping the branch for a sample, in [0, 1).
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"
