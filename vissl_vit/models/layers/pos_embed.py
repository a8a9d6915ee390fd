"""Position-embedding helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """Interpolate (bicubic, antialiased as timm does) the patch part of a [1, prefix + H*W, D] position embedding to a new grid.

    The prefix tokens' (class token's) embeddings are kept as they are. The old grid is square.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = int(round(grid.shape[1] ** 0.5))
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} patch tokens is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    D = grid.shape[-1]
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2)  # [1, D, old, old]
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", antialias=True).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)
    return torch.cat([prefix, grid], dim=1)
