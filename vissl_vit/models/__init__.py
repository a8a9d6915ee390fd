"""Trunks, heads and the model that joins them."""

from vissl_vit.models import heads, trunks  # noqa: F401  (registration)
from vissl_vit.models.build import apply_weights_init, build_model
from vissl_vit.models.model import TrunkHeadModel

__all__ = ["TrunkHeadModel", "apply_weights_init", "build_model"]
