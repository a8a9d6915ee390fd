"""The shared shape of vissl_vit's command-line tools: usage, user errors without tracebacks."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class ExitStatus:
    """What :func:`exit_status` sets: 0, 2 after a user error, 130 after Ctrl-C."""

    code: int = 0


@contextlib.contextmanager
def exit_status() -> Iterator[ExitStatus]:
    """Run the block as a command line runs: a UserError is one line on stderr and status 2 (no
    traceback); Ctrl-C says how to resume and is status 130. Any other error propagates (a bug:
    its traceback is wanted). A context manager rather than a wrapper function, so that the
    command line's call path to the engine stays short (no frame of its own)."""
    from vissl_vit.errors import UserError

    status = ExitStatus()
    try:
        yield status
    except UserError as e:
        print(f"vissl_vit: error: {e}", file=sys.stderr)
        status.code = 2
    except KeyboardInterrupt:
        print("vissl_vit: interrupted; rerun the same command to resume from the last checkpoint.", file=sys.stderr)
        status.code = 130


def usage_status(argv: list[str], usage: str) -> int | None:
    """For no arguments or -h / --help: print ``usage`` and return the exit status (2 for none, 0
    for help); None otherwise."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    return None


def cli_main(run: Callable[[list[str]], object], argv: list[str], usage: str) -> int:
    """Run ``run(argv)`` under :func:`exit_status`, or print usage (:func:`usage_status`). Returns
    the exit status."""
    code = usage_status(argv, usage)
    if code is not None:
        return code
    with exit_status() as status:
        run(argv)
    return status.code


def split_options(
    argv: list[str],
    values: dict[str, tuple[str, Callable[[str], Any]]],
    switches: dict[str, tuple[str, Any]],
    defaults: dict[str, Any],
    usage: str,
) -> tuple[list[str], dict[str, Any]]:
    """Separate a tool's ``--options`` from its config arguments.

    Args:
        argv: the command line.
        values: ``--flag VALUE`` options: flag -> (key, parser of the value).
        switches: ``--flag`` options: flag -> (key, value to set).
        defaults: the options' values when not given.
        usage: shown with an unknown option.

    Returns:
        The remaining (config) arguments, and the options.
    """
    from vissl_vit.errors import UserError

    opts, rest, i = dict(defaults), [], 0
    while i < len(argv):
        a = argv[i]
        if a in values:
            if i + 1 >= len(argv):
                raise UserError(f"{a} needs a value.\n{usage}")
            key, parse = values[a]
            try:
                opts[key] = parse(argv[i + 1])
            except ValueError:
                raise UserError(f"{a} {argv[i + 1]}: not a valid value.\n{usage}") from None
            i += 1
        elif a in switches:
            key, value = switches[a]
            opts[key] = value
        elif a.startswith("--"):
            raise UserError(f"unknown option {a}.\n{usage}")
        else:
            rest.append(a)
        i += 1
    return rest, opts
