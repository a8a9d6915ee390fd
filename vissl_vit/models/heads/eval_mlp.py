"""VISSL's ``eval_mlp`` linear-probe head: BatchNorm over the features, then ``mlp``."""

from __future__ import annotations

import torch
from torch import nn

from vissl_vit.models.heads.mlp import MLP
from vissl_vit.registry import HEADS


@HEADS.register("eval_mlp")
class LinearEvalMLP(nn.Module):
    """BatchNorm over the input features, then linear layers (MAE's linear probe recipe).

    Args:
        in_channels: input width.
        dims: widths of the linear layers, ``dims[0] == in_channels``.
        use_bn, use_relu, use_dropout, use_bias, skip_last_layer_relu_bn: as for ``mlp``.
    """

    def __init__(
        self,
        in_channels: int,
        dims: list[int],
        use_bn: bool = False,
        use_relu: bool = False,
        use_dropout: bool = False,
        use_bias: bool = True,
        skip_last_layer_relu_bn: bool = True,
    ) -> None:
        super().__init__()
        if dims[0] != in_channels:
            raise ValueError(f"eval_mlp: dims[0]={dims[0]} must equal in_channels={in_channels}")
        self.channel_bn = nn.BatchNorm1d(in_channels, eps=1e-5, momentum=0.1)
        self.clf = MLP(dims, use_bn, use_relu, use_dropout, use_bias, skip_last_layer_relu_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C] or [B, C, 1, 1] -> [B, dims[-1]]."""
        return self.clf(self.channel_bn(x.flatten(1)))
