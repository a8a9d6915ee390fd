"""Logging to the console and to <run folder>/log.txt, JSON-lines files, and the console's own lines
(one per phase, a results table at the end).

The console coexists with tqdm progress bars: while a bar is live, log lines are written with
``tqdm.write`` (which clears the bars, writes the line and redraws them), so bar and lines never
share a terminal row; the per-step lines, which the bar's postfix already shows, are left out of
the console then (log.txt still has them).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

LOGGER_NAME = "vissl_vit"
_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"

# Lines logged before the run folder is known (compose_config's notes on VISSL keys) wait here for
# the next setup_logging, which writes them to log.txt. They are kept in the environment, not in a
# module variable: spawned workers start a fresh interpreter and get the config as YAML text only,
# and the environment is what they inherit from the launcher that composed the config.
KEPT_LINES_ENV = "VISSL_VIT_KEPT_LOG_LINES"

# A log record with this attribute True (``logger.info(..., extra={SHOWN_BY_BAR: True})``) says
# what a live progress bar already shows: the console skips it while a bar is live.
SHOWN_BY_BAR = "shown_by_bar"

# The keys of a metrics.json record that say where the phase stands, not what it measured
# ("train_phase_idx" starts like a train value's key: it is not one)
PHASE_RECORD_KEYS = ("iteration", "phase_idx", "train_phase_idx")


def keep_for_run_log(logger_name: str, lines: list[str], level: int = logging.WARNING) -> None:
    """Have the next ``setup_logging`` write ``lines`` to log.txt, replacing any lines kept before.

    The lines are expected to have been logged to the console already; an empty list forgets them.

    Args:
        logger_name: the logger they were logged with (shown in log.txt as every line's is).
        lines: the messages.
        level: their level.
    """
    if lines:
        os.environ[KEPT_LINES_ENV] = json.dumps({"name": logger_name, "level": level, "lines": list(lines)})
    else:
        os.environ.pop(KEPT_LINES_ENV, None)


def _take_kept_lines() -> list[logging.LogRecord]:
    """The kept lines as log records, forgotten here (each reaches one run's log.txt once)."""
    text = os.environ.pop(KEPT_LINES_ENV, None)
    if not text:
        return []
    kept = json.loads(text)
    log = logging.getLogger(kept["name"])
    return [log.makeRecord(kept["name"], kept["level"], "", 0, "%s", (line,), None) for line in kept["lines"]]


def live_progress_bars() -> list[Any]:
    """The tqdm bars now shown (none when tqdm was never imported)."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return []
    return [b for b in list(getattr(tqdm_module.tqdm, "_instances", ())) if not getattr(b, "disable", False)]


class ConsoleHandler(logging.StreamHandler):
    """The console's handler: plain writes, or ``tqdm.write`` while a progress bar is live (the bar
    is cleared, the line written, the bar redrawn below it); records marked :data:`SHOWN_BY_BAR`
    are skipped while a bar is live."""

    def emit(self, record: logging.LogRecord) -> None:
        if not live_progress_bars():
            super().emit(record)
            return
        if getattr(record, SHOWN_BY_BAR, False):
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging's contract: a failed emit reports itself and does not raise
            self.handleError(record)


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message`` for INFO and below; warnings and errors also name their level and logger
    (log.txt keeps the full format for every line)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__(datefmt="%H:%M:%S")
        self._info = logging.Formatter(f"{prefix}%(asctime)s %(message)s", "%H:%M:%S")
        self._warn = logging.Formatter(f"{prefix}%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return (self._info if record.levelno <= logging.INFO else self._warn).format(record)


def setup_logging(run_dir: str | None, rank: int, all_ranks: bool = False) -> logging.Logger:
    """The console on every rank, and log.txt on rank 0 only (appended).

    The console shows INFO and above on rank 0; other ranks show warnings and errors only (each
    line prefixed ``[rank N]``) unless ``all_ranks``, so that a job of N processes prints its lines
    once. log.txt (rank 0) gets every INFO line in the full format
    (``LEVEL HH:MM:SS,ms logger: message``), whatever the console shows. This run's part of log.txt
    starts with the lines kept by ``keep_for_run_log`` (the config's notes), which the console
    showed when they were logged.

    Args:
        run_dir: the run folder (log.txt), or None for the console only.
        rank: this process's global rank.
        all_ranks: every rank's console shows INFO lines too (LOG_ALL_RANKS).
    """
    kept = _take_kept_lines()
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    console = ConsoleHandler(sys.stdout)
    console.setFormatter(ConsoleFormatter("" if rank == 0 else f"[rank {rank}] "))
    console.setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    logger.addHandler(console)
    if run_dir is not None and rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(run_dir, "log.txt"), mode="a")
        fh.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(fh)
        for record in kept:
            fh.handle(record)
    return logger


def progress_bar(enabled: bool, total: int, desc: str, initial: int = 0, unit: str = "it") -> Any:
    """A tqdm bar on stderr that vanishes when closed, or None when not ``enabled`` or when stderr is
    not a terminal (a log file or a pipe gets the log lines instead)."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)


# ---- the console's phase lines and results table ----


def format_duration(seconds: float) -> str:
    """``0.4s``, ``12s``, ``1m12s``, ``2h05m``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def phase_values(phase: str, record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A metrics.json record's values by model: ``{"": {...}, "_ema": {...}}`` (the EMA's keys end in
    ``_ema``), each ``{"loss": float | None, "metrics": {"top_1": (value, output name or None)}}``.
    A meter with several outputs (one per evaluated feature) gives each metric's best output, with
    its name; a single output gives its value and None."""
    out: dict[str, dict[str, Any]] = {}
    start = f"{phase}_"
    for key, value in record.items():
        if key in PHASE_RECORD_KEYS or not key.startswith(start):
            continue
        name = key[len(start) :]
        suffix = "_ema" if name.endswith("_ema") else ""
        part = out.setdefault(suffix, {"loss": None, "metrics": {}})
        if name == f"loss{suffix}":
            part["loss"] = float(value)
        elif isinstance(value, dict):  # a meter: {"top_1": {"0": 87.3}, ...}
            for metric, per_output in value.items():
                if not isinstance(per_output, dict) or not per_output:
                    continue
                best = max(per_output, key=lambda o: per_output[o])
                part["metrics"][metric] = (float(per_output[best]), best if len(per_output) > 1 else None)
    return out


def _metric_label(metric: str) -> str:
    return metric.replace("_", "-")


def describe_phase(phase: str, record: dict[str, Any]) -> str:
    """One phase's values in words: ``test loss 0.8523 top-1 83.60 top-5 97.10  ema loss 0.86 top-1 84.00``."""
    words = []
    for suffix, part in phase_values(phase, record).items():
        w = [phase if not suffix else suffix.strip("_")]
        if part["loss"] is not None:
            w += ["loss", f"{part['loss']:.4g}"]
        for metric, (value, output) in part["metrics"].items():
            w += [_metric_label(metric), f"{value:.2f}" + (f" [{output}]" if output else "")]
        words.append(" ".join(w))
    return "  ".join(words)


def epoch_line(epoch: int, num_epochs: int, phases: Iterable[tuple[str, dict[str, Any]]], seconds: float) -> str:
    """The console's line for one epoch: ``epoch 3/10  train loss 0.84 top-1 84.70  |  test loss 0.85
    top-1 83.60  (1m12s)``.

    Args:
        epoch: the epoch, counted from 1 (metrics.json's train_phase_idx + 1).
        num_epochs: epochs in all.
        phases: (phase name, metrics.json record) of this epoch's phases, in the order they ran.
        seconds: the epoch's wall time.
    """
    body = "  |  ".join(describe_phase(phase, rec) for phase, rec in phases)
    return f"epoch {epoch}/{num_epochs}  {body}  ({format_duration(seconds)})"


def _phase_of(record: dict[str, Any]) -> str | None:
    for key in record:
        for phase in ("train", "test"):
            if key not in PHASE_RECORD_KEYS and key.startswith(f"{phase}_"):
                return phase
    return None


def results_table(records: list[dict[str, Any]], num_epochs: int, run_dir: str, seconds: float, note: str = "") -> str:
    """The console's table at the end of training, from the run's metrics.json records: the best
    test top-1 and its epoch, the last one, the same for the EMA when it was evaluated, the last
    train loss, the wall time and the run folder.

    The headline metric is the meter's ``top_1`` (or its first metric when it has no top_1).
    Records with the same phase_idx (a phase written again after a resume) count once, the last.

    Args:
        records: metrics.json's lines, in file order.
        num_epochs: epochs in all.
        run_dir: the run folder.
        seconds: this process's training time.
        note: said after the wall time (e.g. "since the resume at iteration 40").
    """
    unique = list({r.get("phase_idx", i): r for i, r in enumerate(records)}.values())
    rows: list[tuple[str, str]] = []
    tests = [r for r in unique if _phase_of(r) == "test"]
    for suffix, label in (("", "test"), ("_ema", "ema")):
        scored = []
        for r in tests:
            part = phase_values("test", r).get(suffix)
            if part and part["metrics"]:
                metric = "top_1" if "top_1" in part["metrics"] else next(iter(part["metrics"]))
                value, output = part["metrics"][metric]
                scored.append((value, r["train_phase_idx"], metric, output))
        if not scored:
            continue
        best = max(scored, key=lambda s: s[0])  # the first of equal bests
        last = scored[-1]
        for word, (value, idx, metric, output) in (("best", best), ("last", last)):
            where = f" [{output}]" if output else ""
            rows.append(
                (f"{word} {_metric_label(metric)} ({label})", f"{value:.2f}{where}  at epoch {idx + 1}/{num_epochs}")
            )
    trains = [r for r in unique if _phase_of(r) == "train"]
    if trains:
        part = phase_values("train", trains[-1]).get("", {})
        if part.get("loss") is not None:
            rows.append(
                ("last train loss", f"{part['loss']:.4g}  at epoch {trains[-1]['train_phase_idx'] + 1}/{num_epochs}")
            )
    rows.append(("wall time", format_duration(seconds) + (f" ({note})" if note else "")))
    rows.append(("run folder", run_dir))
    width = max(len(k) for k, _ in rows)
    return "Results:\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _drop_partial_last_line(path: str) -> None:
    """A run killed while writing can leave half a line: cut it so appended lines stay valid JSON."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def read_json_lines(path: str) -> list[dict[str, Any]]:
    """A JSON-lines file's complete lines ([] when there is no file; a half-written last line is left out)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                out.append(json.loads(line))
    return out


class JsonLinesWriter:
    """Appends one JSON object per line to a file, flushed after each line."""

    def __init__(self, path: str) -> None:
        self.path = path
        _drop_partial_last_line(path)
        self._f = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
