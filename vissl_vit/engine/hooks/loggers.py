"""Logging fan-out as hooks: the run's scalars to a CSV file (always), to Weights & Biases and to
MLflow (when asked for and installed).

A :class:`MetricsLogger` is a hook that receives the same numbers as the run's JSON files: each
stdout.json line (the per-step scalars, every LOG_FREQUENCY steps) through :meth:`log_step`, and each
metrics.json line (a train or test phase) through :meth:`log_phase`. Every registered hook that is
one receives them, on rank 0 (the engine builds loggers there only), so a logger of your own (say
Neptune's) is a MetricsLogger subclass in ``HOOKS.EXTRA``.
"""

from __future__ import annotations

import csv
import importlib
import io
import logging
import os
import secrets
from typing import Any

from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.errors import ConfigError
from vissl_vit.registry import HOOKS
from vissl_vit.utils.logging import PHASE_RECORD_KEYS

logger = logging.getLogger(__name__)

# stdout.json's per-step fields that are scalars worth plotting
STEP_FIELDS = ("loss", "lr", "images_per_sec", "eta_seconds")


class MetricsLogger(HookBase):
    """A hook that also receives the run's scalars (see the module's docstring)."""

    def log_step(self, record: dict[str, Any]) -> None:
        """A stdout.json line: iteration, epoch (from 0), loss, lr, images_per_sec, eta_seconds, time."""

    def log_phase(self, phase: str, record: dict[str, Any]) -> None:
        """A metrics.json line of a ``phase`` ("train" or "test"): iteration, phase_idx,
        train_phase_idx and the phase's values under keys starting with ``<phase>_``."""


def metrics_loggers(trainer: Any) -> list[MetricsLogger]:
    """The trainer's hooks that are metrics loggers, in hook order."""
    return [h for h in getattr(trainer, "hooks", ()) if isinstance(h, MetricsLogger)]


def phase_scalars(phase: str, record: dict[str, Any]) -> dict[str, float]:
    """A metrics.json record's values as flat scalars: ``{"loss": 0.85, "top_1": 83.6, "top_5": 97.1,
    "loss_ema": 0.86, "top_1_ema": 84.0}``. A meter with several outputs names each:
    ``top_1_res5``. Keys follow the record's, without the ``<phase>_`` prefix and the meter's name."""
    out: dict[str, float] = {}
    start = f"{phase}_"
    for key, value in record.items():
        if key in PHASE_RECORD_KEYS or not key.startswith(start):
            continue
        name = key[len(start) :]
        if not isinstance(value, dict):
            out[name] = float(value)
            continue
        suffix = "_ema" if name.endswith("_ema") else ""
        for metric, per_output in value.items():
            for output, v in per_output.items():
                column = metric if len(per_output) == 1 else f"{metric}_{output}"
                out[f"{column}{suffix}"] = float(v)
    return out


