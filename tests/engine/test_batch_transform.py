"""Trainer's batch_transform: a per-micro-batch transform on the device after the transfer
(big_vision's mixup runs there), numbered from the run's start so that resume is exact."""

from __future__ import annotations

import torch
from torch import nn

from tests.engine.toy import ToyLoader, toy_trainer
from vissl_vit.engine.hooks import HookBase
from vissl_vit.engine.trainer import Trainer


def _trainer(transform) -> Trainer:  # noqa: ANN001
    model = lambda: nn.Linear(3, 1)  # noqa: E731
    return toy_trainer(
        ToyLoader(4), model, iterations_per_epoch=2, max_iterations=4, accumulation=2, batch_transform=transform
    )


def test_each_micro_batch_is_transformed_before_the_forward_and_numbered_from_the_start():
    numbers, losses = [], []

    def double(data: torch.Tensor, target: torch.Tensor, number: int) -> tuple[torch.Tensor, torch.Tensor]:
        numbers.append(number)
        return 2 * data, target + number

    class _Loss(HookBase):
        def after_step(self) -> None:
            losses.append(float(self.trainer.last.loss))

    trainer = _trainer(double)
    trainer.register_hooks([_Loss()])
    trainer.train()
    assert numbers == list(range(8))  # 4 steps x 2 micro-batches
    # the model saw the transformed batches: the same steps by hand give the same losses
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches, expected = ToyLoader(4).batches, []
    for step in range(4):
        opt.zero_grad()
        total = torch.zeros(())  # summed in float32, as the trainer does
        for i in range(2):
            b = batches[(2 * step + i) % 4]
            loss = nn.functional.mse_loss(model(2 * b["data"]), b["label"] + 2 * step + i)
            (loss / 2).backward()
            total += loss.detach() / 2
        opt.step()
        expected.append(float(total))
    # (float32 rounding of the two loops' op order differs by ~1e-7; a batch not transformed would
    # differ by far more)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-6, atol=0)


def test_a_resumed_run_numbers_its_micro_batches_where_the_first_left_off():
    numbers = []
    trainer = _trainer(lambda d, t, n: (numbers.append(n), (d, t))[1])
    trainer.iteration = 3  # as restored from a checkpoint of iteration 3
    trainer.train()
    assert numbers == [6, 7]
