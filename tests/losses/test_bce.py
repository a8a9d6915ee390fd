"""bce_logits_multiple_output_single_target against timm's BinaryCrossEntropy, VISSL's reduction and
DeiT-III's binarised mixup targets; a composed config trains with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import read_losses
from vissl_vit import build_loss, compose_config, run_train_engine
from vissl_vit.errors import ConfigError
from vissl_vit.losses.bce import BCELogitsMultipleOutputSingleTargetLoss as BCE
from vissl_vit.registry import COLLATORS

timm_bce = pytest.importorskip("timm.loss.binary_cross_entropy")
TimmBCE = timm_bce.BinaryCrossEntropy

B, C = 6, 5
EXACT = {"rtol": 1e-6, "atol": 1e-7}


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, C, generator=torch.Generator().manual_seed(seed)) * 3


def _mixed_targets(label_smoothing: float, labels: list[int] | None = None) -> torch.Tensor:
    """cutmixup_collator's soft targets for a batch of B samples (mixup, one lam per batch)."""
    labels = labels or [0, 1, 2, 3, 4, 0]
    samples = [
        {"data": torch.rand(3, 8, 8), "label": lab, "index": i, "seed": 7, "bad": 0, "bad_path": ""}
        for i, lab in enumerate(labels)
    ]
    batch = COLLATORS.get("cutmixup_collator")(
        samples, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=label_smoothing, num_classes=C
    )
    assert 0.0 < batch["mix_lambda"][0] < 1.0  # the seed gives a real mix
    return batch["label"]


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_hard_targets_with_smoothing_equal_timm(smoothing):
    target = torch.tensor([0, 4, 2, 2, 1, 3])
    ours = BCE(reduction="mean", smoothing=smoothing)(_logits(), target)
    torch.testing.assert_close(ours, TimmBCE(smoothing=smoothing)(_logits(), target), **EXACT)


def test_soft_mixup_targets_pass_through_as_timm():
    soft = _mixed_targets(label_smoothing=0.1)
    ours = BCE(reduction="mean", smoothing=0.1)(_logits(1), soft)  # smoothing is for index targets only
    torch.testing.assert_close(ours, TimmBCE(smoothing=0.1)(_logits(1), soft), **EXACT)


@pytest.mark.parametrize(("threshold", "smoothing"), [(0.0, 0.0), (0.2, 0.0), (0.0, 0.1)])
def test_thresholded_targets_equal_timm(threshold, smoothing):
    soft = _mixed_targets(label_smoothing=smoothing)
    for target in (soft, torch.tensor([0, 4, 2, 2, 1, 3])):
        ours = BCE(reduction="mean", smoothing=smoothing, target_threshold=threshold)(_logits(2), target)
        ref = TimmBCE(smoothing=smoothing, target_threshold=threshold)(_logits(2), target)
        torch.testing.assert_close(ours, ref, **EXACT)


def test_pos_weight_and_sum_classes_equal_timm():
    target = torch.tensor([1, 0, 3, 2, 4, 4])
    for pos_weight in (2.0, [0.5, 1.0, 2.0, 3.0, 4.0]):
        ours = BCE(pos_weight=pos_weight, sum_classes=True, smoothing=0.1)(_logits(3), target)
        ref = TimmBCE(pos_weight=torch.tensor(pos_weight), sum_classes=True, smoothing=0.1)(_logits(3), target)
        torch.testing.assert_close(ours, ref, **EXACT)


