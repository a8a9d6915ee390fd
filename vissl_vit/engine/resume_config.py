"""What a resume may change: the new config against the config of the checkpoint it resumes.

Keys that shape the saved state (the model's tensors, the loss's buffers, the optimizer's state)
cannot change: loading would fail half-way or continue a different run under the old name. Every
other change (epochs, schedule values, batch size, world size, logging, ...) is accepted and
listed in one warning, so that a resume under new values is never silent. The rule is written in
defaults.yaml, above CHECKPOINT.AUTO_RESUME.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from vissl_vit.errors import ConfigError

logger = logging.getLogger(__name__)

# Keys that shape the state, as patterns over the dotted names under `config`. "LOSS.*.x" is any
# loss's section (only the active loss's sections differ in practice).
STATE_SHAPING = (
    "ENGINE_NAME",
    "MODEL.TRUNK.*",
    "MODEL.HEAD.*",
    "LOSS.name",
    "LOSS.*.embedding_dim",
    "LOSS.*.num_prototypes",
    "LOSS.*.queue_size",
    "LOSS.*.queue.queue_length",
    "LOSS.*.crops_for_assign",
    "LOSS.*.version",
    "OPTIMIZER.name",
    "OPTIMIZER.regularize_bn",
    "OPTIMIZER.regularize_bias",
    "OPTIMIZER.non_regularized_parameters",
    "OPTIMIZER.regularize_1d_params",
    "OPTIMIZER.param_group_constructor",
    "OPTIMIZER.layer_wise_lr_decay.decay",
    "OPTIMIZER.param_group_overrides",
)
# ... except these trunk keys, which change how the model runs, not what it holds
STATE_NEUTRAL = ("MODEL.TRUNK.*_RATE", "MODEL.TRUNK.*.CHECKPOINT_*")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys -> values; lists are leaves (a head list or a schedule list is one value)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def shapes_state(key: str) -> bool:
    """Whether a change of ``key`` (a dotted name under ``config``) is refused on resume."""
    match = lambda patterns: any(fnmatch.fnmatchcase(key, p) for p in patterns)  # noqa: E731
    return match(STATE_SHAPING) and not match(STATE_NEUTRAL)


def _previous_config(state: dict[str, Any], run_dir: str) -> tuple[dict[str, Any] | None, str]:
    """The config the checkpoint was written under (older checkpoints: the run folder's train_config.yaml)."""
    if state.get("config_yaml"):  # a checkpoint field, not a config key: older checkpoints lack it
        return yaml.safe_load(state["config_yaml"])["config"], "the checkpoint"
    path = os.path.join(run_dir, "train_config.yaml")
    if not os.path.exists(path):
        return None, path
    with open(path) as f:
        return yaml.safe_load(f)["config"], path


def check_resume_config(
    cfg_root: DictConfig, state: dict[str, Any], run_dir: str, checkpoint: str, warn: bool = True
) -> None:
    """Compare this run's config with the resumed checkpoint's; call before train_config.yaml is written.

    Args:
        cfg_root: this run's composed config (``config`` under it).
        state: the loaded checkpoint.
        run_dir: the run folder (CHECKPOINT.DIR).
        checkpoint: the checkpoint's path, for messages.
        warn: log the accepted changes (on rank 0 only: one warning per run; every rank checks).

    Raises:
        ConfigError: a key that shapes the saved state changed (each listed old -> new).
    """
    old, source = _previous_config(state, run_dir)
    if old is None:
        if warn:
            logger.warning("Resuming %s without its config (no %s): cannot tell what changed.", checkpoint, source)
        return
    new = _flatten(OmegaConf.to_container(cfg_root.config, resolve=True))
    old = _flatten(old)
    absent = "<absent>"
    changed = [k for k in sorted(set(new) | set(old)) if new.get(k, absent) != old.get(k, absent)]
    refused = [k for k in changed if shapes_state(k) and k in new and k in old]  # a new key: a new version
    describe = lambda keys: "; ".join(f"{k}: {old.get(k, absent)!r} -> {new.get(k, absent)!r}" for k in keys)  # noqa: E731
    if refused:
        raise ConfigError(
            f"Cannot resume {checkpoint} with another model, loss or optimizer: {describe(refused)}. "
            "Use another config.CHECKPOINT.DIR for the new run (or restore these values to resume)."
        )
    if changed and warn:
        logger.warning(
            "Resuming %s with a changed config (compared with %s): %s", checkpoint, source, describe(changed)
        )
