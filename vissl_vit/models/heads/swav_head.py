"""SwAV's head: a projection MLP, L2-normalised embeddings, and one or more sets of prototypes.

"Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", Caron et al.,
NeurIPS 2020. Prototype layers are named ``prototypes0``, ``prototypes1``, ... as in VISSL.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vissl_vit.models.heads.mlp import MLP
from vissl_vit.registry import HEADS


class SwAVOutput(NamedTuple):
    """embeddings [N, D] (L2-normalised), scores per prototype set [N, K_j], and the prototype
    weights [K_j, D] (detached), which the loss needs to score its queue."""

    embeddings: torch.Tensor
    scores: list[torch.Tensor]
    prototypes: list[torch.Tensor]


@HEADS.register("swav_head")
class SwAVPrototypesHead(nn.Module):
    """Args:
    dims: widths of the projection MLP, e.g. [768, 2048, 128] (dims[0]: trunk width).
    num_clusters: number of prototypes of each set, e.g. [3000].
    use_bn: BatchNorm1d in the projection MLP's hidden layers.
    use_bias: bias in the projection MLP.
    """

    # the hooks the trainer must run for this head (engine/hooks/build.py): unit prototypes after each step
    trainer_hooks: tuple[str, ...] = ("normalize_prototypes_hook",)

    def __init__(self, dims: list[int], num_clusters: list[int], use_bn: bool = True, use_bias: bool = True) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"swav_head needs at least two dims, got {dims}")
        # Linear (-> BN) -> ReLU between layers, none after the last
        self.projection_head = MLP(dims, use_bn=use_bn, use_relu=True, use_bias=use_bias)
        self.num_sets = len(num_clusters)
        for j, k in enumerate(num_clusters):
            self.add_module(f"prototypes{j}", nn.Linear(dims[-1], k, bias=False))

    def prototype_layers(self) -> list[nn.Linear]:
        return [getattr(self, f"prototypes{j}") for j in range(self.num_sets)]

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise each prototype (after each optimizer step: scores are cosine similarities)."""
        for layer in self.prototype_layers():
            layer.weight.copy_(F.normalize(layer.weight, dim=1))

    def forward(self, x: torch.Tensor) -> SwAVOutput:
        """x: [N, dims[0]] -> SwAVOutput."""
        emb = F.normalize(self.projection_head(x), dim=1)
        layers = self.prototype_layers()
        return SwAVOutput(emb, [layer(emb) for layer in layers], [layer.weight.detach() for layer in layers])
