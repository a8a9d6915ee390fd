"""``load_run(run_dir)``: a trained model and its eval transforms from a run folder, in two lines::

    model, transform = vissl_vit.load_run("./runs/my_run")
    logits = model(transform(Image.open("cat.jpg").convert("RGB"))[None])[0]

The model is built from the run's ``train_config.yaml`` and loaded (strictly) from its newest
checkpoint, or from ``model_final.safetensors`` when the folder has no checkpoint left; the
transform is the run's test transform (``DATA.TEST.TRANSFORMS``), what its test phases fed the model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from vissl_vit.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)


def _weights_file(run_dir: str, weights: str | None) -> str:
    from vissl_vit.engine.checkpoint import find_latest
    from vissl_vit.export import EXPORT_STEM

    if weights:
        path = weights if os.path.isabs(weights) or os.path.exists(weights) else os.path.join(run_dir, weights)
        if not os.path.isfile(path):
            raise ConfigError(f"load_run(weights={weights!r}): no such file (in {run_dir} or as given).")
        return path
    latest = find_latest(run_dir)
    if latest is not None:
        return latest
    final = os.path.join(run_dir, f"{EXPORT_STEM}.safetensors")
    if os.path.isfile(final):
        return final
    raise ConfigError(
        f"load_run({run_dir!r}): the folder has no checkpoint (model_*.torch) and no {EXPORT_STEM}.safetensors."
    )


def run_config_file(run_dir: str, who: str = "load_run") -> str:
    """``run_dir/train_config.yaml``, or a ConfigError naming ``who`` asked for it."""
    config_file = os.path.join(os.path.abspath(run_dir), "train_config.yaml")
    if not os.path.isfile(config_file):
        raise ConfigError(f"{who}({run_dir!r}): no train_config.yaml there (is it a run folder, CHECKPOINT.DIR?).")
    return config_file


def load_run_model(run_dir: str, weights: str | None = None) -> tuple[nn.Module, DictConfig]:
    """The model a run trained (eval mode, CPU) and the run's composed config (its ``config`` node):
    :func:`load_run` without the transform, for tools that also read the run's data settings."""
    from vissl_vit.config import compose_config
    from vissl_vit.models import build_model
    from vissl_vit.models.weights import detect_format, load_weights, map_names, read_weights_file, select_state_dict

    config_file = run_config_file(run_dir)
    cfg = compose_config([f"config={config_file}"]).config
    model = build_model(cfg)
    path = _weights_file(run_dir, weights)
    sd, _ = select_state_dict(read_weights_file(path), "classy_state_dict")
    fmt = detect_format(list(sd))
    load_weights(model, map_names(sd, fmt), scope="model", strict=True, path=path, fmt=fmt)
    model.eval()
    logger.info("Loaded %s into the model of %s", path, config_file)
    return model, cfg


def load_run(run_dir: str, weights: str | None = None) -> tuple[nn.Module, Callable[[Any], Any]]:
    """The model a run trained, in eval mode on the CPU, and its eval transform (PIL image -> tensor).

    Args:
        run_dir: a run folder (CHECKPOINT.DIR), with its train_config.yaml.
        weights: a file to load instead of the newest checkpoint: a path, or a name in the folder
            (``model_best.torch``, ``model_final.safetensors``, ``model_phase3.torch``).

    Raises:
        ConfigError: the folder has no train_config.yaml or no weights.
        UserError: the weights do not fit the model built from the config.
    """
    from vissl_vit.data.transforms import build_transforms

    model, cfg = load_run_model(run_dir, weights)
    entries = OmegaConf.to_container(cfg.DATA.TEST.TRANSFORMS, resolve=True)
    transform = build_transforms(entries, "config.DATA.TEST.TRANSFORMS")
    if transform is None:
        raise ConfigError(
            f"load_run({run_dir!r}): the run has no DATA.TEST.TRANSFORMS, so its eval transform is unknown; "
            "build one (e.g. torchvision Resize, CenterCrop, ToTensor) for the trunk's IMAGE_SIZE."
        )
    return model, transform
