"""Logging hooks: stdout.json + log.txt lines, tensorboard scalars, a progress bar."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.registry import HOOKS
from vissl_vit.utils.distributed import get_world_size
from vissl_vit.utils.logging import JsonLinesWriter

logger = logging.getLogger(__name__)


@HOOKS.register("log_hook")
class LogHook(HookBase):
    """Every ``log_frequency`` steps (and the last): a line in log.txt, stdout.json and tensorboard.

    stdout.json fields: iteration (completed steps), epoch, loss (this step's), lr, images_per_sec
    (since the previous line, this process x world size), eta_seconds, time (unix seconds). The
    loss is the mean over ranks, so it does not depend on how the global batch is split.

    The loss of a step to log is filed with the step scalars (:class:`StepScalars`) and read at
    the step's sync point with the other scalars: no host sync or collective of its own.

    Args:
        log_frequency: steps between lines.
        stdout_json: writer of stdout.json, or None on ranks > 0.
        tb_writer: tensorboard SummaryWriter, or None.
        world_size: processes (images/s counts the global batch).
        all_reduce: sums a tensor over ranks (the logged loss is the mean over ranks).
    """

    def __init__(
        self, log_frequency: int, stdout_json: JsonLinesWriter | None, tb_writer: Any, world_size: int, all_reduce: Any
    ) -> None:
        self.log_frequency, self.stdout_json, self.tb = log_frequency, stdout_json, tb_writer
        self.world_size, self.all_reduce = world_size, all_reduce

    def before_train(self) -> None:
        self._t0, self._it0, self._images = time.perf_counter(), self.trainer.iteration, 0
        self._start_t, self._start_it = self._t0, self.trainer.iteration

    def before_epoch(self) -> None:
        # images/s measures training only: restart the window after the test phase
        self._t0, self._images = time.perf_counter(), 0

    def _logs(self, step: int) -> bool:
        return step % self.log_frequency == 0 or step == self.trainer.max_iterations

    def before_optimizer_step(self) -> None:
        t = self.trainer
        if self._logs(t.iteration + 1):
            # every rank takes part: the logged loss is the global batch's, whatever the world size
            t.scalars.add("loss", t.last.loss, reducer=self.all_reduce)

    def after_step(self) -> None:
        t = self.trainer
        self._images += t.last.batch_size * self.world_size
        if not self._logs(t.iteration):
            return
        if t.scalars.has_pending("loss"):  # not when the trainer read them at this step (sync_every = log_frequency)
            t.sync()
        loss = t.scalars.latest("loss")[0] / self.world_size
        now = time.perf_counter()
        ips = self._images / max(now - self._t0, 1e-9)
        per_iter = (now - self._start_t) / max(t.iteration - self._start_it, 1)
        record = {
            "iteration": t.iteration,
            "epoch": (t.iteration - 1) // t.iterations_per_epoch,
            "loss": loss,  # full precision: resumed and uninterrupted runs compare equal
            "lr": t.last.lr,
            "images_per_sec": round(ips, 2),
            "eta_seconds": round(per_iter * (t.max_iterations - t.iteration), 1),
            "time": time.time(),
        }
        self._t0, self._images = now, 0
        if self.stdout_json is not None:
            self.stdout_json.write(record)
            logger.info(
                "iter %d/%d epoch %d loss %.4f lr %.4g %.1f img/s eta %ds",
                t.iteration,
                t.max_iterations,
                record["epoch"],
                record["loss"],
                record["lr"],
                ips,
                int(record["eta_seconds"]),
            )
        if self.tb is not None:
            for k in ("loss", "lr", "images_per_sec"):
                self.tb.add_scalar(f"train/{k}", record[k], t.iteration)


@HOOKS.register("progress_bar_hook")
class ProgressBarHook(HookBase):
    """A tqdm bar over iterations on rank 0, shown only when stderr is a terminal."""

    def __init__(self, log_frequency: int) -> None:
        self.log_frequency = log_frequency
        self.bar = None

    def before_train(self) -> None:
        if sys.stderr.isatty():
            from tqdm import tqdm

            t = self.trainer
            self.bar = tqdm(total=t.max_iterations, initial=t.iteration, unit="it", dynamic_ncols=True)
            self._t, self._n = time.perf_counter(), 0

    def after_step(self) -> None:
        if self.bar is None:
            return
        t = self.trainer
        self.bar.update(1)
        self._n += t.last.batch_size
        if t.iteration % self.log_frequency == 0:
            now = time.perf_counter()
            loss = t.scalars.latest("loss")  # the log hook's, read at this step: no host sync of its own
            self.bar.set_postfix(
                epoch=t.epoch,
                loss=f"{loss[0] / get_world_size():.4f}" if loss else "-",
                lr=f"{t.last.lr:.3g}",
                img_s=f"{self._n / max(now - self._t, 1e-9):.0f}",
            )
            self._t, self._n = now, 0

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()
