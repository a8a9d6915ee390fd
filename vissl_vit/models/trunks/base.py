"""What every trunk promises the engine: its config section, its features, its layers.

The engine never knows which trunk it runs. The model builder, ``config/validate.py``, the FSDP
wrapper, feature extraction, the parameter groups and the throughput tool ask the trunk's class
(before anything is built, from ``MODEL.TRUNK``) or the built trunk (afterwards). Adding a trunk is
one file with a ``@TRUNKS.register(name)`` subclass of :class:`Trunk`, its tests, and its section
of defaults.yaml.

From the config, before building (class methods; ``trunk_cfg`` is the ``MODEL.TRUNK`` node):

- ``kwargs_from_config``: its YAML section(s) -> the keyword arguments of ``__init__``
  (detectron2's ``from_config``). Required.
- ``check_config``: rules between its keys, raising :class:`~vissl_vit.errors.ConfigError`.
- ``feature_width_from_config`` / ``default_feature_from_config``: the width of a named feature
  and the feature returned without ``out_feat_keys``, so heads can be checked before building.
- ``num_params_from_config``: the parameter count, to refuse a model that cannot fit in memory.
- ``input_shape_from_config``: (channels, height, width) of one input image (throughput tool).
- ``timm_reference``: timm's model of the same shape, for the throughput tool's ratios (or None).

The defaults of these build the trunk on the meta device (no memory, no init) and ask it, so a
new trunk gets them for free; a trunk overrides them where building would be slow for absurd sizes.

From the built trunk: ``forward(x, out_feat_keys)``, ``feature_width``, ``default_feature``,
``no_weight_decay``, ``layer_id`` (for layer-wise LR decay), ``block_types`` (the FSDP wrap policy),
``num_layers``.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn


class Trunk(nn.Module):
    """Base class of every registered trunk.

    Subclasses set ``CONFIG_SECTIONS`` (the sections of ``MODEL.TRUNK`` they read, e.g.
    ``("VISION_TRANSFORMERS", "CONVIT")``) and ``FEATURE_PATTERNS`` (feature name -> description),
    implement ``kwargs_from_config``, ``forward``, ``feature_width`` and ``default_feature``, and
    keep their transformer blocks in ``self.blocks`` (or override ``layer_id`` / ``block_types``).
    """

    CONFIG_SECTIONS: ClassVar[tuple[str, ...]] = ()
    FEATURE_PATTERNS: ClassVar[dict[str, str]] = {}

    # ---- from the config, before anything is built --------------------------------------------

    @classmethod
    def kwargs_from_config(cls, trunk_cfg: DictConfig) -> dict[str, Any]:
        """``MODEL.TRUNK`` -> keyword arguments of ``__init__``."""
        raise NotImplementedError(f"{cls.__name__} must implement kwargs_from_config")

    @classmethod
    def from_config(cls, trunk_cfg: DictConfig) -> Trunk:
        """Build the trunk from ``MODEL.TRUNK`` (an unknown keyword is a ConfigError)."""
        from vissl_vit.utils.kwargs import call_with_kwargs

        return call_with_kwargs(cls, cls.kwargs_from_config(trunk_cfg), f"trunk '{trunk_cfg.NAME}'")

    @classmethod
    def check_config(cls, trunk_cfg: DictConfig) -> None:
        """Rules between the trunk's keys; raise ConfigError naming the key. Default: none."""

    @classmethod
    def meta(cls, trunk_cfg: DictConfig) -> Trunk:
        """The trunk built on the meta device: its structure without memory or initialisation."""
        return _meta_trunk(cls, _freeze(trunk_cfg))

    @classmethod
    def feature_width_from_config(cls, trunk_cfg: DictConfig, key: str) -> int | None:
        """Width of feature ``key`` ([B, width]); None for non-flat features; ValueError if unknown."""
        return cls.meta(trunk_cfg).feature_width(key)

    @classmethod
    def default_feature_from_config(cls, trunk_cfg: DictConfig) -> str:
        """The feature ``forward`` returns without ``out_feat_keys``."""
        return cls.meta(trunk_cfg).default_feature()

    @classmethod
    def num_params_from_config(cls, trunk_cfg: DictConfig) -> int:
        """Number of parameters of the trunk."""
        return sum(p.numel() for p in cls.meta(trunk_cfg).parameters())

    @classmethod
    def size_summary(cls, trunk_cfg: DictConfig) -> str:
        """The keys that set the trunk's size, for messages (e.g. 'NUM_LAYERS=12, HIDDEN_DIM=768')."""
        return ", ".join(f"{s}: {OmegaConf.to_container(trunk_cfg[s])}" for s in cls.CONFIG_SECTIONS)

    @classmethod
    def input_shape_from_config(cls, trunk_cfg: DictConfig) -> tuple[int, int, int]:
        """(channels, height, width) of one input image."""
        vit = trunk_cfg.VISION_TRANSFORMERS
        return (int(vit.IN_CHANNELS), int(vit.IMAGE_SIZE), int(vit.IMAGE_SIZE))

    @classmethod
    def timm_reference(cls, trunk_cfg: DictConfig, num_classes: int) -> nn.Module | None:
        """timm's model of the same shape with a linear head of ``num_classes`` (throughput ratios),
        or None when timm has no twin."""
        return None

    # ---- the built trunk -----------------------------------------------------------------------

    block_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    """Module types that are the FSDP units (each instance sharded on its own)."""

    @property
    def num_layers(self) -> int:
        """Number of blocks (layer ids run 0 .. num_layers + 1)."""
        return len(self.blocks)

    def feature_width(self, key: str) -> int | None:
        """Width of the flat feature ``key``, None for a non-flat one; ValueError if unknown."""
        raise NotImplementedError

    def default_feature(self) -> str:
        """The feature ``forward`` returns without ``out_feat_keys``."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that conventionally get no weight decay (position embeddings, tokens)."""
        return set()

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` (as in ``named_parameters()``) for layer-wise LR decay (BEiT's
        rule): 0 for everything before the first block (embeddings, tokens), i + 1 for
        ``blocks.i.*``, num_layers + 1 for everything after the last block (final norm)."""
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        before = ("patch_embed", "pos_embed", "cls_token", "dist_token", "reg_token", "pos_drop")
        return 0 if name.split(".")[0] in before else self.num_layers + 1

    def shard_units(self) -> list[nn.Module]:
        """The sub-modules FSDP shards one by one (instances of ``block_types``)."""
        return [m for m in self.modules() if self.block_types and isinstance(m, self.block_types)]


def _freeze(trunk_cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(trunk_cfg, resolve=True)


@functools.lru_cache(maxsize=8)
def _meta_trunk(cls: type[Trunk], cfg_yaml: str) -> Trunk:
    with torch.device("meta"):
        return cls.from_config(OmegaConf.create(cfg_yaml))


def trunk_class(trunk_cfg: DictConfig) -> type[Trunk]:
    """The registered class of ``MODEL.TRUNK.NAME`` (ConfigError naming the known ones)."""
    from vissl_vit.errors import ConfigError
    from vissl_vit.registry import TRUNKS

    cls = TRUNKS.get(trunk_cfg.NAME)
    if not (isinstance(cls, type) and issubclass(cls, Trunk)):
        raise ConfigError(f"trunk '{trunk_cfg.NAME}' does not derive from vissl_vit.models.trunks.base.Trunk.")
    return cls
