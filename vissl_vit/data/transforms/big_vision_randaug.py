"""big_vision's RandAugment: ``randaug(num_layers, magnitude)`` of its ImageNet recipes, op for op.

Beyer, Zhai, Kolesnikov, "Better plain ViT baselines for ImageNet-1k", 2022 (arXiv:2205.01580):
``decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,10)``. big_vision's implementation is
``pp/archive/autoaugment.py::distort_image_with_randaugment`` (the TPU EfficientNet code); every
fact used here, with its source line, is in the shared RECIPES.md section 4.7 (issue 15).

Per layer one of 16 operations is drawn uniformly (with replacement across layers) and **always**
applied at the fixed magnitude (the ``prob`` big_vision samples is never used). The 16 operations
are torchvision's 14 minus Identity, plus Invert, SolarizeAdd and Cutout.

Why this is our own code and not torchvision's or timm's RandAugment (or ours in
``rand_augment.py``): the semantics differ, and mup-vit (EIFY/mup-vit) measured that the
differences move the grey-level spectrum of the augmented images:

- the op set: 16 ops, no Identity (torchvision: 14 with Identity; timm / VISSL: 15, ``prob`` 0.5);
- the magnitude scale: M=10 is big_vision's _MAX_LEVEL (torchvision's ``magnitude=10`` is 10 of its 31 bins);
  big_vision's i1k / i21k configs go past it, to 15 and 20, and so may this one;
- fill grey 128 (torchvision: 0) and **nearest** resampling (timm / VISSL: bilinear or bicubic);
- Shear is the projective map ``x' = x + l y`` about the **top-left origin**, ``l`` the factor
  itself, read by TF's kernel (torchvision reaches the same map through ``F.affine`` with the
  angle atan(l) and ``center=[0, 0]``; a shear about the centre, ``F.affine``'s default, differs);
- Translate is **absolute**: 100 px at M=10 whatever the image size (torchvision: 150/331 of the
  side; timm / VISSL: 45% of it);
- Solarize's threshold int(M/10 * 256) = 256 overflows uint8 to 0 at M=10, which makes Solarize a
  full Invert (big_vision issue #110); enhancement factors are 0.1 + 0.18 M (1.9 at M=10,
  unsigned; torchvision and timm's increasing forms: 1 +- 0.9 M/10 with a random sign), computed
  and truncated as TF's ``blend`` does;
- Contrast blends with a grey whose level is ``sum(histogram) / 256 = H * W / 256`` (196 for
  224 x 224) instead of the mean grey level (the "Contrast bug"). ``contrast_bug=False`` uses
  the mean grey level ``sum_v hist[v] v / (H W)`` (mup-vit's fix), cast to uint8 in the same place.

All arithmetic copies TF's float32 order and casts (uint8 casts truncate; TF's
``rgb_to_grayscale`` scales by 1/255, weights (0.2989, 0.587, 0.114), then x 255.5 and truncates),
so that each op equals a TensorFlow implementation pixel for pixel: all 16, Contrast in both
modes, on a calibration grid and a colour gradient, with no +-1 tolerance needed, Sharpness's
float32 convolution included (``tests/data/test_big_vision_randaug.py``). About 2 ms per
224 x 224 image for RA(2, 10) on one CPU core.

The python ``random`` module draws the op, the sign and the Cutout centre, as the other
RandAugments in ``rand_augment.py`` do, so seeding a data-loader worker seeds it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image

from vissl_vit.errors import ConfigError
from vissl_vit.registry import TRANSFORMS

MAX_LEVEL = 10.0  # big_vision's _MAX_LEVEL
FILL = 128  # big_vision's replace_value [128] * 3
_F32 = np.float32
_GREY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=_F32)  # tf.image.rgb_to_grayscale's

# big_vision's list, in its order (the op index drawn is a position in this list)
OP_NAMES = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd",
)  # fmt: skip
SIGNED_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")

Array = np.ndarray  # uint8, (H, W, 3)


# --- helpers: TF's casts and colour conversions ------------------------------------------------


def _to_uint8(x: Array) -> Array:
    """TF's saturate_cast / cast after clip_by_value(0, 255): clamp, then truncate toward zero."""
    return np.clip(x, 0, 255).astype(np.uint8)


def blend(image1: Array, image2: Array, factor: float) -> Array:
    """``image1 + factor (image2 - image1)`` in float32; truncated to uint8 (clipped first when
    extrapolating, factor outside (0, 1))."""
    if factor == 0.0:
        return image1
    if factor == 1.0:
        return image2
    a = image1.astype(_F32)
    temp = a + _F32(factor) * (image2.astype(_F32) - a)
    return temp.astype(np.uint8) if 0.0 < factor < 1.0 else _to_uint8(temp)


