"""SimCLR's InfoNCE (NT-Xent) loss over the global batch, VISSL's ``simclr_info_nce_loss``.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
arXiv:2002.05709, eq. 1. Each process holds the embeddings of its 2n views in VISSL's layout,
``[view 0 of images 1..n, view 1 of images 1..n]`` (the model concatenates the collator's views in
this order). The embeddings of every process are gathered, so each anchor is contrasted with the
2N - 2 other views of the global batch of N images (N = n x world size):

    loss = mean over local anchors i of -log( e^{s(i, p(i)) / T} / sum_{k != i} e^{s(i, k) / T} )

with s the cosine similarity and p(i) the other view of i's image; the sum over k runs over the
positive and every negative of the global batch (all but the anchor itself), as VISSL's masks do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vissl_vit.errors import ConfigError
from vissl_vit.registry import LOSSES
from vissl_vit.utils.distributed import get_rank, get_world_size, is_initialized

# VISSL's buffer_params; world_size and effective_batch_size are inferred in VISSL (and here come
# from the process group and the gathered batch), so only embedding_dim is checked.
_BUFFER_KEYS = ("embedding_dim", "world_size", "effective_batch_size")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the sum of every rank's gradient of its slice.

    With DDP averaging the parameters' gradients over ranks, this gives the gradient of the mean
    of the ranks' losses, the loss of the global batch (gloo and nccl alike: no reduce_scatter).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # x: [b, D] -> [world * b, D]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.b = dist.get_rank(), x.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order, differentiable; ``x`` itself on one process."""
    return _GatherWithGrad.apply(x) if is_initialized() and get_world_size() > 1 else x


@LOSSES.register("simclr_info_nce_loss")
class SimclrInfoNCELoss(nn.Module):
    """SimCLR's InfoNCE loss with negatives from every process (VISSL's name and keys).

    Args:
        temperature: T, the softmax temperature (SimCLR: 0.1 at batch 4096, 0.5 for small batches).
        buffer_params: VISSL's section: ``embedding_dim`` (the width of the last head's output,
            checked); ``world_size`` and ``effective_batch_size`` are accepted and not used (VISSL
            infers them; here the process group and the gathered batch give them).
    """

    def __init__(self, temperature: float = 0.1, buffer_params: dict[str, int] | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        buffer_params = dict(buffer_params or {"embedding_dim": 128})
        unknown = sorted(set(buffer_params) - set(_BUFFER_KEYS))
        if unknown:
            raise ValueError(f"buffer_params: unknown keys {unknown}; expected some of {list(_BUFFER_KEYS)}")
        self.temperature = temperature
        self.embedding_dim = int(buffer_params["embedding_dim"])

    def forward(self, output: list[torch.Tensor] | torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """``output``: the embeddings [2n, D] of this process (or a one-element list of them)."""
        z = output[0] if isinstance(output, (list, tuple)) else output
        if z.ndim != 2 or z.shape[1] != self.embedding_dim:
            raise ConfigError(
                f"simclr_info_nce_loss got embeddings of shape {list(z.shape)}, but "
                f"config.LOSS.simclr_info_nce_loss.buffer_params.embedding_dim={self.embedding_dim}: set it to the "
                "last head's output width."
            )
        if z.shape[0] % 2:
            raise ValueError(
                f"simclr_info_nce_loss needs 2 views per image (simclr_collator after ImgReplicatePil "
                f"num_times=2); got {z.shape[0]} embeddings"
            )
        z = F.normalize(z.float(), dim=1)  # [2n, D]
        all_z = gather_with_grad(z)  # [2N, D], rank r's block at rows 2n r .. 2n (r + 1)
        two_n, n = z.shape[0], z.shape[0] // 2
        offset = get_rank() * two_n if is_initialized() else 0
        logits = z @ all_z.t() / self.temperature  # [2n, 2N]
        local = torch.arange(two_n, device=z.device)
        # the anchor is neither a positive nor a negative of itself
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[local, offset + local] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        positive = offset + (local + n) % two_n  # view 0 <-> view 1 of the same image
        return F.cross_entropy(logits, positive)
