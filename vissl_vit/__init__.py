"""vissl_vit: train Vision Transformers, supervised or self-supervised, from a YAML file.

The Python API mirrors the command line::

    from vissl_vit import compose_config, build_model, build_loss, build_dataset, build_dataloader

    cfg = compose_config(["config=test/quick_vit", "config.OPTIMIZER.num_epochs=1"]).config
    model = build_model(cfg)            # trunk + heads
    loss = build_loss(cfg)              # LOSS.name with LOSS.<name>'s arguments
    dataset = build_dataset(cfg, "TRAIN")
    optimizer = build_optimizer(cfg, model)

``run_train_engine(compose_config([...]))`` runs a whole training in this process;
``apply_weights_init(model, cfg)`` loads MODEL.WEIGHTS_INIT into a built model, and
``run_extract_features_engine`` / ``run_nearest_neighbor_engine`` are the evaluation engines.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# bound now: the function's name is also its module's, which an import of vissl_vit.load_run would
# otherwise leave here in its place (that module imports no torch)
from vissl_vit.load_run import load_run

# name -> the module it comes from: imported on first use (PEP 562), so that ``import vissl_vit``
# and the command line's --help, --list-configs and config errors do not wait for torch
_EXPORTS = {
    "apply_weights_init": "vissl_vit.models",
    "build_dataloader": "vissl_vit.data",
    "build_dataset": "vissl_vit.data",
    "build_loss": "vissl_vit.losses",
    "build_lr_scheduler": "vissl_vit.optim",
    "build_meter": "vissl_vit.meters",
    "build_model": "vissl_vit.models",
    "build_optimizer": "vissl_vit.optim",
    "compose_config": "vissl_vit.config",
    "derive_run_values": "vissl_vit.config",
    "run_extract_features_engine": "vissl_vit.engine.extract_engine",
    "run_nearest_neighbor_engine": "vissl_vit.engine.extract_engine",
    "run_train_engine": "vissl_vit.engine.train_engine",
}

if TYPE_CHECKING:
    from vissl_vit.config import compose_config, derive_run_values
    from vissl_vit.data import build_dataloader, build_dataset
    from vissl_vit.engine.extract_engine import run_extract_features_engine, run_nearest_neighbor_engine
    from vissl_vit.engine.train_engine import run_train_engine
    from vissl_vit.losses import build_loss
    from vissl_vit.meters import build_meter
    from vissl_vit.models import apply_weights_init, build_model
    from vissl_vit.optim import build_lr_scheduler, build_optimizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vissl_vit' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"

__all__ = [
    "apply_weights_init",
    "build_dataloader",
    "build_dataset",
    "build_loss",
    "build_lr_scheduler",
    "build_meter",
    "build_model",
    "build_optimizer",
    "compose_config",
    "derive_run_values",
    "load_run",
    "run_extract_features_engine",
    "run_nearest_neighbor_engine",
    "run_train_engine",
]
