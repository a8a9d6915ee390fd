"""Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vissl_vit.models.layers.attention import Attention
from vissl_vit.models.layers.drop_path import DropPath
from vissl_vit.models.layers.mlp import Mlp


class Block(nn.Module):
    """A ViT block with timm's parameter names (``norm1``, ``attn``, ``norm2``, ``mlp``).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_dim: hidden width of the MLP.
        qkv_bias: bias in the qkv projection.
        qk_scale: attention scale, None for head_dim ** -0.5.
        dropout: dropout after the MLP layers and the attention projection.
        attn_drop: dropout of the attention weights.
        drop_path: stochastic-depth rate of both residual branches.
        checkpoint_mlp: recompute the MLP in the backward pass to save memory.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        dropout: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        checkpoint_mlp: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.checkpoint_mlp = checkpoint_mlp

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, attn = self.attn(self.norm1(x), return_attention=return_attention)
        x = x + self.drop_path(y)
        del y  # free the branch output before the MLP runs: lower peak memory, fewer page faults
        if self.checkpoint_mlp and self.training and torch.is_grad_enabled():
            return x + self.drop_path(checkpoint(self._mlp_branch, x, use_reentrant=False)), attn
        return x + self.drop_path(self._mlp_branch(x)), attn
