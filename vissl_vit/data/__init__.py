"""Data: sources, transforms, sampler, collators and loaders."""

from vissl_vit.data import collators, datasets  # noqa: F401  (registration)
from vissl_vit.data.build import build_dataloader, build_dataset

__all__ = ["build_dataloader", "build_dataset"]
