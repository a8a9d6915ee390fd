"""Errors a user can cause.

Every exception raised for bad input (a misspelled key, a wrong type, a missing file, a NaN loss)
is a :class:`UserError`. The command-line tools print its message and exit with status 2, without
a Python traceback, because the message already says what is wrong and what was expected.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


class ConfigError(UserError):
    """A config key, value or file that is wrong."""


class DataError(UserError):
    """A data set that cannot be read (missing files, too many unreadable images)."""


class TrainingError(UserError):
    """A run that cannot go on (a NaN or Inf loss)."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates closest to ``name`` (case-insensitive), best first."""
    candidates = list(candidates)
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A ``" Did you mean 'x'?"`` suffix for error messages, or ``""`` when nothing is close."""
    hits = closest(name, candidates)
    if not hits:
        return ""
    return " Did you mean " + " or ".join(f"'{h}'" for h in hits) + "?"
