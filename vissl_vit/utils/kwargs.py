"""Calling a registered component with keyword arguments that came from a config."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from vissl_vit.errors import ConfigError, did_you_mean


def call_with_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], where: str, *args: Any) -> Any:
    """Call ``fn(*args, **kwargs)``; a keyword ``fn`` does not take is a ConfigError naming ``where``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature
        return fn(*args, **kwargs)
    params = sig.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][len(args) :]
    if not takes_any:
        for key in kwargs:
            if key not in params:
                raise ConfigError(
                    f"{where}: unknown argument '{key}'.{did_you_mean(key, names)} It takes: {', '.join(names)}."
                )
    missing = [n for n in names if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing argument(s) {', '.join(missing)}. It takes: {', '.join(names)}.")
    return fn(*args, **kwargs)
