"""Rank, world size and collectives that also work without a process group (one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_primary() -> bool:
    """True on rank 0, the only rank that writes the run folder."""
    return get_rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns it unchanged on one process)."""
    if is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t
