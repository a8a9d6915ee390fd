"""big_vision's preprocessing ops (issue 15): the TF inception crop's box distribution, resize_small,
central_crop and value_range; against TensorFlow itself when ``tensorflow-cpu`` is installed.

TensorFlow runs in a subprocess: in one process, importing triton (torch._dynamo does, through
torchvision) after TensorFlow segfaults, which would take the whole pytest session down.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from vissl_vit.data.transforms import big_vision_ops as bv
from vissl_vit.data.transforms.build import build_transforms

H, W = 256, 512  # mup-vit's test image: wide enough that the aspect range constrains the box


def _h_range(r: np.ndarray, min_area: float, max_area: float) -> tuple[np.ndarray, np.ndarray]:
    """h_min(r), h_max(r) of RECIPES.md 4.6, written out again here in float64."""
    h_min = np.rint(np.sqrt(min_area / r))
    h_max = np.rint(np.sqrt(max_area / r))
    narrowed = np.floor((W + 0.5 - 1e-7) / r)
    narrowed -= np.rint(narrowed * r) > W
    h_max = np.minimum(np.where(np.rint(h_max * r) > W, narrowed, h_max), H)
    return np.minimum(h_min, h_max), h_max


def _z(chi2: float, dof: int) -> float:
    """A chi-square statistic as standard deviations above its mean (normal approximation)."""
    return (chi2 - dof) / math.sqrt(2 * dof)


def test_inception_crop_never_falls_back_and_draws_the_ratio_and_height_uniformly():
    n = 100_000
    b = bv.sample_boxes(H, W, n, rng=np.random.default_rng(0))
    assert (b["attempts"] == 0).sum() == 0  # no fallback to the whole image (torchvision: ~0.14%)
    r, h, w = b["ratio"].astype(np.float64), b["height"], b["width"]
    assert r.min() >= 0.75 and r.max() <= 1.33
    assert np.array_equal(w, np.rint(h.astype(np.float32) * b["ratio"]).astype(np.int64))
    assert ((w * h >= 0.05 * H * W) & (w <= W) & (h <= H)).all()
    # the ratio is uniform in linear space: 20 equal bins
    counts = np.histogram(r, bins=20, range=(0.75, 1.33))[0]
    assert _z(((counts - n / 20) ** 2 / (n / 20)).sum(), 19) < 4
    # the height is uniform in [h_min(r), h_max(r)] given r: for each draw, the chance of each of
    # 10 position bins is the share of the integers of its range falling there; 4 bins of r
    h_min, h_max = _h_range(r, 0.05 * H * W, 1.0 * H * W)
    assert ((h >= h_min) & (h <= h_max)).mean() > 0.999  # the +1 for a too small area aside
    size = h_max - h_min + 1
    pos = np.minimum(((h - h_min + 0.5) / size * 10).astype(int), 9)
    edges = np.ceil(np.arange(11)[None, :] * size[:, None] / 10 - 0.5)
    share = np.diff(edges, axis=1) / size[:, None]  # [n, 10], each row sums to 1
    r_bin = np.minimum(((r - 0.75) / 0.58 * 4).astype(int), 3)
    chi2 = 0.0
    for k in range(4):
        sel = r_bin == k
        observed = np.bincount(pos[sel], minlength=10)
        expected = share[sel].sum(0)
        chi2 += ((observed - expected) ** 2 / expected).sum()
    assert _z(chi2, 40) < 4, chi2
    # the offsets: TF's Uniform(n) is in [0, n), so top <= H - h - 1 (and 0 when h = H)
    assert (b["top"] <= np.maximum(H - h - 1, 0)).all() and (b["left"] <= np.maximum(W - w - 1, 0)).all()
    assert (b["left"] == W - w - 1).sum() > 100 and ((b["top"] == H - h - 1) & (h < H)).sum() > 100  # to its end


def test_torchvision_random_resized_crop_falls_back_where_tf_does_not():
    torch.manual_seed(0)
    img = torch.empty(3, H, W)
    boxes = [T.RandomResizedCrop.get_params(img, scale=(0.05, 1.0), ratio=(0.75, 1.33)) for _ in range(10_000)]
    # its fallback: a centre crop with the ratio clamped (256 x 340 here), never drawn otherwise
    fallbacks = sum(1 for top, left, h, w in boxes if (h, w) == (256, 340) and (top, left) == (0, 86))
    assert fallbacks > 0  # expected ~14 (mup-vit: 14,340 in 10^7); ours: 0 of 10^5 above


def test_transforms_by_name_sizes_offsets_and_value_range():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (259, 300, 3), dtype=np.uint8))
    entries = [{"name": "ResizeSmall", "size": 256}, {"name": "CentralCrop", "size": 224}, {"name": "ToTensor"}]
    out = build_transforms([*entries, {"name": "ValueRange"}], "t")(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert bv.ResizeSmall(256).output_size(375, 500) == (256, 341)  # round(500 x 256 / 375 = 341.33)
    assert bv.ResizeSmall(224).output_size(300, 301) == (224, 225)  # 224.75 rounds up
    # central crop: offsets (H - h) // 2; torchvision rounds (H - h) / 2 half to even: 35 -> 18, not 17
    arr = np.asarray(img)
    ours = np.asarray(bv.CentralCrop(224)(img))
    assert np.array_equal(ours, arr[17 : 17 + 224, 38 : 38 + 224])
    assert not np.array_equal(np.asarray(T.CenterCrop(224)(img)), ours)
    assert np.array_equal(np.asarray(T.CenterCrop(224)(img)), arr[18 : 18 + 224, 38 : 38 + 224])
    # inception crop: a size x size uint8 image, repeatable under numpy's seed
    crop = bv.InceptionCrop(32)
    np.random.seed(3)
    first = np.asarray(crop(img))
    np.random.seed(3)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8 and np.array_equal(first, np.asarray(crop(img)))
    assert np.asarray(bv.InceptionCrop([20, 24], antialias=True)(img.convert("L"))).shape == (20, 24)
    # value_range(-1, 1) after ToTensor = big_vision's float32 (x - 0) / (255 - 0) then -1 + t * 2, bit for bit
    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    big_vision = np.float32(-1) + (x.astype(np.float32) - np.float32(0)) / np.float32(255) * np.float32(2)
    ours = bv.ValueRange(-1, 1)(T.ToTensor()(Image.fromarray(x)))[0].numpy()
    assert np.array_equal(ours, big_vision) and ours.min() == -1 and ours.max() == 1
    assert torch.equal(bv.ValueRange()(Image.fromarray(x)), bv.ValueRange()(torch.from_numpy(x)[None]))


# ---- against TensorFlow ------------------------------------------------------------------------

N_TF = 50_000  # boxes per TF seed (3 s each); torchvision's get_params is slower: 10,000

_TF_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    n, path = int(sys.argv[1]), sys.argv[2]
    data = dict(np.load(path))

    @tf.function
    def boxes(seed):
        def one(i):
            begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                [256, 512, 3], tf.zeros([0, 0, 4]), seed=tf.stack([seed, i]), area_range=(0.05, 1.0),
                aspect_ratio_range=(0.75, 1.33), min_object_covered=0, use_image_if_no_bounding_boxes=True)
            return tf.concat([begin[:2], size[:2]], 0)
        return tf.map_fn(one, tf.range(n, dtype=tf.int64), fn_output_signature=tf.int32, parallel_iterations=64)

    def u8(x):  # big_vision's cast
        return tf.cast(tf.clip_by_value(x, 0, 255), tf.uint8).numpy()

    def resize_small_central_crop(image, small, crop):  # big_vision's resize_small + central_crop
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        factor = tf.cast(small, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
        h = tf.cast(tf.round(tf.cast(h, tf.float32) * factor), tf.int32)
        w = tf.cast(tf.round(tf.cast(w, tf.float32) * factor), tf.int32)
        image = tf.cast(tf.clip_by_value(tf.image.resize(image, (h, w), method="area"), 0, 255), tf.uint8)
        dy, dx = (tf.shape(image)[0] - crop) // 2, (tf.shape(image)[1] - crop) // 2
        return tf.image.crop_to_bounding_box(image, dy, dx, crop, crop).numpy()

    out = {"boxes0": boxes(tf.constant(0, tf.int64)).numpy(), "boxes1": boxes(tf.constant(1, tf.int64)).numpy()}
    for key in [k for k in data if k.startswith("image")]:
        out["eval_" + key] = resize_small_central_crop(data[key], 256, 224)
        for aa in (False, True):
            for size in ((224, 224), (61, 80), (400, 300)):
                resized = tf.image.resize(data[key], size, method="bilinear", antialias=aa)
                out[f"bilinear_{aa}_{size[0]}_{key}"] = u8(resized)
    v = tf.cast(tf.constant(np.arange(256, dtype=np.uint8)), tf.float32)
    out["value_range"] = (-1 + (v - tf.constant(0.0)) / (tf.constant(255.0) - tf.constant(0.0)) * (1 - -1)).numpy()
    np.savez(path.replace("in.npz", "out.npz"), **out)
    """
)

