"""Cross-entropy against closed forms, and torch losses by name."""

from __future__ import annotations

import math

import pytest
import torch

from vissl_vit import build_loss, compose_config
from vissl_vit.errors import ConfigError
from vissl_vit.losses.cross_entropy import CrossEntropyMultipleOutputSingleTargetLoss as CE


def test_uniform_logits_give_log_num_classes():
    loss = CE()([torch.zeros(4, 10)], torch.tensor([0, 3, 5, 9]))
    assert loss.item() == pytest.approx(math.log(10))


def test_known_value_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    expected = -(2.0 - math.log(math.exp(2.0) + 1.0 + math.exp(-1.0)))
    assert CE()(logits, torch.tensor([0])).item() == pytest.approx(expected)


def test_label_smoothing_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    logp = torch.log_softmax(logits, dim=1)[0]
    eps = 0.1
    expected = -((1 - eps) * logp[0] + eps * logp.mean())
    assert CE(label_smoothing=eps)(logits, torch.tensor([0])).item() == pytest.approx(expected.item())


def test_soft_targets_temperature_and_normalisation():
    logits = torch.tensor([[1.0, 3.0], [0.5, -0.5]])
    soft = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    logp = torch.log_softmax(logits / 0.5, dim=1)
    expected = -(soft * logp).sum(1).mean()
    assert CE(temperature=0.5)(logits, soft).item() == pytest.approx(expected.item())
    normed = logits / logits.norm(dim=1, keepdim=True)
    expected = torch.nn.functional.cross_entropy(normed, torch.tensor([1, 0]))
    assert CE(normalize_output=True)(logits, torch.tensor([1, 0])).item() == pytest.approx(expected.item())


def test_ignore_index_and_multiple_outputs():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    target = torch.tensor([1, -100, 2])
    single = torch.nn.functional.cross_entropy(a[[0, 2]], target[[0, 2]])
    assert CE()([a], target).item() == pytest.approx(single.item())
    # VISSL sums the outputs' losses (vissl/losses/cross_entropy_multiple_output_single_target.py,
    # CrossEntropyMultipleOutputSingleTargetCriterion.forward: loss += ... for each output)
    both = CE()([a], target) + CE()([b], target)
    assert CE()([a, b], target).item() == pytest.approx(both.item())


def test_each_head_gets_its_own_gradient():
    # the sum: a head's gradient does not depend on how many other heads are trained with it
    a = torch.randn(5, 4, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 0])
    CE()([a], target).backward()
    alone = a.grad.clone()
    a.grad = None
    CE()([a, torch.randn(5, 4), torch.randn(5, 4)], target).backward()
    assert torch.allclose(a.grad, alone)


def test_torch_loss_by_name_and_unknown_name():
    cfg = compose_config(
        ["config=test/quick_vit", "config.LOSS.name=MSELoss", "config.LOSS.MSELoss={reduction: sum}"]
    ).config
    loss = build_loss(cfg)
    assert loss([torch.ones(2, 3)], torch.zeros(2, 3)).item() == 6.0
    cfg = compose_config(["config=test/quick_vit", "config.LOSS.name=CrossEntropyLos"]).config
    with pytest.raises(ConfigError, match="Did you mean 'CrossEntropyLoss'"):
        build_loss(cfg)


def test_bad_loss_argument_names_the_key():
    cfg = compose_config(
        ["config=test/quick_vit", "config.LOSS.name=MSELoss", "config.LOSS.MSELoss={reductio: sum}"]
    ).config
    with pytest.raises(ConfigError, match=r"config.LOSS.MSELoss: unknown argument 'reductio'"):
        build_loss(cfg)
