"""Logging hooks: stdout.json + log.txt lines, tensorboard scalars, progress bars, the console's
line per epoch and results table, and the run's env.json."""

from __future__ import annotations

import glob
import logging
import os
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.engine.hooks.loggers import MetricsLogger, metrics_loggers
from vissl_vit.registry import HOOKS
from vissl_vit.utils.distributed import get_world_size
from vissl_vit.utils.environment import describe_environment, write_environment
from vissl_vit.utils.logging import (
    SHOWN_BY_BAR,
    JsonLinesWriter,
    epoch_line,
    format_duration,
    progress_bar,
    read_json_lines,
    results_table,
)

logger = logging.getLogger(__name__)

# TensorBoard's section of the per-step scalars (the LogHook's); the phases' means are under
# "train/" and "test/" (phases.PhaseWriter). The same prefix as W&B's and MLflow's step scalars.
STEP_TAG = "step"
# The metrics the HParams tab shows beside the hyper-parameters: tags the PhaseWriter writes.
HPARAM_METRICS = ("train/loss", "test/loss", "test/top_1/0")


def _scalar(v: Any) -> bool | int | float | str:
    """A value TensorBoard's HParams tab takes: bool, number or string (anything else as text)."""
    return v if isinstance(v, (bool, int, float, str)) else str(v)


def run_hparams(cfg: DictConfig, world_size: int) -> dict[str, bool | int | float | str]:
    """The run's main hyper-parameters, flat, for TensorBoard's HParams tab: trunk, loss, optimizer
    and its weight decay, length, batch sizes, seed, and every keyword argument of the trunk
    (``trunk.<kwarg>``, e.g. ``trunk.norm_layer``: what the comparisons of issue 16 vary).

    Args:
        cfg: the ``config`` node.
        world_size: processes in the run (the global batch).
    """
    from vissl_vit.models.trunks.base import trunk_class

    o, d = cfg.OPTIMIZER, cfg.DATA.TRAIN
    h: dict[str, Any] = {
        "trunk": cfg.MODEL.TRUNK.NAME,
        "loss": cfg.LOSS.name,
        "optimizer": o.name,
        "weight_decay": o.weight_decay,
        "lr_schedule": o.param_schedulers.lr.name,
        "num_epochs": o.num_epochs,
        "num_train_steps": o.num_train_steps,
        "batch_size_per_replica": d.BATCHSIZE_PER_REPLICA,
        "global_batch_size": d.BATCHSIZE_PER_REPLICA * world_size * o.grad_accumulation_steps,
        "world_size": world_size,
        "seed": cfg.SEED_VALUE,
        "collate_function": d.COLLATE_FUNCTION,
    }
    kwargs = trunk_class(cfg.MODEL.TRUNK).kwargs_from_config(cfg.MODEL.TRUNK)
    h.update({f"trunk.{k}": v for k, v in kwargs.items()})
    return {k: _scalar(OmegaConf.to_container(v) if isinstance(v, DictConfig) else v) for k, v in h.items()}


def _fresh_writer(tb: Any) -> bool:
    """Whether ``tb``'s folder holds no event file but its own (no earlier process wrote there)."""
    return len(glob.glob(os.path.join(tb.get_logdir(), "events.out.tfevents.*"))) <= 1


