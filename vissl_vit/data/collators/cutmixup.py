"""Mixup and CutMix as a collator (VISSL's cutmixup_collator), for DeiT's recipe.

Mixup (Zhang et al. 2018) blends two images with weight lam ~ Beta(alpha, alpha); CutMix (Yun et
al. 2019) pastes a box of one into the other, lam being the unpasted area. Each sample is mixed
with its mirror in the batch (i with B-1-i). Targets become smoothed one-hot vectors mixed with
the same lam, which cross_entropy_multiple_output_single_target accepts as soft targets. For
self-supervised methods (ssl_method set) every crop of a sample is mixed with the same partner
and lam, and labels are left as they are.

The random draws come from a generator seeded with the batch's first sample seed, so a batch is
mixed the same way in a resumed run.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from vissl_vit.registry import COLLATORS


def _box(rng: np.random.Generator, h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """A box of area (1 - lam) h w, centred uniformly, clipped to the image: (y0, y1, x0, x1)."""
    ratio = np.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = rng.integers(h), rng.integers(w)
    return (int(np.clip(cy - ch // 2, 0, h)), int(np.clip(cy + ch // 2, 0, h)),
            int(np.clip(cx - cw // 2, 0, w)), int(np.clip(cx + cw // 2, 0, w)))  # fmt: skip


def _draw(rng: np.random.Generator, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float):
    """One (lam, use_cutmix) draw; lam = 1 means no mixing."""
    if rng.random() >= prob or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return 1.0, False
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    return float(rng.beta(alpha, alpha)), use_cutmix


@COLLATORS.register("cutmixup_collator")
def cutmixup_collator(
    samples: list[dict[str, Any]],
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: Literal["batch", "pair", "elem"] = "batch",
    correct_lam: bool = True,
    label_smoothing: float = 0.1,
    num_classes: int = 1000,
    ssl_method: str | None = None,
) -> dict[str, Any]:
    """Args:
    mixup_alpha: Beta parameter of mixup; 0 turns mixup off (DeiT: 0.8).
    cutmix_alpha: Beta parameter of CutMix; 0 turns it off (DeiT: 1.0).
    prob: probability of mixing a batch (mode batch) or a pair / sample.
    switch_prob: probability of CutMix rather than mixup when both are on.
    mode: "batch" (one lam for the batch), "pair" (one per mirrored pair), "elem" (one per sample).
    correct_lam: lam = the area left after clipping the CutMix box to the image.
    label_smoothing: smoothing of the one-hot targets (supervised only).
    num_classes: classes of the one-hot targets (supervised only).
    ssl_method: a self-supervised method's name (e.g. "swav"): mix every crop, keep labels.
    """
    if mode not in ("batch", "pair", "elem"):
        raise ValueError(f"cutmixup_collator: mode must be batch, pair or elem, got {mode!r}")
    multi = isinstance(samples[0]["data"], list)
    if multi and not ssl_method:
        raise ValueError("cutmixup_collator: samples have several crops; set ssl_method (e.g. swav)")
    batch = default_collate([{k: v for k, v in s.items() if k != "data"} for s in samples])
    views = (
        [torch.stack([s["data"][i] for s in samples]) for i in range(len(samples[0]["data"]))]
        if multi
        else [torch.stack([s["data"] for s in samples])]
    )
    rng = np.random.default_rng(int(samples[0]["seed"]))
    B = len(samples)
    n_draws = 1 if mode == "batch" else (B + 1) // 2 if mode == "pair" else B
    draws = [_draw(rng, mixup_alpha, cutmix_alpha, prob, switch_prob) for _ in range(n_draws)]
    h0, w0 = views[0].shape[-2:]
    boxes, lams_of_draw = [], []  # per draw: the CutMix box (in view 0's pixels) and the effective lam
    for lam, use_cutmix in draws:
        box = _box(rng, h0, w0, lam) if use_cutmix and lam < 1.0 else None
        if box is not None and correct_lam:
            lam = 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / (h0 * w0)
        boxes.append(box)
        lams_of_draw.append(lam)
    lams = torch.ones(B)
    mixed = [v.clone() for v in views]
    for i in range(B):
        d = 0 if mode == "batch" else min(i, B - 1 - i) if mode == "pair" else i
        lam, box, j = lams_of_draw[d], boxes[d], B - 1 - i
        if lam == 1.0:
            continue
        lams[i] = lam
        for v, out in zip(views, mixed):
            if box is None:
                out[i] = v[i] * lam + v[j] * (1.0 - lam)
            else:  # the same box on every crop, scaled to its size
                h, w = v.shape[-2:]
                y0, y1 = box[0] * h // h0, box[1] * h // h0
                x0, x1 = box[2] * w // w0, box[3] * w // w0
                out[i, :, y0:y1, x0:x1] = v[j, :, y0:y1, x0:x1]
    batch["data"] = mixed if multi else mixed[0]
    batch["mix_lambda"] = lams
    if not ssl_method:
        off = label_smoothing / num_classes
        one_hot = F.one_hot(batch["label"], num_classes).float() * (1.0 - label_smoothing) + off
        batch["label"] = lams[:, None] * one_hot + (1.0 - lams[:, None]) * one_hot.flip(0)
    return batch