def grayscale(image: Array) -> Array:
    """tf.image.rgb_to_grayscale on uint8: (H, W) uint8."""
    flt = image.astype(_F32) * _F32(1.0 / 255.0)
    grey = flt[..., 0] * _GREY_WEIGHTS[0] + flt[..., 1] * _GREY_WEIGHTS[1] + flt[..., 2] * _GREY_WEIGHTS[2]
    return _to_uint8(grey * _F32(255.5))


def _grey_rgb(grey: Array) -> Array:
    return np.repeat(grey[..., None], 3, axis=2)


def _sign(value: float) -> float:
    """value or -value, 50/50 (big_vision's _randomly_negate_tensor)."""
    return value if random.random() < 0.5 else -value


# --- the 16 operations: fn(image uint8 (H, W, 3), argument) -> image ---------------------------


def autocontrast(image: Array, _: float | None = None) -> Array:
    """Per channel, min..max rescaled to 0..255 in float32 and truncated; a flat channel is kept."""
    out = image.copy()
    for c in range(image.shape[2]):
        ch = image[..., c]
        lo, hi = _F32(ch.min()), _F32(ch.max())
        if hi > lo:
            scale = _F32(255.0) / (hi - lo)
            out[..., c] = _to_uint8(ch.astype(_F32) * scale + (-lo * scale))
    return out


def equalize(image: Array, _: float | None = None) -> Array:
    """Per channel histogram equalisation (PIL's algorithm, as big_vision codes it in TF)."""
    out = image.copy()
    for c in range(image.shape[2]):
        ch = image[..., c]
        hist = np.bincount(ch.ravel(), minlength=256).astype(np.int64)
        nonzero = hist[hist != 0]
        step = (nonzero.sum() - nonzero[-1]) // 255
        if step == 0:
            continue
        lut = (np.cumsum(hist) + step // 2) // step
        lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255).astype(np.uint8)
        out[..., c] = lut[ch]
    return out


def invert(image: Array, _: float | None = None) -> Array:
    return 255 - image


def posterize(image: Array, bits: int) -> Array:
    """Keep the top ``bits`` bits (0 bits: black)."""
    shift = 8 - int(bits)
    if shift >= 8:
        return np.zeros_like(image)
    return (image >> shift) << shift


def solarize(image: Array, threshold: int) -> Array:
    """Pixels >= threshold inverted. The threshold is cast to uint8 first, as TF's comparison with
    a uint8 image does: 256 (M=10) wraps to 0 and every pixel is inverted."""
    t = int(threshold) % 256
    return np.where(image < t, image, 255 - image).astype(np.uint8)


def solarize_add(image: Array, addition: int, threshold: int = 128) -> Array:
    """Pixels < threshold get ``clip(x + addition, 0, 255)``."""
    added = _to_uint8(image.astype(np.int32) + int(addition))
    return np.where(image < threshold, added, image).astype(np.uint8)


def color(image: Array, factor: float) -> Array:
    return blend(_grey_rgb(grayscale(image)), image, factor)


def contrast(image: Array, factor: float, bug: bool = True) -> Array:
    """Blend with a flat grey. big_vision's grey is ``sum(histogram) / 256`` = H W / 256 (the bug,
    ``bug=True``); the fix is the mean grey level. Either is clipped and truncated to uint8."""
    grey = grayscale(image)
    if bug:
        mean = grey.size / 256.0
    else:
        mean = float(np.bincount(grey.ravel(), minlength=256) @ np.arange(256)) / grey.size
    level = _to_uint8(np.array(mean, dtype=_F32))
    return blend(np.full_like(image, level), image, factor)


def brightness(image: Array, factor: float) -> Array:
    return blend(np.zeros_like(image), image, factor)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=_F32) / _F32(13.0)


def sharpness(image: Array, factor: float) -> Array:
    """Blend with the 3x3 smoothed image (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, valid
    convolution, truncated to uint8); the 1-pixel border keeps the original."""
    h, w = image.shape[:2]
    if h < 3 or w < 3:
        return image
    flt = image.astype(_F32)
    smooth = np.zeros((h - 2, w - 2, image.shape[2]), dtype=_F32)
    for i in range(3):
        for j in range(3):
            smooth += flt[i : i + h - 2, j : j + w - 2] * _SMOOTH[i, j]
    degenerate = image.copy()
    degenerate[1:-1, 1:-1] = _to_uint8(smooth)
    return blend(degenerate, image, factor)


