"""cutmixup_collator (mixup / CutMix as in DeiT) and RandAugment."""

from __future__ import annotations

import inspect
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vissl_vit.data.collators.cutmixup import cutmixup_collator
from vissl_vit.data.transforms.rand_augment import RandAugment
from vissl_vit.errors import ConfigError


def _samples(n=4, size=8, seed=3, crops=None):
    out = []
    for i in range(n):
        img = torch.full((3, size, size), float(i + 1))
        data = [torch.full((3, s, s), float(i + 1)) for s in crops] if crops else img
        out.append({"data": data, "label": i % 3, "index": i, "seed": seed + i, "bad": 0, "bad_path": ""})
    return out


def test_mixup_batch_blends_mirrors_and_targets():
    batch = cutmixup_collator(_samples(), mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=3)
    lam = batch["mix_lambda"][0].item()
    assert torch.all(batch["mix_lambda"] == lam) and 0 < lam < 1
    for i in range(4):  # sample i holds the value i + 1; its mirror B-1-i holds 4 - i
        torch.testing.assert_close(batch["data"][i], torch.full((3, 8, 8), lam * (i + 1) + (1 - lam) * (4 - i)))
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float() * 0.9 + 0.1 / 3
    torch.testing.assert_close(batch["label"], lam * one_hot + (1 - lam) * one_hot.flip(0))
    torch.testing.assert_close(batch["label"].sum(1), torch.ones(4))


def test_cutmix_pastes_one_box_and_corrects_lambda():
    batch = cutmixup_collator(_samples(size=16), mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=3)
    x = batch["data"]
    for i in range(4):
        pasted = (x[i, 0] == 4 - i).float().mean().item()  # share of pixels from the mirror
        own = (x[i, 0] == i + 1).float().mean().item()
        assert pasted + own == pytest.approx(1.0)
        assert batch["mix_lambda"][i].item() == pytest.approx(own)  # lam = the area left
    masks = [(x[i, 0] != i + 1) for i in range(4)]
    assert all(torch.equal(masks[0], m) for m in masks)  # batch mode: the same box for every sample


def test_no_mixing_and_elem_mode():
    batch = cutmixup_collator(_samples(), prob=0.0, label_smoothing=0.0, num_classes=3)
    assert torch.equal(batch["data"][2], torch.full((3, 8, 8), 3.0))
    assert torch.equal(batch["label"], torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float())
    batch = cutmixup_collator(_samples(n=8), mixup_alpha=1.0, cutmix_alpha=0.0, mode="elem", num_classes=3)
    assert len(set(batch["mix_lambda"].tolist())) > 1


def test_ssl_crops_all_mixed_labels_kept_and_deterministic():
    a = cutmixup_collator(_samples(crops=[8, 4]), ssl_method="swav", num_classes=1)
    b = cutmixup_collator(_samples(crops=[8, 4]), ssl_method="swav", num_classes=1)
    assert [d.shape for d in a["data"]] == [(4, 3, 8, 8), (4, 3, 4, 4)]
    assert a["label"].tolist() == [0, 1, 2, 0]
    assert all(torch.equal(x, y) for x, y in zip(a["data"], b["data"]))
    # VISSL vissl/data/collators/cutmixup_collator.py, cutmixup_collator: the Mixup object is called
    # once per crop position, so each crop has its own lam (defaults: mixup, alpha 1.0); partner: the mirror
    lam = a["mix_lambda"]
    assert lam.shape == (2, 4) and lam[0, 0] != lam[1, 0]
    for c, size in enumerate([8, 4]):
        expected = torch.full((3, size, size), lam[c, 0].item() * 1 + (1 - lam[c, 0].item()) * 4)
        torch.testing.assert_close(a["data"][c][0], expected)
    with pytest.raises(ConfigError, match="set ssl_method"):
        cutmixup_collator(_samples(crops=[8, 4]))


