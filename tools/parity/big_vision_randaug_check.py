"""Our BigVisionRandAugment against big_vision's own ``pp/archive/autoaugment.py`` (issue 15).

tests/data/test_big_vision_randaug.py checks ours against a TensorFlow transcription written from
RECIPES.md 4.7; this tool runs big_vision's real file instead. It is not vendored: point
--big-vision-dir at a folder holding big_vision's ``autoaugment.py`` (the same file is
``big_vision/pp/archive/autoaugment.py`` and ``big_vision/pp/autoaugment.py``) and, on a
TensorFlow without tensorflow_addons (2.16+), a ``tensorflow_addons/image.py`` shim giving
``transform`` / ``rotate`` / ``translate`` on ``tf.raw_ops.ImageProjectiveTransformV3`` with
tfa 0.23's defaults (nearest, constant fill 0; big_vision's wrap / unwrap turns the 0 alpha
into its grey 128).

Three checks, printed as a table:

1. each of the 16 ops at magnitudes 10 and 3 (both signs of the signed ones; Cutout at fixed
   centres), on mup-vit's 224 x 224 grid of 56-px squares and a colour gradient: big_vision's
   op function called with the arguments its ``_parse_policy_info`` builds (``level_to_arg``
   with HParams(cutout_const=40, translate_const=100), replace [128, 128, 128]) against ours
   at the same magnitude: the largest |difference| and the number of differing values;
2. ``distort_image_with_randaugment(grid, 2, 10)`` run eagerly N times under
   ``tf.random.set_seed(seed)``, every ``tf.random_uniform`` it draws recorded, and ours'
   ``augment_array`` replayed with the same draws (op, sign, Cutout centre): images equal;
3. the grey-level spectrum z (the statistic of tests/data/test_big_vision_randaug.py) of N
   ``distort_image_with_randaugment(grid, 2, 10)`` images drawn as big_vision's input pipeline
   draws them (a tf.data map, TF's own RNG) against 3 N of ours with its own seeded RNG; beside
   it the z of check 2's eager images, ours against ours (the null) and fill 0 (must fail).

Each op of check 1 runs both eagerly and inside a tf.data map (big_vision's setting); the table
shows the larger difference.

Usage: python tools/parity/big_vision_randaug_check.py --big-vision-dir /tmp/bv_src [--n 300]
       [--seed 0] [--json FILE]
Exit status 0 when every op and replayed image is equal and the spectrum z < 5, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np
import torchvision  # noqa: F401  (first: importing torchvision, i.e. triton, after TensorFlow segfaults)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from vissl_vit.data.transforms import big_vision_randaug as bv  # noqa: E402

Z_BOUND = 5.0  # the bound of tests/data/test_big_vision_randaug.py
CUTOUT_CENTRES = ((30, 200), (112, 5), (0, 0), (223, 223), (100, 120))  # (row, column)


def gradient() -> np.ndarray:
    """The colour gradient of tests/data/test_big_vision_randaug.py: red along x, green along y,
    blue the complement of their mean, uint8 (224, 224, 3)."""
    y, x = np.mgrid[:224, :224].astype(np.float64)
    r, g = np.round(255 * x / 223), np.round(255 * y / 223)
    return np.stack([r, g, np.round(255 - (r + g) / 2)], axis=2).astype(np.uint8)


def spectrum_z(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |difference of the mean per-image grey-level CDFs| / its pooled standard error,
    over the 256 levels, of two (N, 256) sets of per-image histograms (the test file's
    statistic, written again here so that this tool does not import the tests)."""
    a, b = np.cumsum(a, axis=1), np.cumsum(b, axis=1)
    diff = np.abs(a.mean(0) - b.mean(0))
    se = np.concatenate([a, b]).std(0, ddof=1) * np.sqrt(1 / len(a) + 1 / len(b))
    return float(np.where(se > 0, diff / np.where(se > 0, se, 1.0), 0.0).max())


