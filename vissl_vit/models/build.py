"""build_model: MODEL.* -> TrunkHeadModel. The only place that reads MODEL.TRUNK and MODEL.HEAD."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from vissl_vit.models.moco import MoCoModel
from vissl_vit.models.model import TrunkHeadModel
from vissl_vit.registry import HEADS, TRUNKS
from vissl_vit.utils.kwargs import call_with_kwargs


def vit_kwargs(vit: DictConfig) -> dict[str, Any]:
    """MODEL.TRUNK.VISION_TRANSFORMERS -> keyword arguments of the vision_transformer trunk."""
    return {
        "image_size": vit.IMAGE_SIZE,
        "patch_size": vit.PATCH_SIZE,
        "in_chans": vit.IN_CHANNELS,
        "num_layers": vit.NUM_LAYERS,
        "num_heads": vit.NUM_HEADS,
        "hidden_dim": vit.HIDDEN_DIM,
        "mlp_dim": vit.MLP_DIM,
        "dropout_rate": vit.DROPOUT_RATE,
        "attention_dropout_rate": vit.ATTENTION_DROPOUT_RATE,
        "classifier": vit.CLASSIFIER,
        "use_class_token": vit.USE_CLASS_TOKEN,
        "drop_path_rate": vit.DROP_PATH_RATE,
        "qkv_bias": vit.QKV_BIAS,
        "pos_embed_type": vit.POS_EMBED,
        "freeze_patch_embed": vit.FREEZE_PATCH_EMBED,
        # VISSL writes False for "the default scale"
        "qk_scale": None if isinstance(vit.QK_SCALE, bool) else float(vit.QK_SCALE),
        "checkpoint_mlp": vit.CHECKPOINT_MLP,
        "checkpoint_block": vit.CHECKPOINT_BLOCK,
    }


def build_model(cfg: DictConfig) -> TrunkHeadModel:
    """Build trunk and heads from the ``config`` node of a composed config.

    MoCo (``LOSS.name: moco_loss``) is the one method whose model is more than trunk + heads: its
    model adds a momentum encoder, configured by ``LOSS.moco_loss`` as in VISSL's configs.

    Args:
        cfg: the ``config`` node (``compose_config(...).config``).
    """
    name = cfg.MODEL.TRUNK.NAME
    trunk_cls = TRUNKS.get(name)
    trunk = call_with_kwargs(trunk_cls, vit_kwargs(cfg.MODEL.TRUNK.VISION_TRANSFORMERS), f"trunk '{name}'")
    heads = []
    for i, entry in enumerate(OmegaConf.to_container(cfg.MODEL.HEAD.PARAMS, resolve=True)):
        head_name, kwargs = entry[0], entry[1] if len(entry) > 1 else {}
        heads.append(call_with_kwargs(HEADS.get(head_name), kwargs, f"config.MODEL.HEAD.PARAMS[{i}] '{head_name}'"))
    model = TrunkHeadModel(trunk, heads)
    if cfg.LOSS.name == "moco_loss":
        m = cfg.LOSS.moco_loss
        model = MoCoModel(model, m.version, m.momentum, m.momentum_schedule, m.shuffle_bn)
    return model
