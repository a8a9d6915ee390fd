"""Logging to the console and to <run folder>/log.txt, and JSON-lines files."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

LOGGER_NAME = "vissl_vit"
_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"

# Lines logged before the run folder is known (compose_config's notes on VISSL keys) wait here for
# the next setup_logging, which writes them to log.txt. They are kept in the environment, not in a
# module variable: spawned workers start a fresh interpreter and get the config as YAML text only,
# and the environment is what they inherit from the launcher that composed the config.
KEPT_LINES_ENV = "VISSL_VIT_KEPT_LOG_LINES"


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


def setup_logging(run_dir: str | None, rank: int) -> logging.Logger:
    """Console logging on every rank (rank-prefixed beyond 0); log.txt on rank 0 only (appended).

    This run's part of log.txt starts with the lines kept by ``keep_for_run_log`` (the config's notes),
    which the console showed when they were logged.
    """
    kept = _take_kept_lines()
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = _FORMAT if rank == 0 else f"[rank {rank}] {_FORMAT}"
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    logger.addHandler(console)
    if run_dir is not None and rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(run_dir, "log.txt"), mode="a")
        fh.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(fh)
        for record in kept:
            fh.handle(record)
    return logger


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
