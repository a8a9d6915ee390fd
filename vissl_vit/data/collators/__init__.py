"""Collators, registered by name in COLLATORS (DATA.*.COLLATE_FUNCTION)."""

from vissl_vit.data.collators import cutmixup, default, multiview  # noqa: F401  (registration)
