"""DeiT / DeiT-III transforms against their references, and YAML composite transforms.

References: timm.data.RandomErasing (random_erasing.py); deit/augment.py::new_data_aug_generator
(3-Augment: torchvision RandomChoice over grayscale / solarize / blur classes with p=1.0, then
ColorJitter; ``--src``: Resize + RandomCrop(padding=4, reflect) + RandomHorizontalFlip).
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from omegaconf import OmegaConf
from PIL import Image, ImageFilter, ImageOps
from timm.data.random_erasing import RandomErasing

from vissl_vit.data.transforms import build_transforms
from vissl_vit.data.transforms.build import build_transform
from vissl_vit.data.transforms.deit import SimpleRandomCrop, ThreeAugment, TimmRandomErasing
from vissl_vit.errors import ConfigError


def _image(w: int = 8, h: int = 8, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _yaml(text: str) -> list:
    return OmegaConf.to_container(OmegaConf.create(text), resolve=True)  # as vissl_vit/data/build.py


# ---------------------------------------------------------------- TimmRandomErasing


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(p=0.25, mode="pixel"),  # DeiT: --reprob 0.25 --remode pixel --recount 1
        dict(p=1.0, mode="pixel"),
        dict(p=0.7, mode="rand", max_count=3),  # count drawn per image, area divided by count
        dict(p=1.0, mode="const", min_area=0.1, max_area=0.6, min_aspect=0.5, max_aspect=4.0),
    ],
)
def test_random_erasing_equals_timm_bit_for_bit(kwargs):
    ours = TimmRandomErasing(**kwargs)
    timm_kwargs = {("probability" if k == "p" else k): v for k, v in kwargs.items()}
    theirs = RandomErasing(**timm_kwargs, device="cpu")
    shapes = [(3, 16, 16), (3, 7, 23), (1, 12, 5), (3, 32, 32)]
    xs = [torch.randn(shapes[i % len(shapes)], generator=torch.Generator().manual_seed(i)) for i in range(300)]
    xs.append(torch.randn(6, 3, 16, 16))  # a batch: each image on its own draws

    def run(t):
        random.seed(123)
        torch.manual_seed(123)
        return [t(x.clone()) for x in xs], random.random(), torch.rand(1)

    ours_out, ours_py, ours_torch = run(ours)
    timm_out, timm_py, timm_torch = run(theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours_out, timm_out))
    assert ours_py == timm_py and torch.equal(ours_torch, timm_torch)  # same number of draws of each RNG
    assert sum(not torch.equal(a, x) for a, x in zip(ours_out, xs)) > 50  # it did erase


def test_random_erasing_p_frequency_and_copy():
    # n = 2000 draws at p = 0.25: sd = sqrt(n p (1 - p)) = 19.4; bound 5 sd = 97 around 500
    random.seed(0)
    torch.manual_seed(0)
    x = torch.randn(3, 16, 16)
    t = TimmRandomErasing(p=0.25)
    erased = sum(not torch.equal(t(x), x) for _ in range(2000))
    assert abs(erased - 500) <= 97
    assert not any(not torch.equal(TimmRandomErasing(p=0.0)(x), x) for _ in range(100))
    assert sum(not torch.equal(TimmRandomErasing(p=1.0)(x), x) for _ in range(100)) >= 99  # 10 tries nearly always fit
    y = x.clone()
    TimmRandomErasing(p=1.0)(y)
    assert torch.equal(y, x)  # not in place by default
    TimmRandomErasing(p=1.0, inplace=True)(y)
    assert not torch.equal(y, x)


def test_random_erasing_pixel_mode_is_noise_in_the_box_only():
    random.seed(1)
    torch.manual_seed(1)
    x = torch.full((3, 32, 32), 7.0)
    out = TimmRandomErasing(p=1.0)(x)
    changed = (out != 7.0).any(0)
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all() and changed.sum() == box.numel()  # one rectangle
    area = box.numel() / (32 * 32)
    assert 0.02 * 0.8 <= area <= 1 / 3 * 1.2  # U(0.02, 1/3) up to rounding of the sides
    assert abs(out[:, changed].mean()) < 0.3 and abs(out[:, changed].std() - 1) < 0.3  # N(0, 1)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(p=1.5), "p"),
        (dict(mode="zero"), "mode"),
        (dict(min_aspect=0), "min_aspect"),
        (dict(min_count=2, max_count=1), "count"),
    ],
)
def test_random_erasing_bad_arguments(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        TimmRandomErasing(**kwargs)


def test_random_erasing_needs_a_tensor():
    with pytest.raises(TypeError, match="after ToTensor"):
        TimmRandomErasing()(_image())


# ---------------------------------------------------------------- ThreeAugment


def _which(img: Image.Image, out: Image.Image) -> str:
    a, o = np.asarray(img).astype(int), np.asarray(out).astype(int)
    if (o[..., 0] == o[..., 1]).all() and (o[..., 1] == o[..., 2]).all():
        return "grayscale"
    if np.array_equal(o, np.where(a >= 128, 255 - a, a)):
        return "solarize"
    assert not np.array_equal(o, a)
    return "blur"


def test_three_augment_picks_each_op_a_third_of_the_time():
    # n = 3000, p = 1/3: sd = sqrt(n p (1 - p)) = 25.8; bound 5 sd = 129 around 1000
    random.seed(0)
    img = _image(12, 10)
    t = ThreeAugment(color_jitter=0.0)  # jitter off, so the op is visible
    assert t.jitter is None
    counts = {"grayscale": 0, "solarize": 0, "blur": 0}
    for _ in range(3000):
        counts[_which(img, t(img))] += 1
    assert all(abs(c - 1000) <= 129 for c in counts.values()), counts


def test_three_augment_ops_are_deit_ops():
    img = _image(12, 10)
    t = ThreeAugment(color_jitter=0.0)
    grey, sol, blur = t.ops
    assert np.array_equal(np.asarray(grey(img)), np.asarray(T.Grayscale(3)(img)))
    assert np.array_equal(np.asarray(sol(img)), np.asarray(ImageOps.solarize(img, 128)))
    random.seed(5)
    out = blur(img)
    random.seed(5)
    expected = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
    assert np.array_equal(np.asarray(out), np.asarray(expected))


class _DeitOp:
    """deit/augment.py's gray_scale / Solarization / GaussianBlur at p=1.0: draw, then apply."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.kind == "blur":
            assert random.random() <= 1.0
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        assert random.random() < 1.0
        return T.Grayscale(3)(img) if self.kind == "grayscale" else ImageOps.solarize(img)


