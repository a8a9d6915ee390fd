"""Weighted k-nearest-neighbour classification of features (DINO's protocol; VISSL's knn_utils).

Wu et al. 2018 / Caron et al. 2021 (DINO, arXiv:2104.14294): cosine similarity to every training
feature, the k most similar vote for their class with weight exp(similarity / T), T = 0.07.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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


def knn_search(
    bank: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    backend: str = "faiss",
    index: str = "flat",
    nlist: int = 1024,
    nprobe: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar bank rows of each query by inner product: (similarities, indices), [M, k].

    Rows are used as given (normalise them first for cosine similarity). Missing neighbours (an
    IVF search that visits too few cells) have index -1.

    Args:
        bank: [N, D] float32.
        queries: [M, D] float32.
        k: neighbours per query.
        backend: "faiss" (IndexFlatIP, or IndexIVFFlat with ``index="ivf"``) or "torch".
        index: "flat" (exact) or "ivf" (approximate; faiss only).
        nlist: ivf: inverted lists (k-means cells), lowered to what the bank can train.
        nprobe: ivf: cells visited per query.
    """
    k = min(k, bank.shape[0])
    if backend == "torch":
        sims, idxs = [], []
        for start in range(0, queries.shape[0], 1024):
            s, i = (queries[start : start + 1024] @ bank.T).topk(k, dim=1)
            sims.append(s)
            idxs.append(i)
        return torch.cat(sims), torch.cat(idxs)
    try:
        import faiss
    except ImportError:
        from vissl_vit.errors import ConfigError

        raise ConfigError(
            "config.NEAREST_NEIGHBOR.BACKEND=faiss but faiss is not installed: pip install faiss-cpu "
            "(or faiss-gpu), or set config.NEAREST_NEIGHBOR.BACKEND=torch."
        ) from None
    xb = np.ascontiguousarray(bank.numpy(), dtype=np.float32)
    xq = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    dim = xb.shape[1]
    if index == "ivf":
        nlist = max(1, min(nlist, xb.shape[0] // 39))  # faiss wants ~39 training points per cell
        quantizer = faiss.IndexFlatIP(dim)
        ix = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ix.train(xb)
        ix.nprobe = min(nprobe, nlist)
    else:
        ix = faiss.IndexFlatIP(dim)
    ix.add(xb)
    sim, idx = ix.search(xq, k)
    return torch.from_numpy(sim), torch.from_numpy(idx)


def weighted_knn_accuracy(
    sim: torch.Tensor,
    idx: torch.Tensor,
    bank_labels: torch.Tensor,
    query_labels: torch.Tensor,
    ks: list[int],
    temperature: float,
) -> dict[str, dict[str, float]]:
    """Top-1/top-5 (percent) for each k of weighted votes over neighbours sorted by similarity.

    Args:
        sim, idx: [M, kmax] from :func:`knn_search`, most similar first.
        bank_labels: [N] labels of the bank.
        query_labels: [M] labels of the queries.
        ks: the k values (each at most kmax).
        temperature: votes weigh exp(similarity / temperature).
    """
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    valid = idx >= 0
    labels = bank_labels[idx.clamp(min=0)]
    # exp((s - s_max) / T): the same votes up to a factor per query, so the same predictions, but
    # finite for the raw inner products of unnormalised features (L2_NORM_FEATS False), where
    # exp(s / T) overflows (s = 100 at T = 0.07 is already e^1428)
    s = torch.where(valid, sim.double(), torch.full((), -torch.inf, dtype=torch.float64))
    top = s.max(dim=1, keepdim=True).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.where(valid, ((s - top) / temperature).exp(), torch.zeros((), dtype=torch.float64))
    results = {}
    for k in ks:
        k_eff = min(k, idx.shape[1])
        votes = torch.zeros(idx.shape[0], num_classes, dtype=torch.float64)
        votes.scatter_add_(1, labels[:, :k_eff], weights[:, :k_eff])
        pred = votes.topk(min(5, num_classes), dim=1).indices
        hit = pred == query_labels[:, None]
        n = max(query_labels.shape[0], 1)
        results[str(k)] = {
            "top_1": 100.0 * hit[:, 0].sum().item() / n,
            "top_5": 100.0 * hit.any(dim=1).sum().item() / n,
        }
    return results
