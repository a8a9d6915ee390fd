"""One Registry type (fvcore's), one instance per kind of component.

Each registry maps a name used in YAML (``MODEL.TRUNK.NAME: vision_transformer``) to a class or
function. A failed lookup raises :class:`~vissl_vit.errors.ConfigError` listing the known names
and the closest one, instead of fvcore's bare ``KeyError``.

Modules register themselves on import; ``vissl_vit/<kind>/__init__.py`` imports every module
of its kind explicitly, so what is registered is visible there. Each registry names that package
and imports it before its first lookup: ``import vissl_vit`` imports nothing heavy (``--help`` and
``--list-configs`` start in a second, not in the seconds torch takes), yet no lookup can see a
registry whose modules were not imported yet.
"""

from __future__ import annotations

import importlib
from typing import Any

from fvcore.common.registry import Registry as _FvcoreRegistry

from vissl_vit.errors import ConfigError, did_you_mean


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


class Registry(_FvcoreRegistry):
    """fvcore's Registry with a lookup error that lists the known names.

    Args:
        name: the kind, for messages ("trunk").
        package: the package whose import registers every built-in component of the kind; imported
            before the first lookup (None: nothing to import).
    """

    def __init__(self, name: str, package: str | None = None) -> None:
        super().__init__(name)
        self._package, self._loading = package, False

    def _load(self) -> None:
        if self._package is None or self._loading:  # loaded, or a lookup while its package imports
            return
        self._loading = True
        try:
            importlib.import_module(self._package)  # an error here is the user's to see; the next lookup retries
        finally:
            self._loading = False
        self._package = None

    def __contains__(self, name: str) -> bool:
        self._load()
        return super().__contains__(name)

    def __iter__(self):  # noqa: ANN204  (fvcore's signature)
        self._load()
        return super().__iter__()

    def get(self, name: str) -> Any:
        self._load()
        ret = self._obj_map.get(name)
        if ret is None:
            known = ", ".join(sorted(self._obj_map))
            raise ConfigError(
                f"Unknown {self._name} '{name}'.{did_you_mean(name, self._obj_map)} Known {self._name} names: {known}."
            )
        return ret

    def _do_register(self, name: str, obj: Any) -> None:
        """Add ``obj`` under ``name``; a name taken by another object is an error naming both."""
        old = self._obj_map.get(name)
        if old is not None and old is not obj:
            raise ValueError(
                f"Two {self._name}s are registered as '{name}': {_qualname(old)} and {_qualname(obj)}. "
                f'Rename one of them (register("another_name")).'
            )
        self._obj_map[name] = obj

    def register(self, obj_or_name: Any = None) -> Any:  # type: ignore[override]
        """Register a class or function, in fvcore's three call forms.

        ``@REG.register()`` registers under the object's ``__name__``; ``@REG.register("name")``
        under ``name``; ``REG.register(obj)`` registers ``obj`` at once (and returns it). The
        same object registered twice under one name (a module imported twice) is kept once.

        Args:
            obj_or_name: None or a name (decorator forms), or the object to register.
        """
        if obj_or_name is not None and not isinstance(obj_or_name, str):
            self._do_register(obj_or_name.__name__, obj_or_name)
            return obj_or_name
        name = obj_or_name

        def deco(obj: Any) -> Any:
            self._do_register(name or obj.__name__, obj)
            return obj

        return deco

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load()
        return sorted(self._obj_map)


TRUNKS = Registry("trunk", "vissl_vit.models.trunks")
TRUNKS.__doc__ = """Trunks: ``cls(**kwargs) -> nn.Module`` whose ``forward(x, out_feat_keys=None)``
returns a list of tensors, one per requested feature (the default feature when None)."""

HEADS = Registry("head", "vissl_vit.models.heads")
HEADS.__doc__ = """Heads: ``cls(**kwargs) -> nn.Module`` mapping one tensor to one tensor.
The kwargs are the dict of a ``MODEL.HEAD.PARAMS`` entry."""

LOSSES = Registry("loss", "vissl_vit.losses")
LOSSES.__doc__ = """Losses: ``cls(**kwargs)`` built from ``LOSS.<name>``; ``forward(output, target)``
takes the model's list of outputs and the batch's target and returns a scalar tensor."""

COLLATORS = Registry("collator", "vissl_vit.data.collators")
COLLATORS.__doc__ = """Collators: ``fn(samples, **COLLATE_FUNCTION_PARAMS) -> dict`` turning a list
of ``{"data": ..., "label": ..., "index": ...}`` samples into a batch dict."""

TRANSFORMS = Registry("transform", "vissl_vit.data.transforms")
TRANSFORMS.__doc__ = """Transforms: ``cls(**kwargs)`` from one ``DATA.*.TRANSFORMS`` entry; torchvision's
transforms are looked up by their own names when not registered here."""

DATASETS = Registry("dataset", "vissl_vit.data.datasets")
DATASETS.__doc__ = """Data sources: ``fn(path, label_path, split, **kwargs) -> Dataset`` of
``(image, label)`` pairs, named in ``DATA.*.DATA_SOURCES``."""

OPTIMIZERS = Registry("optimizer", "vissl_vit.optim")
OPTIMIZERS.__doc__ = """Optimizers: ``fn(param_groups, **kwargs) -> torch.optim.Optimizer``."""

SCHEDULERS = Registry("scheduler", "vissl_vit.optim")
SCHEDULERS.__doc__ = """Parameter schedules: ``fn(**kwargs) -> fvcore ParamScheduler``, a function of
the training progress ``where`` in [0, 1)."""

HOOKS = Registry("hook", "vissl_vit.engine.hooks")
HOOKS.__doc__ = """Trainer hooks: ``cls(**kwargs) -> HookBase``, built by ``build_hooks``."""

METERS = Registry("meter", "vissl_vit.meters")
METERS.__doc__ = """Meters: ``cls(**kwargs)`` with ``update(outputs, target)``, ``value()``, ``reset()``."""
