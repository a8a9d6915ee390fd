"""Trunks, registered by name in TRUNKS."""

from vissl_vit.models.trunks import convit, vision_transformer  # noqa: F401  (registration)
