"""A TensorFlow implementation of big_vision's 16 RandAugment operations, for the parity tests only.

Written from the specification in the shared RECIPES.md section 4.7 (big_vision
``pp/archive/autoaugment.py``), with TensorFlow's own image ops where big_vision uses them
(``tf.image.rgb_to_grayscale``, ``tf.histogram_fixed_width``, ``tf.nn.depthwise_conv2d``) and
``tf.raw_ops.ImageProjectiveTransformV3`` (NEAREST, constant fill 128) for the geometric ones,
which is what ``tfa.image.transform`` runs; with nearest interpolation, big_vision's wrap /
unwrap alpha channel gives the same pixels as a constant fill.

Each op in ``OPS`` takes and returns a uint8 (H, W, 3) numpy array (running a ``tf.function`` of
the tensor op eagerly). ``make_distort(seed)`` is big_vision's ``distort_image_with_randaugment``
loop: each layer one graph (``tf.switch_case`` over the 16 ops, as big_vision's ``tf.cond``
chain), drawing the op, the sign and the Cutout centre from a seeded ``tf.random.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torchvision  # noqa: F401  (first: importing torchvision, i.e. triton, after TensorFlow segfaults)

# isort: split
import tensorflow as tf

try:  # one thread each: ~2x faster for these small graphs on a shared CPU
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:  # TensorFlow already initialised by the importer: keep its settings
    pass

OP_NAMES = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd",
)  # fmt: skip
_SIGNED = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def blend(image1: tf.Tensor, image2: tf.Tensor, factor: float) -> tf.Tensor:
    if factor == 0.0:
        return image1
    if factor == 1.0:
        return image2
    a, b = tf.cast(image1, tf.float32), tf.cast(image2, tf.float32)
    temp = a + factor * (b - a)
    if 0.0 < factor < 1.0:
        return tf.cast(temp, tf.uint8)
    return tf.cast(tf.clip_by_value(temp, 0.0, 255.0), tf.uint8)


def _per_channel(fn, image: tf.Tensor) -> tf.Tensor:
    return tf.stack([fn(image[:, :, c]) for c in range(3)], axis=2)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    def channel(ch):
        lo, hi = tf.cast(tf.reduce_min(ch), tf.float32), tf.cast(tf.reduce_max(ch), tf.float32)

        def scaled():
            scale = 255.0 / (hi - lo)
            return tf.cast(tf.clip_by_value(tf.cast(ch, tf.float32) * scale - lo * scale, 0.0, 255.0), tf.uint8)

        return tf.cond(hi > lo, scaled, lambda: ch)

    return _per_channel(channel, image)


def equalize(image: tf.Tensor) -> tf.Tensor:
    def channel(ch):
        ch = tf.cast(ch, tf.int32)
        hist = tf.histogram_fixed_width(ch, [0, 255], nbins=256)
        nonzero = tf.boolean_mask(hist, hist != 0)
        step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

        def mapped():
            lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
            lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
            return tf.gather(lut, ch)

        return tf.cast(tf.cond(step == 0, lambda: ch, mapped), tf.uint8)

    return _per_channel(channel, image)


def invert(image: tf.Tensor) -> tf.Tensor:
    return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
    shift = tf.constant(8 - int(bits), tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image: tf.Tensor, threshold: int) -> tf.Tensor:
    t = tf.cast(tf.constant(int(threshold), tf.int32), tf.uint8)  # 256 wraps to 0, as in big_vision
    return tf.where(image < t, image, 255 - image)


def solarize_add(image: tf.Tensor, addition: int, threshold: int = 128) -> tf.Tensor:
    added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int64) + int(addition), 0, 255), tf.uint8)
    return tf.where(image < threshold, added, image)


def color(image: tf.Tensor, factor: float) -> tf.Tensor:
    return blend(tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image)), image, factor)


def contrast(image: tf.Tensor, factor: float, bug: bool = True) -> tf.Tensor:
    grey = tf.cast(tf.image.rgb_to_grayscale(image), tf.int32)
    hist = tf.histogram_fixed_width(grey, [0, 255], nbins=256)
    if bug:
        mean = tf.reduce_sum(tf.cast(hist, tf.float32)) / 256.0
    else:
        total = tf.reduce_sum(tf.cast(hist, tf.float64) * tf.range(256, dtype=tf.float64))
        mean = tf.cast(total / tf.cast(tf.size(grey), tf.float64), tf.float32)
    flat = tf.clip_by_value(tf.ones_like(grey, tf.float32) * mean, 0.0, 255.0)
    return blend(tf.image.grayscale_to_rgb(tf.cast(flat, tf.uint8)), image, factor)


def brightness(image: tf.Tensor, factor: float) -> tf.Tensor:
    return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: float) -> tf.Tensor:
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32, shape=[3, 3, 1, 1]) / 13.0
    kernel = tf.tile(kernel, [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], padding="VALID")
    smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)[0]
    mask = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(mask == 1, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
    return blend(degenerate, image, factor)


def _transform(image: tf.Tensor, transform, fill: int) -> tf.Tensor:
    """tfa.image.transform's kernel: NEAREST, constant fill."""
    transform = tf.concat([tf.cast(tf.reshape(transform, [6]), tf.float32), tf.zeros([2], tf.float32)], 0)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=tf.shape(image)[:2],
        fill_value=tf.constant(float(fill), tf.float32),
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )
    return out[0]


