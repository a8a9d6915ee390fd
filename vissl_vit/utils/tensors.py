"""Moving batches to devices."""

from __future__ import annotations

import torch


def to_device(data: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """A batch's data (a tensor, or a list of views) on the device."""
    if isinstance(data, (list, tuple)):
        return [d.to(device, non_blocking=True) for d in data]
    return data.to(device, non_blocking=True)
