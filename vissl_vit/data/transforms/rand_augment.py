"""RandAugment with VISSL's arguments (timm's variant used by DeiT: "rand-m9-mstd0.5-inc1").

Cubuk et al., "RandAugment", 2020 (arXiv:1909.13719). Each image gets ``num_layers`` operations
drawn uniformly from the list below, each applied with probability ``prob``, at a magnitude
(0-10) drawn from N(magnitude, magnitude_std) per application. With ``increasing_severity`` the
posterize, solarize and enhancement operations get stronger as the magnitude grows (their
"Increasing" forms in timm); otherwise enhancement factors can move either way around 1.

This name takes precedence over torchvision's RandAugment (different arguments); for
torchvision's, use its TrivialAugmentWide or AutoAugment, or register it under another name.
"""

from __future__ import annotations

import random

from PIL import Image, ImageEnhance, ImageOps

from vissl_vit.registry import TRANSFORMS

_MAX = 10.0
_FILL = (124, 116, 104)  # ImageNet mean, for pixels that geometric operations bring in


def _signed(v: float) -> float:
    return v if random.random() < 0.5 else -v


def _fill(img: Image.Image):
    return _FILL[0] if img.mode == "L" else _FILL[: len(img.getbands())]


def _affine(img: Image.Image, matrix: tuple) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_fill(img))


def _enhance(kind, increasing: bool):
    """Colour, contrast, brightness, sharpness. Increasing: factor 1 +- 0.09 m (further from 1 as m
    grows); original: factor 0.1 + 0.18 m (below or above 1 depending on m)."""

    def op(img: Image.Image, m: float) -> Image.Image:
        factor = 1.0 + _signed(m / _MAX * 0.9) if increasing else m / _MAX * 1.8 + 0.1
        return kind(img).enhance(factor)

    return op


def _posterize(increasing: bool):
    """Bits kept: 4 - 0.4 m (increasing: fewer bits, stronger) or 4 + 0.4 m (original)."""

    def op(img: Image.Image, m: float) -> Image.Image:
        bits = 4 - int(m / _MAX * 4) if increasing else 4 + int(m / _MAX * 4)
        return img if bits >= 8 else ImageOps.posterize(img, max(bits, 1))

    return op


def _solarize(increasing: bool):
    def op(img: Image.Image, m: float) -> Image.Image:
        thresh = 256 - int(m / _MAX * 256) if increasing else int(m / _MAX * 256)
        return ImageOps.solarize(img, thresh)

    return op


def _solarize_add(img: Image.Image, m: float) -> Image.Image:
    add = int(m / _MAX * 110)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    if img.mode == "RGB":
        lut = lut * 3
    return img.point(lut) if img.mode in ("L", "RGB") else img


def _ops(increasing: bool) -> dict:
    return {
        "AutoContrast": lambda img, m: ImageOps.autocontrast(img),
        "Equalize": lambda img, m: ImageOps.equalize(img),
        "Invert": lambda img, m: ImageOps.invert(img),
        "Rotate": lambda img, m: img.rotate(_signed(m / _MAX * 30.0), resample=Image.BILINEAR, fillcolor=_fill(img)),
        "Posterize": _posterize(increasing),
        "Solarize": _solarize(increasing),
        "SolarizeAdd": _solarize_add,
        "Color": _enhance(ImageEnhance.Color, increasing),
        "Contrast": _enhance(ImageEnhance.Contrast, increasing),
        "Brightness": _enhance(ImageEnhance.Brightness, increasing),
        "Sharpness": _enhance(ImageEnhance.Sharpness, increasing),
        "ShearX": lambda img, m: _affine(img, (1, _signed(m / _MAX * 0.3), 0, 0, 1, 0)),
        "ShearY": lambda img, m: _affine(img, (1, 0, 0, _signed(m / _MAX * 0.3), 1, 0)),
        "TranslateXRel": lambda img, m: _affine(img, (1, 0, _signed(m / _MAX * 0.45) * img.size[0], 0, 1, 0)),
        "TranslateYRel": lambda img, m: _affine(img, (1, 0, 0, 0, 1, _signed(m / _MAX * 0.45) * img.size[1])),
    }


@TRANSFORMS.register("RandAugment")
class RandAugment:
    """Args:
    magnitude: strength of every operation, 0-10 (DeiT: 9).
    magnitude_std: standard deviation of the per-application noise on the magnitude (DeiT: 0.5).
    increasing_severity: the "Increasing" operation forms (DeiT: True).
    num_layers: operations per image (2).
    prob: probability of applying each drawn operation (0.5).
    """

    def __init__(
        self,
        magnitude: float = 9.0,
        magnitude_std: float = 0.0,
        increasing_severity: bool = False,
        num_layers: int = 2,
        prob: float = 0.5,
    ) -> None:
        if not 0 <= magnitude <= _MAX:
            raise ValueError(f"magnitude must be in [0, 10], got {magnitude}")
        self.magnitude, self.magnitude_std = magnitude, magnitude_std
        self.num_layers, self.prob = num_layers, prob
        self.ops = _ops(increasing_severity)
        self.names = list(self.ops)

    def __call__(self, img: Image.Image) -> Image.Image:
        for name in random.choices(self.names, k=self.num_layers):
            if random.random() >= self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = min(_MAX, max(0.0, random.gauss(m, self.magnitude_std)))
            img = self.ops[name](img, m)
        return img

    def __repr__(self) -> str:
        return (
            f"RandAugment(magnitude={self.magnitude}, magnitude_std={self.magnitude_std}, num_layers={self.num_layers})"
        )
