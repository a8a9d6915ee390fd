"""Every registered component: a tiny forward (and backward where it learns) with typical kwargs.

A name registered without an entry here fails the test, so new components get covered.
"""

from __future__ import annotations

import pytest
import torch

import vissl_vit  # noqa: F401  (registers everything)
from vissl_vit.registry import COLLATORS, HEADS, LOSSES, TRUNKS

TRUNK_KWARGS = {
    "vision_transformer": dict(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32),
}
HEAD_KWARGS = {
    "mlp": dict(dims=[16, 8, 4], use_bn=True, use_relu=True),
    "vision_transformer_head": dict(in_plane=16, num_classes=4, hidden_dim=8),
    "eval_mlp": dict(in_channels=16, dims=[16, 4]),
}
LOSS_CASES = {
    "cross_entropy_multiple_output_single_target": (dict(label_smoothing=0.1), torch.tensor([0, 1, 2, 3])),
}


@pytest.mark.parametrize("name", TRUNKS.names())
def test_trunk_forward_backward(name):
    trunk = TRUNKS.get(name)(**TRUNK_KWARGS[name])
    out = trunk(torch.randn(2, 3, 16, 16))
    out[0].sum().backward()
    assert all(p.grad is not None for p in trunk.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", HEADS.names())
def test_head_forward_backward(name):
    head = HEADS.get(name)(**HEAD_KWARGS[name])
    out = head(torch.randn(4, 16))
    assert out.shape == (4, 4)
    out.sum().backward()


@pytest.mark.parametrize("name", LOSSES.names())
def test_loss_forward_backward(name):
    kwargs, target = LOSS_CASES[name]
    logits = torch.randn(4, 4, requires_grad=True)
    loss = LOSSES.get(name)(**kwargs)([logits], target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None


@pytest.mark.parametrize("name", COLLATORS.names())
def test_collator_stacks_samples(name):
    samples = [
        {"data": torch.full((3, 4, 4), float(i)), "label": i, "index": i, "bad": 0, "bad_path": ""} for i in range(3)
    ]
    batch = COLLATORS.get(name)(samples)
    assert batch["data"].shape == (3, 3, 4, 4) and batch["label"].tolist() == [0, 1, 2]
