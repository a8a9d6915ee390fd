"""build_loss: LOSS.name + LOSS.<name> -> a loss module."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vissl_vit.errors import ConfigError, did_you_mean
from vissl_vit.losses.cross_entropy import TorchLoss
from vissl_vit.registry import LOSSES
from vissl_vit.utils.kwargs import call_with_kwargs

logger = logging.getLogger(__name__)


def build_loss(cfg: DictConfig) -> nn.Module:
    """The loss named by ``LOSS.name``: from vissl_vit's registry, else torch.nn by class name.

    Args:
        cfg: the ``config`` node.
    """
    name = cfg.LOSS.name
    # a torch loss needs no LOSS.<name> section (its defaults are torch's); ours are in defaults.yaml
    kwargs = OmegaConf.to_container(cfg.LOSS[name], resolve=True) if name in cfg.LOSS else {}
    if name == "swav_loss":
        kwargs = infer_swav_kwargs(cfg, kwargs)
    if name in LOSSES.names():
        return call_with_kwargs(LOSSES.get(name), kwargs, f"config.LOSS.{name}")
    torch_cls = getattr(torch.nn, name, None)
    if isinstance(torch_cls, type) and name.endswith("Loss"):
        return TorchLoss(call_with_kwargs(torch_cls, kwargs, f"config.LOSS.{name}"))
    torch_names = [n for n in dir(torch.nn) if n.endswith("Loss")]
    raise ConfigError(
        f"config.LOSS.name='{name}' is neither a vissl_vit loss ({', '.join(LOSSES.names())}) nor a torch.nn "
        f"loss.{did_you_mean(name, LOSSES.names() + torch_names)}"
    )


def infer_swav_kwargs(cfg: DictConfig, kwargs: dict[str, Any], log: bool = True) -> dict[str, Any]:
    """swav_loss's sizes as VISSL infers them (``infer_losses_config`` in vissl/utils/hydra_config.py).

    ``embedding_dim`` is the swav_head's ``dims[-1]``, ``num_prototypes`` its ``num_clusters``, and
    ``num_crops`` the multi-crop transform's ``total_num_crops`` (the configured value when no
    transform has one). As in VISSL these win over the ``LOSS.swav_loss`` values, which a user
    easily forgets to change with the head; a value that differs is logged as overridden.

    Args:
        cfg: the ``config`` node.
        kwargs: ``LOSS.swav_loss`` as a dict.
        log: log each inferred value (the build does; validation's early look does not).
    """
    heads = OmegaConf.to_container(cfg.MODEL.HEAD.PARAMS, resolve=True)
    if len(heads) != 1 or heads[0][0] != "swav_head":
        names = [h[0] for h in heads]
        raise ConfigError(
            f"config.LOSS.name=swav_loss needs exactly one head, a swav_head, in config.MODEL.HEAD.PARAMS; got {names}"
        )
    head = heads[0][1]
    inferred: dict[str, tuple[Any, str]] = {}
    if "dims" in head:
        inferred["embedding_dim"] = (head["dims"][-1], "MODEL.HEAD.PARAMS swav_head dims[-1]")
    if "num_clusters" in head:
        inferred["num_prototypes"] = (list(head["num_clusters"]), "MODEL.HEAD.PARAMS swav_head num_clusters")
    for transform in OmegaConf.to_container(cfg.DATA.TRAIN.TRANSFORMS, resolve=True):
        if "total_num_crops" in transform:  # VISSL: the last transform that has the key
            inferred["num_crops"] = (transform["total_num_crops"], f"DATA.TRAIN.TRANSFORMS {transform['name']}")
    kwargs = dict(kwargs)
    for key, (value, source) in inferred.items():
        note = f" (config.LOSS.swav_loss.{key}={kwargs[key]} overridden, as VISSL does)" if kwargs[key] != value else ""
        if log:
            logger.info("swav_loss: %s=%s from %s%s", key, value, source, note)
        kwargs[key] = value
    return kwargs
