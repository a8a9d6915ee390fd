"""Phase hooks: the train meter and the test phases, each writing a metrics.json line per phase.

metrics.json follows VISSL: ``{"iteration": 500, "phase_idx": 3, "train_phase_idx": 1,
"test_accuracy_list_meter": {"top_1": {"0": 87.3}}}``, phases numbered in the order they ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.engine.hooks.guards import BadImages, bad_in_batches, gather_objects
from vissl_vit.engine.hooks.loggers import metrics_loggers
from vissl_vit.models.ema import ModelEma
from vissl_vit.registry import HOOKS
from vissl_vit.utils.logging import JsonLinesWriter, describe_phase, progress_bar
from vissl_vit.utils.tensors import to_device

logger = logging.getLogger(__name__)


class PhaseWriter:
    """Writes each phase's values: a metrics.json line (rank 0), tensorboard scalars, and the same
    record to every metrics logger of the trainer (CSV, W&B, MLflow, the console's epoch line:
    loggers.py). The console line is the epoch summary hook's, not this writer's.

    TensorBoard tags, at the phase's iteration: ``<phase>/loss`` (``train/loss`` is the epoch's mean
    loss, ``test/loss`` the test set's), ``<phase>/<metric>/<output>`` for the run's meter
    (``test/top_1/0``), ``<phase>/loss_ema`` and ``<phase>_<meter>_ema/<metric>/<output>`` for the
    EMA's. The per-step values are the LogHook's, under ``step/`` (logging_hooks.STEP_TAG): no tag
    holds both a step's value and a phase's mean.

    Args:
        metrics_json: the metrics.json writer, or None on ranks > 0.
        tb_writer: tensorboard SummaryWriter, or None.
        meter_name: METERS.name: the run's meter is written under ``<phase>_<meter_name>``.
    """

    def __init__(self, metrics_json: JsonLinesWriter | None, tb_writer: Any, meter_name: str) -> None:
        self.metrics_json, self.tb, self.meter_name = metrics_json, tb_writer, meter_name

    def write(self, trainer: Any, prefix: str, train_phase_idx: int, values: dict[str, Any]) -> dict[str, Any]:
        """Write one phase (``prefix``: "train" or "test"); returns its metrics.json record."""
        record = {"iteration": trainer.iteration, "phase_idx": trainer.phase_idx, "train_phase_idx": train_phase_idx}
        record.update({f"{prefix}_{k}": v for k, v in values.items()})
        trainer.phase_idx += 1
        if self.metrics_json is not None:
            self.metrics_json.write(record)
        for sink in metrics_loggers(trainer):
            sink.log_phase(prefix, record)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, dict):  # meter: {"top_1": {"0": 87.3}}
                    # the run's meter under the phase's name, another (the EMA's) under its own key
                    tag = prefix if k == self.meter_name else f"{prefix}_{k}"
                    for metric, per_output in v.items():
                        for out, val in per_output.items():
                            self.tb.add_scalar(f"{tag}/{metric}/{out}", val, trainer.iteration)
                else:
                    self.tb.add_scalar(f"{prefix}/{k}", v, trainer.iteration)
        return record


@HOOKS.register("train_meter_hook")
class TrainMeterHook(HookBase):
    """Accumulate the train meter and mean loss over each epoch; one metrics.json line per epoch.

    The loss sum stays a float64 tensor on the loss's device during the epoch: adding a step's
    loss to it does not wait for the device (``.item()`` per step would), and float64 adds the
    float32 losses as exactly as Python floats do. The host reads it once, at the epoch's end (and
    when a checkpoint asks for the state, which stores plain floats).
    """

    def __init__(self, meter: Any, writer: PhaseWriter, all_reduce: Any) -> None:
        self.meter, self.writer, self.all_reduce = meter, writer, all_reduce
        self.loss_sum: torch.Tensor | float = 0.0
        self.steps = 0

    def after_step(self) -> None:
        last = self.trainer.last
        loss = last.loss.detach().to(torch.float64)
        if isinstance(self.loss_sum, torch.Tensor):
            self.loss_sum += loss
        else:  # the epoch's first step, or the first after a resume: start from the float so far
            self.loss_sum = loss + self.loss_sum
        self.steps += 1
        if self.meter is not None:
            for m in last.micro:
                self.meter.update(m.outputs, m.target)

    def _loss_sum(self) -> float:
        return float(self.loss_sum)  # the host sync (a float stays itself)

    def after_epoch(self) -> None:
        totals = self.all_reduce(torch.tensor([self._loss_sum(), float(self.steps)], dtype=torch.float64))
        values: dict[str, Any] = {"loss": (totals[0] / totals[1].clamp(min=1)).item()}
        if self.meter is not None:
            self.meter.sync(self.all_reduce)
            values[self.writer.meter_name] = self.meter.value()
            self.meter.reset()
        self.writer.write(self.trainer, "train", self.trainer.epochs_done - 1, values)
        self.loss_sum, self.steps = 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"loss_sum": self._loss_sum(), "steps": self.steps}
        if self.meter is not None:
            state["meter"] = {"correct": self.meter.correct.cpu(), "count": self.meter.count}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum, self.steps = state["loss_sum"], state["steps"]
        if self.meter is not None and "meter" in state:
            self.meter.correct, self.meter.count = state["meter"]["correct"], state["meter"]["count"]


@HOOKS.register("test_hook")
class TestHook(HookBase):
    """Evaluate on the test loader every ``every_n_epochs`` epochs and after the last one.

    Args:
        loader: the test loader.
        meter: the test meter.
        writer: writes metrics.json lines.
        every_n_epochs: TEST_EVERY_NUM_EPOCH.
        num_epochs: epochs in all (the last always gets a test phase).
        all_reduce: sums a tensor over ranks.
        max_bad_fraction: DATA.MAX_BAD_IMAGE_FRACTION: a test phase in which more than this fraction
            of the test images (distinct, united over ranks) could not be read stops the run.
        gather: every rank's object, in rank order.
        ema: the model EMA (HOOKS.EMA_MODEL.ENABLE_EMA_METERS), evaluated on the same batches as
            the model, with its own loss and meter; written beside the model's, under keys with
            the suffix ``_ema`` (VISSL's ``metric_key_name_suffix="ema"``: ``test_loss_ema``,
            ``test_accuracy_list_meter_ema``). None: the model only.
        ema_meter: the EMA's meter, built as ``meter`` is (None without a meter).
        progress_bar: show a bar over the test batches (rank 0, when stderr is a terminal).
    """

    def __init__(
        self,
        loader: DataLoader,
        meter: Any,
        writer: PhaseWriter,
        every_n_epochs: int,
        num_epochs: int,
        all_reduce: Any,
        max_bad_fraction: float,
        gather: Callable[[Any], list[Any]] = gather_objects,
        ema: ModelEma | None = None,
        ema_meter: Any = None,
        progress_bar: bool = False,
    ) -> None:
        self.loader, self.meter, self.writer = loader, meter, writer
        self.every_n_epochs, self.num_epochs, self.all_reduce = every_n_epochs, num_epochs, all_reduce
        self.max_bad_fraction, self.gather = max_bad_fraction, gather
        self.ema, self.ema_meter = ema, ema_meter
        self.show_bar = progress_bar
        self._training = False  # in trainer.train(): the epoch summary hook logs the phase's line
        # the newest test phase's (train_phase_idx, values), for the checkpoint's best-by-metric
        self.last_values: tuple[int, dict[str, Any]] | None = None

    def before_train(self) -> None:
        self._training = True

    def after_train(self) -> None:
        self._training = False

    def after_epoch(self) -> None:
        t = self.trainer
        done = t.epochs_done
        if done % self.every_n_epochs == 0 or done == self.num_epochs or t.iteration >= t.max_iterations:
            self.run_test(done - 1)

    @torch.no_grad()
    def run_test(self, train_phase_idx: int) -> dict[str, Any]:
        """One pass over the test set in eval mode (the model, and the EMA when there is one);
        returns and writes the meters' values."""
        t = self.trainer
        model = t.model
        was_training = model.training
        model.eval()
        self.loader.sampler.set_epoch(0)
        self.loader.sampler.set_start_iteration(0)
        # one evaluation per model: (model, its device, its meter, [loss sum]); the EMA may live
        # on the CPU while the model trains on the GPU
        evals = [_Eval(model, t.device, self.meter)]
        if self.ema is not None:
            evals.append(_Eval(self.ema.module, self.ema.device, self.ema_meter))
        n = 0
        found: dict[int, str] = {}  # unreadable test images met by this rank
        bar = progress_bar(self.show_bar, len(self.loader), "test", unit="batch")
        try:
            for batch in self.loader:
                found.update(bad_in_batches([batch]))
                for e in evals:
                    e.run(t, batch)
                n += len(batch["label"])
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        bad = BadImages("TEST", len(self.loader.dataset), self.max_bad_fraction)
        bad.report_and_check(self.gather(found), f" in the test phase after epoch {train_phase_idx}")
        values: dict[str, Any] = {}
        for e, suffix in zip(evals, ("", "_ema")):
            totals = self.all_reduce(torch.tensor([e.loss_sum, float(n)], dtype=torch.float64))
            values[f"loss{suffix}"] = (totals[0] / totals[1].clamp(min=1)).item()
            if e.meter is not None:
                e.meter.sync(self.all_reduce)
                values[f"{self.writer.meter_name}{suffix}"] = e.meter.value()
        record = self.writer.write(t, "test", train_phase_idx, values)
        if not self._training:  # TEST_ONLY: no epoch line will say it
            logger.info("TEST_ONLY, the model at iteration %d:  %s", t.iteration, describe_phase("test", record))
        model.train(was_training)
        self.last_values = (train_phase_idx, values)
        return values


class _Eval:
    """One model's share of a test phase: its forwards, loss sum and meter."""

    def __init__(self, model: torch.nn.Module, device: torch.device, meter: Any) -> None:
        self.model, self.device, self.meter = model, device, meter
        self.loss_sum = 0.0
        if meter is not None:
            meter.reset()

    def run(self, trainer: Any, batch: dict[str, Any]) -> None:
        data = to_device(batch["data"], self.device)
        target = batch["label"].to(trainer.device, non_blocking=True)
        with trainer.autocast():
            outputs = self.model(data)
            if self.device != trainer.device:  # a CPU EMA: loss and meter where the loss's state is
                outputs = [to_device(o, trainer.device) for o in outputs]
            self.loss_sum += trainer.loss_fn(outputs, target).item() * len(target)
        if self.meter is not None:
            self.meter.update(outputs, target)