def test_defaults_are_vissl_mixup_defaults():
    # VISSL vissl/data/collators/cutmixup_collator.py, Mixup.__init__: mixup_alpha=1.0,
    # cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5, mode="batch",
    # correct_lam=True, label_smoothing=0.1, num_classes=1000
    vissl = {
        "mixup_alpha": 1.0, "cutmix_alpha": 0.0, "cutmix_minmax": None, "prob": 1.0, "switch_prob": 0.5,
        "mode": "batch", "correct_lam": True, "label_smoothing": 0.1, "num_classes": 1000,
    }  # fmt: skip
    params = inspect.signature(cutmixup_collator).parameters
    assert {k: params[k].default for k in vissl} == vissl
    # with the defaults a batch is blended (mixup), not pasted (CutMix): no pixel keeps its value
    batch = cutmixup_collator(_samples(), num_classes=3)
    assert not torch.any(batch["data"][0] == 1.0) and 0 < batch["mix_lambda"][0] < 1


def test_cutmix_minmax_box_sides_and_lambda():
    # VISSL cutmixup_collator.py rand_bbox_minmax: each side uniform in [min, max) of the image's,
    # lam = 1 - box area / image area (always corrected); cutmix_alpha forced to 1.0
    for seed in range(5):
        batch = cutmixup_collator(
            _samples(size=20, seed=seed), cutmix_minmax=[0.2, 0.5], mixup_alpha=0.0, num_classes=3
        )
        pasted = batch["data"][0, 0] == 4.0  # sample 0 holds 1, its mirror 4
        rows, cols = pasted.any(1).sum().item(), pasted.any(0).sum().item()
        assert 4 <= rows < 10 and 4 <= cols < 10 and pasted.sum().item() == rows * cols
        assert batch["mix_lambda"][0].item() == pytest.approx(1 - rows * cols / 400)


def test_multicrop_without_ssl_method_is_a_config_error_before_the_loader():
    from vissl_vit.config import compose_config

    with pytest.raises(ConfigError, match=r"set config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS.ssl_method"):
        compose_config(["config=test/quick_swav", "config.DATA.TRAIN.COLLATE_FUNCTION=cutmixup_collator"])
    cfg = compose_config(
        [
            "config=test/quick_swav",
            "config.DATA.TRAIN.COLLATE_FUNCTION=cutmixup_collator",
            "config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS.ssl_method=swav",
        ]
    )
    assert cfg.config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS.ssl_method == "swav"


@pytest.mark.slow
def test_multicrop_without_ssl_method_is_one_line_on_the_command_line(tmp_path, capfd):
    from vissl_vit.engine.launch import main  # what the command runs

    # caught when composed, before a loader worker (NUM_DATALOADER_WORKERS=1) could wrap the collator's error in a traceback
    args = ["config=test/quick_swav", "config.DATA.TRAIN.COLLATE_FUNCTION=cutmixup_collator"]
    assert main([*args, "config.DATA.NUM_DATALOADER_WORKERS=1", f"config.CHECKPOINT.DIR={tmp_path}"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ssl_method" in err, err[-3000:]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_randaugment_every_op_runs(mode):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert(mode)
    ra = RandAugment(magnitude=9, magnitude_std=0.5, increasing_severity=True)
    assert len(ra.ops) == 15
    for name, op in ra.ops.items():
        out = op(img, 9.0)
        assert out.size == img.size and out.mode == img.mode, name


def test_randaugment_is_seeded_and_can_be_off():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    ra = RandAugment(magnitude=9, magnitude_std=0.5, increasing_severity=True, prob=1.0)
    random.seed(5)
    a = np.asarray(ra(img))
    random.seed(5)
    assert np.array_equal(a, np.asarray(ra(img))) and not np.array_equal(a, np.asarray(img))
    assert np.array_equal(np.asarray(RandAugment(prob=0.0)(img)), np.asarray(img))
    with pytest.raises(ConfigError, match="magnitude"):
        RandAugment(magnitude=11)
