"""Binary cross-entropy of each of a model's outputs against one target (VISSL's name, timm's options).

One sigmoid per class instead of a softmax over classes: DeiT-III ("Revenge of the ViT", Touvron
et al. 2022) trains with it on mixup / CutMix targets binarised with ``> 0`` (both mixed classes
become 1) and no label smoothing. The options are those of timm's ``BinaryCrossEntropy``
(timm/loss/binary_cross_entropy.py): class-index targets become one-hot vectors with label
smoothing, dense targets (mixup's soft labels, multi-label 0/1 vectors) pass through,
``target_threshold`` binarises them, ``pos_weight`` weighs the positive term, ``sum_classes`` sums
over classes before averaging over the batch.

VISSL's own ``bce_logits_multiple_output_single_target`` (multi-label benchmarks such as VOC07)
is the ``reduction: none`` case: a dense target of -1 marks an unknown label, left out; each class
is averaged over the samples that have a label for it, and the classes are summed. ``-1`` entries
are left out in every reduction.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vissl_vit.errors import ConfigError
from vissl_vit.registry import LOSSES

_KEY = "config.LOSS.bce_logits_multiple_output_single_target"
_REDUCTIONS = ("none", "mean", "sum")


@LOSSES.register("bce_logits_multiple_output_single_target")
class BCELogitsMultipleOutputSingleTargetLoss(nn.Module):
    """Sum over outputs of ``BCEWithLogits(output, target)``, as VISSL's criterion sums them.

    The target is a class index per sample ([B], int: one-hot with ``smoothing``, off value
    smoothing / C, on value 1 - smoothing + smoothing / C, as timm) or a dense target per sample
    ([B, C], float: mixup's soft labels or multi-label 0/1, with -1 for unknown labels).

    Args:
        reduction: over the [B, C] losses: "mean" (over all entries: torch, timm, DeiT-III), "sum",
            or "none" (VISSL's default: each class averaged over its labelled samples, then summed
            over classes; with no -1 entries that is ``sum_classes``).
        normalize_output: L2-normalise the logits first (VISSL's option).
        world_size: accepted for VISSL's configs, not used (VISSL infers it and uses it nowhere
            in this loss).
        smoothing: label smoothing of class-index targets, in [0, 1). Dense targets are assumed
            smoothed upstream (cutmixup_collator's label_smoothing), as in timm.
        target_threshold: binarise the target with ``target > threshold`` (after smoothing); None
            for none. DeiT-III: 0.0 with smoothing 0.0, so each mixed class becomes 1 (with
            smoothing > 0 every class would pass, the off value being > 0).
        pos_weight: weight of the positive term, one float or one per class; None for 1.
        sum_classes: sum over classes, then average over the batch (timm's option); replaces
            ``reduction``.
    """

    def __init__(
        self,
        reduction: Literal["none", "mean", "sum"] = "none",
        normalize_output: bool = False,
        world_size: int = 1,
        smoothing: float = 0.0,
        target_threshold: float | None = None,
        pos_weight: float | list[float] | None = None,
        sum_classes: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ConfigError(f"{_KEY}.reduction='{reduction}': expected one of {', '.join(_REDUCTIONS)}.")
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError(f"{_KEY}.smoothing={smoothing}: expected a value in [0, 1).")
        if isinstance(pos_weight, (list, tuple)) and not pos_weight:
            raise ConfigError(f"{_KEY}.pos_weight=[]: expected a float, one float per class, or null.")
        self.reduction = reduction
        self.normalize_output = normalize_output
        self.smoothing = smoothing
        self.target_threshold = target_threshold
        self.sum_classes = sum_classes
        weight = torch.tensor(pos_weight, dtype=torch.float) if pos_weight is not None else None
        self.register_buffer("pos_weight", weight, persistent=False)

    def binary_target(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The [B, C] target the loss compares ``logits`` [B, C] with: class indices one-hot and
        smoothed, a dense target as given; then thresholded when ``target_threshold`` is set.
        Entries of a dense target equal to -1 (unknown labels) are left out by the loss."""
        if target.shape == logits.shape:
            dense = target.to(dtype=logits.dtype)
        elif target.ndim == 1 and target.shape[0] == logits.shape[0]:
            off = self.smoothing / logits.shape[-1]
            on = 1.0 - self.smoothing + off
            dense = torch.full_like(logits, off).scatter_(1, target.long().view(-1, 1), on)
        else:
            raise ValueError(
                f"bce_logits_multiple_output_single_target: target of shape {tuple(target.shape)} fits neither "
                f"the logits {tuple(logits.shape)} nor one class index per sample"
            )
        if self.target_threshold is not None:
            dense = dense.gt(self.target_threshold).to(dtype=logits.dtype)
        return dense

    def _one(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.normalize_output:
            logits = F.normalize(logits, dim=1)
        logits = logits.float()  # float32 under autocast too, as the cross-entropy loss
        num_classes = logits.shape[-1]
        if self.pos_weight is not None and self.pos_weight.numel() not in (1, num_classes):
            raise ConfigError(
                f"{_KEY}.pos_weight has {self.pos_weight.numel()} values; the model has {num_classes} classes "
                "(give one float, or one per class)."
            )
        # VISSL: -1 in a dense target is an unknown label (class indices have none)
        known = target != -1 if target.shape == logits.shape else None
        dense = self.binary_target(logits, target)
        loss = F.binary_cross_entropy_with_logits(logits, dense, pos_weight=self.pos_weight, reduction="none")
        if known is not None:
            loss = loss * known
        if self.sum_classes:  # [B, C] -> [B] -> scalar
            return loss.sum(dim=-1).mean()
        if self.reduction == "sum":
            return loss.sum()
        count = known.sum(dim=0 if self.reduction == "none" else None) if known is not None else None
        if self.reduction == "mean":
            return loss.sum() / count.clamp(min=1) if count is not None else loss.mean()
        # "none", VISSL's: per class the mean over its labelled samples, summed over classes
        per_class = loss.sum(dim=0) / (count.clamp(min=1) if count is not None else loss.shape[0])
        return per_class.sum()

    def forward(self, output: list[torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outputs = [output] if isinstance(output, torch.Tensor) else list(output)
        # the sum, as VISSL's: each head's gradient is that of its own loss
        return torch.stack([self._one(logits, target) for logits in outputs]).sum(dim=0)
