"""simclr_info_nce_loss against VISSL's formula, by hand and on 2 processes (gloo)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.conftest import read_losses
from vissl_vit import build_loss, compose_config, run_train_engine
from vissl_vit.errors import ConfigError
from vissl_vit.losses.simclr import SimclrInfoNCELoss


def vissl_formula(emb: torch.Tensor, temperature: float, world: int = 1) -> torch.Tensor:
    """VISSL's vissl/losses/simclr_info_nce_loss.py (SimclrInfoNCECriterion.precompute_pos_neg_mask
    and forward), written down for the global batch: rank r holds rows [2n r, 2n (r + 1)) laid out
    [view 0 of its n images, view 1]; for each anchor pos = exp(s(anchor, other view) / T), neg = the
    sum of exp(s / T) over the global batch minus the anchor's two views; loss = -mean log(pos /
    (pos + neg)) over all anchors (the mean of the ranks' means: equal local batches)."""
    z = F.normalize(emb.double(), dim=1)
    sim = torch.exp(z @ z.t() / temperature)
    two_n = z.shape[0] // world
    n = two_n // 2
    losses = []
    for g in range(z.shape[0]):
        r, a = divmod(g, two_n)
        p = r * two_n + (a + n) % two_n
        pos = sim[g, p]
        neg = sum(sim[g, k] for k in range(z.shape[0]) if k not in (g, p))
        losses.append(-math.log(pos / (pos + neg)))
    return torch.tensor(sum(losses) / len(losses))


def test_known_answer_by_hand():
    # 2 images, 2 views in 2-d: view 0 = e1, e2; view 1 = e1, (e1 + e2)/sqrt2; T = 0.5
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])
    c = math.cos(math.pi / 4)
    # s(anchor, k) for k != anchor (rows: anchors 0..3); positives: 0<->2, 1<->3
    sims = {0: {1: 0.0, 2: 1.0, 3: c}, 1: {0: 0.0, 2: 0.0, 3: c}, 2: {0: 1.0, 1: 0.0, 3: c}, 3: {0: c, 1: c, 2: c}}
    pos_of = {0: 2, 1: 3, 2: 0, 3: 1}
    by_hand = (
        sum(
            -math.log(math.exp(sims[a][pos_of[a]] / 0.5) / sum(math.exp(s / 0.5) for s in sims[a].values()))
            for a in range(4)
        )
        / 4
    )
    loss = SimclrInfoNCELoss(0.5, {"embedding_dim": 2})([emb], torch.zeros(4))
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert loss.item() == pytest.approx(vissl_formula(emb, 0.5).item(), rel=1e-6)


def test_random_batch_matches_vissl_formula():
    torch.manual_seed(0)
    emb = torch.randn(12, 8)
    loss = SimclrInfoNCELoss(0.1, {"embedding_dim": 8, "world_size": 64, "effective_batch_size": 4096})(emb)
    assert loss.item() == pytest.approx(vissl_formula(emb, 0.1).item(), rel=1e-5)


def test_built_from_vissl_keys_and_wrong_embedding_dim_names_the_key():
    cfg = compose_config(
        [
            "config=test/quick_vit",
            "config.LOSS.name=simclr_info_nce_loss",
            "config.LOSS.simclr_info_nce_loss.temperature=0.2",
            "config.LOSS.simclr_info_nce_loss.buffer_params.embedding_dim=16",
        ]
    ).config
    loss = build_loss(cfg)
    assert isinstance(loss, SimclrInfoNCELoss) and loss.temperature == 0.2
    with pytest.raises(ConfigError, match="buffer_params.embedding_dim=16"):
        loss([torch.randn(4, 8)], torch.zeros(4))


def _worker(rank: int, port: int, emb: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        two_n = emb.shape[0] // 2
        local = emb[rank * two_n : (rank + 1) * two_n].clone().requires_grad_(True)
        loss = SimclrInfoNCELoss(0.2, {"embedding_dim": emb.shape[1]})([local], torch.zeros(two_n))
        loss.backward()
        # the global loss is the mean of the ranks' losses (DDP divides the summed gradients by the
        # world size): its gradient on this rank's embeddings is local.grad / 2, the gather's
        # backward having summed every rank's gradient of them
        torch.save({"loss": loss.detach(), "grad": local.grad / 2}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    # 2 ranks x 3 images x 2 views; rank r holds [view 0 of its images, view 1 of its images]
    torch.manual_seed(1)
    emb = torch.randn(12, 5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(
        _worker, args=(port, emb, str(tmp_path / "r")), nprocs=2, join=True, start_method="spawn"
    )
    res = [torch.load(tmp_path / f"r.{r}") for r in range(2)]
    # the one-process global batch in its own layout: [view 0 of all 6 images, view 1 of all 6]
    order = [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]
    single = emb[order].clone().requires_grad_(True)
    loss = SimclrInfoNCELoss(0.2, {"embedding_dim": 5})(single)
    loss.backward()
    assert ((res[0]["loss"] + res[1]["loss"]) / 2).item() == pytest.approx(loss.item(), rel=1e-5)
    assert loss.item() == pytest.approx(vissl_formula(emb, 0.2, world=2).item(), rel=1e-5)
    # the gradient of each rank's embeddings equals the one-process gradient of the same rows
    grads = torch.cat([res[0]["grad"], res[1]["grad"]])
    inverse = torch.argsort(torch.tensor(order))
    assert torch.allclose(grads, single.grad[inverse], atol=1e-6)


def test_simclr_trains_with_simclr_collator(tmp_path):
    # a VISSL-style SimCLR setup: 2 views per image, simclr_collator, a projector, the InfoNCE loss
    run = tmp_path / "simclr"
    cfg = compose_config(
        [
            "config=test/quick_moco",
            "config.DATA.TRAIN.COLLATE_FUNCTION=simclr_collator",
            'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [32, 64, 16], "use_relu": True}]]',
            "config.LOSS.name=simclr_info_nce_loss",
            "config.LOSS.simclr_info_nce_loss.buffer_params.embedding_dim=16",
            "config.LOSS.simclr_info_nce_loss.temperature=0.5",
            "config.OPTIMIZER.num_epochs=1",
            f"config.CHECKPOINT.DIR={run}",
        ]
    )
    run_train_engine(cfg)
    losses = read_losses(run)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses.values())
    # 16 images: 30 negatives + 1 positive per anchor, so at init the loss is near log(31)
    assert abs(losses[min(losses)] - math.log(31)) < 1.0
