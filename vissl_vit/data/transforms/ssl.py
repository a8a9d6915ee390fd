"""Self-supervised transforms (VISSL's names): replicate, multi-crop, colour distortion, blur, solarize.

Transforms after ``ImgReplicatePil`` / ``ImgPilToMultiCrop`` see a list of images and are applied to
each element (see ``build.py``); an entry's ``indices`` restricts it to some elements, for
asymmetric augmentations such as MoCo v3's blur on view 0 and solarize on view 1.
"""

from __future__ import annotations

import random

import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

from vissl_vit.errors import ConfigError
from vissl_vit.registry import TRANSFORMS


@TRANSFORMS.register("ImgReplicatePil")
class ImgReplicatePil:
    """One image -> a list of ``num_times`` copies (the views of contrastive methods)."""

    takes_list = True  # consumes one image, returns a list

    def __init__(self, num_times: int = 2) -> None:
        if num_times < 1:
            raise ValueError(f"num_times must be >= 1, got {num_times}")
        self.num_times = num_times

    def __call__(self, img: Image.Image) -> list[Image.Image]:
        return [img.copy() for _ in range(self.num_times)]


@TRANSFORMS.register("ImgPilToMultiCrop")
class ImgPilToMultiCrop:
    """One image -> ``total_num_crops`` random resized crops (SwAV's multi-crop).

    Args:
        total_num_crops: crops in all, ``sum(num_crops)``.
        num_crops: crops of each resolution, e.g. [2, 6].
        size_crops: side of each resolution's crops, e.g. [224, 96].
        crop_scales: (min, max) area fraction of each resolution's crops, e.g. [[0.14, 1], [0.05, 0.14]].
    """

    takes_list = True

    def __init__(
        self, total_num_crops: int, num_crops: list[int], size_crops: list[int], crop_scales: list[list[float]]
    ) -> None:
        if not len(num_crops) == len(size_crops) == len(crop_scales):
            raise ValueError("num_crops, size_crops and crop_scales need one entry per resolution")
        if sum(num_crops) != total_num_crops:
            raise ValueError(f"total_num_crops={total_num_crops} but num_crops adds up to {sum(num_crops)}")
        self.crops = [
            T.RandomResizedCrop(size, scale=tuple(scale))
            for n, size, scale in zip(num_crops, size_crops, crop_scales)
            for _ in range(n)
        ]

    def __call__(self, img: Image.Image) -> list[Image.Image]:
        return [crop(img) for crop in self.crops]


@TRANSFORMS.register("ImgPilColorDistortion")
class ImgPilColorDistortion:
    """SimCLR's colour distortion: colour jitter with probability 0.8, greyscale with 0.2.

    Args:
        strength: scales the jitter: brightness, contrast, saturation 0.8 x strength, hue 0.2 x strength.
        color_jitter_probability: probability of the jitter.
        grayscale_probability: probability of turning the image grey.
        brightness, contrast, saturation, hue: set one jitter amount directly instead of from
            strength (BYOL / MoCo v3: 0.4, 0.4, 0.2, 0.1).
    """

    def __init__(
        self,
        strength: float = 1.0,
        color_jitter_probability: float = 0.8,
        grayscale_probability: float = 0.2,
        brightness: float | None = None,
        contrast: float | None = None,
        saturation: float | None = None,
        hue: float | None = None,
    ) -> None:
        s = strength
        jitter = T.ColorJitter(
            0.8 * s if brightness is None else brightness,
            0.8 * s if contrast is None else contrast,
            0.8 * s if saturation is None else saturation,
            min(0.2 * s, 0.5) if hue is None else hue,
        )
        self.transform = T.Compose(
            [T.RandomApply([jitter], p=color_jitter_probability), T.RandomGrayscale(p=grayscale_probability)]
        )

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.transform(img)


@TRANSFORMS.register("ImgPilGaussianBlur")
class ImgPilGaussianBlur:
    """Gaussian blur of a random radius in [radius_min, radius_max], with probability p."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


@TRANSFORMS.register("ImgPilRandomSolarize")
class ImgPilRandomSolarize:
    """Solarize (invert the pixels at or above a threshold) with probability ``p``.

    VISSL's (vissl/data/ssl_transforms/img_pil_random_solarize.py, after BYOL) draws the
    threshold uniformly from the integers 0-256 at each application; BYOL's and MoCo v3's own code
    use a fixed 128 (``threshold: 128``; with p 0.2 on view 1).

    Args:
        p: probability of solarizing an image (VISSL's key and default, 0.66).
        threshold: a fixed threshold (0-256), or None for VISSL's random one.
        prob: not a key: VISSL reads only ``p`` (a ``prob`` there is ignored), so it is refused.
    """

    def __init__(self, p: float = 0.66, threshold: int | None = None, prob: float | None = None) -> None:
        if prob is not None:
            raise ConfigError(
                f"ImgPilRandomSolarize: the probability is VISSL's key p (p: {prob}); VISSL ignores 'prob'."
            )
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"ImgPilRandomSolarize: p must be in [0, 1], got {p}")
        if threshold is not None and not 0 <= threshold <= 256:
            raise ConfigError(f"ImgPilRandomSolarize: threshold must be in [0, 256] or null, got {threshold}")
        self.p, self.threshold = p, threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        # VISSL's RandomSolarizeTransform: an int from the closed interval [0, 256]
        threshold = random.randint(0, 256) if self.threshold is None else self.threshold
        return ImageOps.solarize(img, threshold)
