"""big_vision's image preprocessing ops, reproduced in numpy: the inception crop, resize_small,
central_crop and value_range of "Better plain ViT baselines for ImageNet-1k" (Beyer et al., 2022,
arXiv:2205.01580; ``big_vision/pp/ops_image.py`` and ``ops_general.py``).

Train: ``InceptionCrop(224) | RandomHorizontalFlip | <big_vision randaug> | ToTensor | ValueRange``;
eval: ``ResizeSmall(256) | CentralCrop(224) | ToTensor | ValueRange`` (``../shared/RECIPES.md`` 4.1, 4.5).

Why our own code and not torchvision's:

- ``InceptionCrop`` draws its box as ``tf.image.sample_distorted_bounding_box`` does (TF's
  ``GenerateRandomCrop`` kernel, in float32): the aspect ratio uniform in linear space, the height
  uniform given the ratio (so small crops are more frequent than under a uniform area), 100 attempts,
  the whole image when all fail, and the top/left offsets in [0, H - h) (TF's ``Uniform(n)`` is
  exclusive, so the last offset is never drawn unless h = H). torchvision's ``RandomResizedCrop``
  draws the area uniformly and the ratio log-uniformly, tries 10 times and falls back to a clamped
  centre crop: a different distribution of boxes (tests/data/test_inception_crop.py measures it).
- The resizes follow TF's kernels operation by operation in float32 (``ResizeBilinear`` with
  half-pixel centres, ``ResizeArea``) and end with big_vision's ``cast(clip(x, 0, 255), uint8)``,
  which truncates: 254.99998 becomes 254, so the last bit of float32 rounding shows (TF's own area
  resize turns a flat white image into 254). Measured against TF 2.20: bit-exact for ``area`` and
  plain ``bilinear`` (tests/data/test_inception_crop.py). torch's ``area`` mode is an adaptive
  average pool (whole pixels), not TF's fractional box filter.
- ``CentralCrop`` puts the box at ``(H - h) // 2``; torchvision's ``CenterCrop`` rounds
  ``(H - h) / 2`` half-to-even, one pixel further for an odd difference of 35, 39, ...

Each op takes and returns a PIL image (uint8, L or RGB) except ``ValueRange``, which returns a
float tensor. Random draws use numpy's global generator, which the dataset seeds per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vissl_vit.errors import ConfigError
from vissl_vit.registry import TRANSFORMS

_F32 = np.float32
_TF_EPS = _F32(1e-7)  # kEps of TF's GenerateRandomCrop


def _pair(size: int | Sequence[int], where: str) -> tuple[int, int]:
    """(height, width) from an int or a [height, width] list of positive ints."""
    pair = [size, size] if isinstance(size, int) and not isinstance(size, bool) else size
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in pair)
    ):
        raise ConfigError(f"{where}: size is a positive int or a [height, width] pair of them, got {size!r}")
    return int(pair[0]), int(pair[1])


def _to_array(img: Image.Image) -> tuple[np.ndarray, bool]:
    """A PIL image as an [H, W, C] uint8 array, and whether it had no channel axis (mode L)."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise TypeError(f"big_vision ops take 8-bit images (PIL mode L or RGB), got mode {img.mode}")
    return (arr[..., None], True) if arr.ndim == 2 else (arr, False)


def _to_image(arr: np.ndarray, squeeze: bool) -> Image.Image:
    return Image.fromarray(arr[..., 0] if squeeze else arr)


def tf_uint8(x: np.ndarray) -> np.ndarray:
    """big_vision's ``tf.cast(tf.clip_by_value(x, 0, 255), tf.uint8)``: clip, then truncate toward 0."""
    return np.clip(x, 0, 255).astype(np.uint8)


# ---- tf.image.sample_distorted_bounding_box ---------------------------------------------------


