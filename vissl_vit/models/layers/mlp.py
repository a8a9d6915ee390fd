"""The transformer block's MLP: Linear -> activation -> Dropout -> Linear -> Dropout."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """Two-layer MLP of a transformer block (timm's parameter names ``fc1``, ``fc2``).

    Args:
        dim: input and output width.
        hidden_dim: hidden width (usually 4 x dim).
        dropout: dropout after each linear layer.
        act_layer: the activation class (GELU, exact erf form, as timm and DeiT).
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
