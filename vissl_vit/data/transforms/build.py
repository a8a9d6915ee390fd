"""build_transforms: a DATA.*.TRANSFORMS list -> one callable.

Each entry is ``{name: ..., **kwargs}``: a transform of vissl_vit's TRANSFORMS registry, else
a torchvision.transforms class of that name, called with the entry's other keys. Once a transform
has made a list of views (ImgReplicatePil, ImgPilToMultiCrop), the following ones apply to each
view, or only to the views listed in the entry's ``indices`` (VISSL's convention).

torchvision's containers take their transforms as a nested list of entries, built the same way::

    - name: RandomChoice        # one of them per image, uniformly (or by its p list)
      transforms: [{name: Grayscale, num_output_channels: 3}, {name: GaussianBlur, kernel_size: 9}]
    - name: RandomApply         # all of them, with probability p
      p: 0.8
      transforms: [{name: ColorJitter, brightness: 0.4}]

A torchvision argument whose value is an enum takes its name as a string, in any case:
``interpolation: bicubic`` becomes ``InterpolationMode.BICUBIC``, ``policy: cifar10``
``AutoAugmentPolicy.CIFAR10``.

``torchvision.<Name>`` names torchvision's class even where vissl_vit registers a transform of the
same name: ``torchvision.RandAugment`` is torchvision's (14 ops, zero fill, ``num_ops`` /
``magnitude`` out of 31 bins), ``RandAugment`` VISSL's.
"""

from __future__ import annotations

import enum
import inspect
from typing import Any

import torchvision.transforms as T

from vissl_vit.errors import ConfigError, did_you_mean
from vissl_vit.registry import TRANSFORMS
from vissl_vit.utils.kwargs import call_with_kwargs

# torchvision classes whose first argument is a list of transforms: YAML gives it as ``transforms``
_CONTAINERS = ("Compose", "RandomApply", "RandomChoice", "RandomOrder")


def _torchvision_names() -> list[str]:
    return [n for n in dir(T) if n[0].isupper() and isinstance(getattr(T, n), type)]


def enum_value(enum_type: type[enum.Enum], value: Any, where: str) -> enum.Enum:
    """``value`` as a member of ``enum_type``: a member, or its name or value as a string in any case."""
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        for member in enum_type:
            if value.lower() in (member.name.lower(), str(member.value).lower()):
                return member
    valid = [str(m.value) for m in enum_type]
    hint = did_you_mean(value, valid) if isinstance(value, str) else ""
    raise ConfigError(f"{where}: {value!r} is not a valid {enum_type.__name__}.{hint} Valid: {', '.join(valid)}.")


def interpolation_mode(value: Any, where: str) -> T.InterpolationMode:
    """A torchvision InterpolationMode from its name (``bicubic``, ``BICUBIC``), PIL's integer
    code (3 = bicubic, as DeiT's code writes it) or itself."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return T.functional._interpolation_modes_from_int(value)
        except KeyError:
            pass
    return enum_value(T.InterpolationMode, value, where)


def _torchvision_kwargs(cls: type, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """Strings given for enum-valued arguments (those whose default is an enum, and any
    ``interpolation``, which also takes PIL's integer codes) converted to the enum."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return kwargs
    out = dict(kwargs)
    for key, value in kwargs.items():
        default = params[key].default if key in params else None
        if key == "interpolation" or isinstance(default, T.InterpolationMode):
            out[key] = interpolation_mode(value, f"{where}: {key}")
        elif isinstance(default, enum.Enum):
            out[key] = enum_value(type(default), value, f"{where}: {key}")
    return out


def _build_container(cls: type, kwargs: dict[str, Any], where: str) -> Any:
    """A torchvision container (Compose, RandomApply, RandomChoice, RandomOrder) from its
    ``transforms`` list of entries, each built by :func:`build_transform`."""
    here = f"{where} '{cls.__name__}'"
    items = kwargs.pop("transforms", None)
    if not isinstance(items, list) or not items:
        raise ConfigError(
            f"{here}: 'transforms' must be a non-empty list of transforms ({{name: ...}} entries), got {items!r}."
        )
    inner = []
    for j, item in enumerate(items):
        if isinstance(item, dict) and "indices" in item:
            raise ConfigError(
                f"{where}.transforms[{j}]: 'indices' selects views only on a top-level transform, "
                f"not inside {cls.__name__}."
            )
        inner.append(build_transform(item, f"{where}.transforms[{j}]"))
    return call_with_kwargs(cls, kwargs, here, inner)


def build_transform(entry: dict[str, Any], where: str) -> Any:
    """One transform from ``{name: ..., **kwargs}`` (a container's ``transforms`` built recursively)."""
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"{where}: each transform is a mapping with a 'name' key, got {entry!r}.")
    kwargs = {k: v for k, v in entry.items() if k not in ("name", "indices")}
    name = entry["name"]
    explicit = isinstance(name, str) and name.startswith("torchvision.")
    if not explicit and name in TRANSFORMS.names():
        return call_with_kwargs(TRANSFORMS.get(name), kwargs, f"{where} '{name}'")
    if explicit:
        name = name[len("torchvision.") :]
    cls = getattr(T, name, None)
    if isinstance(cls, type):
        kwargs = _torchvision_kwargs(cls, kwargs, f"{where} '{name}'")
        if name in _CONTAINERS:
            return _build_container(cls, kwargs, where)
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
