"""SwAV's queue at another world size: redistributed, it holds and drops what an uninterrupted run would."""

from __future__ import annotations

import pytest
import torch

from vissl_vit.losses import swav
from vissl_vit.losses.swav import SwAVLoss

D, GLOBAL_BATCH = 4, 8


def _losses(world: int, queue_length: int, monkeypatch) -> list[SwAVLoss]:
    """One loss per rank, built as each rank of a ``world``-process run builds it."""
    monkeypatch.setattr(swav, "get_world_size", lambda: world)
    kw = {"embedding_dim": D, "num_prototypes": [3], "crops_for_assign": [0, 1], "num_crops": 2}
    return [SwAVLoss(queue={"queue_length": queue_length}, **kw) for _ in range(world)]


def _step(losses: list[SwAVLoss], step: int) -> None:
    """One training step's queue update: the global batch (2 crops x 8 samples) split over the ranks."""
    g = torch.Generator().manual_seed(step)
    crops = torch.randn(2, GLOBAL_BATCH, D, generator=g)
    b = GLOBAL_BATCH // len(losses)
    for r, loss in enumerate(losses):
        loss._update_queue(torch.cat([crops[0, r * b : (r + 1) * b], crops[1, r * b : (r + 1) * b]]), b)
        loss.num_steps += 1


def _global(losses: list[SwAVLoss]) -> list[torch.Tensor]:
    """Per assigned crop, the set of valid queue entries over all ranks (rows sorted)."""
    out = []
    for a in range(2):
        rows = torch.cat([q.queue[a, q.queue.shape[1] - int(q.queue_filled) :] for q in losses])
        out.append(rows[torch.argsort(rows[:, 0])])
    return out


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 4), (4, 2)])
@pytest.mark.parametrize("interrupted_after", [1, 5])  # partly filled, full and rotated
def test_redistributed_queue_matches_an_uninterrupted_run(monkeypatch, old, new, interrupted_after):
    queue_length, total = 3 * GLOBAL_BATCH, 8
    reference, expected = _losses(new, queue_length, monkeypatch), {}
    for step in range(total):
        _step(reference, step)
        expected[step] = _global(reference)

    before = _losses(old, queue_length, monkeypatch)
    for step in range(interrupted_after):
        _step(before, step)
    states = [q.state_dict() for q in before]
    after = _losses(new, queue_length, monkeypatch)
    for rank, q in enumerate(after):
        q.load_state_dict(q.redistribute_state(states, rank, new))
        assert q.queue.shape == (2, queue_length // new, D)
    assert [torch.equal(a, b) for a, b in zip(_global(after), _global(before))] == [True, True]
    for step in range(interrupted_after, total):  # after every step: the same entries kept and dropped
        _step(after, step)
        assert [torch.equal(a, b) for a, b in zip(_global(after), expected[step])] == [True, True], step
    assert [int(q.num_steps) for q in after] == [total] * new
