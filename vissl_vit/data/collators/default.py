"""The default collator: stack each field of the sample dicts."""

from __future__ import annotations

from typing import Any

from torch.utils.data import default_collate as _torch_default_collate

from vissl_vit.registry import COLLATORS


@COLLATORS.register("default_collate")
def default_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples ``{"data": [C,H,W], "label", "index", "bad", "bad_path"}`` -> a batch of the same keys."""
    return _torch_default_collate(samples)