@lru_cache(maxsize=8)
def _coords(h: int, w: int) -> tuple[Array, Array]:
    """Output pixel coordinates (x, y) as float32 (H, W) arrays (read-only, shared)."""
    ys, xs = np.meshgrid(np.arange(h, dtype=_F32), np.arange(w, dtype=_F32), indexing="ij")
    xs.flags.writeable = ys.flags.writeable = False
    return xs, ys


def _round_half_away(v: Array) -> Array:
    """std::round in float32: nearest integer, ties away from zero (np.rint breaks them to even)."""
    r = np.rint(v)
    tie = np.abs(v - r) == _F32(0.5)  # exact in float32
    r[tie] = (v + np.copysign(_F32(0.5), v))[tie]
    return r


def projective(image: Array, transform: tuple[float, ...], fill: int = FILL) -> Array:
    """TF's ImageProjectiveTransform with NEAREST and a constant fill: output pixel (x, y) reads
    input ``(a0 x + a1 y + a2, a3 x + a4 y + a5)`` (float32, no projective part), rounded half
    away from zero (std::round); coordinates outside the image get ``fill``."""
    h, w = image.shape[:2]
    a = np.asarray(transform, dtype=_F32)
    xs, ys = _coords(h, w)
    cx = _round_half_away((a[0] * xs + a[1] * ys) + a[2])
    cy = _round_half_away((a[3] * xs + a[4] * ys) + a[5])
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    # index h * w of the flattened image + one fill pixel is the fill
    flat_index = np.where(inside, cy.astype(np.intp) * w + cx.astype(np.intp), h * w)
    source = np.concatenate([image.reshape(h * w, -1), np.full((1, image.shape[2]), fill, image.dtype)])
    return source[flat_index]


def rotate(image: Array, degrees: float, fill: int = FILL) -> Array:
    """Counter-clockwise rotation about the image centre (tfa.image.rotate's transform, float32)."""
    h, w = _F32(image.shape[0]), _F32(image.shape[1])
    rad = _F32(degrees) * _F32(math.pi / 180.0)
    cos, sin = np.cos(rad, dtype=_F32), np.sin(rad, dtype=_F32)
    x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / _F32(2.0)
    y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / _F32(2.0)
    return projective(image, (cos, -sin, x_off, sin, cos, y_off), fill)


