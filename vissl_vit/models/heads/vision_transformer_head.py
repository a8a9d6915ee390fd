"""The ViT classification head: optional pre-logits (Linear + Tanh), then a linear classifier.

As in the ViT paper's pre-training setup: the pre-logits layer is used when pre-training on large
data sets, and the classifier is initialised at zero.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from timm.layers import lecun_normal_
from torch import nn

from vissl_vit.registry import HEADS


@HEADS.register("vision_transformer_head")
class VisionTransformerHead(nn.Module):
    """Args:
    in_plane: input width (the trunk's HIDDEN_DIM).
    num_classes: number of classes.
    hidden_dim: width of the Tanh pre-logits layer, or None for a single linear layer.
    weight_init: the classifier's weights: "zeros" (ViT, big_vision, timm), or "suo" (SimplEsT-ViT:
        scaled uniform orthogonal as its code runs it on torch's (out, in) layout, gain
        sqrt(in_plane / num_classes)); its bias is 0 either way.
    """

    def __init__(
        self, in_plane: int, num_classes: int, hidden_dim: int | None = None, weight_init: str = "zeros"
    ) -> None:
        super().__init__()
        layers: list[tuple[str, nn.Module]] = []
        width = in_plane
        if hidden_dim:
            layers += [("pre_logits", nn.Linear(in_plane, hidden_dim)), ("act", nn.Tanh())]
            width = hidden_dim
        layers.append(("head", nn.Linear(width, num_classes)))
        self.layers = nn.Sequential(OrderedDict(layers))
        if hidden_dim:
            # Flax Dense's default, as big_vision's pre_logits has it: lecun normal, a normal truncated
            # at 2 sd and widened so that its sd is sqrt(1/in_plane) (timm's lecun_normal_); torch's
            # trunc_normal_(std=...) truncates at +-2 absolute, i.e. not at all at this scale
            lecun_normal_(self.layers.pre_logits.weight)
            nn.init.zeros_(self.layers.pre_logits.bias)
        if weight_init not in ("zeros", "suo"):
            raise ValueError(f"vision_transformer_head weight_init='{weight_init}': expected zeros or suo")
        if weight_init == "suo":
            from vissl_vit.models.layers.tat import scaled_uniform_orthogonal_

            scaled_uniform_orthogonal_(self.layers.head.weight, dks_torch_layout=True)
        else:
            nn.init.zeros_(self.layers.head.weight)
        nn.init.zeros_(self.layers.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_plane] -> logits [B, num_classes]."""
        return self.layers(x)
