"""build_transforms: a DATA.*.TRANSFORMS list -> one callable.

Each entry is ``{name: ..., **kwargs}``: a transform of vissl_vit's TRANSFORMS registry, else
a torchvision.transforms class of that name, called with the entry's other keys. Once a transform
has made a list of views (ImgReplicatePil, ImgPilToMultiCrop), the following ones apply to each
view, or only to the views listed in the entry's ``indices`` (VISSL's convention).
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
    kwargs = {k: v for k, v in entry.items() if k not in ("name", "indices")}
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


class ListAwareCompose:
    """Apply transforms in order; on a list of views, apply each to every view (or to ``indices``)."""

    def __init__(self, steps: list[tuple[Any, list[int] | None]]) -> None:
        self.steps = steps

    def __call__(self, x: Any) -> Any:
        for transform, indices in self.steps:
            if isinstance(x, list) and not getattr(transform, "takes_list", False):
                x = [transform(v) if indices is None or i in indices else v for i, v in enumerate(x)]
            else:
                x = transform(x)
        return x

    def __repr__(self) -> str:
        return "ListAwareCompose(" + ", ".join(repr(t) for t, _ in self.steps) + ")"


def build_transforms(entries: list[dict[str, Any]], where: str) -> ListAwareCompose | None:
    """All transforms of a list, composed in order; None for an empty list."""
    if not entries:
        return None
    steps = []
    for i, e in enumerate(entries):
        indices = e.get("indices") if isinstance(e, dict) else None
        steps.append((build_transform(e, f"{where}[{i}]"), list(indices) if indices is not None else None))
    return ListAwareCompose(steps)
