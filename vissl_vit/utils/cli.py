"""The shared shape of vissl_vit's command-line tools: usage, user errors without tracebacks."""

from __future__ import annotations

import sys
from collections.abc import Callable


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
