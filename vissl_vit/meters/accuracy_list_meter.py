"""Top-k accuracy of each of a model's outputs (VISSL's accuracy_list_meter)."""

from __future__ import annotations

import torch

from vissl_vit.registry import METERS


@METERS.register("accuracy_list_meter")
class AccuracyListMeter:
    """Running top-k accuracies, in percent, one set per model output.

    Soft (2-D) targets count their argmax as the class, as VISSL does for mixup targets.

    Args:
        num_meters: number of model outputs measured.
        topk_values: which k.
        meter_names: a name per output for the reported values; empty uses "0", "1", ...
    """

    def __init__(self, num_meters: int, topk_values: list[int], meter_names: list[str]) -> None:
        if meter_names and len(meter_names) != num_meters:
            raise ValueError(f"meter_names has {len(meter_names)} names for num_meters={num_meters}")
        self.num_meters = num_meters
        self.topk = list(topk_values)
        self.names = list(meter_names) or [str(i) for i in range(num_meters)]
        self.reset()

    def reset(self) -> None:
        self.correct = torch.zeros(self.num_meters, len(self.topk), dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def update(self, outputs: list[torch.Tensor], target: torch.Tensor) -> None:
        if len(outputs) != self.num_meters:
            raise ValueError(
                f"accuracy_list_meter: num_meters={self.num_meters} but the model has {len(outputs)} outputs"
            )
        if target.ndim == 2:
            target = target.argmax(dim=1)
        maxk = max(self.topk)
        if self.correct.device != target.device:  # the counts live where the outputs are: no host read per step
            self.correct = self.correct.to(target.device)
        for m, out in enumerate(outputs):
            pred = out.topk(min(maxk, out.shape[1]), dim=1).indices  # [B, k]
            hit = pred == target[:, None]
            self.correct[m] += torch.stack([hit[:, :k].any(dim=1).sum() for k in self.topk]).to(self.correct.dtype)
        self.count += target.shape[0]

    def sync(self, all_reduce) -> None:
        """Sum the counts over ranks with ``all_reduce(tensor)`` (a no-op on one process)."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.correct.device)
        t = torch.cat([self.correct.flatten(), count])
        t = all_reduce(t)
        self.correct = t[:-1].reshape(self.correct.shape)
        self.count = int(t[-1].item())

    def value(self) -> dict[str, dict[str, float]]:
        """``{"top_1": {"0": 76.1}, "top_5": {...}}``: VISSL's layout in metrics.json."""
        acc = (self.correct / max(self.count, 1) * 100.0).cpu()
        return {
            f"top_{k}": {name: round(acc[m, j].item(), 4) for m, name in enumerate(self.names)}
            for j, k in enumerate(self.topk)
        }
