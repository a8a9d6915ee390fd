"""Transforms by name: vissl_vit's (registered in TRANSFORMS) and torchvision's."""

from vissl_vit.data.transforms import big_vision_ops, big_vision_randaug, deit, rand_augment, ssl  # noqa: F401  (registration)
from vissl_vit.data.transforms.build import build_transforms

__all__ = ["build_transforms"]
