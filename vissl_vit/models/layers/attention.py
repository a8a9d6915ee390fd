"""Multi-head self-attention through torch's scaled_dot_product_attention.

SDPA picks the flash or memory-efficient kernels on GPU and a fused kernel on CPU. The attention
weights are only materialised when asked for (``return_attention``), for visualisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention (timm's parameter names ``qkv``, ``proj``).

    Args:
        dim: token width.
        num_heads: number of heads; ``dim`` must be a multiple of it.
        qkv_bias: learned bias in the query/key/value projection.
        qk_scale: attention scale; None for ``head_dim ** -0.5``.
        attn_drop: dropout of the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the output [B, L, D] and, if asked, the attention weights [B, heads, L, L]."""
        B, L, D = x.shape
        # qkv: [3, B, heads, L, head_dim]
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = None
        if return_attention:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            out = F.dropout(attn, self.attn_drop, self.training) @ v
        else:
            drop = self.attn_drop if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, L, D)
        return self.proj_drop(self.proj(out)), attn
