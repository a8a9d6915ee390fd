"""The grey-level spectrum of RandAugment(2, 10) on mup-vit's calibration grid, as PNG strips.

mup-vit's picture (EIFY/mup-vit README; issue 15): a 224 x 224 black-and-white checkerboard of
56 x 56 squares is augmented N times; all N x 224 x 224 output grey levels are sorted black to
white and laid out as a 2000 x 200 strip (the level at evenly spaced ranks, filled column by
column, so that black is on the left). Two implementations with the same spectrum produce the
same distribution of grey levels; fill 0, interpolation, a missing op or another magnitude map
show as a shifted step.

Writes into --out (default ./runs/randaug_spectrum):
  ours.png          vissl_vit's BigVisionRandAugment(2, 10)
  torchvision.png   torchvision.transforms.RandAugment(num_ops=2, magnitude=10)
  tensorflow.png    the TensorFlow reference of tests/data/tf_randaug_reference.py (when
                    TensorFlow imports; pip install tensorflow-cpu)
  spectra.png       the strips stacked and labelled, and spectra.txt with the fraction of
                    pixels at 0, 128, 255 and elsewhere for each.

Usage: python tools/randaug_spectrum.py [--n 2000] [--out DIR] [--width 2000 --height 200]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vissl_vit.data.transforms.big_vision_randaug import BigVisionRandAugment, calibration_grid  # noqa: E402

Augment = Callable[[np.ndarray], np.ndarray]


def spectrum(augment: Augment, grid: np.ndarray, n: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(strip uint8 (height, width), per-level pixel counts (256,)) of n augmentations of grid."""
    counts = np.zeros(256, np.int64)
    for _ in range(n):
        counts += np.bincount(np.asarray(augment(grid))[..., 0].ravel(), minlength=256)
    # the sorted levels at width x height evenly spaced ranks: the level whose cumulative count
    # first passes each rank
    ranks = (np.arange(width * height) + 0.5) * (counts.sum() / (width * height))
    levels = np.searchsorted(np.cumsum(counts), ranks, side="right").clip(0, 255).astype(np.uint8)
    return levels.reshape(width, height).T.copy(), counts  # column-major: black on the left


def _augmenters(grid: np.ndarray) -> dict[str, Augment]:
    ours = BigVisionRandAugment(num_layers=2, magnitude=10)
    tv = T.RandAugment(num_ops=2, magnitude=10)
    out: dict[str, Augment] = {
        "ours": ours.augment_array,
        "torchvision": lambda img: np.asarray(tv(Image.fromarray(img))),
    }
    try:
        from tests.data import tf_randaug_reference  # imports TensorFlow (after torchvision: see there)

        out["tensorflow"] = tf_randaug_reference.make_distort(seed=0)
    except ImportError as e:
        print(f"TensorFlow reference skipped ({e}); pip install tensorflow-cpu to add it")
    return out


def _summary(counts: np.ndarray) -> str:
    f = counts / counts.sum()
    return f"0: {f[0]:.4f}  128: {f[128]:.4f}  255: {f[255]:.4f}  other: {1 - f[0] - f[128] - f[255]:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="augmentations per implementation (mup-vit: 100000)")
    parser.add_argument("--out", default="runs/randaug_spectrum", help="output folder")
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--height", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n < 1 or args.width < 1 or args.height < 1:
        parser.error(f"--n, --width and --height must be >= 1, got {args.n}, {args.width}, {args.height}")
    os.makedirs(args.out, exist_ok=True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    grid = calibration_grid()
    strips, lines = {}, []
    for name, augment in _augmenters(grid).items():
        start = time.perf_counter()
        strip, counts = spectrum(augment, grid, args.n, args.width, args.height)
        seconds = time.perf_counter() - start
        path = os.path.join(args.out, f"{name}.png")
        Image.fromarray(strip, "L").save(path)
        strips[name] = strip
        lines.append(f"{name:12s} n={args.n}  {seconds:6.1f} s  {_summary(counts)}")
        print(f"{path}  ({lines[-1]})")
    label_w, gap = 110, 10
    sheet = Image.new("L", (label_w + args.width, len(strips) * (args.height + gap)), 255)
    draw = ImageDraw.Draw(sheet)
    for i, (name, strip) in enumerate(strips.items()):
        top = i * (args.height + gap)
        sheet.paste(Image.fromarray(strip, "L"), (label_w, top))
        draw.text((5, top + args.height // 2), name, fill=0)
    sheet.save(os.path.join(args.out, "spectra.png"))
    with open(os.path.join(args.out, "spectra.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(os.path.join(args.out, "spectra.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
