"""simclr_collator: the views of a batch reach the model in VISSL's order."""

from __future__ import annotations

import pytest
import torch

from vissl_vit.data.collators.multiview import simclr_collator
from vissl_vit.models.model import forward_views
from vissl_vit.registry import COLLATORS


def _samples(n: int = 3, views: int = 2, size: int = 4) -> list[dict]:
    # image i's view v holds the value 10 i + v, so every tensor names its image and view
    return [
        {"data": [torch.full((3, size, size), 10.0 * i + v) for v in range(views)], "label": i, "index": i}
        for i in range(n)
    ]


@pytest.mark.parametrize("views", [2, 3])
def test_simclr_collator_gives_the_model_vissls_layout(views):
    # VISSL vissl/data/collators/simclr_collator.py, simclr_collator: one tensor
    # [img1_0, img2_0, ..., imgN_0, img1_1, ..., imgN_1, ...], i.e. for pos in views: for idx in images
    n = 3
    vissl_order = torch.stack([torch.full((3, 4, 4), 10.0 * i + v) for v in range(views) for i in range(n)])
    batch = COLLATORS.get("simclr_collator")(_samples(n, views))
    assert len(batch["data"]) == views and all(v.shape == (n, 3, 4, 4) for v in batch["data"])
    # the model runs the views as one batch in list order (models/model.py forward_views): VISSL's tensor
    seen = forward_views(lambda x, keys: [x], batch["data"], None)
    torch.testing.assert_close(seen, vissl_order)
    assert batch["label"].tolist() == list(range(n)) and batch["index"].tolist() == list(range(n))


def test_simclr_collator_refuses_single_images():
    samples = [{"data": torch.zeros(3, 4, 4), "label": 0}]
    with pytest.raises(ValueError, match=r"simclr_collator: .*ImgReplicatePil"):
        simclr_collator(samples)
