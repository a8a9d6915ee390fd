"""Heads, registered by name in HEADS."""

from vissl_vit.models.heads import eval_mlp, mlp, swav_head, vision_transformer_head  # noqa: F401  (registration)