TF_SIZES = {"image_a": (375, 500), "image_b": (259, 300), "image_c": (512, 384), "image_d": (150, 140)}


@pytest.fixture(scope="module")
def tf_results(tmp_path_factory) -> dict[str, np.ndarray]:
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (pip install tensorflow-cpu) for the parity tests")
    folder = tmp_path_factory.mktemp("tf")
    rng = np.random.default_rng(7)
    images = {k: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for k, hw in TF_SIZES.items()}
    images["image_flat"] = np.full((300, 400, 3), 255, np.uint8)  # a flat region: the truncating cast
    np.savez(folder / "in.npz", **images)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-c", _TF_SCRIPT, str(N_TF), str(folder / "in.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {**images, **dict(np.load(folder / "out.npz"))}


def two_sample(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(z of the 2-D (h, w) histogram chi-square, KS distance of the areas) between two [n, 2] samples.

    The histogram has 16-pixel bins; bins with fewer than 20 boxes in both samples together are
    pooled into one. The chi-square of two samples of sizes n, m is
    sum (sqrt(m / n) a - sqrt(n / m) b)^2 / (a + b), with (bins - 1) degrees of freedom.
    """
    edges = (np.arange(0, H + 17, 16), np.arange(0, W + 17, 16))
    ca = np.histogram2d(a[:, 0], a[:, 1], bins=edges)[0].ravel()
    cb = np.histogram2d(b[:, 0], b[:, 1], bins=edges)[0].ravel()
    small = ca + cb < 20
    ca = np.append(ca[~small], ca[small].sum())
    cb = np.append(cb[~small], cb[small].sum())
    keep = ca + cb > 0
    ca, cb = ca[keep], cb[keep]
    n, m = ca.sum(), cb.sum()
    chi2 = ((math.sqrt(m / n) * ca - math.sqrt(n / m) * cb) ** 2 / (ca + cb)).sum()
    area_a, area_b = np.sort(a[:, 0] * a[:, 1]), np.sort(b[:, 0] * b[:, 1])
    grid = np.union1d(area_a, area_b)
    ks = np.abs(np.searchsorted(area_a, grid, "right") / n - np.searchsorted(area_b, grid, "right") / m).max()
    return _z(chi2, len(ca) - 1), float(ks)


def ks_critical(n: int, m: int) -> float:
    """The KS distance two samples of sizes n and m exceed with probability 0.001 when alike."""
    return 1.949 * math.sqrt((n + m) / (n * m))


def test_inception_crop_matches_tf_and_torchvision_does_not(tf_results):
    tf0, tf1 = tf_results["boxes0"], tf_results["boxes1"]  # [n, 4]: top, left, h, w
    ours = bv.sample_boxes(H, W, N_TF, rng=np.random.default_rng(0))
    ours_hw = np.stack([ours["height"], ours["width"]], 1)
    torch.manual_seed(0)
    img = torch.empty(3, H, W)
    tv = np.array([T.RandomResizedCrop.get_params(img, scale=(0.05, 1.0), ratio=(0.75, 1.33)) for _ in range(10_000)])
    floor = two_sample(tf0[:, 2:], tf1[:, 2:])
    ours_vs_tf = two_sample(ours_hw, tf0[:, 2:])
    tv_vs_tf = two_sample(tv[:, 2:], tf0[:, 2:])
    crit_tf, crit_tv = ks_critical(N_TF, N_TF), ks_critical(len(tv), N_TF)
    print(
        f"\n(h, w) chi-square z / area KS: TF seed 0 vs 1 {floor[0]:.2f} / {floor[1]:.4f}; ours vs TF "
        f"{ours_vs_tf[0]:.2f} / {ours_vs_tf[1]:.4f}; torchvision vs TF {tv_vs_tf[0]:.1f} / {tv_vs_tf[1]:.4f} "
        f"(KS p=0.001 critical {crit_tf:.4f}, {crit_tv:.4f})"
    )
    passes = lambda stat, crit: stat[0] < 4 and stat[1] < crit  # noqa: E731
    assert passes(floor, crit_tf)  # the noise floor: TF against itself
    assert passes(ours_vs_tf, crit_tf)
    assert not passes(tv_vs_tf, crit_tv) and tv_vs_tf[0] > 20 and tv_vs_tf[1] > 3 * crit_tv
    # neither TF nor ours ever falls back, and both draw top in [0, H - h)
    for boxes in (tf0, tf1, np.stack([ours["top"], ours["left"], ours["height"], ours["width"]], 1)):
        assert not ((boxes[:, 2] == H) & (boxes[:, 3] == W)).any()
        assert (boxes[:, 0] <= np.maximum(H - boxes[:, 2] - 1, 0)).all()
        assert (boxes[:, 1] <= np.maximum(W - boxes[:, 3] - 1, 0)).all()


def test_resizes_and_crops_match_tf(tf_results):
    for key in [*TF_SIZES, "image_flat"]:
        img = Image.fromarray(tf_results[key])
        ours = np.asarray(bv.CentralCrop(224)(bv.ResizeSmall(256)(img)))
        # area resize and big_vision's crop offsets: TF's output exactly (measured: 0 pixels differ)
        assert np.array_equal(ours, tf_results[f"eval_{key}"]), key
        for size in ((224, 224), (61, 80), (400, 300)):
            ours = bv.resize(tf_results[key], *size, "bilinear", antialias=False)
            assert np.array_equal(ours, tf_results[f"bilinear_False_{size[0]}_{key}"]), (key, size)
            # mup-vit's antialiased bilinear is torch's, not TF's: within one grey level of TF's
            # antialiased resize, off by one in under 1% of the pixels of a random image, but in a
            # third of a flat white one (torch's weighted sum falls just below 255 and truncates)
            ours = bv.resize(tf_results[key], *size, "bilinear", antialias=True)
            diff = np.abs(ours.astype(int) - tf_results[f"bilinear_True_{size[0]}_{key}"])
            share = 0.5 if key == "image_flat" else 0.01
            assert diff.max() <= 1 and (diff > 0).mean() < share, (key, size, diff.max(), (diff > 0).mean())
    # a flat white image: TF's area sum truncates to 254 (as ours does); bilinear keeps 255
    assert tf_results["eval_image_flat"].min() == 254
    x = torch.from_numpy(np.arange(256, dtype=np.uint8))[None, None]
    assert np.array_equal(bv.ValueRange(-1, 1)(x).numpy().ravel(), tf_results["value_range"])
