"""Cross-entropy of each of a model's outputs against one target (VISSL's name and options)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vissl_vit.registry import LOSSES


@LOSSES.register("cross_entropy_multiple_output_single_target")
class CrossEntropyMultipleOutputSingleTargetLoss(nn.Module):
    """Sum over outputs of ``CE(output / temperature, target)``, as VISSL's criterion sums them.

    With several outputs (one linear probe per feature), each head's gradient is that of its own
    loss: every probe trains as if it were alone, whatever the number of heads.

    The target is a class index per sample ([B], int) or a distribution per sample ([B, C],
    float, e.g. mixup's soft labels); label smoothing applies to both, as in torch.

    Args:
        weight: per-class weights, or None.
        ignore_index: class index whose samples are ignored (index targets only).
        reduction: "mean", "sum" or "none" over the batch.
        normalize_output: L2-normalise the logits first (cosine classifier).
        temperature: logits are divided by it; must be > 0.
        label_smoothing: in [0, 1).
    """

    def __init__(
        self,
        weight: list[float] | None = None,
        ignore_index: int = -100,
        reduction: Literal["mean", "sum", "none"] = "mean",
        normalize_output: bool = False,
        temperature: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.register_buffer("weight", torch.tensor(weight, dtype=torch.float) if weight is not None else None)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.normalize_output = normalize_output
        self.temperature = temperature
        self.label_smoothing = label_smoothing

    def forward(self, output: list[torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outputs = [output] if isinstance(output, torch.Tensor) else list(output)
        losses = []
        for logits in outputs:
            if self.normalize_output:
                logits = F.normalize(logits, dim=-1)
            logits = logits.float() / self.temperature
            kwargs = {"ignore_index": self.ignore_index} if not target.is_floating_point() else {}
            losses.append(
                F.cross_entropy(
                    logits,
                    target,
                    weight=self.weight,
                    reduction=self.reduction,
                    label_smoothing=self.label_smoothing,
                    **kwargs,
                )
            )
        # the sum, not the mean: with the mean each of n heads would get 1/n of its gradient
        return torch.stack(losses).sum(dim=0)


class TorchLoss(nn.Module):
    """A torch.nn loss applied to each model output, averaged over outputs."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, output: list[torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outputs = [output] if isinstance(output, torch.Tensor) else list(output)
        return torch.stack([self.loss(o, target) for o in outputs]).mean(dim=0)
