"""MoCo's InfoNCE loss: v2 with a queue of negatives, v3 with in-batch keys from every rank.

v2 (Chen et al. 2020, arXiv:2003.04297): logits = [q.k+, q.queue] / tau, the positive at index 0,
cross-entropy; then the keys of the whole global batch enter the FIFO queue.
v3 (Chen, Xie, He 2021, arXiv:2104.02057): ctr(q, k) = CE(q . all_gather(k)^T / tau, labels =
local index + rank * B) * 2 tau, and loss = ctr(q1, k2) + ctr(q2, k1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vissl_vit.registry import LOSSES
from vissl_vit.utils.distributed import all_gather_cat, get_rank


@LOSSES.register("moco_loss")
class MoCoLoss(nn.Module):
    """Args (VISSL's keys, plus the v3 switches):
    embedding_dim: width of the embeddings (the head's output).
    queue_size: v2's number of negatives kept; a multiple of the global batch.
    momentum: the momentum encoder's base momentum (used by the MoCo model).
    temperature: tau.
    version: "v2" or "v3".
    momentum_schedule: "constant" or "cosine" (used by the MoCo model).
    shuffle_bn: v2's shuffle-BN across processes (used by the MoCo model).
    """

    def __init__(
        self,
        embedding_dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        version: Literal["v2", "v3"] = "v2",
        momentum_schedule: Literal["constant", "cosine"] = "constant",
        shuffle_bn: bool = True,
    ) -> None:
        super().__init__()
        if version not in ("v2", "v3"):
            raise ValueError(f"version must be 'v2' or 'v3', got {version!r}")
        self.embedding_dim, self.temperature, self.version = embedding_dim, temperature, version
        self.queue_size = queue_size
        if version == "v2":
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, embedding_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.embedding_dim:
            raise ValueError(
                f"moco_loss: the model outputs embeddings of width {x.shape[1]} but "
                f"LOSS.moco_loss.embedding_dim={self.embedding_dim}; make the last head's output match"
            )

    def forward(self, output: list[torch.Tensor], target: torch.Tensor | None = None) -> torch.Tensor:
        """output: [queries, keys] from MoCoModel; target is unused."""
        q, k = F.normalize(output[0], dim=1), F.normalize(output[1].detach(), dim=1)
        self._check(q)
        if self.version == "v2":
            return self._v2(q, k)
        B = q.shape[0] // 2
        return self._ctr(q[:B], k[B:]) + self._ctr(q[B:], k[:B])

    def _ctr(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        keys = all_gather_cat(k)  # [world * B, D]
        logits = q @ keys.T / self.temperature
        labels = torch.arange(q.shape[0], device=q.device) + get_rank() * q.shape[0]
        return F.cross_entropy(logits, labels) * (2 * self.temperature)

    def _v2(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        l_pos = (q * k).sum(dim=1, keepdim=True)  # [B, 1]
        l_neg = q @ self.queue.clone().T  # [B, K]
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        if torch.is_grad_enabled():  # training step: the global batch's keys enter the queue
            self.enqueue(all_gather_cat(k))
        return loss

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: overwrite the oldest entries with ``keys`` [N, D]."""
        n = keys.shape[0]
        if self.queue_size % n:
            raise ValueError(f"moco_loss: queue_size={self.queue_size} must be a multiple of the global batch {n}")
        ptr = int(self.queue_ptr)
        self.queue[ptr : ptr + n] = keys
        self.queue_ptr.fill_((ptr + n) % self.queue_size)