def histograms(images: Iterable[np.ndarray]) -> np.ndarray:
    """(N, 256) grey-level fractions of channel 0 (the grid stays grey through every op)."""
    return np.stack([np.bincount(im[..., 0].ravel(), minlength=256) / im[..., 0].size for im in images])


class _TF1Proxy:
    """big_vision's module-level ``tf`` (tensorflow.compat.v1) with ``random_uniform`` replaced by
    ``hook``; every other name is the real one."""

    def __init__(self, tf1, hook: Callable) -> None:
        self._tf1, self.random_uniform = tf1, hook

    def __getattr__(self, name: str):
        return getattr(self._tf1, name)


def load_big_vision(folder: str):
    """(tensorflow, big_vision's autoaugment module) with ``folder`` first on sys.path."""
    import tensorflow as tf  # after torchvision, see the import above

    sys.path.insert(0, os.path.abspath(folder))
    import autoaugment  # big_vision's file (and its tensorflow_addons, real or shim)

    return tf, autoaugment


def op_table(tf, aa) -> list[dict]:
    """Check 1: one row per (op, magnitude, sign or Cutout centre, image)."""
    tf1 = aa.tf
    hparams = aa.HParams(cutout_const=40, translate_const=100)
    images = {"grid": bv.calibration_grid(), "gradient": gradient()}
    rows = []
    for m in (10, 3):
        ours_ra = bv.BigVisionRandAugment(num_layers=1, magnitude=m)
        for name in bv.OP_NAMES:
            variants: list[tuple[str, dict]] = [("", {})]
            if name in bv.SIGNED_OPS:
                variants = [("+", {"flip": True}), ("-", {"flip": False})]
            if name == "Cutout":
                variants = [(f"c={c}", {"centre": c}) for c in CUTOUT_CENTRES]
            for label, v in variants:
                queue: list = []

                def hook(shape=None, minval=0, maxval=None, dtype=None, seed=None, name=None, _q=queue):
                    return tf.constant(_q.pop(0), dtype=dtype or tf.float32)

                # _randomly_negate_tensor keeps the sign when floor(u + 0.5) is 1: u = 0.75 keeps it
                if "flip" in v:
                    queue.append(0.75 if v["flip"] else 0.25)
                aa.tf = _TF1Proxy(tf1, hook)
                try:
                    func, _, args = aa._parse_policy_info(name, 0.5, float(m), [128] * 3, hparams)
                    arg_theirs = float(np.asarray(args[0])) if args else None
                    for image_name, image in images.items():
                        if "centre" in v:
                            queue[:] = list(v["centre"])
                        theirs = np.asarray(func(tf.constant(image), *args))
                        if "centre" in v:
                            queue[:] = list(v["centre"])
                        # and as big_vision runs it: in a tf.data map (a traced graph)
                        ds = tf.data.Dataset.from_tensors(image).map(lambda x, f=func, a=args: f(x, *a))
                        theirs_graph = next(iter(ds)).numpy()
                        ours = _ours_op(ours_ra, name, image, v)
                        diff = np.maximum(
                            np.abs(theirs.astype(np.int16) - ours.astype(np.int16)),
                            np.abs(theirs_graph.astype(np.int16) - ours.astype(np.int16)),
                        )
                        rows.append(
                            {
                                "op": name, "m": m, "variant": label, "image": image_name,
                                "arg_theirs": arg_theirs, "arg_ours": _ours_arg(ours_ra, name, v),
                                "max_abs": int(diff.max()), "n_diff": int((diff > 0).sum()),
                            }
                        )  # fmt: skip
                finally:
                    aa.tf = tf1
    return rows


def _ours_arg(ra: bv.BigVisionRandAugment, name: str, v: dict) -> float | None:
    arg = ra.args[name]
    if arg is None:
        return None
    return float(-arg if v.get("flip") is False else arg)


