"""SwAV's swapped-prediction loss with Sinkhorn-Knopp codes, distributed over ranks.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020 (arXiv:2006.09882). For each crop used for assignment, codes q come from the
Sinkhorn-Knopp algorithm on its prototype scores (with the queue's, when on); every other crop
predicts them: loss = -sum q log softmax(scores / tau), averaged over crops and prototype sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vissl_vit.models.heads.swav_head import SwAVOutput
from vissl_vit.registry import LOSSES
from vissl_vit.utils.distributed import all_reduce_max, all_reduce_sum, get_world_size


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float, num_iters: int, double: bool = False) -> torch.Tensor:
    """Equipartitioned soft assignments of this rank's samples, computed over the global batch.

    Args:
        scores: [B_local, K] prototype scores of this rank's samples.
        epsilon: entropy regularisation (0.05 in SwAV).
        num_iters: Sinkhorn iterations (3 in SwAV).
        double: compute in float64.

    Returns:
        codes [B_local, K]: each row sums to 1; over the global batch each prototype gets B/K.
        The row and column sums are all-reduced, so the result on any split of the global batch
        over ranks equals the one-process result.
    """
    scores = scores.double() if double else scores.float()
    scores = scores - all_reduce_max(scores.max().reshape(1))  # exp without overflow; cancels out
    Q = torch.exp(scores / epsilon).T  # [K, B]
    K = Q.shape[0]
    B = all_reduce_sum(torch.tensor([float(Q.shape[1])], dtype=Q.dtype, device=Q.device))
    Q /= all_reduce_sum(Q.sum().reshape(1))
    for _ in range(num_iters):
        Q /= all_reduce_sum(Q.sum(dim=1, keepdim=True))  # rows (prototypes): each sums to 1/K
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)  # columns (samples): each sums to 1/B
        Q /= B
    return (Q * B).T


@LOSSES.register("swav_loss")
class SwAVLoss(nn.Module):
    """Args (VISSL's keys):
    embedding_dim: width of the head's embeddings.
    num_prototypes: prototypes of each set, as the head's num_clusters.
    temperature: tau of the softmax over prototype scores (0.1).
    epsilon: Sinkhorn's entropy regularisation (0.05; 0.03 with larger prototype counts).
    num_iters: Sinkhorn iterations (3).
    crops_for_assign: the crops whose codes are predicted, e.g. [0, 1].
    num_crops: crops per image (2 + the small multi-crop ones).
    use_double_precision: Sinkhorn in float64.
    normalize_last_layer: L2-normalise the prototypes after each optimizer step.
    queue: {queue_length: global number of past embeddings used in Sinkhorn (0: none),
        start_iter: the iteration from which the queue fills; it joins Sinkhorn once full, as in
        official SwAV (``queue_length / global batch`` iterations later)}.

    Each rank's queue holds that rank's own past embeddings (``queue_length / world_size`` of
    them), so a checkpoint keeps every rank's state (``state_is_per_rank``), and a resume at another
    world size rebuilds the global queue from them (:meth:`redistribute_state`).
    """

    state_is_per_rank = True

    def __init__(
        self,
        embedding_dim: int = 128,
        num_prototypes: list[int] = (3000,),
        temperature: float = 0.1,
        epsilon: float = 0.05,
        num_iters: int = 3,
        crops_for_assign: list[int] = (0, 1),
        num_crops: int = 2,
        use_double_precision: bool = False,
        normalize_last_layer: bool = True,
        queue: dict | None = None,
    ) -> None:
        super().__init__()
        queue = dict(queue or {})
        self.embedding_dim, self.num_prototypes = embedding_dim, list(num_prototypes)
        self.temperature, self.epsilon, self.num_iters = temperature, epsilon, num_iters
        self.crops_for_assign, self.num_crops = list(crops_for_assign), num_crops
        self.use_double_precision, self.normalize_last_layer = use_double_precision, normalize_last_layer
        self.queue_length = queue.get("queue_length", 0)
        self.queue_start_iter = queue.get("start_iter", 0)
        if any(c >= num_crops for c in self.crops_for_assign):
            raise ValueError(f"crops_for_assign={self.crops_for_assign} names crops beyond num_crops={num_crops}")
        local = self.queue_length // max(get_world_size(), 1)
        # queue of past embeddings per assigned crop: [len(crops_for_assign), local, D], filled from the end
        self.register_buffer("queue", torch.zeros(len(self.crops_for_assign), local, embedding_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    def forward(self, output: list[SwAVOutput], target: torch.Tensor | None = None) -> torch.Tensor:
        """output: [SwAVOutput] over num_crops x B samples (crop-major); target is unused."""
        out: SwAVOutput = output[0]
        n = out.embeddings.shape[0]
        if n % self.num_crops:
            raise ValueError(f"swav_loss: {n} embeddings is not num_crops={self.num_crops} crops of one batch")
        B = n // self.num_crops
        training = torch.is_grad_enabled()
        queue_on = self.queue.shape[1] > 0 and int(self.num_steps) >= self.queue_start_iter
        # official SwAV (main_swav.py, use_the_queue): the queue fills from start_iter on and joins
        # Sinkhorn only once it is full (its last slot written); empty slots would be fake samples
        use_queue = queue_on and int(self.queue_filled) == self.queue.shape[1]
        total = 0.0
        for scores, prototypes in zip(out.scores, out.prototypes):
            for a, crop in enumerate(self.crops_for_assign):
                with torch.no_grad():
                    s = scores[B * crop : B * (crop + 1)].detach()
                    if use_queue:
                        past = self.queue[a] @ prototypes.T
                        s = torch.cat([s, past.to(s.dtype)])
                    q = sinkhorn_knopp(s, self.epsilon, self.num_iters, self.use_double_precision)[:B]
                sub = 0.0
                for v in range(self.num_crops):
                    if v == crop:
                        continue
                    logp = F.log_softmax(scores[B * v : B * (v + 1)].float() / self.temperature, dim=1)
                    sub = sub - (q * logp).sum(dim=1).mean()
                total = total + sub / (self.num_crops - 1)
        loss = total / (len(self.crops_for_assign) * len(out.scores))
        if training:
            if queue_on:
                self._update_queue(out.embeddings.detach(), B)
            self.num_steps += 1
        return loss

    @torch.no_grad()
    def _update_queue(self, embeddings: torch.Tensor, B: int) -> None:
        local = self.queue.shape[1]
        if local == 0:
            return
        for a, crop in enumerate(self.crops_for_assign):  # shift out the oldest, append the newest
            self.queue[a] = torch.cat([self.queue[a, B:], embeddings[B * crop : B * (crop + 1)]])[-local:]
        self.queue_filled.fill_(min(local, int(self.queue_filled) + B))

    def redistribute_state(self, states: list[dict], rank: int, world_size: int) -> dict:
        """This rank's state at ``world_size`` from the states every rank of another world size saved.

        Sinkhorn treats the queue as a set over ranks, so what matters is which embeddings the
        global queue holds and which of them leave first. The saved local queues are interleaved
        into one global queue in age order (element k of every rank's queue, oldest first, has the
        same age), the oldest are dropped if it is longer than this queue, and rank r takes every
        ``world_size``-th element from r. Each rank then evicts its oldest B entries per step,
        which together are the globally oldest ones: with the same global batch, the queue holds
        and drops what it would have in an uninterrupted run at this world size.

        Args:
            states: the saved ``state_dict()`` of each rank, in rank order.
            rank: this rank.
            world_size: the ranks of this run.
        """
        first = states[0]
        filled = min(int(s["queue_filled"]) for s in states)  # the same on every rank (same B)
        sets, width, dim = first["queue"].shape[0], self.queue.shape[1], first["queue"].shape[2]
        # [A, filled, W_old, D] -> [A, filled * W_old, D]: index k * W_old + r is rank r's k-th valid entry
        valid = torch.stack([s["queue"][:, s["queue"].shape[1] - filled :] for s in states], dim=2)
        merged = valid.reshape(sets, filled * len(states), dim)
        merged = merged[:, max(0, merged.shape[1] - width * world_size) :]  # drop the oldest that do not fit
        mine = merged[:, rank::world_size]
        queue = torch.zeros(sets, width, dim, dtype=first["queue"].dtype)
        if mine.shape[1]:
            queue[:, width - mine.shape[1] :] = mine
        return {
            "queue": queue,
            "queue_filled": torch.tensor(mine.shape[1], dtype=torch.long),
            "num_steps": first["num_steps"].clone(),
        }
