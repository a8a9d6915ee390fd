"""Heads, registered by name in HEADS."""

from vissl_vit.models.heads import eval_mlp, mlp, vision_transformer_head  # noqa: F401  (registration)
