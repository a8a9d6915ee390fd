"""build_transforms: a DATA.*.TRANSFORMS list -> one callable.

Each entry is ``{name: ..., **kwargs}``: a transform of vissl_vit's TRANSFORMS registry, else
a torchvision.transforms class of that name, called with the entry's other keys.
"""

from __future__ import annotations

from typing import Any

import torchvision.transforms as T

from vissl_vit.errors import ConfigError, did_you_mean
from vissl_vit.registry import TRANSFORMS
from vissl_vit.utils.kwargs import call_with_kwargs


def _torchvision_names() -> list[str]:
    return [n for n in dir(T) if n[0].isupper() and isinstance(getattr(T, n), type)]


def build_transform(entry: dict[str, Any], where: str) -> Any:
    """One transform from ``{name: ..., **kwargs}``."""
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{where}: each transform is a mapping with a 'name' key, got {entry!r}.")
    kwargs = {k: v for k, v in entry.items() if k != "name"}
    name = entry["name"]
    if name in TRANSFORMS.names():
        return call_with_kwargs(TRANSFORMS.get(name), kwargs, f"{where} '{name}'")
    cls = getattr(T, name, None)
    if isinstance(cls, type):
        return call_with_kwargs(cls, kwargs, f"{where} '{name}'")
    known = TRANSFORMS.names() + _torchvision_names()
    raise ConfigError(
        f"{where}: unknown transform '{name}'.{did_you_mean(name, known)} Transforms are vissl_vit's "
        f"({', '.join(TRANSFORMS.names()) or 'none registered'}) or torchvision.transforms classes."
    )


def build_transforms(entries: list[dict[str, Any]], where: str) -> T.Compose | None:
    """All transforms of a list, composed in order; None for an empty list."""
    if not entries:
        return None
    return T.Compose([build_transform(e, f"{where}[{i}]") for i, e in enumerate(entries)])
