"""Random images and labels, generated from the index (the same image every time)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vissl_vit.data.datasets.base import ImageSource


class SyntheticSource(ImageSource):
    """``num_images`` random images of ``image_size``² pixels with labels in [0, num_classes)."""

    def __init__(self, num_images: int, image_size: int, num_channels: int, num_classes: int, seed: int) -> None:
        self.num_images, self.image_size = num_images, image_size
        self.num_channels, self.num_classes, self.seed = num_channels, num_classes, seed

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int) -> Image.Image:
        rng = np.random.default_rng((self.seed, index))
        arr = rng.integers(0, 256, (self.image_size, self.image_size, self.num_channels), dtype=np.uint8)
        return Image.fromarray(arr[..., 0] if self.num_channels == 1 else arr)

    def label(self, index: int) -> int:
        return int(np.random.default_rng((self.seed, index, 1)).integers(self.num_classes))
