"""The toy trainer the engine's unit tests share (detectron2's tests/test_engine.py style): a linear
regression on fixed batches, run by the real Trainer without composing a config.

    ToySampler     what the Trainer needs of a sampler (set_epoch, set_start_iteration, len)
    ToyLoader(n)   n fixed batches of 4 samples of a regression: data [4, 3], label [4, 1],
                   seeded (the same batches in every test); with_bad_fields adds the dataset's
                   unreadable-image fields (index, bad, bad_path), none unreadable unless bad_at
    ToyRegression  nn.Linear(3, 1) named as the checkpoint expects (trunk.*)
    toy_trainer(loader, model, ...)  Trainer(model(), MSE, SGD lr 0.1, constant lr 0.1, CPU), seeded
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fvcore.common.param_scheduler import ConstantParamScheduler
from torch import nn

from vissl_vit.engine.trainer import Trainer


class ToySampler:
    def __init__(self, n: int) -> None:
        self.n = n

    def set_epoch(self, epoch: int) -> None: ...

    def set_start_iteration(self, it: int) -> None: ...

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


class ToyLoader:
    """``n`` fixed batches of 4 samples of a linear regression (what the Trainer needs of a DataLoader)."""

    def __init__(self, n: int = 8, with_bad_fields: bool = False, bad_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches: list[dict[str, Any]] = []
        for i in range(n):
            batch: dict[str, Any] = {"data": torch.randn(4, 3, generator=g), "label": torch.randn(4, 1, generator=g)}
            if with_bad_fields:
                index = torch.arange(4 * i, 4 * i + 4)
                bad = torch.zeros(4, dtype=torch.long)
                if i == bad_at:
                    bad[1] = 1
                paths = [f"/d/{j}.jpg" if b else "" for j, b in zip(index.tolist(), bad.tolist())]
                batch.update(index=index, bad=bad, bad_path=paths)
            self.batches.append(batch)
        self.sampler = ToySampler(n)
        self.dataset = list(range(4 * n))

    def __iter__(self):
        return iter(self.batches)


class ToyRegression(nn.Module):
    """A linear regression named as the checkpoint expects (trunk.*)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


def toy_trainer(
    loader: ToyLoader | None = None,
    model: Callable[[], nn.Module] = ToyRegression,
    iterations_per_epoch: int = 8,
    max_iterations: int | None = None,
    **kwargs: Any,
) -> Trainer:
    """A Trainer of ``model()`` (default ToyRegression, built after seeding 0) on ``loader`` (default
    8 batches): MSE, SGD at lr 0.1, a constant lr of 0.1, on the CPU; ``max_iterations`` defaults to
    one epoch; other keyword arguments go to Trainer (accumulation, amp_dtype, sync_every, ...)."""
    torch.manual_seed(0)
    net = model()
    return Trainer(
        net,
        nn.MSELoss(),
        torch.optim.SGD(net.parameters(), lr=0.1),
        ConstantParamScheduler(0.1),
        ToyLoader() if loader is None else loader,
        iterations_per_epoch=iterations_per_epoch,
        max_iterations=iterations_per_epoch if max_iterations is None else max_iterations,
        update_interval="step",
        device=torch.device("cpu"),
        **kwargs,
    )