def test_three_augment_draws_as_deit_with_jitter():
    deit = T.Compose(
        [T.RandomChoice([_DeitOp("grayscale"), _DeitOp("solarize"), _DeitOp("blur")]), T.ColorJitter(0.3, 0.3, 0.3)]
    )
    ours = ThreeAugment()
    assert ours.jitter.brightness == ours.jitter.contrast == ours.jitter.saturation == (0.7, 1.3)
    assert ours.jitter.hue is None
    imgs = [_image(9, 7, seed=i) for i in range(200)]

    def run(t):
        random.seed(7)
        torch.manual_seed(7)
        return [np.asarray(t(im)) for im in imgs]

    assert all(np.array_equal(a, b) for a, b in zip(run(ours), run(deit)))


@pytest.mark.parametrize("bad", [-0.1, [0.3, 0.3], "strong"])
def test_three_augment_bad_jitter(bad):
    with pytest.raises(ConfigError, match="color_jitter"):
        ThreeAugment(color_jitter=bad)


# ---------------------------------------------------------------- SimpleRandomCrop


@pytest.mark.parametrize("w, h", [(37, 23), (23, 37), (64, 16), (12, 12), (5, 9)])
def test_simple_random_crop_geometry_and_deit_order(w, h):
    t = SimpleRandomCrop(12)
    deit = T.Compose(
        [
            T.Resize(12, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomCrop(12, padding=4, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
        ]
    )
    img = _image(w, h)
    for seed in range(20):
        torch.manual_seed(seed)
        out = t(img)
        torch.manual_seed(seed)
        assert out.size == (12, 12)
        assert np.array_equal(np.asarray(out), np.asarray(deit(img)))


def test_simple_random_crop_pads_by_reflection():
    # 20 x 12 input, size 12: the resize keeps it (shorter side already 12); reflect-padded by 4 it is
    # 28 x 20, so the crop's top is in [0, 8] and its left in [0, 16]; every pixel is unique
    h, w = 12, 20
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = np.arange(h * w).reshape(h, w)
    a[..., 1], a[..., 2] = np.mgrid[0:h, 0:w]
    img = Image.fromarray(a)
    padded = np.pad(a, ((4, 4), (4, 4), (0, 0)), mode="reflect")

    def window(top: int, left: int, flip: bool) -> bytes:
        crop = padded[top : top + 12, left : left + 12]
        return np.ascontiguousarray(crop[:, ::-1] if flip else crop).tobytes()

    windows = {window(*pos): pos for pos in itertools.product(range(9), range(17), (False, True))}
    assert len(windows) == 9 * 17 * 2  # each crop position tells itself apart
    t = SimpleRandomCrop(12)
    torch.manual_seed(0)
    hits = [windows.get(np.asarray(t(img)).tobytes()) for _ in range(300)]
    assert None not in hits  # every output is a window of the reflect-padded image
    tops, lefts, flips = ({h[k] for h in hits} for k in range(3))
    assert tops == set(range(9)) and lefts == set(range(17)) and flips == {False, True}


def test_simple_random_crop_bad_arguments():
    with pytest.raises(ConfigError, match="size"):
        SimpleRandomCrop(0)
    with pytest.raises(ConfigError, match="bicubc"):
        SimpleRandomCrop(8, interpolation="bicubc")


# ---------------------------------------------------------------- YAML composites and enums


def test_random_choice_picks_both_and_keeps_p():
    img = _image(6, 6)
    tf = build_transforms(
        _yaml("""
- name: RandomChoice
  transforms:
    - {name: RandomHorizontalFlip, p: 1.0}
    - {name: RandomVerticalFlip, p: 1.0}
"""),
        "DATA.TRAIN.TRANSFORMS",
    )
    h, v = np.asarray(img)[:, ::-1], np.asarray(img)[::-1]
    random.seed(0)
    outs = [np.asarray(tf(img)) for _ in range(60)]
    assert all(np.array_equal(o, h) or np.array_equal(o, v) for o in outs)
    assert any(np.array_equal(o, h) for o in outs) and any(np.array_equal(o, v) for o in outs)
    weighted = build_transform(
        {
            "name": "RandomChoice",
            "p": [0.0, 1.0],
            "transforms": [{"name": "Grayscale"}, {"name": "RandomVerticalFlip", "p": 1.0}],
        },
        "X",
    )
    assert weighted.p == [0.0, 1.0]
    assert all(np.array_equal(np.asarray(weighted(img)), v) for _ in range(20))


def test_random_apply_p_and_nested_containers():
    img = _image(6, 6)
    off = build_transform(
        {"name": "RandomApply", "p": 0.0, "transforms": [{"name": "ColorJitter", "brightness": 0.9}]}, "X"
    )
    assert off.p == 0.0
    assert all(np.array_equal(np.asarray(off(img)), np.asarray(img)) for _ in range(30))
    nested = build_transforms(
        _yaml("""
- name: Compose
  transforms:
    - name: RandomApply
      p: 1.0
      transforms: [{name: RandomHorizontalFlip, p: 1.0}, {name: RandomVerticalFlip, p: 1.0}]
    - name: RandomOrder
      transforms: [{name: ToTensor}]
"""),
        "X",
    )
    out = nested(img)
    assert torch.equal(out, T.ToTensor()(img.rotate(180)))


def test_enum_strings_reach_torchvision_as_enums():
    tf = build_transforms(
        _yaml("""
- {name: Resize, size: 8, interpolation: bicubic}
- name: RandomChoice
  transforms:
    - {name: RandomResizedCrop, size: 8, interpolation: BICUBIC}
    - {name: RandomRotation, degrees: 10, interpolation: Nearest-Exact}
- {name: AutoAugment, policy: cifar10}
"""),
        "X",
    )
    resize, choice, aa = (step for step, _ in tf.steps)
    assert resize.interpolation is T.InterpolationMode.BICUBIC
    assert choice.transforms[0].interpolation is T.InterpolationMode.BICUBIC
    assert choice.transforms[1].interpolation is T.InterpolationMode.NEAREST_EXACT
    assert aa.policy is T.AutoAugmentPolicy.CIFAR10
    pil_code = build_transform({"name": "Resize", "size": 8, "interpolation": 3}, "X")  # DeiT's interpolation=3
    assert pil_code.interpolation is T.InterpolationMode.BICUBIC
    assert isinstance(tf(_image(12, 10)), Image.Image)  # and it runs


@pytest.mark.parametrize(
    "entries, where",
    [
        (
            [{"name": "Resize", "size": 8, "interpolation": "bicubc"}],
            "DATA.TRAIN.TRANSFORMS[0] 'Resize': interpolation",
        ),
        (
            [{"name": "RandomApply", "transforms": [{"name": "Resize", "size": 8, "interpolation": "cubic"}]}],
            "DATA.TRAIN.TRANSFORMS[0].transforms[0] 'Resize': interpolation",
        ),
    ],
)
def test_bad_interpolation_is_a_one_line_config_error(entries, where):
    with pytest.raises(ConfigError) as e:
        build_transforms(entries, "DATA.TRAIN.TRANSFORMS")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(where)
    assert "nearest, nearest-exact, bilinear, bicubic, box, hamming, lanczos" in msg


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"name": "RandomChoice"}, "'transforms' must be a non-empty list"),
        ({"name": "RandomApply", "transforms": []}, "'transforms' must be a non-empty list"),
        ({"name": "RandomChoice", "transforms": [{"name": "Grayscal"}]}, r"transforms\[0\]: unknown transform"),
        ({"name": "Compose", "transforms": [{"name": "Grayscale", "indices": [0]}]}, "indices"),
        ({"name": "RandomApply", "prob": 0.5, "transforms": [{"name": "Grayscale"}]}, "unknown argument 'prob'"),
    ],
)
def test_bad_containers(entry, match):
    with pytest.raises(ConfigError, match=match):
        build_transform(entry, "X")