def import_for(module: str, key: str) -> Any:
    """``import module``, or a one-line ConfigError naming the config ``key`` that asked for it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"config.{key}=True but the package '{module}' is not installed: pip install {module}, "
            f"or set config.{key}=False."
        ) from None


# ---- CSV ----


@HOOKS.register("csv_logger")
class CsvLoggerHook(MetricsLogger):
    """<run folder>/metrics.csv: one row per stdout.json line (``kind`` step) and per metrics.json
    line (``kind`` train or test), for a spreadsheet or ``pandas.read_csv``.

    Columns: kind, iteration, epoch (counted from 0, as in the JSON files), phase_idx (phase rows),
    then each scalar under its own column (loss, lr, images_per_sec, eta_seconds, time; the meter's
    top_1, top_5, ...; ``_ema`` ones). A column that appears later (the first test phase) rewrites
    the file with the wider header; cells a row does not have are empty.

    After a resume the file holds what the checkpoint holds: step rows up to the resumed iteration
    and the phase rows the checkpoint counted (phase_idx below the resumed one); rows written after
    the checkpoint, by the run that was interrupted, are dropped before new ones are added, so no
    iteration or phase appears twice.

    Args:
        path: the CSV file.
    """

    FIRST = ("kind", "iteration", "epoch", "phase_idx")

    def __init__(self, path: str) -> None:
        self.path = path
        self.columns: list[str] = list(self.FIRST)
        self.rows: list[dict[str, str]] = []
        self._f: io.TextIOBase | None = None

    def before_train(self) -> None:
        self._open()

    def _open(self) -> None:
        """Read the rows kept from an earlier run (those the resumed checkpoint counted) and rewrite
        the file with them; later rows are appended."""
        if self._f is not None:
            return
        it, phases = self.trainer.iteration, self.trainer.phase_idx
        kept: list[dict[str, str]] = []
        if os.path.exists(self.path):
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                for row in reader:
                    if None in row or any(v is None for v in row.values()):  # a half-written last row
                        continue
                    if _keeps(row, it, phases):
                        kept.append(row)
            self.columns += [c for c in columns if c not in self.columns]
        self.rows = kept
        self._rewrite()

    def _rewrite(self) -> None:
        if self._f is not None:
            self._f.close()
        tmp = os.path.join(os.path.dirname(self.path), f".{os.path.basename(self.path)}.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns, restval="")
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", newline="")

    def _write(self, row: dict[str, Any]) -> None:
        self._open()
        row = {k: ("" if v is None else repr(v) if isinstance(v, float) else str(v)) for k, v in row.items()}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
            return
        csv.DictWriter(self._f, self.columns, restval="").writerow(row)
        self._f.flush()

    def log_step(self, record: dict[str, Any]) -> None:
        row: dict[str, Any] = {"kind": "step", "iteration": record["iteration"], "epoch": record["epoch"]}
        row.update({k: record[k] for k in (*STEP_FIELDS, "time") if k in record})
        self._write(row)

    def log_phase(self, phase: str, record: dict[str, Any]) -> None:
        row: dict[str, Any] = {
            "kind": phase,
            "iteration": record["iteration"],
            "epoch": record["train_phase_idx"],
            "phase_idx": record["phase_idx"],
        }
        row.update(phase_scalars(phase, record))
        self._write(row)

    def after_train(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _keeps(row: dict[str, str], iteration: int, phase_idx: int) -> bool:
    """Whether a row of an earlier run is one the resumed checkpoint counted."""
    try:
        if row["kind"] == "step":
            return int(row["iteration"]) <= iteration
        return int(row["phase_idx"]) < phase_idx
    except (KeyError, ValueError):
        return False


# ---- Weights & Biases and MLflow ----


def _run_id_file(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, name)


def _read_id(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _write_id(path: str, run_id: str) -> None:
    with open(path, "w") as f:
        f.write(run_id + "\n")


@HOOKS.register("wandb_logger")
class WandbLoggerHook(MetricsLogger):
    """Weights & Biases (HOOKS.WANDB_SETUP): the per-step scalars under ``step/`` (loss, lr,
    images_per_sec) and each phase's under ``train/`` or ``test/``, at the run's iteration as W&B's
    step; the composed config as the W&B run's config.

    The W&B run id is kept in <run folder>/wandb_run_id.txt: a resumed run continues the same W&B
    run (``resume="allow"``); W&B ignores steps it already has.

    Args:
        run_dir: the run folder.
        project: the W&B project.
        entity: the W&B team or user ("" for your default).
        run_name: the W&B run's name ("" for the run folder's name).
        config: the composed config, as plain containers.
    """

    def __init__(self, run_dir: str, project: str, entity: str, run_name: str, config: dict[str, Any]) -> None:
        self.wandb = import_for("wandb", "HOOKS.WANDB_SETUP.USE_WANDB")
        self.run_dir, self.project, self.entity = run_dir, project, entity
        self.run_name, self.config = run_name or os.path.basename(os.path.normpath(run_dir)), config
        self.run: Any = None

    def before_train(self) -> None:
        self._start()

    def _start(self) -> Any:
        if self.run is None:
            id_file = _run_id_file(self.run_dir, "wandb_run_id.txt")
            run_id = _read_id(id_file) or secrets.token_hex(4)
            self.run = self.wandb.init(
                project=self.project,
                entity=self.entity or None,
                name=self.run_name,
                id=run_id,
                resume="allow",
                dir=self.run_dir,
                config=self.config,
            )
            _write_id(id_file, run_id)
        return self.run

    def log_step(self, record: dict[str, Any]) -> None:
        scalars = {f"step/{k}": record[k] for k in ("loss", "lr", "images_per_sec") if k in record}
        self._start().log(scalars, step=record["iteration"])

    def log_phase(self, phase: str, record: dict[str, Any]) -> None:
        scalars = {f"{phase}/{k}": v for k, v in phase_scalars(phase, record).items()}
        scalars["epoch"] = record["train_phase_idx"]
        self._start().log(scalars, step=record["iteration"])

    def after_train(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


@HOOKS.register("mlflow_logger")
class MlflowLoggerHook(MetricsLogger):
    """MLflow (HOOKS.MLFLOW_SETUP): the per-step scalars under ``step/`` and each phase's under
    ``train/`` or ``test/``, at the run's iteration as MLflow's step; train_config.yaml as an
    artifact.

    The MLflow run id is kept in <run folder>/mlflow_run_id.txt: a resumed run logs to the same
    MLflow run.

    Args:
        run_dir: the run folder.
        tracking_uri: where MLflow records ("" for MLflow's default: MLFLOW_TRACKING_URI or ./mlruns).
        experiment_name: the MLflow experiment.
        run_name: the MLflow run's name ("" for the run folder's name).
    """

    def __init__(self, run_dir: str, tracking_uri: str, experiment_name: str, run_name: str) -> None:
        self.mlflow = import_for("mlflow", "HOOKS.MLFLOW_SETUP.USE_MLFLOW")
        self.run_dir, self.tracking_uri, self.experiment_name = run_dir, tracking_uri, experiment_name
        self.run_name = run_name or os.path.basename(os.path.normpath(run_dir))
        self.run: Any = None

    def before_train(self) -> None:
        self._start()

    def _start(self) -> None:
        if self.run is not None:
            return
        m = self.mlflow
        if self.tracking_uri:
            m.set_tracking_uri(self.tracking_uri)
        m.set_experiment(self.experiment_name)
        id_file = _run_id_file(self.run_dir, "mlflow_run_id.txt")
        run_id = _read_id(id_file)
        self.run = m.start_run(run_id=run_id) if run_id else m.start_run(run_name=self.run_name)
        _write_id(id_file, self.run.info.run_id)
        config = os.path.join(self.run_dir, "train_config.yaml")
        if os.path.exists(config):
            m.log_artifact(config)

    def log_step(self, record: dict[str, Any]) -> None:
        self._start()
        scalars = {f"step/{k}": float(record[k]) for k in ("loss", "lr", "images_per_sec") if k in record}
        self.mlflow.log_metrics(scalars, step=record["iteration"])

    def log_phase(self, phase: str, record: dict[str, Any]) -> None:
        self._start()
        scalars = {f"{phase}/{k}": v for k, v in phase_scalars(phase, record).items()}
        self.mlflow.log_metrics(scalars, step=record["iteration"])

    def after_train(self) -> None:
        if self.run is not None:
            self.mlflow.end_run()
            self.run = None