def shear_x(image: Array, level: float, fill: int = FILL) -> Array:
    """Output (x, y) reads input (x + level y, y): a shear about the top-left origin."""
    return projective(image, (1.0, level, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image: Array, level: float, fill: int = FILL) -> Array:
    return projective(image, (1.0, 0.0, 0.0, level, 1.0, 0.0), fill)


def translate_x(image: Array, pixels: float, fill: int = FILL) -> Array:
    """Output x reads input x + pixels: the content moves left by ``pixels`` (big_vision calls
    tfa's translate with ``[-pixels, 0]``)."""
    return projective(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y(image: Array, pixels: float, fill: int = FILL) -> Array:
    return projective(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


def cutout(image: Array, pad_size: int, fill: int = FILL, center: tuple[int, int] | None = None) -> Array:
    """Rows [cy - pad, cy + pad) and columns [cx - pad, cx + pad), clipped to the image, set to
    ``fill``; the centre (cy, cx) is a uniform pixel (side <= 2 pad = 80 at M=10)."""
    h, w = image.shape[:2]
    cy, cx = center if center is not None else (random.randrange(h), random.randrange(w))
    top, bottom = max(0, cy - pad_size), min(h, cy + pad_size)
    left, right = max(0, cx - pad_size), min(w, cx + pad_size)
    out = image.copy()
    out[top:bottom, left:right] = fill
    return out


OPS: dict[str, Callable[..., Array]] = {
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "Solarize": solarize,
    "Color": color,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Cutout": cutout,
    "SolarizeAdd": solarize_add,
}
_FILLED = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout")


def level_to_arg(name: str, magnitude: float, cutout_const: int = 40, translate_const: int = 100) -> float | None:
    """big_vision's level -> argument map, before the random sign of the signed ops (RECIPES 4.7):
    Rotate 30 M/10 degrees, Posterize int(4 M/10) bits, Solarize int(256 M/10), SolarizeAdd
    int(110 M/10), enhancements 1.8 M/10 + 0.1, Shear 0.3 M/10, Translate translate_const M/10
    pixels, Cutout int(cutout_const M/10); None for the ops without an argument."""
    m = magnitude / MAX_LEVEL
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return m * 1.8 + 0.1
    return {
        "Rotate": m * 30.0,
        "Posterize": int(m * 4),
        "Solarize": int(m * 256),
        "SolarizeAdd": int(m * 110),
        "ShearX": m * 0.3,
        "ShearY": m * 0.3,
        "TranslateX": m * float(translate_const),
        "TranslateY": m * float(translate_const),
        "Cutout": int(m * cutout_const),
    }[name]


def calibration_grid(size: int = 224, square: int = 56) -> Array:
    """mup-vit's calibration image: a size x size black-and-white checkerboard of square x square
    squares (black at the top-left), uint8 (size, size, 3)."""
    y, x = np.mgrid[:size, :size]
    board = (((y // square) + (x // square)) % 2 * 255).astype(np.uint8)
    return np.repeat(board[..., None], 3, axis=2)


@TRANSFORMS.register("BigVisionRandAugment")
class BigVisionRandAugment:
    """big_vision's ``randaug(num_layers, magnitude)`` on a PIL image, before ToTensor.

    Args:
        num_layers: operations per image, each drawn uniformly from the 16 (with replacement)
            and always applied (big_vision: 2).
        magnitude: the fixed level of every operation, 0-20 (big_vision's S/16 recipe: 10; its
            i1k / i21k configs also 15 and 20; no noise).
        contrast_bug: True = Contrast as big_vision ships it (grey level H W / 256); False = the
            mean grey level (mup-vit's fix).
        cutout_const: the Cutout half-side at magnitude 10, in pixels (big_vision: 40).
        translate_const: the translation at magnitude 10, in pixels (big_vision: 100).
        fill: the grey of the geometric operations' and Cutout's empty pixels (big_vision: 128).

    An RGB image comes back RGB; a one-band ("L") image is processed as grey RGB and comes back
    one-band (every op keeps r = g = b on a grey image); other modes are converted to RGB.
    """

    def __init__(
        self,
        num_layers: int = 2,
        magnitude: float = 10,
        contrast_bug: bool = True,
        cutout_const: int = 40,
        translate_const: int = 100,
        fill: int = FILL,
    ) -> None:
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 0:
            raise ConfigError(f"BigVisionRandAugment: num_layers must be an integer >= 0, got {num_layers!r}")
        # big_vision's own ImageNet-1k / 21k configs also use 15 ("medium") and 20 ("strong"): its
        # code scales every argument past _MAX_LEVEL, and so does this one (checked against it at
        # 15 and 20, tools/parity). Past 20 Posterize would shift by a negative count.
        if not 0 <= magnitude <= 2 * MAX_LEVEL:
            raise ConfigError(f"BigVisionRandAugment: magnitude must be in [0, 20], got {magnitude!r}")
        if not isinstance(contrast_bug, bool):
            raise ConfigError(f"BigVisionRandAugment: contrast_bug must be true or false, got {contrast_bug!r}")
        for key, value in (("cutout_const", cutout_const), ("translate_const", translate_const)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"BigVisionRandAugment: {key} must be a number >= 0, got {value!r}")
        if not isinstance(fill, int) or isinstance(fill, bool) or not 0 <= fill <= 255:
            raise ConfigError(f"BigVisionRandAugment: fill must be one grey level, an integer 0-255, got {fill!r}")
        self.num_layers, self.magnitude, self.contrast_bug = num_layers, magnitude, contrast_bug
        self.cutout_const, self.translate_const, self.fill = cutout_const, translate_const, fill
        self.args = {n: level_to_arg(n, magnitude, cutout_const, translate_const) for n in OP_NAMES}

    def apply_op(self, image: Array, name: str) -> Array:
        """One operation at this transform's magnitude, with its random sign (uint8 HWC array)."""
        arg = self.args[name]
        if name in SIGNED_OPS:
            arg = _sign(arg)
        if name == "Contrast":
            return contrast(image, arg, bug=self.contrast_bug)
        if name in _FILLED:
            return OPS[name](image, arg, fill=self.fill)
        return OPS[name](image, arg)

    def augment_array(self, image: Array) -> Array:
        """RandAugment on a uint8 (H, W, 3) array."""
        for _ in range(self.num_layers):
            image = self.apply_op(image, OP_NAMES[random.randrange(len(OP_NAMES))])
        return image

    def __call__(self, img: Image.Image) -> Image.Image:
        grey = img.mode == "L"
        rgb = img.convert("RGB") if img.mode != "RGB" else img
        out = self.augment_array(np.asarray(rgb, dtype=np.uint8))
        return Image.fromarray(np.ascontiguousarray(out[..., 0]) if grey else out, "L" if grey else "RGB")

    def __repr__(self) -> str:
        return (
            f"BigVisionRandAugment(num_layers={self.num_layers}, magnitude={self.magnitude}, "
            f"contrast_bug={self.contrast_bug}, fill={self.fill})"
        )


__all__ = ["OPS", "OP_NAMES", "BigVisionRandAugment", "blend", "calibration_grid", "grayscale", "level_to_arg"]
