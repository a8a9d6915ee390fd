"""SwAV: Sinkhorn marginals, the loss's closed form, the minimum at identical views, the queue."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vissl_vit.losses.swav import SwAVLoss, sinkhorn_knopp
from vissl_vit.models.heads.swav_head import SwAVOutput


def _scores(n=12, k=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, d, generator=g), dim=1)
    protos = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return emb, protos


def test_sinkhorn_marginals():
    emb, protos = _scores(n=12, k=4)
    q = sinkhorn_knopp(emb @ protos.T, epsilon=0.05, num_iters=3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))  # each sample: a distribution
    q = sinkhorn_knopp(emb @ protos.T, epsilon=0.05, num_iters=200)
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 3.0), atol=1e-3, rtol=0)  # equipartition B/K


def test_sinkhorn_is_exp_scores_with_row_and_column_scaling():
    emb, protos = _scores(n=6, k=3)
    s = emb @ protos.T
    q = sinkhorn_knopp(s, epsilon=0.5, num_iters=3)
    # Q = diag(a) exp(S / eps) diag(b): the ratio to exp(S / eps) has rank one
    ratio = q / torch.exp(s / 0.5)
    torch.testing.assert_close(ratio / ratio[:1], (ratio / ratio[:1])[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-6)


def _loss(views, protos, **kw):
    emb = torch.cat(views)
    out = SwAVOutput(emb, [emb @ protos.T], [protos])
    return SwAVLoss(embedding_dim=emb.shape[1], num_prototypes=[protos.shape[0]], num_crops=len(views), **kw)([out])


def test_loss_equals_closed_form():
    emb, protos = _scores(n=5, k=4)
    other = F.normalize(emb + 0.3 * torch.randn_like(emb), dim=1)
    with torch.no_grad():
        loss = _loss([emb, other], protos)
    s0, s1 = emb @ protos.T, other @ protos.T
    q0, q1 = sinkhorn_knopp(s0, 0.05, 3), sinkhorn_knopp(s1, 0.05, 3)
    expected = (-(q0 * F.log_softmax(s1 / 0.1, 1)).sum(1).mean() - (q1 * F.log_softmax(s0 / 0.1, 1)).sum(1).mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_identical_views_give_the_minimum():
    emb, protos = _scores(n=16, k=4)
    with torch.no_grad():
        same = _loss([emb, emb], protos)
        swapped = _loss([emb, emb[torch.randperm(16, generator=torch.Generator().manual_seed(1))]], protos)
    # with identical views the loss is the cross-entropy of the codes with their own crop's
    # predictions; any mismatch between views only adds to it
    s = emb @ protos.T
    expected = -(sinkhorn_knopp(s, 0.05, 3) * F.log_softmax(s / 0.1, 1)).sum(1).mean()
    assert same.item() == pytest.approx(expected.item(), rel=1e-5)
    assert swapped.item() > same.item() + 0.1


def test_queue_fills_from_the_end_and_joins_after_start_iter():
    emb, protos = _scores(n=8, k=4)
    emb2, _ = _scores(n=8, k=4, seed=5)

    def make(e):
        return SwAVLoss(embedding_dim=8, num_prototypes=[4], num_crops=2, queue={"queue_length": 6, "start_iter": 1})

    loss_fn = make(emb)
    loss_fn([SwAVOutput(emb.requires_grad_(), [emb @ protos.T], [protos])])  # iteration 0: queue not used
    assert int(loss_fn.queue_filled) == 4
    assert torch.equal(loss_fn.queue[0, -4:], emb[:4].detach()) and torch.equal(loss_fn.queue[1, -4:], emb[4:].detach())
    out2 = SwAVOutput(emb2.requires_grad_(), [emb2 @ protos.T], [protos])
    with_queue = loss_fn([out2])  # iteration 1: the 4 queued embeddings join Sinkhorn
    without = make(emb2)([out2])
    assert with_queue.item() != pytest.approx(without.item())
    # FIFO: the newest 4 at the end, the 2 most recent of the previous batch before them
    assert int(loss_fn.queue_filled) == 6
    assert torch.equal(loss_fn.queue[0, -4:], emb2[:4].detach()) and torch.equal(
        loss_fn.queue[0, :2], emb[2:4].detach()
    )
