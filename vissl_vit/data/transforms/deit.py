"""DeiT's and DeiT-III's own transforms: 3-Augment, simple random crop, timm's random erasing.

Touvron et al., "Training data-efficient image transformers & distillation through attention",
2021 (arXiv:2012.12877), and "DeiT III: Revenge of the ViT", 2022 (arXiv:2204.07118).

- ``ThreeAugment``: DeiT-III's secondary transform (``deit/augment.py::new_data_aug_generator``):
  one of grayscale, solarize and Gaussian blur per image, then colour jitter. With ``--ThreeAugment``
  it replaces the whole train transform: no RandAugment and no random erasing next to it.
- ``SimpleRandomCrop``: DeiT-III's primary transform under ``--src`` (ImageNet-21k pre-training and
  its fine-tuning); ImageNet-1k keeps the random resized crop (torchvision's ``RandomResizedCrop``
  with ``interpolation: bicubic``).
- ``TimmRandomErasing``: DeiT's random erasing (timm's ``RandomErasing``, ``--reprob 0.25
  --remode pixel``), on the normalised tensor.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

from vissl_vit.data.transforms.build import interpolation_mode
from vissl_vit.errors import ConfigError
from vissl_vit.registry import TRANSFORMS


def _grayscale(img: Image.Image) -> Image.Image:
    """Grayscale with the input's number of channels: 3 for a colour image (DeiT's Grayscale(3)),
    and a one-channel image unchanged (its grey is itself), so that a batch keeps one shape."""
    return T.functional.to_grayscale(img, num_output_channels=1 if len(img.getbands()) == 1 else 3)


def _solarize(img: Image.Image) -> Image.Image:
    return ImageOps.solarize(img, threshold=128)


def _blur(img: Image.Image) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


@TRANSFORMS.register("ThreeAugment")
class ThreeAugment:
    """DeiT-III's 3-Augment on a PIL image: one of three operations, then colour jitter.

    The operation is drawn uniformly per image: grayscale (3 channels; one-channel images stay so), solarize (PIL's
    ``ImageOps.solarize`` at threshold 128: pixels >= 128 inverted) or Gaussian blur of radius
    U(0.1, 2.0). Then ``ColorJitter(b, c, s)`` (brightness, contrast, saturation; no hue) always
    runs, unless its strengths are all 0 (DeiT then leaves it out).

    The python ``random`` calls follow DeiT's code, so that a seeded run draws the same: one
    ``random()`` for the choice (torchvision's ``RandomChoice``), one for the chosen operation's
    probability check (DeiT's three classes take ``p=1.0`` and still draw it), and for blur one
    ``uniform(0.1, 2.0)``; the jitter draws from torch's generator, as torchvision's does. timm's
    ``auto_augment='3a'`` draws the choice differently (``random.choice``) but applies the same
    three operations.

    Args:
        color_jitter: brightness, contrast and saturation strength: one number for all three
            (DeiT's ``--color-jitter``, 0.3 in DeiT-III) or a list of three; 0 turns the jitter off.
    """

    def __init__(self, color_jitter: float | Sequence[float] = 0.3) -> None:
        strengths = [color_jitter] * 3 if isinstance(color_jitter, (int, float)) else list(color_jitter)
        if len(strengths) != 3 or any(not isinstance(s, (int, float)) or s < 0 for s in strengths):
            raise ConfigError(
                f"ThreeAugment: color_jitter is one number >= 0 or a list of three "
                f"(brightness, contrast, saturation), got {color_jitter!r}"
            )
        self.ops = (_grayscale, _solarize, _blur)
        self.jitter = T.ColorJitter(*strengths) if any(strengths) else None

    def __call__(self, img: Image.Image) -> Image.Image:
        op = self.ops[math.floor(random.random() * len(self.ops))]  # = random.choices(self.ops)[0]
        random.random()  # DeiT's p=1.0 check of the chosen operation: always true, but drawn
        img = op(img)
        return self.jitter(img) if self.jitter is not None else img

    def __repr__(self) -> str:
        return f"ThreeAugment(grayscale | solarize@128 | blur U(0.1, 2.0), then {self.jitter})"


@TRANSFORMS.register("SimpleRandomCrop")
class SimpleRandomCrop:
    """DeiT-III's simple random crop (``--src``): resize, random crop with reflect padding, flip.

    ``Resize(size)`` of the shorter side (the aspect ratio kept), ``RandomCrop(size,
    padding=padding, padding_mode='reflect')``, ``RandomHorizontalFlip(0.5)``: the output is
    ``size x size``; unlike a random resized crop it keeps nearly the whole image at one scale.
    These are torchvision's transforms in DeiT's order, so a seeded run draws what DeiT's does.

    Args:
        size: side of the output, in pixels (224; 192 or 160 for DeiT-III's low-resolution runs).
        padding: pixels of reflect padding on each side before the crop (DeiT-III: 4).
        interpolation: resampling of the resize, a torchvision InterpolationMode name (DeiT: bicubic).
    """

    def __init__(self, size: int, padding: int = 4, interpolation: str = "bicubic") -> None:
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"SimpleRandomCrop: size is a positive int (the output side), got {size!r}")
        if not isinstance(padding, int) or padding < 0:
            raise ConfigError(f"SimpleRandomCrop: padding is an int >= 0, got {padding!r}")
        mode = interpolation_mode(interpolation, "SimpleRandomCrop: interpolation")
        self.transform = T.Compose(
            [
                T.Resize(size, interpolation=mode),
                T.RandomCrop(size, padding=padding, padding_mode="reflect"),
                T.RandomHorizontalFlip(0.5),
            ]
        )

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.transform(img)

    def __repr__(self) -> str:
        return f"SimpleRandomCrop({self.transform.transforms})"


@TRANSFORMS.register("TimmRandomErasing")
class TimmRandomErasing:
    """Random erasing as DeiT uses it: timm's ``RandomErasing``, after Normalize, on a tensor.

    Zhong et al., "Random Erasing Data Augmentation", 2020 (arXiv:1708.04896). With probability
    ``p`` an image gets ``count`` boxes (1 unless ``max_count`` is set, then uniform in
    [min_count, max_count]); each box has area U(min_area, max_area) x H x W / count and aspect
    ratio exp(U(log min_aspect, log max_aspect)), sides ``round(sqrt(area x aspect))`` by
    ``round(sqrt(area / aspect))``; up to 10 tries until it fits strictly inside, then a uniform
    position. Mode ``pixel`` fills it with per-pixel N(0, 1) noise, ``rand`` with one N(0, 1) colour
    per channel, ``const`` with 0: values of the normalised image, hence after Normalize.

    The draws (python ``random`` for the box, torch's generator for the noise) come in timm's order,
    so with the same seeds the output equals ``timm.data.RandomErasing(..., device='cpu')``'s.

    torchvision's ``RandomErasing`` (the name VISSL's configs use, kept as torchvision's) differs:
    its defaults are area (0.02, 0.33) and aspect (0.3, 3.3), it draws the box from torch's
    generator (so no seeded parity with timm), it fills with ``value`` (0 by default; ``'random'``: noise),
    and VISSL's configs place it before Normalize, so its box is black in [0, 1] space rather than
    noise in normalised space.

    Args:
        p: probability of erasing an image (DeiT: ``--reprob 0.25``; DeiT-III: 0).
        min_area, max_area: fraction of the image area a box covers, drawn uniformly.
        min_aspect: smallest aspect ratio (h / w); ``max_aspect`` defaults to 1 / min_aspect.
        mode: ``pixel`` (DeiT), ``rand`` or ``const``.
        min_count, max_count: boxes per erased image (DeiT: 1).
        inplace: erase the input tensor itself (timm's behaviour) instead of a copy.
    """

    modes = ("pixel", "rand", "const")

    def __init__(
        self,
        p: float = 0.25,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        mode: str = "pixel",
        min_count: int = 1,
        max_count: int | None = None,
        inplace: bool = False,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"TimmRandomErasing: p must be in [0, 1], got {p}")
        if not 0.0 < min_area <= max_area <= 1.0:
            raise ConfigError(f"TimmRandomErasing: need 0 < min_area <= max_area <= 1, got {min_area}, {max_area}")
        if not isinstance(mode, str) or mode.lower() not in self.modes:
            raise ConfigError(f"TimmRandomErasing: mode {mode!r} is not one of {', '.join(self.modes)}")
        if not min_aspect > 0.0:
            raise ConfigError(f"TimmRandomErasing: min_aspect must be > 0, got {min_aspect}")
        max_aspect = max_aspect or 1 / min_aspect
        if not min_aspect <= max_aspect:
            raise ConfigError(f"TimmRandomErasing: need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        max_count = max_count or min_count
        if not 1 <= min_count <= max_count:
            raise ConfigError(f"TimmRandomErasing: need 1 <= min_count <= max_count, got {min_count}, {max_count}")
        self.p, self.min_area, self.max_area = p, min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.mode, self.min_count, self.max_count, self.inplace = mode.lower(), min_count, max_count, inplace

    def _fill(self, shape: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
        c = shape[0]
        if self.mode == "pixel":
            return torch.empty(shape, dtype=like.dtype, device=like.device).normal_()
        if self.mode == "rand":
            return torch.empty((c, 1, 1), dtype=like.dtype, device=like.device).normal_()
        return torch.zeros((c, 1, 1), dtype=like.dtype, device=like.device)

    def _erase(self, img: torch.Tensor) -> None:
        """Erase boxes of one [C, H, W] image in place, or leave it (probability 1 - p)."""
        if random.random() > self.p:
            return
        c, h_img, w_img = img.shape
        count = self.min_count if self.min_count == self.max_count else random.randint(self.min_count, self.max_count)
        for _ in range(count):
            for _attempt in range(10):
                area = random.uniform(self.min_area, self.max_area) * h_img * w_img / count
                aspect = math.exp(random.uniform(*self.log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if w < w_img and h < h_img:
                    top = random.randint(0, h_img - h)
                    left = random.randint(0, w_img - w)
                    img[:, top : top + h, left : left + w] = self._fill((c, h, w), img)
                    break

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A [C, H, W] image or a [B, C, H, W] batch (each image on its own draws)."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
            raise TypeError(
                f"TimmRandomErasing takes a [C, H, W] or [B, C, H, W] tensor (place it after ToTensor and "
                f"Normalize), got {type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}"
            )
        if not self.inplace:
            x = x.clone()
        for img in [x] if x.dim() == 3 else x:
            self._erase(img)
        return x

    def __repr__(self) -> str:
        return (
            f"TimmRandomErasing(p={self.p}, area=({self.min_area}, {self.max_area}), mode={self.mode}, "
            f"count=({self.min_count}, {self.max_count}))"
        )
