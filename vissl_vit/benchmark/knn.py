"""Weighted k-nearest-neighbour classification of L2-normalised features (DINO's protocol).

Wu et al. 2018 / Caron et al. 2021 (DINO, arXiv:2104.14294): cosine similarity to every training
feature, the k most similar vote for their class with weight exp(similarity / T), T = 0.07.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vissl_vit.utils.tensors import to_device


@torch.no_grad()
def extract_features(
    trunk: nn.Module, loader: DataLoader, device: torch.device, feature: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] (float32, on the CPU) and labels [N] of a loader's data, in eval mode."""
    was_training = trunk.training
    trunk.eval()
    feats, labels = [], []
    for batch in loader:
        out = trunk(to_device(batch["data"], device), [feature] if feature else None)[0]
        feats.append(out.float().cpu())
        labels.append(batch["label"])
    trunk.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of weighted kNN on L2-normalised features.

    Args:
        train_feats: [N, D] memory bank.
        train_labels: [N] class indices.
        test_feats: [M, D] queries.
        test_labels: [M] class indices.
        k: neighbours that vote.
        temperature: votes are weighted by exp(cosine similarity / temperature).
        chunk: queries per similarity matrix (memory: chunk x N floats).
    """
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    bank = F.normalize(train_feats.float(), dim=1)
    queries = F.normalize(test_feats.float(), dim=1)
    top1 = top5 = 0
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk]
        sim, idx = (q @ bank.T).topk(min(k, bank.shape[0]), dim=1)  # [m, k]
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        pred = votes.topk(min(5, num_classes), dim=1).indices
        target = test_labels[start : start + chunk, None]
        top1 += (pred[:, :1] == target).sum().item()
        top5 += (pred == target).any(dim=1).sum().item()
    n = queries.shape[0]
    return {"top_1": 100.0 * top1 / n, "top_5": 100.0 * top5 / n}