def write_hparams(tb: Any, hparams: dict[str, Any], step: int) -> None:
    """``hparams`` to the HParams tab (linked to :data:`HPARAM_METRICS`) and, as a markdown table,
    to the Text tab under the tag ``hparams``; written to ``tb``'s own event file."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    values = {k: _scalar(v) for k, v in hparams.items()}
    exp, ssi, sei = hparams_summary(values, {m: 0.0 for m in HPARAM_METRICS})
    writer = tb._get_file_writer()  # SummaryWriter.add_hparams would open a writer in a sub-folder
    for summary in (exp, ssi, sei):
        writer.add_summary(summary, step)
    table = "| hyper-parameter | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in values.items())
    tb.add_text("hparams", table, step)


@HOOKS.register("log_hook")
class LogHook(HookBase):
    """Every ``log_frequency`` steps (and the last): a line in log.txt, stdout.json and tensorboard,
    and the same record to every metrics logger (CSV, W&B, MLflow: see loggers.py).

    TensorBoard tags: the step's values go under ``step/`` (``step/loss``, ``step/lr``,
    ``step/images_per_sec``, at the completed iteration), as for W&B and MLflow; the phases' means
    (``train/loss``, ``test/loss``, ``test/top_1/0``, ...) are the PhaseWriter's (phases.py), so the
    step loss and the epoch mean never share a tag. Before the first step, on the writer's rank
    (rank 0), the run's hyper-parameters (``hparams``, plus the schedule's peak ``lr_peak``) go to
    TensorBoard's HParams tab and, as a table, to its Text tab (tag ``hparams``): once per run, in the
    run's own event folder (``tb_logs``, not a sub-folder as ``SummaryWriter.add_hparams`` would),
    so the HParams tab links them to the ``train/loss`` and ``test/...`` curves. A resume writes
    them again only when the writer is fresh, i.e. ``tb_logs`` holds no event file of an earlier
    process (the run was resumed with tensorboard newly on, or the folder was cleared); a run from
    scratch (iteration 0) always writes them.

    stdout.json fields: iteration (completed steps), epoch (from 0), loss (this step's), lr,
    images_per_sec (since the previous line, this process x world size), eta_seconds, time (unix
    seconds). The loss is the mean over ranks, so it does not depend on how the global batch is
    split. The log.txt line is left off the console while a progress bar shows the same numbers.

    The loss of a step to log is filed with the step scalars (:class:`StepScalars`) and read at
    the step's sync point with the other scalars: no host sync or collective of its own.

    Args:
        log_frequency: steps between lines.
        stdout_json: writer of stdout.json, or None on ranks > 0.
        tb_writer: tensorboard SummaryWriter, or None.
        world_size: processes (images/s counts the global batch).
        all_reduce: sums a tensor over ranks (the logged loss is the mean over ranks).
        hparams: the run's hyper-parameters for TensorBoard (:func:`run_hparams`); None or empty:
            none written.
    """

    def __init__(
        self,
        log_frequency: int,
        stdout_json: JsonLinesWriter | None,
        tb_writer: Any,
        world_size: int,
        all_reduce: Any,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        self.log_frequency, self.stdout_json, self.tb = log_frequency, stdout_json, tb_writer
        self.world_size, self.all_reduce = world_size, all_reduce
        self.hparams = dict(hparams or {})

    def before_train(self) -> None:
        self._t0, self._it0, self._images = time.perf_counter(), self.trainer.iteration, 0
        self._start_t, self._start_it = self._t0, self.trainer.iteration
        if self.tb is not None and self.hparams and _fresh_writer(self.tb):  # not again on resume
            hparams = dict(self.hparams)
            # the schedule's peak, as trained (auto-scaled): sampled over the run's progress
            hparams["lr_peak"] = max(float(self.trainer.lr_scheduler(i / 1000)) for i in range(1000))
            write_hparams(self.tb, hparams, self.trainer.iteration)

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
                "iter %d/%d epoch %d loss %.4f lr %.4g %.1f img/s eta %s",
                t.iteration,
                t.max_iterations,
                record["epoch"],
                record["loss"],
                record["lr"],
                ips,
                format_duration(record["eta_seconds"]),
                extra={SHOWN_BY_BAR: True},
            )
        for sink in metrics_loggers(t):
            sink.log_step(record)
        if self.tb is not None:
            for k in ("loss", "lr", "images_per_sec"):
                self.tb.add_scalar(f"{STEP_TAG}/{k}", record[k], t.iteration)


@HOOKS.register("progress_bar_hook")
class ProgressBarHook(HookBase):
    """A tqdm bar per training epoch on rank 0 (``epoch 3/10``, over the epoch's steps), shown only
    when stderr is a terminal; it vanishes at the epoch's end, where the epoch's line is logged.

    Its postfix, updated every ``log_frequency`` steps, shows the logged loss, the lr, images/s
    (this process) and the time left for the whole run. Log lines written meanwhile go above the
    bar (``utils.logging.ConsoleHandler``).

    Args:
        log_frequency: steps between postfix updates (LOG_FREQUENCY: the loss is read then).
        num_epochs: epochs in all (the bar's label).
    """

    def __init__(self, log_frequency: int, num_epochs: int) -> None:
        self.log_frequency, self.num_epochs = log_frequency, num_epochs
        self.bar = None

    def before_train(self) -> None:
        self._start_t, self._start_it = time.perf_counter(), self.trainer.iteration

    def before_epoch(self) -> None:
        t = self.trainer
        self.bar = progress_bar(
            True, t.iterations_per_epoch, f"epoch {t.epoch + 1}/{self.num_epochs}", t.iteration % t.iterations_per_epoch
        )
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
            per_iter = (now - self._start_t) / max(t.iteration - self._start_it, 1)
            self.bar.set_postfix(
                {  # in this order (keyword arguments would be sorted by name)
                    "loss": f"{loss[0] / get_world_size():.4f}" if loss else "-",
                    "lr": f"{t.last.lr:.3g}",
                    "img/s": f"{self._n / max(now - self._t, 1e-9):.0f}",
                    "eta": format_duration(per_iter * (t.max_iterations - t.iteration)),
                }
            )
            self._t, self._n = now, 0

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def after_epoch(self) -> None:
        self._close()  # before the test phase, which shows its own bar

    def after_train(self) -> None:
        self._close()


@HOOKS.register("epoch_summary_hook")
class EpochSummaryHook(MetricsLogger):
    """The console's summary on rank 0: one line per epoch, after its test phase
    (``epoch 3/10  train loss 0.8412 top-1 84.70  |  test loss 0.8523 top-1 83.60  (1m12s)``),
    and a results table when training ends (best and last test top-1 with their epochs, the
    EMA's when it is evaluated, the last train loss, the wall time, the run folder), read from
    metrics.json so that a resumed run's table covers the whole run.

    Args:
        num_epochs: epochs in all.
        run_dir: the run folder (metrics.json).
    """

    def __init__(self, num_epochs: int, run_dir: str) -> None:
        self.num_epochs, self.run_dir = num_epochs, run_dir
        self.phases: list[tuple[str, dict[str, Any]]] = []  # this epoch's
        self.seen: list[dict[str, Any]] = []  # every phase of this process
        self._epoch_t = time.perf_counter()

    def before_train(self) -> None:
        self._train_t, self._start_it = time.perf_counter(), self.trainer.iteration

    def before_epoch(self) -> None:
        self._epoch_t, self.phases = time.perf_counter(), []

    def log_phase(self, phase: str, record: dict[str, Any]) -> None:
        self.phases.append((phase, record))
        self.seen.append(record)

    def after_epoch(self) -> None:
        if self.phases:
            epoch = self.phases[0][1]["train_phase_idx"] + 1
            logger.info("%s", epoch_line(epoch, self.num_epochs, self.phases, time.perf_counter() - self._epoch_t))
        self.phases = []

    def after_train(self) -> None:
        t = self.trainer
        if t.iteration < t.max_iterations:  # stopped early (an error, preemption): no results yet
            return
        records = read_json_lines(os.path.join(self.run_dir, "metrics.json")) or self.seen
        note = f"since the resume at iteration {self._start_it}" if self._start_it else ""
        logger.info(
            "%s", results_table(records, self.num_epochs, self.run_dir, time.perf_counter() - self._train_t, note)
        )


@HOOKS.register("environment_hook")
class EnvironmentHook(HookBase):
    """env.json in the run folder at the start of training (rank 0): versions, devices, host,
    command line, git commit (``utils.environment``); one line of it in the log.

    Args:
        run_dir: the run folder.
        world_size: processes in the run.
    """

    def __init__(self, run_dir: str, world_size: int) -> None:
        self.run_dir, self.world_size = run_dir, world_size

    def before_train(self) -> None:
        env = write_environment(self.run_dir, self.world_size)
        logger.info("Environment: %s (%s)", describe_environment(env), os.path.join(self.run_dir, "env.json"))