def test_mixed_targets_binarised_at_zero_are_exactly_two_hot():
    labels = [0, 1, 2, 3, 4, 1]  # sample i is mixed with sample B-1-i: pairs (0,1) (1,4) (2,3)
    soft = _mixed_targets(label_smoothing=0.0, labels=labels)
    loss = BCE(reduction="mean", target_threshold=0.0, smoothing=0.0)
    binary = loss.binary_target(_logits(), soft)
    two_hot = torch.zeros(B, C)
    for i, lab in enumerate(labels):
        two_hot[i, lab] = 1.0
        two_hot[i, labels[B - 1 - i]] = 1.0
    assert torch.equal(binary, two_hot)
    assert binary.sum(dim=1).tolist() == [2.0] * B  # no mirrored pair shares its class here
    torch.testing.assert_close(loss(_logits(), soft), F.binary_cross_entropy_with_logits(_logits(), two_hot), **EXACT)
    # with smoothing the off value 0.1 / C is > 0: every class passes the threshold (RECIPES 3.3's pitfall)
    smoothed = BCE(target_threshold=0.0).binary_target(_logits(), _mixed_targets(0.1, labels))
    assert torch.equal(smoothed, torch.ones(B, C))


def test_vissl_reduction_leaves_out_unknown_labels():
    # VISSL's reduction "none" (vissl/losses/bce_logits_multiple_output_single_target.py): per class,
    # the sum over samples with a label (not -1) divided by their number, summed over classes
    target = torch.randint(0, 2, (B, C), generator=torch.Generator().manual_seed(4)).float()
    target[0, 1] = target[3, 1] = target[2, 4] = -1
    logits = _logits(4)
    elementwise = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0), reduction="none")
    known = (target != -1).float()
    expected = ((elementwise * known).sum(0) / known.sum(0)).sum()
    torch.testing.assert_close(BCE()(logits, target), expected, **EXACT)
    # without unknown labels it is timm's sum_classes; "mean" leaves the -1 entries out of the count
    full = target.clamp(min=0)
    torch.testing.assert_close(BCE()(logits, full), TimmBCE(smoothing=0.0, sum_classes=True)(logits, full), **EXACT)
    mean = (elementwise * known).sum() / known.sum()
    torch.testing.assert_close(BCE(reduction="mean")(logits, target), mean, **EXACT)


def test_outputs_are_summed_and_normalised_on_request():
    a, b, target = _logits(5), _logits(6), torch.tensor([0, 1, 2, 3, 4, 0])
    loss = BCE(reduction="mean")
    torch.testing.assert_close(loss([a, b], target), loss(a, target) + loss(b, target), **EXACT)
    normed = BCE(reduction="mean", normalize_output=True)(a, target)
    torch.testing.assert_close(normed, loss(F.normalize(a, dim=1), target), **EXACT)


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"LOSS\.bce_logits_multiple_output_single_target\.reduction='avg'"):
        BCE(reduction="avg")
    with pytest.raises(ConfigError, match=r"smoothing=1\.0"):
        BCE(smoothing=1.0)
    with pytest.raises(ConfigError, match="pos_weight has 2 values; the model has 5 classes"):
        BCE(pos_weight=[1.0, 2.0])(_logits(), torch.tensor([0, 1, 2, 3, 4, 0]))


def test_a_composed_config_builds_the_loss_and_trains(tmp_path):
    key = "config.LOSS.bce_logits_multiple_output_single_target"
    overrides = [
        "config=test/quick_vit",
        f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
        "config.OPTIMIZER.num_epochs=1",
        "config.TEST_MODEL=False",
        "config.DATA.SYNTHETIC.NUM_IMAGES=32",
        "config.LOSS.name=bce_logits_multiple_output_single_target",
        f"{key}.reduction=mean",
        f"{key}.target_threshold=0.0",
        "config.DATA.TRAIN.COLLATE_FUNCTION=cutmixup_collator",
        "config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS={mixup_alpha: 0.8, cutmix_alpha: 1.0, label_smoothing: 0.0, "
        "num_classes: 4}",
    ]
    cfg = compose_config(overrides)
    loss = build_loss(cfg.config)
    assert isinstance(loss, BCE) and loss.target_threshold == 0.0 and loss.reduction == "mean"
    run_train_engine(cfg)
    losses = read_losses(tmp_path / "run")
    assert sorted(losses) == [1, 2]
    # random logits of a fresh head: the mean BCE is near log 2 per entry, far from a CE over 4 classes
    assert all(0.3 < v < 1.2 for v in losses.values()), losses
