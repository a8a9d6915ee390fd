"""Position-embedding helpers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """Interpolate (bicubic, antialiased as timm does) the patch part of a [1, prefix + H*W, D] position embedding to a new grid.

    The prefix tokens' (class token's) embeddings are kept as they are. The old grid is square.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = int(grid.shape[1])  # plain ints: shapes are tensors while tracing (fvcore flop counts)
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"position embedding of {n} patch tokens is not a square grid")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if (old, old) == new_grid:
        return pos_embed
    D = grid.shape[-1]
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2)  # [1, D, old, old]
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", antialias=True).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)
    return torch.cat([prefix, grid], dim=1)


def sincos_2d_pos_embed(grid: int, dim: int, num_prefix_tokens: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings [1, prefix + grid*grid, dim], MoCo v3's
    ``build_2d_sincos_position_embedding`` (vits.py) value for value.

    Channels in quarters: sin(r w), cos(r w), sin(c w), cos(c w), with r the patch's row and c its
    column (tokens in row-major order), w_d = 1 / temperature^(d / (dim/4)). MoCo v3 names the row
    quarters "w" (its meshgrid is indexed ij over (w, h)); what counts is the order, which is why
    checkpoints trained with it (and their kNN / linear-eval numbers) need this one. The prefix
    tokens get zeros.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [grid, grid]: token r*grid + c
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    o_r, o_c = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega  # [grid*grid, dim/4]
    emb = torch.cat([o_r.sin(), o_r.cos(), o_c.sin(), o_c.cos()], dim=1)
    return torch.cat([torch.zeros(num_prefix_tokens, dim), emb])[None]
