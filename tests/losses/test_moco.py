"""MoCo's InfoNCE against closed forms; the queue's FIFO order."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vissl_vit.losses.moco import MoCoLoss


def test_v2_infonce_equals_closed_form():
    # hand-made unit vectors: q . k = 0.8, q . negatives = 0.6 and 0
    q = torch.tensor([[1.0, 0.0, 0.0]])
    k = torch.tensor([[0.8, 0.6, 0.0]])
    loss_fn = MoCoLoss(embedding_dim=3, queue_size=2, temperature=0.5, version="v2")
    loss_fn.queue.copy_(torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]))
    with torch.no_grad():  # no enqueue
        loss = loss_fn([q, k])
    t = 0.5
    expected = -math.log(math.exp(0.8 / t) / (math.exp(0.8 / t) + math.exp(0.6 / t) + math.exp(0.0 / t)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_v3_symmetric_loss_with_two_tau_scaling():
    torch.manual_seed(0)
    q, k = torch.randn(6, 5), torch.randn(6, 5)  # 2 views x 3 images
    t = 0.2
    loss = MoCoLoss(embedding_dim=5, temperature=t, version="v3")([q, k])
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)

    def ctr(a, b):  # -mean_i log softmax_j(a_i . b_j / t)[i], times 2 t
        logits = a @ b.T / t
        return -(logits.diag() - logits.logsumexp(dim=1)).mean() * 2 * t

    expected = ctr(qn[:3], kn[3:]) + ctr(qn[3:], kn[:3])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_queue_is_fifo_and_wraps():
    loss_fn = MoCoLoss(embedding_dim=2, queue_size=4, version="v2")
    batches = [torch.full((2, 2), float(i)) for i in range(1, 4)]
    loss_fn.enqueue(batches[0])
    loss_fn.enqueue(batches[1])
    assert loss_fn.queue[:, 0].tolist() == [1, 1, 2, 2] and int(loss_fn.queue_ptr) == 0
    loss_fn.enqueue(batches[2])  # overwrites the oldest
    assert loss_fn.queue[:, 0].tolist() == [3, 3, 2, 2] and int(loss_fn.queue_ptr) == 2


def test_training_forward_enqueues_keys_eval_does_not():
    loss_fn = MoCoLoss(embedding_dim=2, queue_size=4, version="v2")
    q, k = torch.randn(2, 2, requires_grad=True), torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    with torch.no_grad():
        loss_fn([q, k])
    assert int(loss_fn.queue_ptr) == 0
    loss_fn([q, k])
    assert torch.allclose(loss_fn.queue[:2], torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_queue_not_a_multiple_of_the_batch_and_wrong_width():
    loss_fn = MoCoLoss(embedding_dim=2, queue_size=5, version="v2")
    with pytest.raises(ValueError, match="multiple of the global batch"):
        loss_fn([torch.randn(2, 2, requires_grad=True), torch.randn(2, 2)])
    with pytest.raises(ValueError, match="embedding_dim=2"):
        MoCoLoss(embedding_dim=2, version="v3")([torch.randn(4, 3), torch.randn(4, 3)])
