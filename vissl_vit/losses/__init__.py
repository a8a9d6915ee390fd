"""Losses, registered by name in LOSSES; torch.nn losses by their class names."""

from vissl_vit.losses import bce, cross_entropy, moco, simclr, swav  # noqa: F401  (registration)
from vissl_vit.losses.build import build_loss

__all__ = ["build_loss"]
