"""Image to patch tokens: a strided convolution (timm's ``patch_embed.proj``)."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each to ``embed_dim``.

    Args:
        patch_size: side of the square patches, in pixels.
        in_chans: image channels.
        embed_dim: token width.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """x: [B, C, H, W] -> tokens [B, (H/p)(W/p), D] and the patch grid (H/p, W/p)."""
        _, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}")
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (H // p, W // p)
