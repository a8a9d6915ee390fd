"""The shared shape of vissl_vit's command-line tools: usage, user errors without tracebacks."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def cli_main(run: Callable[[list[str]], object], argv: list[str], usage: str) -> int:
    """Run ``run(argv)``; print usage for no arguments or -h; a UserError is one line on stderr
    and exit status 2; Ctrl-C says how to resume. Returns the exit status."""
    from vissl_vit.errors import UserError

    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    try:
        run(argv)
    except UserError as e:
        print(f"vissl_vit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vissl_vit: interrupted; rerun the same command to resume from the last checkpoint.", file=sys.stderr)
        return 130
    return 0


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