def sample_boxes(
    height: int,
    width: int,
    n: int,
    area_range: tuple[float, float] = (0.05, 1.0),
    ratio_range: tuple[float, float] = (0.75, 1.33),
    max_attempts: int = 100,
    rng: Any = None,
) -> dict[str, np.ndarray]:
    """``n`` boxes of a ``height x width`` image drawn as ``tf.image.sample_distorted_bounding_box``
    draws them (no bounding boxes, ``min_object_covered=0``, ``use_image_if_no_bounding_boxes``).

    TF's kernel (``sample_distorted_bounding_box_op.cc``, ``GenerateRandomCrop``), with its float32
    arithmetic and ``lrintf`` (round half to even); vectorised over the ``n`` draws, each of which
    retries until it succeeds or has used ``max_attempts``::

        r = U(ratio_min, ratio_max)                        # linear, not log-uniform
        h_min = rint(sqrt(min_area / r)), h_max = rint(sqrt(max_area / r))
        h_max: the largest with rint(h_max * r) <= W, at most H; h_min = min(h_min, h_max)
        h = U{h_min .. h_max}, w = rint(h * r)             # height uniform, not area
        area < min_area: h += 1; area > max_area: h -= 1 (w recomputed)
        accept if min_area <= w * h <= max_area, 0 < w <= W, 0 < h <= H
        top = U{0 .. H - h - 1} (0 if h = H), left likewise
    and the whole image when no attempt succeeds.

    Args:
        height, width: the image's size.
        n: number of boxes.
        area_range: fraction of the image area (TF's ``area_range``; big_vision: 0.05, 1.0).
        ratio_range: width / height (TF's ``aspect_ratio_range``; big_vision: 0.75, 1.33).
        max_attempts: tries per box before the whole image (TF's default 100).
        rng: a numpy Generator or RandomState; None uses numpy's global generator.

    Returns:
        int64 arrays ``top``, ``left``, ``height``, ``width``, ``attempts`` (tries used; 0 for a
        box that fell back to the whole image) and the float32 ``ratio`` of the accepted try.
    """
    rng = np.random if rng is None else rng
    H, W = int(height), int(width)
    min_area = _F32(area_range[0]) * _F32(W) * _F32(H)  # float * int * int, in float32 as in TF
    max_area = _F32(area_range[1]) * _F32(W) * _F32(H)
    r_lo, r_hi = _F32(ratio_range[0]), _F32(ratio_range[1])
    out = {k: np.zeros(n, np.int64) for k in ("top", "left", "height", "width", "attempts")}
    out["ratio"] = np.zeros(n, _F32)
    todo = np.arange(n)
    for attempt in range(1, max_attempts + 1):
        if not len(todo):
            break
        m = len(todo)
        r = rng.random(m).astype(_F32) * (r_hi - r_lo) + r_lo
        h = np.rint(np.sqrt(min_area / r)).astype(np.int64)
        h_max = np.rint(np.sqrt(max_area / r)).astype(np.int64)
        too_wide = np.rint(h_max.astype(_F32) * r) > W
        # the largest h_max with rint(h_max * r) <= W, computed in double as TF does
        narrowed = ((W + 0.5 - float(_TF_EPS)) / r.astype(np.float64)).astype(np.int64)
        narrowed -= np.rint(narrowed.astype(_F32) * r) > W
        h_max = np.minimum(np.where(too_wide, narrowed, h_max), H)
        h = np.minimum(h, h_max)
        h = h + np.floor(rng.random(m) * (h_max - h + 1)).astype(np.int64)  # U{h .. h_max}
        w = np.rint(h.astype(_F32) * r).astype(np.int64)
        small = (w * h).astype(_F32) < min_area
        h = np.where(small, h + 1, h)
        w = np.where(small, np.rint(h.astype(_F32) * r).astype(np.int64), w)
        large = (w * h).astype(_F32) > max_area
        h = np.where(large, h - 1, h)
        w = np.where(large, np.rint(h.astype(_F32) * r).astype(np.int64), w)
        area = (w * h).astype(_F32)
        ok = (area >= min_area) & (area <= max_area) & (w > 0) & (w <= W) & (h > 0) & (h <= H)
        # TF's Uniform(n) is in [0, n): the offset H - h is never drawn
        top = np.where(h < H, np.floor(rng.random(m) * (H - h)), 0).astype(np.int64)
        left = np.where(w < W, np.floor(rng.random(m) * (W - w)), 0).astype(np.int64)
        done = todo[ok]
        for key, value in (("top", top), ("left", left), ("height", h), ("width", w), ("ratio", r)):
            out[key][done] = value[ok]
        out["attempts"][done] = attempt
        todo = todo[~ok]
    out["height"][todo], out["width"][todo] = H, W  # fallback: the whole image, top = left = 0
    return out


