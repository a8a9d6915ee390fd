"""VISSL's ``mlp`` head: a stack of Linear layers, optionally with BN, ReLU and dropout between."""

from __future__ import annotations

import torch
from torch import nn

from vissl_vit.registry import HEADS


@HEADS.register("mlp")
class MLP(nn.Module):
    """Linear layers of widths ``dims`` (``dims[0]`` is the input width).

    Args:
        dims: widths, e.g. [768, 1000] for a linear classifier, [768, 2048, 128] for a projector.
        use_bn: BatchNorm1d after each linear layer.
        use_relu: ReLU after each linear layer.
        use_dropout: Dropout(0.5) after each linear layer.
        use_bias: bias in the linear layers.
        skip_last_layer_relu_bn: no BN/ReLU/dropout after the last layer.
        weight_init: "normal" (VISSL's: weights N(0, 0.01), zero biases) or "default" (PyTorch's
            own nn.Linear init, U(+-1/sqrt(fan_in)); RescaleViT's classifier).
    """

    def __init__(
        self,
        dims: list[int],
        use_bn: bool = False,
        use_relu: bool = False,
        use_dropout: bool = False,
        use_bias: bool = True,
        skip_last_layer_relu_bn: bool = True,
        weight_init: str = "normal",
    ) -> None:
        super().__init__()
        if weight_init not in ("normal", "default"):
            raise ValueError(f"mlp head weight_init='{weight_init}': expected normal or default")
        if len(dims) < 2:
            raise ValueError(f"mlp head needs at least two dims (input and output), got {dims}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out, bias=use_bias))
            if i == len(dims) - 2 and skip_last_layer_relu_bn:
                break
            if use_bn:
                layers.append(nn.BatchNorm1d(d_out))
            if use_relu:
                layers.append(nn.ReLU(inplace=True))
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.clf = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Linear) and weight_init == "normal":
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, D] (or [B, D, 1, 1], flattened) -> [B, dims[-1]]."""
        return self.clf(x.flatten(1) if x.ndim > 2 else x)
