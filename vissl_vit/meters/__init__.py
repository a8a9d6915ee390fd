"""Meters, registered by name in METERS (METERS.name)."""

from omegaconf import DictConfig, OmegaConf

from vissl_vit.meters import accuracy_list_meter  # noqa: F401  (registration)
from vissl_vit.registry import METERS
from vissl_vit.utils.kwargs import call_with_kwargs


def build_meter(cfg: DictConfig):
    """The meter named by ``METERS.name``, or None when it is empty."""
    name = cfg.METERS.name
    if not name:
        return None
    kwargs = OmegaConf.to_container(cfg.METERS[name], resolve=True) if name in cfg.METERS else {}
    return call_with_kwargs(METERS.get(name), kwargs, f"config.METERS.{name}")


__all__ = ["build_meter"]