# ---------------------------------------------------------------- the recipes' lists, as in the report

DEIT_TRAIN = """
- {name: RandomResizedCrop, size: 16, interpolation: bicubic}
- {name: RandomHorizontalFlip}
- {name: RandAugment, magnitude: 9, magnitude_std: 0.5, increasing_severity: true, interpolation: bicubic}
- {name: ToTensor}
- {name: Normalize, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
- {name: TimmRandomErasing, p: 0.25, mode: pixel}
"""

DEIT3_TRAIN = """
- {name: RandomResizedCrop, size: 16, interpolation: bicubic}
- {name: RandomHorizontalFlip}
- {name: ThreeAugment, color_jitter: 0.3}
- {name: ToTensor}
- {name: Normalize, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
"""

DEIT3_SRC_TRAIN = """
- {name: SimpleRandomCrop, size: 16}
- {name: ThreeAugment}
- {name: ToTensor}
- {name: Normalize, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
"""


@pytest.mark.parametrize("text", [DEIT_TRAIN, DEIT3_TRAIN, DEIT3_SRC_TRAIN])
def test_recipe_lists_build_and_run(text):
    tf = build_transforms(_yaml(text), "DATA.TRAIN.TRANSFORMS")
    random.seed(0)
    torch.manual_seed(0)
    for seed in range(5):
        out = tf(_image(30, 20, seed))
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and math.isfinite(out.sum().item())


def test_three_augment_keeps_a_one_channel_image_one_channel():
    # Fashion-MNIST-like input: grayscale must not turn it into RGB (a batch keeps one shape)
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (12, 12), dtype=np.uint8), mode="L")
    aug = ThreeAugment(color_jitter=0.3)
    random.seed(0)
    outs = [aug(img) for _ in range(30)]
    assert {o.mode for o in outs} == {"L"} and {o.size for o in outs} == {(12, 12)}
    rgb = aug(img.convert("RGB"))
    assert rgb.mode == "RGB"
