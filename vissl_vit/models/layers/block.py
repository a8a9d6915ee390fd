"""Pre-norm transformer block: x + DropPath(LS(Attn(Norm(x)))), then x + DropPath(LS(MLP(Norm(x)))).

The block is a composition chosen by keyword, as timm's ``Block(norm_layer=..., act_layer=...,
attn_layer=..., mlp_layer=..., init_values=...)``: a new norm, attention or MLP is a new layer
module passed in, not a branch in here. Blocks of another shape (no skips, rescaled skips) are
other block classes with the same ``forward`` contract:
``forward(x [B, L, D], return_attention=False) -> (x [B, L, D], attention weights or None)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from timm.layers import LayerScale
from torch import nn
from torch.utils.checkpoint import checkpoint

from vissl_vit.models.layers.attention import Attention
from vissl_vit.models.layers.drop_path import DropPath
from vissl_vit.models.layers.mlp import Mlp

# LayerNorm with the eps of ViT, DeiT and big_vision (torch's default is 1e-5)
LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


class Block(nn.Module):
    """A ViT block with timm's parameter names (``norm1``, ``attn``, ``ls1``, ``norm2``, ``mlp``, ``ls2``).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_dim: hidden width of the MLP.
        qkv_bias: bias in the qkv projection.
        qk_scale: attention scale, None for head_dim ** -0.5.
        dropout: dropout after the MLP layers and the attention projection.
        attn_drop: dropout of the attention weights.
        drop_path: stochastic-depth rate of both residual branches.
        init_values: LayerScale (CaiT, DeiT-III): learned per-channel scales of both branches,
            initialised to this value (timm's ``LayerScale``, names ``ls1.gamma``/``ls2.gamma``);
            None for no LayerScale.
        norm_layer: ``norm_layer(dim)`` -> the module normalising tokens [B, L, D].
        act_layer: the MLP's activation class.
        attn_layer: ``attn_layer(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)`` ->
            a module whose ``forward(x, return_attention)`` returns (output, weights or None).
        mlp_layer: ``mlp_layer(dim, hidden_dim, dropout, act_layer)`` -> the MLP module.
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
        init_values: float | None = None,
        norm_layer: Callable[[int], nn.Module] = LayerNorm6,
        act_layer: type[nn.Module] = nn.GELU,
        attn_layer: Callable[..., nn.Module] = Attention,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        checkpoint_mlp: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads, qkv_bias, qk_scale, attn_drop, dropout)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, mlp_dim, dropout, act_layer)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.checkpoint_mlp = checkpoint_mlp

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, attn = self.attn(self.norm1(x), return_attention=return_attention)
        x = x + self.drop_path(self.ls1(y))
        del y  # free the branch output before the MLP runs: lower peak memory, fewer page faults
        if self.checkpoint_mlp and self.training and torch.is_grad_enabled():
            return x + self.drop_path(checkpoint(self._mlp_branch, x, use_reentrant=False)), attn
        return x + self.drop_path(self._mlp_branch(x)), attn
