"""Mixup and CutMix as a collator (VISSL's cutmixup_collator), for DeiT's recipe.

Mixup (Zhang et al. 2018) blends two images with weight lam ~ Beta(alpha, alpha); CutMix (Yun et
al. 2019) pastes a box of one into the other, lam being the unpasted area. Each sample is mixed
with its mirror in the batch (i with B-1-i). Targets become smoothed one-hot vectors mixed with
the same lam, which cross_entropy_multiple_output_single_target accepts as soft targets. For
self-supervised methods (ssl_method set) every crop position is mixed as VISSL's collator mixes
it (vissl/data/collators/cutmixup_collator.py): with the same mirrored partner but its own draws
of lam and box, and labels are left as they are. Defaults are VISSL's (its ``Mixup`` class):
mixup on (alpha 1.0), CutMix off.

The random draws come from a generator seeded with the batch's first sample seed, so a batch is
mixed the same way in a resumed run.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from vissl_vit.errors import ConfigError
from vissl_vit.registry import COLLATORS

# transforms whose output is a list of crops: cutmixup_collator then needs ssl_method
_MULTI_VIEW_TRANSFORMS = ("ImgPilToMultiCrop", "ImgReplicatePil")


def check_cutmixup_params(transforms: list[dict[str, Any]], params: dict[str, Any], where: str) -> None:
    """Refuse, before any loader starts, a multi-crop split collated without ``ssl_method``.

    Without it the collator makes supervised soft targets for one image per sample; on a list of
    crops that would fail inside a loader worker, with a traceback.

    Args:
        transforms: the split's TRANSFORMS entries.
        params: the split's COLLATE_FUNCTION_PARAMS.
        where: the config path of the split, for the message.
    """
    multi = [t["name"] for t in transforms if t.get("name") in _MULTI_VIEW_TRANSFORMS]
    if multi and not params.get("ssl_method"):
        raise ConfigError(
            f"config.{where}.COLLATE_FUNCTION=cutmixup_collator with {multi[0]} in TRANSFORMS makes several "
            f'crops per sample: set config.{where}.COLLATE_FUNCTION_PARAMS.ssl_method (e.g. "swav"), or use '
            "one image per sample for supervised mixup / CutMix."
        )


def _box(rng: np.random.Generator, h: int, w: int, lam: float, minmax: list[float] | None) -> tuple[int, int, int, int]:
    """A box of area (1 - lam) h w, centred uniformly, clipped to the image: (y0, y1, x0, x1).
    With ``minmax`` (VISSL / timm ``rand_bbox_minmax``): each side a uniform fraction of the image
    in [min, max), placed uniformly inside it; lam is then ignored."""
    if minmax is not None:
        ch = int(rng.integers(int(h * minmax[0]), int(h * minmax[1])))
        cw = int(rng.integers(int(w * minmax[0]), int(w * minmax[1])))
        y0, x0 = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
        return y0, y0 + ch, x0, x0 + cw
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


def _mix_view(
    v: torch.Tensor, rng: np.random.Generator, mode: str, draw: Any, correct_lam: bool, minmax: list[float] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One crop position [B, C, H, W] mixed with its mirrored batch: (mixed, lam per sample [B])."""
    B, h, w = v.shape[0], v.shape[-2], v.shape[-1]
    n_draws = 1 if mode == "batch" else (B + 1) // 2 if mode == "pair" else B
    boxes, lams_of_draw = [], []  # per draw: the CutMix box and the effective lam
    for lam, use_cutmix in (draw() for _ in range(n_draws)):
        box = _box(rng, h, w, lam, minmax) if use_cutmix and lam < 1.0 else None
        if box is not None and (correct_lam or minmax is not None):
            lam = 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / (h * w)
        boxes.append(box)
        lams_of_draw.append(lam)
    lams, out = torch.ones(B), v.clone()
    for i in range(B):
        d = 0 if mode == "batch" else min(i, B - 1 - i) if mode == "pair" else i
        lam, box, j = lams_of_draw[d], boxes[d], B - 1 - i
        if lam == 1.0:
            continue
        lams[i] = lam
        if box is None:
            out[i] = v[i] * lam + v[j] * (1.0 - lam)
        else:
            out[i, :, box[0] : box[1], box[2] : box[3]] = v[j, :, box[0] : box[1], box[2] : box[3]]
    return out, lams


@COLLATORS.register("cutmixup_collator")
def cutmixup_collator(
    samples: list[dict[str, Any]],
    mixup_alpha: float = 1.0,
    cutmix_alpha: float = 0.0,
    cutmix_minmax: list[float] | None = None,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: Literal["batch", "pair", "elem"] = "batch",
    correct_lam: bool = True,
    label_smoothing: float = 0.1,
    num_classes: int = 1000,
    ssl_method: str | None = None,
) -> dict[str, Any]:
    """Args:
    mixup_alpha: Beta parameter of mixup; 0 turns mixup off (VISSL's default 1.0; DeiT: 0.8).
    cutmix_alpha: Beta parameter of CutMix; 0 turns it off (VISSL's default 0.0; DeiT: 1.0).
    cutmix_minmax: [min, max] fractions of each side of the CutMix box, drawn uniformly, instead
        of a box from lam (turns CutMix on with alpha 1.0, as VISSL does); None: off.
    prob: probability of mixing a batch (mode batch) or a pair / sample.
    switch_prob: probability of CutMix rather than mixup when both are on.
    mode: "batch" (one lam for the batch), "pair" (one per mirrored pair), "elem" (one per sample).
    correct_lam: lam = the area left after clipping the CutMix box to the image.
    label_smoothing: smoothing of the one-hot targets (supervised only).
    num_classes: classes of the one-hot targets (supervised only).
    ssl_method: a self-supervised method's name (e.g. "swav"): mix every crop position with its
        own draws (as VISSL), keep labels. ``mix_lambda`` is then [crops, B].
    """
    if mode not in ("batch", "pair", "elem"):
        raise ConfigError(f"cutmixup_collator: mode must be batch, pair or elem, got {mode!r}")
    if cutmix_minmax is not None:
        if len(cutmix_minmax) != 2:
            raise ConfigError(f"cutmixup_collator: cutmix_minmax must be [min, max], got {cutmix_minmax}")
        cutmix_alpha = 1.0  # VISSL's Mixup forces it, so that the CutMix branch is taken
    multi = isinstance(samples[0]["data"], list)
    if multi and not ssl_method:  # check_cutmixup_params refuses this config before the loader starts
        raise ConfigError("cutmixup_collator: samples have several crops; set ssl_method (e.g. swav)")
    batch = default_collate([{k: v for k, v in s.items() if k != "data"} for s in samples])
    views = (
        [torch.stack([s["data"][i] for s in samples]) for i in range(len(samples[0]["data"]))]
        if multi
        else [torch.stack([s["data"] for s in samples])]
    )
    rng = np.random.default_rng(int(samples[0]["seed"]))

    def draw() -> tuple[float, bool]:
        return _draw(rng, mixup_alpha, cutmix_alpha, prob, switch_prob)

    mixed, lams = zip(*(_mix_view(v, rng, mode, draw, correct_lam, cutmix_minmax) for v in views))
    batch["data"] = list(mixed) if multi else mixed[0]
    batch["mix_lambda"] = torch.stack(lams) if multi else lams[0]
    if not ssl_method:
        lam = lams[0]
        off = label_smoothing / num_classes
        one_hot = F.one_hot(batch["label"], num_classes).float() * (1.0 - label_smoothing) + off
        batch["label"] = lam[:, None] * one_hot + (1.0 - lam[:, None]) * one_hot.flip(0)
    return batch
