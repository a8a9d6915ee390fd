"""build_loss: LOSS.name + LOSS.<name> -> a loss module."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vissl_vit.errors import ConfigError, did_you_mean
from vissl_vit.losses.cross_entropy import TorchLoss
from vissl_vit.registry import LOSSES
from vissl_vit.utils.kwargs import call_with_kwargs


def build_loss(cfg: DictConfig) -> nn.Module:
    """The loss named by ``LOSS.name``: from vissl_vit's registry, else torch.nn by class name.

    Args:
        cfg: the ``config`` node.
    """
    name = cfg.LOSS.name
    # a torch loss needs no LOSS.<name> section (its defaults are torch's); ours are in defaults.yaml
    kwargs = OmegaConf.to_container(cfg.LOSS[name], resolve=True) if name in cfg.LOSS else {}
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
