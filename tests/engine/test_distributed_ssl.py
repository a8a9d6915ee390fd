"""Two gloo processes, each with half of a global batch, give the one-process results."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vissl_vit.losses.moco import MoCoLoss
from vissl_vit.losses.swav import SwAVLoss, sinkhorn_knopp
from vissl_vit.models.heads.swav_head import SwAVOutput
from vissl_vit.utils.distributed import batch_shuffle, batch_unshuffle

B = 4  # per process; the global batch is 2 x B


def _data():
    g = torch.Generator().manual_seed(0)
    return {
        "q": F.normalize(torch.randn(2, 2 * B, 8, generator=g), dim=-1),  # [view, global batch, D]
        "k": F.normalize(torch.randn(2, 2 * B, 8, generator=g), dim=-1),
        "emb": F.normalize(torch.randn(3, 2 * B, 8, generator=g), dim=-1),  # 3 crops
        "protos": F.normalize(torch.randn(5, 8, generator=g), dim=-1),
    }


def _results(d, rows):
    """Every quantity under test, on the samples `rows` of each view."""
    q, k = d["q"][:, rows], d["k"][:, rows]
    torch.manual_seed(1)
    v2 = MoCoLoss(embedding_dim=8, queue_size=4 * B, temperature=0.2, version="v2")
    v2_loss = v2([q[0].clone().requires_grad_(), k[1]])  # training forward: enqueues the global keys
    v3_loss = MoCoLoss(embedding_dim=8, temperature=0.2, version="v3")([q.reshape(-1, 8), k.reshape(-1, 8)])
    emb = d["emb"][:, rows].reshape(-1, 8)
    out = SwAVOutput(emb, [emb @ d["protos"].T], [d["protos"]])
    swav_loss = SwAVLoss(embedding_dim=8, num_prototypes=[5], num_crops=3, crops_for_assign=[0, 1])([out])
    codes = sinkhorn_knopp(d["emb"][0, rows] @ d["protos"].T, epsilon=0.05, num_iters=3)
    return {
        "v2": v2_loss.detach(),
        "queue": v2.queue.clone(),
        "v3": v3_loss.detach(),
        "swav": swav_loss.detach(),
        "codes": codes,
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    res = _results(_data(), slice(rank * B, (rank + 1) * B))
    x = torch.arange(B * 3.0).reshape(B, 3) + 100 * rank
    shuffled, inverse = batch_shuffle(x)
    res["unshuffled"] = batch_unshuffle(shuffled, inverse)
    res["x"] = x
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _results(_data(), slice(0, 2 * B))
    # Sinkhorn: each process's codes are the rows of the one-process codes
    torch.testing.assert_close(torch.cat([r["codes"] for r in ranks]), single["codes"])
    # losses: DDP averages the per-process losses' gradients, so their mean is the one-process loss
    for key in ("v2", "v3", "swav"):
        torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, single[key], msg=key)
    # the v2 queue holds the global batch's keys, the same in every process and as one process
    torch.testing.assert_close(ranks[0]["queue"], single["queue"])
    torch.testing.assert_close(ranks[1]["queue"], single["queue"])
    # shuffle-BN's shuffle and unshuffle give each process its own samples back
    for r in ranks:
        torch.testing.assert_close(r["unshuffled"], r["x"])