def _ours_op(ra: bv.BigVisionRandAugment, name: str, image: np.ndarray, v: dict) -> np.ndarray:
    """Ours through ``apply_op``, its sign or Cutout centre fed through the ``random`` it reads."""
    draws = []
    if "flip" in v:
        draws.append(0.25 if v["flip"] else 0.75)  # ours keeps the sign when random() < 0.5
    if "centre" in v:
        draws.extend(v["centre"])
    with _Replay(draws):
        return ra.apply_op(image, name)


class _Replay:
    """Replaces the ``random`` module big_vision_randaug reads by one that returns ``draws`` in
    order (``randrange`` and ``random`` alike), and checks that all were used."""

    def __init__(self, draws: list) -> None:
        self.draws = list(draws)

    def randrange(self, n: int) -> int:
        value = self.draws.pop(0)
        assert 0 <= value < n, (value, n)
        return int(value)

    def random(self) -> float:
        return float(self.draws.pop(0))

    def __enter__(self) -> _Replay:
        self._saved, bv.random = bv.random, self
        return self

    def __exit__(self, *exc) -> None:
        bv.random = self._saved
        if exc[0] is None:
            assert not self.draws, f"unused draws {self.draws}"


def replay_pipeline(tf, aa, n: int, seed: int) -> tuple[np.ndarray, int, list[str]]:
    """Checks 2: (big_vision's N histograms, number of images differing from ours replayed, the
    first few differences described)."""
    tf1 = aa.tf
    grid = bv.calibration_grid()
    record: list[tuple[str, float]] = []

    def hook(shape=None, minval=0, maxval=None, dtype=None, seed=None, name=None):
        value = tf1.random_uniform(shape, minval=minval, maxval=maxval, dtype=dtype or tf.float32)
        if isinstance(maxval, int) and maxval == len(bv.OP_NAMES) and dtype == tf.int32:
            kind = "op"
        elif minval == 0.2:
            kind = "prob"
        elif dtype == tf.int32:
            kind = "centre"
        else:
            kind = "sign"
        record.append((kind, value.numpy().item()))
        return value

    tf.random.set_seed(seed)
    ra = bv.BigVisionRandAugment(num_layers=2, magnitude=10)
    theirs_h, n_bad, notes = [], 0, []
    aa.tf = _TF1Proxy(tf1, hook)
    try:
        for i in range(n):
            record.clear()
            theirs = np.asarray(aa.distort_image_with_randaugment(tf.constant(grid), 2, 10))
            theirs_h.append(histograms([theirs])[0])
            draws, ops = _draws_for_ours(record)
            with _Replay(draws):
                ours = ra.augment_array(grid)
            if not np.array_equal(ours, theirs):
                n_bad += 1
                if len(notes) < 5:
                    d = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
                    notes.append(f"image {i} {ops}: {int((d > 0).sum())} values differ, max {int(d.max())}")
    finally:
        aa.tf = tf1
    return np.stack(theirs_h), n_bad, notes


def _draws_for_ours(record: list[tuple[str, float]]) -> tuple[list, list[str]]:
    """big_vision's draws of one image, in the order ours consumes them: per layer the op index,
    then the selected op's sign (ours: random() < 0.5 keeps it; big_vision: u >= 0.5 keeps it)
    or Cutout's (row, column) centre."""
    draws: list = []
    ops: list[str] = []
    layers: list[dict] = []
    for kind, value in record:
        if kind == "op":
            layers.append({"op": int(value), "signs": [], "centre": []})
        elif kind == "sign":
            layers[-1]["signs"].append(value)
        elif kind == "centre":
            layers[-1]["centre"].append(int(value))
    signed_order = [n for n in bv.OP_NAMES if n in bv.SIGNED_OPS]  # the order big_vision draws signs
    for layer in layers:
        name = bv.OP_NAMES[layer["op"]]
        ops.append(name)
        draws.append(layer["op"])
        if name in bv.SIGNED_OPS:
            signs = layer["signs"]
            assert len(signs) == len(signed_order), signs
            u = signs[signed_order.index(name)]
            draws.append(0.25 if np.floor(u + 0.5) >= 1 else 0.75)
        if name == "Cutout":
            assert len(layer["centre"]) == 2, layer
            draws.extend(layer["centre"])
    return draws, ops


