"""Rank, world size and collectives that also work without a process group (one process)."""

from __future__ import annotations

from typing import Any

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


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every rank along dim 0 (no gradient), in rank order."""
    if not is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffle-BN: gather the global batch, permute it (rank 0 draws the permutation),
    return this rank's slice and the inverse permutation."""
    local = x.shape[0]
    gathered = all_gather_cat(x)
    perm = (
        torch.randperm(gathered.shape[0], device=x.device)
        if get_rank() == 0
        else torch.empty(gathered.shape[0], dtype=torch.long, device=x.device)
    )
    dist.broadcast(perm, src=0)
    inverse = torch.argsort(perm)
    rank = get_rank()
    return gathered[perm[rank * local : (rank + 1) * local]], inverse


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Undo :func:`batch_shuffle` on the outputs: this rank's samples back in its own order."""
    local = x.shape[0]
    gathered = all_gather_cat(x)
    rank = get_rank()
    return gathered[inverse[rank * local : (rank + 1) * local]]


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks (unchanged on one process)."""
    if is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process). Every rank must call it.

    Tensors in ``obj`` should be on the CPU. On NCCL this needs the rank's CUDA device to be the
    current one (``get_device`` sets it), as torch.distributed.all_gather_object does.
    """
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
