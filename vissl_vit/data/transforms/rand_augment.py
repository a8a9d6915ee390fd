"""RandAugment with VISSL's arguments and semantics (its timm-derived ``rand_auto_aug.py``).

Cubuk et al., "RandAugment", 2020 (arXiv:1909.13719). Each image gets ``num_layers`` operations
drawn from the list below (uniformly with replacement, or without replacement from VISSL's fixed
weights with ``weight_choice: 0``), each applied with probability ``prob``, at a magnitude (0-10)
drawn from N(magnitude, magnitude_std) per application and clipped to [0, 10]. With
``increasing_severity`` the posterize, solarize and enhancement operations get stronger as the
magnitude grows (timm's "Increasing" forms, DeiT's "rand-m9-mstd0.5-inc1"); otherwise they are
VISSL's plain forms, e.g. Posterize keeping int(0.4 m) bits (3 at m=9).

As in VISSL, geometric operations fill with grey (128) and resample with bilinear or bicubic
interpolation drawn at random per application, unless ``fill`` and ``interpolation`` say otherwise
(DeiT's timm RandAugment fills with the data set's mean colour, round(255 x ImageNet mean) =
(124, 116, 104), and resamples bicubic with ``--train-interpolation bicubic``).

This name takes precedence over torchvision's RandAugment (different arguments); for
torchvision's, use its TrivialAugmentWide or AutoAugment, or register it under another name.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from PIL import Image, ImageEnhance, ImageOps

from vissl_vit.errors import ConfigError
from vissl_vit.registry import TRANSFORMS

_MAX = 10.0
_FILL = 128  # VISSL's _FILL (128, 128, 128): its _HPARAMS_DEFAULT overrides any img_mean
_RANDOM_INTERPOLATION = (Image.BILINEAR, Image.BICUBIC)  # VISSL's default: one drawn per application
_INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}

# VISSL's _RAND_CHOICE_WEIGHTS_0 (weight_choice: 0), by operation; the Increasing forms take the
# weight of their plain form (VISSL indexes the weights by position in the list)
_CHOICE_WEIGHTS_0 = {
    "Rotate": 0.3, "ShearX": 0.2, "ShearY": 0.2, "TranslateXRel": 0.1, "TranslateYRel": 0.1,
    "Color": 0.025, "Sharpness": 0.025, "AutoContrast": 0.025, "Solarize": 0.005, "SolarizeAdd": 0.005,
    "Contrast": 0.005, "Brightness": 0.005, "Equalize": 0.005, "Posterize": 0.0, "Invert": 0.0,
}  # fmt: skip

Op = Callable[[Image.Image, float], Image.Image]


def _negate(v: float) -> float:
    """v or -v with probability 1/2 each (VISSL's _randomly_negate)."""
    return -v if random.random() > 0.5 else v


def _fill(img: Image.Image, fill: tuple[int, ...]) -> int | tuple[int, ...]:
    """The fill colour in the image's mode: one value per band (the first for a one-band image)."""
    if img.mode == "L" or len(img.getbands()) == 1:
        return fill[0]
    bands = len(img.getbands())
    return fill[:bands] if len(fill) >= bands else (fill[0],) * bands


def _enhance(kind: Callable[[Image.Image], ImageEnhance._Enhance], increasing: bool) -> Op:
    """Colour, contrast, brightness, sharpness. Increasing: factor 1 +- 0.09 m (further from 1 as m
    grows); plain: factor 0.1 + 0.18 m (below or above 1 depending on m)."""

    def op(img: Image.Image, m: float) -> Image.Image:
        factor = 1.0 + _negate(m / _MAX * 0.9) if increasing else m / _MAX * 1.8 + 0.1
        return kind(img).enhance(factor)

    return op


def _posterize(increasing: bool) -> Op:
    """Bits kept: int(0.4 m) (VISSL's plain Posterize: 3 at m=9) or 4 - int(0.4 m) (increasing)."""

    def op(img: Image.Image, m: float) -> Image.Image:
        bits = int(m / _MAX * 4)
        bits = 4 - bits if increasing else bits
        if bits >= 8:
            return img
        if bits <= 0:  # what PIL's posterize gave VISSL for 0 bits (mask 0): black; PIL now refuses 0
            return img.point([0] * 256 * len(img.getbands()))
        return ImageOps.posterize(img, bits)

    return op


def _solarize(increasing: bool) -> Op:
    def op(img: Image.Image, m: float) -> Image.Image:
        thresh = int(m / _MAX * 256)
        return ImageOps.solarize(img, 256 - thresh if increasing else thresh)

    return op


def _solarize_add(img: Image.Image, m: float) -> Image.Image:
    add = int(m / _MAX * 110)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    if img.mode == "RGB":
        lut = lut * 3
    return img.point(lut) if img.mode in ("L", "RGB") else img


@TRANSFORMS.register("RandAugment")
class RandAugment:
    """Args (VISSL's, with VISSL's defaults):
    magnitude: strength of every operation, 0-10 (VISSL's default 10; DeiT: 9).
    magnitude_std: standard deviation of the per-application noise on the magnitude (DeiT: 0.5).
    num_layers: operations per image (2).
    increasing_severity: the "Increasing" operation forms (DeiT: True).
    weight_choice: None (operations drawn uniformly, with replacement) or 0 (VISSL's fixed
        weights, without replacement: mostly geometric, never Posterize or Invert).
    interpolation: resampling of the geometric operations: None (VISSL: bilinear or bicubic at
        random per application), "nearest" / "bilinear" / "bicubic" or PIL's code, or a list to
        draw from.
    translate_pct: largest translation, as a fraction of the image side (VISSL: 0.45).
    prob: probability of applying each drawn operation (VISSL fixes it at 0.5).
    fill: the fill colour of the geometric operations: one grey level or one value per channel
        (VISSL: 128; DeiT / timm: [124, 116, 104], round(255 x ImageNet mean)).
    """

    def __init__(
        self,
        magnitude: float = 10.0,
        magnitude_std: float = 0.0,
        num_layers: int = 2,
        increasing_severity: bool = False,
        weight_choice: int | None = None,
        interpolation: str | int | Sequence[str | int] | None = None,
        translate_pct: float = 0.45,
        prob: float = 0.5,
        fill: int | Sequence[int] = _FILL,
    ) -> None:
        if not 0 <= magnitude <= _MAX:
            raise ConfigError(f"RandAugment: magnitude must be in [0, 10], got {magnitude}")
        if weight_choice not in (None, 0):
            raise ConfigError(
                f"RandAugment: weight_choice must be null or 0 (VISSL's one weight set), got {weight_choice}"
            )
        self.magnitude, self.magnitude_std = magnitude, magnitude_std
        self.num_layers, self.prob, self.translate_pct = num_layers, prob, translate_pct
        self.resample = self._resamples(interpolation)
        values = [fill] if isinstance(fill, int) else list(fill)
        if not values or not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
            raise ConfigError(
                f"RandAugment: fill must be an integer 0-255 or a list of them (one per channel), got {fill!r}"
            )
        self.fill = tuple(values)
        self.ops = self._ops(increasing_severity)
        self.names = list(self.ops)
        self.weights = None if weight_choice is None else [_CHOICE_WEIGHTS_0[n] for n in self.names]
        if self.weights is not None and num_layers > sum(w > 0 for w in self.weights):
            raise ConfigError(
                f"RandAugment: num_layers={num_layers} with weight_choice 0 draws distinct operations; "
                f"only {sum(w > 0 for w in self.weights)} have a weight."
            )

    @staticmethod
    def _resamples(interpolation: str | int | Sequence[str | int] | None) -> tuple[int, ...]:
        if interpolation is None:
            return _RANDOM_INTERPOLATION
        items = [interpolation] if isinstance(interpolation, (str, int)) else list(interpolation)
        out = []
        for item in items:
            if isinstance(item, str) and item.lower() in _INTERPOLATIONS:
                out.append(_INTERPOLATIONS[item.lower()])
            elif isinstance(item, int) and item in _INTERPOLATIONS.values():
                out.append(item)
            else:
                raise ConfigError(
                    f"RandAugment: interpolation {item!r} is not one of {', '.join(_INTERPOLATIONS)} (or PIL's code)"
                )
        return tuple(out)

    def _geometric(self, img: Image.Image, kind: str, v: float) -> Image.Image:
        """Rotate by v degrees, or an affine shear / translation by v, with grey fill."""
        resample = random.choice(self.resample) if len(self.resample) > 1 else self.resample[0]
        if kind == "rotate":
            return img.rotate(v, resample=resample, fillcolor=_fill(img, self.fill))
        matrix = {
            "shear_x": (1, v, 0, 0, 1, 0),
            "shear_y": (1, 0, 0, v, 1, 0),
            "translate_x": (1, 0, v * img.size[0], 0, 1, 0),
            "translate_y": (1, 0, 0, 0, 1, v * img.size[1]),
        }[kind]
        return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=_fill(img, self.fill))

    def _ops(self, increasing: bool) -> dict[str, Op]:
        t = self.translate_pct
        return {
            "AutoContrast": lambda img, m: ImageOps.autocontrast(img),
            "Equalize": lambda img, m: ImageOps.equalize(img),
            "Invert": lambda img, m: ImageOps.invert(img),
            "Rotate": lambda img, m: self._geometric(img, "rotate", _negate(m / _MAX * 30.0)),
            "Posterize": _posterize(increasing),
            "Solarize": _solarize(increasing),
            "SolarizeAdd": _solarize_add,
            "Color": _enhance(ImageEnhance.Color, increasing),
            "Contrast": _enhance(ImageEnhance.Contrast, increasing),
            "Brightness": _enhance(ImageEnhance.Brightness, increasing),
            "Sharpness": _enhance(ImageEnhance.Sharpness, increasing),
            "ShearX": lambda img, m: self._geometric(img, "shear_x", _negate(m / _MAX * 0.3)),
            "ShearY": lambda img, m: self._geometric(img, "shear_y", _negate(m / _MAX * 0.3)),
            "TranslateXRel": lambda img, m: self._geometric(img, "translate_x", _negate(m / _MAX * t)),
            "TranslateYRel": lambda img, m: self._geometric(img, "translate_y", _negate(m / _MAX * t)),
        }

    def _choose(self) -> list[str]:
        """The operations of one image: uniform with replacement, or weighted without (VISSL's
        np.random.choice(replace=False, p=weights): for two draws, P(a, b) = w_a w_b / (1 - w_a))."""
        if self.weights is None:
            return random.choices(self.names, k=self.num_layers)
        names, weights, chosen = list(self.names), list(self.weights), []
        for _ in range(self.num_layers):
            i = random.choices(range(len(names)), weights=weights)[0]
            chosen.append(names.pop(i))
            weights.pop(i)
        return chosen

    def __call__(self, img: Image.Image) -> Image.Image:
        for name in self._choose():
            if self.prob < 1.0 and random.random() > self.prob:  # VISSL's AugmentOp test
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = random.gauss(m, self.magnitude_std)
            img = self.ops[name](img, min(_MAX, max(0.0, m)))
        return img

    def __repr__(self) -> str:
        return (
            f"RandAugment(magnitude={self.magnitude}, magnitude_std={self.magnitude_std}, num_layers={self.num_layers})"
        )