def tfdata_histograms(tf, aa, n: int, seed: int) -> np.ndarray:
    """big_vision's RA(2, 10) of the grid as its input pipeline runs it: a tf.data map (graph
    mode, TF's own RNG under ``tf.random.set_seed(seed)``), n images, (n, 256) histograms."""
    tf.random.set_seed(seed)
    grid = bv.calibration_grid()
    ds = tf.data.Dataset.from_tensors(grid).repeat(n).map(lambda x: aa.distort_image_with_randaugment(x, 2, 10))
    return histograms(im.numpy() for im in ds)


def spectrum(theirs_h: np.ndarray, replayed_h: np.ndarray, seed: int) -> dict[str, float]:
    """Check 3: z of big_vision (tf.data) against ours (3 N, own RNG), of big_vision's replayed
    eager run against ours, ours against ours, fill 0 against big_vision."""
    random.seed(seed)
    grid, n = bv.calibration_grid(), len(theirs_h)
    ra = bv.BigVisionRandAugment(num_layers=2, magnitude=10)
    ours = histograms(ra.augment_array(grid) for _ in range(3 * n))
    ours_b = histograms(ra.augment_array(grid) for _ in range(n))
    fill0 = bv.BigVisionRandAugment(num_layers=2, magnitude=10, fill=0)
    zero = histograms(fill0.augment_array(grid) for _ in range(n))
    return {
        "z_big_vision_vs_ours": spectrum_z(ours, theirs_h),
        "z_big_vision_eager_vs_ours": spectrum_z(ours, replayed_h),
        "z_ours_vs_ours": spectrum_z(ours, ours_b),
        "z_fill0_vs_big_vision": spectrum_z(zero, theirs_h),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big-vision-dir", required=True, help="folder with big_vision's autoaugment.py (+ shim)")
    parser.add_argument("--n", type=int, default=300, help="RA(2, 10) images for the replay and the spectrum")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.big_vision_dir, "autoaugment.py")):
        parser.error(f"--big-vision-dir: no autoaugment.py in {args.big_vision_dir!r}")

    t0 = time.time()
    tf, aa = load_big_vision(args.big_vision_dir)
    rows = op_table(tf, aa)
    print(
        f"{'op':<13}{'M':>3} {'variant':<13}{'image':<9}{'arg big_vision':>15}{'arg ours':>10}{'max|d|':>8}{'n_diff':>8}"
    )
    for r in rows:
        a_t = "-" if r["arg_theirs"] is None else f"{r['arg_theirs']:.6g}"
        a_o = "-" if r["arg_ours"] is None else f"{r['arg_ours']:.6g}"
        print(
            f"{r['op']:<13}{r['m']:>3} {r['variant']:<13}{r['image']:<9}{a_t:>15}{a_o:>10}"
            f"{r['max_abs']:>8}{r['n_diff']:>8}"
        )
    replayed_h, n_bad, notes = replay_pipeline(tf, aa, args.n, args.seed)
    print(f"\nreplayed distort_image_with_randaugment(grid, 2, 10), {args.n} images: {n_bad} differ")
    for note in notes:
        print("  " + note)
    z = spectrum(tfdata_histograms(tf, aa, args.n, args.seed), replayed_h, args.seed)
    print(f"spectrum z (bound {Z_BOUND}): " + ", ".join(f"{k} {v:.2f}" for k, v in z.items()))
    ok = all(r["max_abs"] == 0 for r in rows) and n_bad == 0 and z["z_big_vision_vs_ours"] < Z_BOUND
    print(f"{'PASS' if ok else 'FAIL'} ({time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ops": rows, "replay_n": args.n, "replay_differ": n_bad, "notes": notes, **z, "ok": ok}, f)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
