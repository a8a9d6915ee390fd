"""RandAugment and ImgPilRandomSolarize under VISSL's names mean what VISSL's code does.

Sources: vissl/data/ssl_transforms/rand_auto_aug.py (RandAugment, AugmentOp, the *_level_to_arg
functions, _RAND_CHOICE_WEIGHTS_0) and vissl/data/ssl_transforms/img_pil_random_solarize.py with
pil_photometric_transforms_lib.py (RandomSolarizeTransform, RandomValueApplier).
"""

from __future__ import annotations

import inspect
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageOps

from vissl_vit.data.transforms.rand_augment import RandAugment
from vissl_vit.data.transforms.ssl import ImgPilRandomSolarize
from vissl_vit.errors import ConfigError


def _const(value: int, mode: str = "RGB", size: int = 12) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).convert(mode)


def test_randaugment_defaults_are_vissl_defaults():
    # rand_auto_aug.py RandAugment.__init__(magnitude=10, magnitude_std=0, num_layers=2,
    # increasing_severity=False, weight_choice=None); AugmentOp prob=0.5, translate_pct 0.45
    params = inspect.signature(RandAugment).parameters
    vissl = {"magnitude": 10, "magnitude_std": 0, "num_layers": 2, "increasing_severity": False, "weight_choice": None}
    assert {k: params[k].default for k in vissl} == vissl
    assert params["prob"].default == 0.5 and params["translate_pct"].default == 0.45


@pytest.mark.parametrize(
    "increasing, m, bits",
    [
        (False, 9.0, 3),  # _posterize_level_to_arg: int(9 / 10 * 4) = 3 bits (not 4 + 3 = 7)
        (False, 5.0, 2),
        (True, 9.0, 1),  # _posterize_increasing_level_to_arg: 4 - 3
        (True, 0.0, 4),
    ],
)
def test_posterize_bits_as_vissl(increasing, m, bits):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    out = RandAugment(increasing_severity=increasing).ops["Posterize"](img, m)
    assert np.array_equal(np.asarray(out), np.asarray(ImageOps.posterize(img, bits)))


def test_posterize_zero_bits_is_black_as_vissl_pil_gave():
    # m < 2.5: int(0.4 m) = 0 bits; PIL's posterize then masked every bit away (PIL now refuses 0)
    out = RandAugment().ops["Posterize"](_const(200), 2.0)
    assert not np.asarray(out).any()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_geometric_fill_is_grey_128(mode):
    # _FILL = (128, 128, 128); _HPARAMS_DEFAULT's img_mean overrides any other
    ra = RandAugment(interpolation="nearest")
    rotated = np.asarray(ra.ops["Rotate"](_const(255, mode), 10.0))
    assert (rotated[0, 0] == 128).all()  # a corner brought in by a 30 degree rotation
    random.seed(0)
    shifted = np.asarray(ra.ops["TranslateXRel"](_const(255, mode), 10.0))  # 45% of the width
    assert (shifted == 128).any() and set(np.unique(shifted)) == {128, 255}


def test_interpolation_is_bilinear_or_bicubic_at_random_unless_named(monkeypatch):
    # AugmentOp: resample = hparams["interpolation"] if given else _RANDOM_INTERPOLATION
    # (BILINEAR, BICUBIC), one drawn per application by _interpolation's random.choice
    seen = []
    real = Image.Image.transform

    def spy(self, size, method, data=None, resample=Image.NEAREST, **kw):
        seen.append(resample)
        return real(self, size, method, data, resample=resample, **kw)

    monkeypatch.setattr(Image.Image, "transform", spy)
    random.seed(1)
    ra = RandAugment()
    for _ in range(40):
        ra.ops["ShearX"](_const(100), 5.0)
    assert set(seen) == {Image.BILINEAR, Image.BICUBIC}
    seen.clear()
    ra = RandAugment(interpolation="bicubic")
    for _ in range(10):
        ra.ops["ShearY"](_const(100), 5.0)
    assert set(seen) == {Image.BICUBIC}
    with pytest.raises(ConfigError, match="interpolation"):
        RandAugment(interpolation="lanczos3")


