"""Collators for samples made of several views (contrastive pairs, multi-crop).

Each sample's "data" is a list of V view tensors; the batch's "data" is a list of V tensors
[B, C, H_v, W_v], one per view, so views of different resolutions stay separate. Every other
field is stacked as by default_collate. Works at any batch size, 1 included (VISSL's
moco_collator failed there).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

from vissl_vit.registry import COLLATORS


def _collate_views(samples: list[dict[str, Any]], expected_views: int | None, name: str) -> dict[str, Any]:
    views = [s["data"] for s in samples]
    n = len(views[0]) if isinstance(views[0], list) else None
    if n is None or any(len(v) != n for v in views):
        raise ValueError(
            f"{name}: each sample's data must be a list of views of the same length (use ImgReplicatePil or "
            f"ImgPilToMultiCrop in TRANSFORMS); got {type(views[0]).__name__}"
        )
    if expected_views is not None and n != expected_views:
        raise ValueError(f"{name}: expected {expected_views} views per sample, got {n}")
    batch = default_collate([{k: v for k, v in s.items() if k != "data"} for s in samples])
    batch["data"] = [torch.stack([v[i] for v in views]) for i in range(n)]
    return batch


@COLLATORS.register("moco_collator")
def moco_collator(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Two views per sample (query, key) -> ``data: [queries [B,C,H,W], keys [B,C,H,W]]``."""
    return _collate_views(samples, 2, "moco_collator")


@COLLATORS.register("multicrop_collator")
def multicrop_collator(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Any number of crops per sample -> one tensor per crop index (SwAV, DINO)."""
    return _collate_views(samples, None, "multicrop_collator")


@COLLATORS.register("simclr_collator")
def simclr_collator(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """As multicrop_collator: each view stacked over the batch (SimCLR-style pairs)."""
    return _collate_views(samples, None, "simclr_collator")
