"""Meters, registered by name in METERS (METERS.name)."""

import logging

from omegaconf import DictConfig, OmegaConf

from vissl_vit.meters import accuracy_list_meter  # noqa: F401  (registration)
from vissl_vit.models.feature_eval import feature_names
from vissl_vit.registry import METERS
from vissl_vit.utils.kwargs import call_with_kwargs

logger = logging.getLogger(__name__)

# Meters with one value per model output, whose count VISSL infers for linear evaluation
# (vissl/utils/hydra_config.py, infer_and_assert_hydra_config: valid_meters).
_LIST_METERS = ("accuracy_list_meter",)


def is_feature_eval_model(cfg: DictConfig) -> bool:
    """VISSL's ``is_feature_extractor_model``: frozen trunk in eval mode with features to probe."""
    fe = cfg.MODEL.FEATURE_EVAL_SETTINGS
    return bool(
        fe.EVAL_MODE_ON and (fe.FREEZE_TRUNK_ONLY or fe.FREEZE_TRUNK_AND_HEAD) and len(fe.LINEAR_EVAL_FEAT_POOL_OPS_MAP)
    )


def build_meter(cfg: DictConfig):
    """The meter named by ``METERS.name``, or None when it is empty.

    For linear evaluation (see :func:`is_feature_eval_model`) a list meter measures each head, one
    per feature of ``LINEAR_EVAL_FEAT_POOL_OPS_MAP``: its ``num_meters`` and ``meter_names`` are set
    from that map whatever the config says, as VISSL does, so a linear-eval overlay over a base
    config with one meter needs not repeat the count. The change is logged.

    Args:
        cfg: the ``config`` node.
    """
    name = cfg.METERS.name
    if not name:
        return None
    kwargs = OmegaConf.to_container(cfg.METERS[name], resolve=True) if name in cfg.METERS else {}
    if name in _LIST_METERS and is_feature_eval_model(cfg):
        feats = feature_names(cfg.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP)
        if kwargs["num_meters"] != len(feats):
            logger.info(
                "config.METERS.%s.num_meters=%d -> %d: one meter per feature of "
                "config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP (%s), as VISSL infers it",
                name,
                kwargs["num_meters"],
                len(feats),
                ", ".join(feats),
            )
        kwargs["num_meters"], kwargs["meter_names"] = len(feats), feats
    return call_with_kwargs(METERS.get(name), kwargs, f"config.METERS.{name}")


__all__ = ["build_meter", "is_feature_eval_model"]