def rotate(image: tf.Tensor, degrees, fill: int = 128) -> tf.Tensor:
    """tfa.image.rotate's transform: counter-clockwise about the centre, in float32."""
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    rad = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.math.cos(rad), tf.math.sin(rad)
    x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    return _transform(image, tf.stack([cos, -sin, x_off, sin, cos, y_off]), fill)


def shear_x(image: tf.Tensor, level, fill: int = 128) -> tf.Tensor:
    return _transform(image, tf.stack([1.0, level, 0.0, 0.0, 1.0, 0.0]), fill)


def shear_y(image: tf.Tensor, level, fill: int = 128) -> tf.Tensor:
    return _transform(image, tf.stack([1.0, 0.0, 0.0, level, 1.0, 0.0]), fill)


def translate_x(image: tf.Tensor, pixels, fill: int = 128) -> tf.Tensor:
    return _transform(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]), fill)


def translate_y(image: tf.Tensor, pixels, fill: int = 128) -> tf.Tensor:
    return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]), fill)


def cutout(image: tf.Tensor, pad_size: int, fill: int = 128, center=(0, 0)) -> tf.Tensor:
    """Rows [cy - pad, cy + pad) x columns [cx - pad, cx + pad), clipped, set to fill (a zero
    mask padded with ones, as big_vision builds it)."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    cy, cx = center
    lower, upper = tf.maximum(0, cy - pad_size), tf.maximum(0, h - cy - pad_size)
    left, right = tf.maximum(0, cx - pad_size), tf.maximum(0, w - cx - pad_size)
    zeros = tf.zeros([h - lower - upper, w - left - right], tf.uint8)
    mask = tf.pad(zeros, [[lower, upper], [left, right]], constant_values=1)
    mask = tf.tile(mask[:, :, None], [1, 1, 3])
    return tf.where(mask == 0, tf.ones_like(image) * fill, image)


_TENSOR_OPS = {
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


def _numpy_op(fn):
    """The op run eagerly (one-off calls: no tracing), on and to numpy."""

    def op(image: np.ndarray, *args, **kwargs) -> np.ndarray:
        if "center" in kwargs:
            kwargs["center"] = tuple(tf.constant(c, tf.int32) for c in kwargs["center"])
        return fn(tf.convert_to_tensor(image, tf.uint8), *args, **kwargs).numpy()

    return op


OPS = {name: _numpy_op(fn) for name, fn in _TENSOR_OPS.items()}


def level_to_arg(name: str, magnitude: float) -> float | None:
    m = magnitude / 10.0
    return {
        "AutoContrast": None, "Equalize": None, "Invert": None,
        "Rotate": m * 30.0, "Posterize": int(m * 4), "Solarize": int(m * 256), "SolarizeAdd": int(m * 110),
        "Color": m * 1.8 + 0.1, "Contrast": m * 1.8 + 0.1, "Brightness": m * 1.8 + 0.1, "Sharpness": m * 1.8 + 0.1,
        "ShearX": m * 0.3, "ShearY": m * 0.3, "TranslateX": m * 100.0, "TranslateY": m * 100.0, "Cutout": int(m * 40),
    }[name]  # fmt: skip


def make_distort(seed: int, num_layers: int = 2, magnitude: float = 10.0, fill: int = 128, contrast_bug: bool = True):
    """big_vision's RandAugment loop as one graph: numpy uint8 (H, W, 3) in, numpy out. Per layer
    an op index uniform in [0, 16), always applied; a signed op's sign is floor(U + 0.5); the
    Cutout centre is uniform over the pixels."""
    rng = tf.random.Generator.from_seed(seed)

    def branch(name: str, image: tf.Tensor, negate: tf.Tensor, center) -> Callable[[], tf.Tensor]:
        arg = level_to_arg(name, magnitude)
        fn = _TENSOR_OPS[name]
        if name in _SIGNED:
            return lambda: fn(image, tf.where(negate, -arg, arg), fill=fill)
        if name == "Cutout":
            return lambda: fn(image, arg, fill=fill, center=center)
        if name == "Contrast":
            return lambda: fn(image, arg, bug=contrast_bug)
        return (lambda: fn(image)) if arg is None else (lambda: fn(image, arg))

    @tf.function
    def layer(image: tf.Tensor) -> tf.Tensor:
        index = rng.uniform([], maxval=len(OP_NAMES), dtype=tf.int32)
        negate = tf.logical_not(tf.cast(tf.floor(rng.uniform([]) + 0.5), tf.bool))
        center = (rng.uniform([], maxval=tf.shape(image)[0], dtype=tf.int32),
                  rng.uniform([], maxval=tf.shape(image)[1], dtype=tf.int32))  # fmt: skip
        return tf.switch_case(index, [branch(n, image, negate, center) for n in OP_NAMES])

    def run(image: np.ndarray) -> np.ndarray:
        out = tf.convert_to_tensor(image, tf.uint8)
        for _ in range(num_layers):
            out = layer(out)
        return out.numpy()

    return run
