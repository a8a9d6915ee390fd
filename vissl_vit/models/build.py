"""build_model: MODEL.* -> TrunkHeadModel. The only place that reads MODEL.TRUNK and MODEL.HEAD."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from vissl_vit.errors import ConfigError
from vissl_vit.models.feature_eval import FeatureEvalModel, parse_pool_ops_map
from vissl_vit.models.moco import MoCoModel
from vissl_vit.models.model import TrunkHeadModel
from vissl_vit.models.trunks.base import trunk_class
from vissl_vit.registry import HEADS
from vissl_vit.utils.kwargs import call_with_kwargs

# MODEL.WRAPPER's values: the method wrapper around trunk + heads. "" (auto) is the choice of the
# configs written before the key: MoCo's wrapper when LOSS.name is moco_loss, none otherwise.
WRAPPERS = ("", "none", "moco")


def method_wrapper(cfg: DictConfig) -> str:
    """The method wrapper the model gets: "none" or "moco" (MODEL.WRAPPER, "" resolved from LOSS.name).

    Args:
        cfg: the ``config`` node.

    Raises:
        ConfigError: MODEL.WRAPPER is not one of :data:`WRAPPERS`.
    """
    name = cfg.MODEL.WRAPPER
    if name not in WRAPPERS:
        raise ConfigError(
            f"config.MODEL.WRAPPER={name!r}: expected one of '' (auto: moco when LOSS.name is moco_loss, "
            f"else none), {', '.join(WRAPPERS[1:])}."
        )
    if name:
        return name
    return "moco" if cfg.LOSS.name == "moco_loss" else "none"


def estimate_num_params(cfg: DictConfig) -> int:
    """The number of parameters build_model would create, from the config alone (nothing is
    allocated), so that an absurd size (NUM_LAYERS=100000) is refused before building. The trunk
    counts its own (:meth:`Trunk.num_params_from_config`); heads are counted from their widths
    (dims, in_plane/hidden_dim/num_classes, num_clusters); MoCo's momentum encoder doubles the count.

    Args:
        cfg: the ``config`` node.
    """
    trunk = trunk_class(cfg.MODEL.TRUNK).num_params_from_config(cfg.MODEL.TRUNK)
    heads = 0
    for entry in OmegaConf.to_container(cfg.MODEL.HEAD.PARAMS, resolve=True):
        kwargs = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
        widths = [int(w) for w in kwargs.get("dims", []) if isinstance(w, int)]
        if "in_plane" in kwargs and "num_classes" in kwargs:
            widths = [int(kwargs["in_plane"]), *([int(kwargs["hidden_dim"])] if kwargs.get("hidden_dim") else [])]
            widths.append(int(kwargs["num_classes"]))
        heads += sum(a * b + b for a, b in zip(widths, widths[1:]))
        clusters = kwargs.get("num_clusters", [])
        if widths and isinstance(clusters, list):
            heads += widths[-1] * sum(int(c) for c in clusters if isinstance(c, int))
    total = trunk + heads
    return 2 * total if method_wrapper(cfg) == "moco" else total


def build_model(cfg: DictConfig) -> TrunkHeadModel:
    """Build trunk and heads from the ``config`` node of a composed config.

    A method whose model is more than trunk + heads is chosen by ``MODEL.WRAPPER``
    (:func:`method_wrapper`; by ``LOSS.name`` in older configs): MoCo's adds a momentum encoder,
    configured by ``LOSS.moco_loss`` as in VISSL's configs. With
    ``FEATURE_EVAL_SETTINGS.EVAL_MODE_ON`` the model is a frozen trunk with a head per feature
    (:class:`FeatureEvalModel`). Weights are loaded separately (:func:`apply_weights_init`).

    Args:
        cfg: the ``config`` node (``compose_config(...).config``).
    """
    trunk = trunk_class(cfg.MODEL.TRUNK).from_config(cfg.MODEL.TRUNK)
    heads = []
    for i, entry in enumerate(OmegaConf.to_container(cfg.MODEL.HEAD.PARAMS, resolve=True)):
        head_name, kwargs = entry[0], entry[1] if len(entry) > 1 else {}
        heads.append(call_with_kwargs(HEADS.get(head_name), kwargs, f"config.MODEL.HEAD.PARAMS[{i}] '{head_name}'"))
    fe = cfg.MODEL.FEATURE_EVAL_SETTINGS
    if fe.EVAL_MODE_ON:
        names, pools = parse_pool_ops_map(OmegaConf.to_container(fe.LINEAR_EVAL_FEAT_POOL_OPS_MAP, resolve=True))
        return FeatureEvalModel(
            trunk, heads, names or None, pools, fe.SHOULD_FLATTEN_FEATS, freeze_heads=freezes_heads(fe)
        )
    wrapper = method_wrapper(cfg)  # checked before anything is built
    model = TrunkHeadModel(trunk, heads)
    if wrapper == "moco":
        m = cfg.LOSS.moco_loss
        model = MoCoModel(model, m.version, m.momentum, m.momentum_schedule, m.shuffle_bn)
    return model


def freezes_heads(fe: DictConfig) -> bool:
    """FEATURE_EVAL_SETTINGS freezes the heads too: FREEZE_TRUNK_AND_HEAD, unless FREEZE_TRUNK_ONLY is
    also set, which wins as in VISSL (train_task.py's build_model: ``if FREEZE_TRUNK_ONLY ... elif
    FREEZE_TRUNK_AND_HEAD``), the pair a VISSL trunk overlay over its kNN base composes to."""
    return bool(fe.EVAL_MODE_ON and fe.FREEZE_TRUNK_AND_HEAD and not fe.FREEZE_TRUNK_ONLY)


def weights_scope(cfg: DictConfig) -> str:
    """What MODEL.WEIGHTS_INIT loads: "trunk" when the heads are new (linear eval, feature
    extraction of the trunk), else "model"; WEIGHTS_INIT.SCOPE overrides. As VISSL's
    ``should_init_head_weights``, EVAL_TRUNK_AND_HEAD loads the heads in evaluation too."""
    scope = cfg.MODEL.WEIGHTS_INIT.SCOPE
    if scope != "auto":
        return scope
    fe = cfg.MODEL.FEATURE_EVAL_SETTINGS
    if fe.EVAL_TRUNK_AND_HEAD and len(cfg.MODEL.HEAD.PARAMS):
        return "model"
    trunk_only = fe.EVAL_MODE_ON and not freezes_heads(fe)
    return "trunk" if trunk_only or cfg.ENGINE_NAME in ("extract_features", "nearest_neighbor") else "model"


def apply_weights_init(model: TrunkHeadModel, cfg: DictConfig) -> None:
    """Load MODEL.WEIGHTS_INIT.PARAMS_FILE into a freshly built model, when one is set."""
    if cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE:
        from vissl_vit.models.weights import init_model_from_weights

        init_model_from_weights(model, cfg.MODEL.WEIGHTS_INIT, weights_scope(cfg))