# ---- TF's resize kernels, in float32 ----------------------------------------------------------


def _bilinear_axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF's ``compute_interpolation_weights`` with half-pixel centres: lower, upper, lerp."""
    scale = _F32(in_size) / _F32(out_size)
    x = (np.arange(out_size, dtype=_F32) + _F32(0.5)) * scale - _F32(0.5)
    floor = np.floor(x)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(x).astype(np.int64), in_size - 1)
    return lower, upper, x - floor


def tf_resize_bilinear(arr: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``tf.image.resize(arr, (out_h, out_w), 'bilinear', antialias=False)`` of an [H, W, C] array:
    TF's ``ResizeBilinear`` (half-pixel centres) and its lerp order, in float32."""
    y0, y1, ly = _bilinear_axis(arr.shape[0], out_h)
    x0, x1, lx = _bilinear_axis(arr.shape[1], out_w)
    v = arr.astype(_F32)
    top_rows, bottom_rows = v[y0], v[y1]  # [out_h, W, C]
    lx, ly = lx[None, :, None], ly[:, None, None]
    top = top_rows[:, x0] + (top_rows[:, x1] - top_rows[:, x0]) * lx
    bottom = bottom_rows[:, x0] + (bottom_rows[:, x1] - bottom_rows[:, x0]) * lx
    return top + (bottom - top) * ly


def _area_axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """TF's ``ResizeArea`` along one axis: for output k and patch slot j, the input index and weight
    (0 past the patch end). The weight is the overlap of input cell i with [k s, (k + 1) s)."""
    s = _F32(in_size) / _F32(out_size)
    k = np.arange(out_size)
    lo = k.astype(_F32) * s
    hi = (k + 1).astype(_F32) * s
    start = np.floor(lo).astype(np.int64)
    end = np.ceil(hi).astype(np.int64)
    slots = int((end - start).max())
    i = start[:, None] + np.arange(slots)[None, :]  # [out, slots]
    i_f = i.astype(_F32)
    lo, hi = lo[:, None], hi[:, None]
    weight = np.where(
        i_f < lo,
        np.where(i_f + 1 > hi, s, i_f + 1 - lo),
        np.where(i_f + 1 > hi, hi - i_f, _F32(1.0)),
    ).astype(_F32)
    weight = np.where(i < end[:, None], weight, _F32(0.0))
    return np.clip(i, 0, in_size - 1), weight


def tf_resize_area(arr: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``tf.image.resize(arr, (out_h, out_w), 'area')`` of an [H, W, C] array: TF's ``ResizeArea``
    box filter (each output pixel the area-weighted mean of the input cells it covers, fractional
    cells included), summed in TF's order in float32: along x within each row, then the rows,
    then times ``1 / (sy * sx)``. Anti-aliased by construction (TF ignores ``antialias`` here)."""
    yi, yw = _area_axis(arr.shape[0], out_h)
    xi, xw = _area_axis(arr.shape[1], out_w)
    v = arr.astype(_F32)
    rows = np.zeros((v.shape[0], out_w, v.shape[2]), _F32)  # per input row: sum over the x patch
    for j in range(xi.shape[1]):
        rows += v[:, xi[:, j]] * xw[None, :, j, None]
    out = np.zeros((out_h, out_w, v.shape[2]), _F32)
    for j in range(yi.shape[1]):
        out += rows[yi[:, j]] * yw[:, j, None, None]
    scale = _F32(1.0 / float(_F32(arr.shape[0]) / _F32(out_h) * (_F32(arr.shape[1]) / _F32(out_w))))
    return out * scale


def resize(arr: np.ndarray, out_h: int, out_w: int, method: str, antialias: bool) -> np.ndarray:
    """``tf.image.resize`` then big_vision's uint8 cast, of an [H, W, C] uint8 array.

    ``bilinear`` without antialias and ``area`` follow TF's kernels (see above). ``bilinear`` with
    antialias (mup-vit's choice, which runs in PyTorch) is torch's antialiased bilinear, a triangle
    filter widened by the scale as TF's ``scale_and_translate``: within one grey level of TF's,
    differing in under 1% of the pixels of a random image but in a third of a flat white one
    (torch's weighted sum lands just below 255 and the cast truncates it).
    """
    if method == "area":
        return tf_uint8(tf_resize_area(arr, out_h, out_w))
    if not antialias:
        return tf_uint8(tf_resize_bilinear(arr, out_h, out_w))
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
    return tf_uint8(y[0].permute(1, 2, 0).numpy())


_METHODS = ("bilinear", "area")


def _check_method(method: str, where: str) -> str:
    if method not in _METHODS:
        raise ConfigError(f"{where}: method is one of {', '.join(_METHODS)} (TF's resize methods), got {method!r}")
    return method


# ---- the registered transforms ----------------------------------------------------------------


@TRANSFORMS.register("InceptionCrop")
class InceptionCrop:
    """big_vision's ``inception_crop`` / ``decode_jpeg_and_inception_crop``: a random box drawn as
    ``tf.image.sample_distorted_bounding_box`` draws it (:func:`sample_boxes`), resized to ``size``.

    Not torchvision's ``RandomResizedCrop``, which draws the area uniformly and the aspect
    log-uniformly with 10 attempts and a clamped centre-crop fallback: here the aspect ratio is
    uniform, the height uniform given it, 100 attempts, and the whole image on failure.

    Args:
        size: output side (or [height, width]) after the resize (big_vision: 224).
        area_min, area_max: the box's area in percent of the image's (big_vision: 5, 100).
        ratio_min, ratio_max: its width / height (big_vision: 0.75, 1.33; 1.33, not 4/3).
        method: ``bilinear`` (big_vision) or ``area``.
        antialias: False as big_vision (TF's plain bilinear, reproduced exactly); True as mup-vit
            (torch's antialiased bilinear, within one grey level of TF's).
        max_attempts: tries before the whole image (TF's 100).
    """

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        area_min: float = 5,
        area_max: float = 100,
        ratio_min: float = 0.75,
        ratio_max: float = 1.33,
        method: str = "bilinear",
        antialias: bool = False,
        max_attempts: int = 100,
    ) -> None:
        self.size = _pair(size, "InceptionCrop")
        if not 0 < area_min <= area_max <= 100:
            raise ConfigError(
                f"InceptionCrop: need 0 < area_min <= area_max <= 100 (percent), got {area_min}, {area_max}"
            )
        if not 0 < ratio_min <= ratio_max:
            raise ConfigError(f"InceptionCrop: need 0 < ratio_min <= ratio_max, got {ratio_min}, {ratio_max}")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigError(f"InceptionCrop: max_attempts is an int >= 1, got {max_attempts!r}")
        self.area = (area_min / 100, area_max / 100)
        self.ratio = (ratio_min, ratio_max)
        self.method = _check_method(method, "InceptionCrop")
        self.antialias, self.max_attempts = bool(antialias), max_attempts

    def get_params(self, height: int, width: int, rng: Any = None) -> tuple[int, int, int, int]:
        """(top, left, height, width) of one box of a ``height x width`` image."""
        b = sample_boxes(height, width, 1, self.area, self.ratio, self.max_attempts, rng)
        return int(b["top"][0]), int(b["left"][0]), int(b["height"][0]), int(b["width"][0])

    def __call__(self, img: Image.Image) -> Image.Image:
        arr, squeeze = _to_array(img)
        top, left, h, w = self.get_params(arr.shape[0], arr.shape[1])
        crop = arr[top : top + h, left : left + w]
        return _to_image(resize(crop, *self.size, self.method, self.antialias), squeeze)

    def __repr__(self) -> str:
        return (
            f"InceptionCrop(size={self.size}, area={self.area}, ratio={self.ratio}, method={self.method}, "
            f"antialias={self.antialias}, max_attempts={self.max_attempts})"
        )


@TRANSFORMS.register("ResizeSmall")
class ResizeSmall:
    """big_vision's ``resize_small``: the shorter side to ``size``, the aspect ratio kept.

    The new sides are ``round(side * size / min(H, W))`` in float32, half to even (``tf.round``);
    then ``tf.image.resize`` with ``method`` and the truncating uint8 cast. ``area`` (big_vision's
    default) is TF's ``ResizeArea`` box filter re-done in float32 in TF's summation order
    (:func:`tf_resize_area`): bit-exact against TF 2.20 on the test's images. torchvision's
    ``Resize`` has no such filter: its ``antialias`` bilinear or bicubic weights neighbours by
    distance, not by covered area.

    Args:
        size: the shorter side after the resize (big_vision: 256).
        method: ``area`` (big_vision) or ``bilinear``.
        antialias: for ``bilinear`` only: True as mup-vit's eval.
    """

    def __init__(self, size: int = 256, method: str = "area", antialias: bool = False) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"ResizeSmall: size is a positive int (the shorter side), got {size!r}")
        self.size, self.method, self.antialias = size, _check_method(method, "ResizeSmall"), bool(antialias)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, as big_vision's ``_resize_factor`` computes it."""
        factor = _F32(self.size) / _F32(min(height, width))
        return int(np.rint(_F32(height) * factor)), int(np.rint(_F32(width) * factor))

    def __call__(self, img: Image.Image) -> Image.Image:
        arr, squeeze = _to_array(img)
        return _to_image(resize(arr, *self.output_size(*arr.shape[:2]), self.method, self.antialias), squeeze)

    def __repr__(self) -> str:
        return f"ResizeSmall(size={self.size}, method={self.method}, antialias={self.antialias})"


@TRANSFORMS.register("CentralCrop")
class CentralCrop:
    """big_vision's ``central_crop``: the ``size`` box at offsets ``((H - h) // 2, (W - w) // 2)``.

    torchvision's ``CenterCrop`` uses ``round((H - h) / 2)``, half to even: for an odd difference
    whose half rounds up (35 -> 18, not 17) its box is one pixel lower (or to the right); it also
    pads a small image, where big_vision (``tf.image.crop_to_bounding_box``) fails, as here.

    Args:
        size: the crop's side, or [height, width] (big_vision: 224).
    """

    def __init__(self, size: int | Sequence[int] = 224) -> None:
        self.size = _pair(size, "CentralCrop")

    def offsets(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the crop in a ``height x width`` image."""
        h, w = self.size
        if h > height or w > width:
            raise ValueError(f"CentralCrop: a {h}x{w} crop does not fit in a {height}x{width} image")
        return (height - h) // 2, (width - w) // 2

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left = self.offsets(img.height, img.width)
        return img.crop((left, top, left + self.size[1], top + self.size[0]))

    def __repr__(self) -> str:
        return f"CentralCrop(size={self.size})"


@TRANSFORMS.register("ValueRange")
class ValueRange:
    """big_vision's ``value_range(vmin, vmax)``: [0, 255] pixels to [vmin, vmax], no mean / std.

    big_vision computes, in float32, ``t = (x - 0) / (255 - 0)`` then ``vmin + t * (vmax - vmin)``.
    Placed after ``ToTensor`` (whose output is already ``t = x / 255`` in float32, correctly
    rounded as TF's division) it computes ``t * (vmax - vmin) + vmin``: bit for bit big_vision's
    (for (-1, 1): ``2t - 1``, equal to ``x / 127.5 - 1`` up to float rounding). Given a PIL image or
    a uint8 tensor it divides by 255 itself first (and returns a [C, H, W] tensor as ToTensor).

    Args:
        vmin, vmax: the output range (big_vision: -1, 1).
    """

    def __init__(self, vmin: float = -1.0, vmax: float = 1.0) -> None:
        if not vmin < vmax:
            raise ConfigError(f"ValueRange: need vmin < vmax, got {vmin}, {vmax}")
        self.vmin, self.vmax = float(vmin), float(vmax)

    def __call__(self, x: Any) -> torch.Tensor:
        if isinstance(x, Image.Image):
            arr, _ = _to_array(x)
            x = torch.from_numpy(np.array(arr)).permute(2, 0, 1)  # a writable copy: PIL's buffer is read-only
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ValueRange takes a PIL image or a tensor, got {type(x).__name__}")
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div(255)
        elif not x.is_floating_point():
            raise TypeError(f"ValueRange takes a uint8 or a float tensor in [0, 1] (after ToTensor), got {x.dtype}")
        return x * (self.vmax - self.vmin) + self.vmin

    def __repr__(self) -> str:
        return f"ValueRange({self.vmin:g}, {self.vmax:g})"