def test_weight_choice_0_draws_vissl_weights_without_replacement():
    # _select_rand_weights(0): _RAND_CHOICE_WEIGHTS_0 (they sum to 1), then
    # np.random.choice(ops, 2, replace=False, p=w): P(first = a) = w_a, P(a, b) = w_a w_b / (1 - w_a)
    random.seed(0)
    ra = RandAugment(weight_choice=0)
    draws = [tuple(ra._choose()) for _ in range(20000)]
    assert all(a != b for a, b in draws)
    names = Counter(n for d in draws for n in d)
    assert names["Posterize"] == 0 and names["Invert"] == 0
    first = Counter(a for a, _ in draws)
    assert first["Rotate"] / 20000 == pytest.approx(0.3, abs=0.015)
    assert first["ShearX"] / 20000 == pytest.approx(0.2, abs=0.015)
    pairs = Counter(draws)
    assert pairs[("Rotate", "ShearX")] / 20000 == pytest.approx(0.3 * 0.2 / 0.7, abs=0.01)
    # the Increasing forms take their plain form's weight (VISSL indexes the weights by position)
    inc = RandAugment(weight_choice=0, increasing_severity=True)
    assert dict(zip(inc.names, inc.weights)) == dict(zip(ra.names, ra.weights))
    # without weights: uniform with replacement (replace = choice_weights is None)
    uniform = RandAugment()
    assert any(a == b for a, b in (tuple(uniform._choose()) for _ in range(500)))
    with pytest.raises(ConfigError, match="weight_choice"):
        RandAugment(weight_choice=1)


def test_magnitude_is_clipped_after_the_noise(monkeypatch):
    # AugmentOp.__call__: magnitude = gauss(m, std), then min(10, max(0, magnitude))
    ra = RandAugment(magnitude=9, magnitude_std=5.0, prob=1.0, num_layers=1)
    seen = []
    ra.ops = {"Rotate": lambda img, m: seen.append(m) or img}
    ra.names = ["Rotate"]
    random.seed(3)
    for _ in range(300):
        ra(_const(0))
    assert min(seen) >= 0.0 and max(seen) == 10.0 and len(set(seen)) > 100


def _threshold_used(out: np.ndarray) -> int:
    """The threshold of a solarized 0..255 ramp: the first value that was inverted (256: none)."""
    changed = np.nonzero(out != np.arange(256, dtype=np.uint8))[0]
    return int(changed[0]) if changed.size else 256


def test_solarize_threshold_is_vissl_random_int_in_0_256():
    # RandomSolarizeTransform(min_v=0, max_v=256, vtype="int", closed_interval=True):
    # np.random.randint(0, 257) per application; applied with RandomApply(p)
    ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    t = ImgPilRandomSolarize(p=1.0)
    random.seed(0)
    used = [_threshold_used(np.asarray(t(ramp)).ravel()) for _ in range(4000)]
    assert min(used) == 0 and max(used) == 256 and len(set(used)) == 257
    assert np.mean(used) == pytest.approx(128, abs=4)  # the mean of 0..256
    counts = np.bincount(used, minlength=257)
    assert counts.max() < 4 * 4000 / 257  # no value favoured (a fixed 128 would take them all)


def test_solarize_p_and_the_fixed_threshold_of_moco_v3_byol():
    # ImgPilRandomSolarize.from_config: p = config.get("p", 0.66)
    assert inspect.signature(ImgPilRandomSolarize).parameters["p"].default == 0.66
    img = _const(200)
    random.seed(0)
    t = ImgPilRandomSolarize(p=0.3, threshold=128)
    applied = [not np.array_equal(np.asarray(t(img)), np.asarray(img)) for _ in range(4000)]
    assert np.mean(applied) == pytest.approx(0.3, abs=0.03)
    ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    fixed = ImgPilRandomSolarize(p=1.0, threshold=128)
    assert np.array_equal(np.asarray(fixed(ramp)), np.asarray(ImageOps.solarize(ramp, 128)))
    with pytest.raises(ConfigError, match="key p"):
        ImgPilRandomSolarize(prob=0.2)
