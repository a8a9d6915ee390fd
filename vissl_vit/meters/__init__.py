"""Meters, registered by name in METERS (METERS.name)."""

from omegaconf import DictConfig, OmegaConf

from vissl_vit.meters import accuracy_list_meter  # noqa: F401  (registration)
from vissl_vit.models.feature_eval import feature_names
from vissl_vit.registry import METERS
from vissl_vit.utils.kwargs import call_with_kwargs


def build_meter(cfg: DictConfig):
    """The meter named by ``METERS.name``, or None when it is empty."""
    name = cfg.METERS.name
    if not name:
        return None
    kwargs = OmegaConf.to_container(cfg.METERS[name], resolve=True) if name in cfg.METERS else {}
    fe = cfg.MODEL.FEATURE_EVAL_SETTINGS
    if name == "accuracy_list_meter" and fe.EVAL_MODE_ON and fe.FREEZE_TRUNK_ONLY and not kwargs.get("meter_names"):
        # linear eval: one meter per head, named after the feature it reads
        feats = feature_names(fe.LINEAR_EVAL_FEAT_POOL_OPS_MAP)
        if len(feats) == kwargs.get("num_meters", 1):
            kwargs["meter_names"] = feats
    return call_with_kwargs(METERS.get(name), kwargs, f"config.METERS.{name}")


__all__ = ["build_meter"]
