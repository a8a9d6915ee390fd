"""build_optimizer and the schedules: OPTIMIZER.* -> torch optimizer and fvcore schedules.

An optimizer is a registered function ``fn(groups, lr=..., **kwargs) -> torch.optim.Optimizer``.
Its keyword arguments come from two places: VISSL's flat keys (``OPTIMIZER.momentum``,
``nesterov``, ``betas``, ``eps``), passed to the optimizers whose signature names them, and its own
section ``OPTIMIZER.<name>`` (as ``LOSS.<name>``) for everything else, checked against the
signature. Weight decay is never a keyword: each parameter group carries its own.

One key of a section is not an argument: ``weight_decay_units`` of the optimizers with decoupled
weight decay (adamw, big_vision_adam), read here. ``torch`` (the default): ``OPTIMIZER.weight_decay``
(and its schedule) is torch's ``wd`` in ``theta <- theta - lr(t) wd theta``. ``big_vision``: it is
big_vision's ``wd`` in ``theta <- theta - sched(t) (lr adam + wd theta)`` (``optax.py::make``), the
decay following the schedule's shape but not its size; with ``lr(t) = lr_peak sched(t)`` that is
torch's ``wd / lr_peak`` (mup-vit's ``--decoupled-weight-decay``: 1e-4 at lr 1e-3 is torch's 0.1).
The groups' ``wd_scale`` (and the fixed weight decays of ``param_group_overrides``) are divided by
``lr_peak``, the largest value of the (auto-scaled) lr schedule, so the trainer's ``weight_decay =
scheduled wd x wd_scale`` gives torch's value at every step and the fused torch AdamW runs
big_vision's decay. A units key rather than a separate optimizer: the conversion is the same for
both optimizers, and every VISSL config (no such key) keeps torch's units.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING

import torch
from fvcore.common.param_scheduler import ParamScheduler
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vissl_vit.errors import ConfigError
from vissl_vit.optim import big_vision  # noqa: F401  (registers big_vision_adam)
from vissl_vit.optim.param_groups import get_param_groups
from vissl_vit.optim.schedulers import build_param_scheduler
from vissl_vit.registry import OPTIMIZERS
from vissl_vit.utils.kwargs import call_with_kwargs

if TYPE_CHECKING:  # config.derive imports optim.schedulers: no import cycle at run time
    from vissl_vit.config.derive import DerivedValues

logger = logging.getLogger(__name__)

# VISSL's flat OPTIMIZER keys; each optimizer receives those its signature names
FLAT_KEYS = ("momentum", "nesterov", "betas", "eps")
PARAM_GROUP_CONSTRUCTORS = ("default", "lr_decay")  # VISSL's names (its dino / linear_eval_heads are not here)
WEIGHT_DECAY_UNITS = ("torch", "big_vision")
DECOUPLED = ("adamw", "big_vision_adam")  # the optimizers whose decay is theta <- theta - lr wd theta


def _fused(groups: list[dict]) -> bool:
    return all(p.is_cuda for g in groups for p in g["params"])


@OPTIMIZERS.register("sgd")
def sgd(
    groups: list[dict], lr: float, momentum: float, nesterov: bool, dampening: float = 0.0
) -> torch.optim.Optimizer:
    """torch's SGD (fused on CUDA); weight decay is coupled L2, from each group."""
    return torch.optim.SGD(
        groups, lr=lr, momentum=momentum, nesterov=nesterov, dampening=dampening, fused=_fused(groups) or None
    )


@OPTIMIZERS.register("adamw")
def adamw(
    groups: list[dict], lr: float, betas: list[float], eps: float, amsgrad: bool = False
) -> torch.optim.Optimizer:
    """torch's AdamW (fused on CUDA): decoupled weight decay ``θ ← θ − lr·wd·θ``."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, amsgrad=amsgrad, fused=_fused(groups) or None)


@OPTIMIZERS.register("adam")
def adam(groups: list[dict], lr: float, betas: list[float], eps: float, amsgrad: bool = False) -> torch.optim.Optimizer:
    """torch's Adam (fused on CUDA) with coupled L2 weight decay: ``g ← g + wd·θ`` before the moments,
    as SimplEsT-ViT trains (``train.py::build_optimizer``, RECIPES.md 6.5); VISSL's ``adam`` is the same."""
    return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), eps=eps, amsgrad=amsgrad, fused=_fused(groups) or None)


@OPTIMIZERS.register("lamb")
def lamb(
    groups: list[dict],
    lr: float,
    betas: list[float],
    eps: float,
    max_grad_norm: float | None = 1.0,
    bias_correction: bool = True,
    grad_averaging: bool = True,
    trust_clip: bool = False,
    always_adapt: bool = False,
) -> torch.optim.Optimizer:
    """timm's ``Lamb`` (``timm/optim/lamb.py``), the port of apex's FusedLAMB that DeiT-III trains with.

    What it does (timm 1.0): before anything, all gradients are divided by
    ``max(1, ‖g‖₂ / max_grad_norm)``, ``‖g‖₂`` the norm over every group (a global clip inside the
    optimizer, on even when ``MODEL.GRAD_CLIP`` is off; None disables it); then bias-corrected
    Adam moments (``grad_averaging``: ``m ← β1·m + (1 − β1)·g``), ``u = m̂ / (√v̂ + eps) + wd·θ``,
    and the trust ratio ``‖θ‖ / ‖u‖`` (1 when either is 0) only for groups whose weight decay is
    not 0 (``always_adapt=False``): exempt groups (biases, norms, LayerScale, tokens) take plain
    Adam steps. ``θ ← θ − lr·ratio·u``. ``trust_clip`` caps the ratio at 1 (LAMBC).

    Args:
        groups: parameter groups, each with its weight decay.
        lr: initial learning rate (the schedule sets it every step).
        betas: (β1, β2).
        eps: added to √v̂ (DeiT-III: 1e-8; timm's default is 1e-6).
        max_grad_norm: the global gradient norm clip inside the optimizer; None for none.
        bias_correction: Adam's bias correction of the moments.
        grad_averaging: scale the gradient by (1 − β1) in the first moment.
        trust_clip: clip the trust ratio at 1.
        always_adapt: apply the trust ratio to groups without weight decay too.
    """
    from timm.optim import Lamb

    return Lamb(
        groups,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        max_grad_norm=max_grad_norm,
        bias_correction=bias_correction,
        grad_averaging=grad_averaging,
        trust_clip=trust_clip,
        always_adapt=always_adapt,
    )


@OPTIMIZERS.register("shampoo")
def shampoo(
    groups: list[dict],
    lr: float,
    betas: list[float],
    eps: float,
    nesterov: bool,
    start_preconditioning_step: int = 25,
    preconditioning_compute_steps: int = 25,
    statistics_compute_steps: int = 1,
    block_size: int = 8192,
    no_preconditioning_for_layers_with_dim_gt: int | None = None,
    skip_preconditioning_rank_lt: int = 1,
    shape_interpretation: bool = False,
    pre_conditioner_type: str = "all",
    graft_type: str = "rmsprop",
    moving_average_for_momentum: bool = True,
    weight_decay_type: str = "l2",
    bias_correction: bool = True,
    use_svd: bool = True,
    root_inverse_eps: float = 1e-12,
    matrix_eps: float = 0.0,
    inverse_exponent_override: int = 0,
) -> torch.optim.Optimizer:
    """Shampoo with Adam grafting: ``pytorch_optimizer.ScalableShampoo`` with the seed's weight
    decay, bias correction and epsilon, and plain-tensor checkpoints (``optim/shampoo.py``, whose
    docstring maps SimplEsT-ViT's Distributed Shampoo settings and says what differs). ``eps`` is
    the graft's epsilon (``grafting_epsilon``), ``betas`` the momentum and the factor matrices' /
    graft's EMA, ``nesterov`` the flat key; the defaults are the seed's Shampoo@25."""
    from vissl_vit.optim.shampoo import build_shampoo

    settings = {k: v for k, v in locals().items() if k not in ("groups", "lr", "betas", "eps", "build_shampoo")}
    return build_shampoo(groups, lr, betas, eps, settings, "config.OPTIMIZER.shampoo")


def optimizer_kwargs(o: DictConfig) -> dict:
    """The keyword arguments of ``OPTIMIZER.name``'s function: the flat VISSL keys its signature
    names, then its section ``OPTIMIZER.<name>`` (a key in both places is an error)."""
    name = o.name
    fn = OPTIMIZERS.get(name)
    params = inspect.signature(fn).parameters
    kwargs = {k: OmegaConf.to_object(o[k]) if OmegaConf.is_config(o[k]) else o[k] for k in FLAT_KEYS if k in params}
    # a registered optimizer without a section in defaults.yaml runs with its own defaults
    section = OmegaConf.to_container(o[name], resolve=True) if name in o else {}
    if not isinstance(section, dict):
        raise ConfigError(f"config.OPTIMIZER.{name}={section!r}: expected a mapping of {name}'s keyword arguments.")
    twice = sorted(set(section) & set(FLAT_KEYS))
    if twice:
        raise ConfigError(
            f"config.OPTIMIZER.{name}.{twice[0]}: set it as config.OPTIMIZER.{twice[0]} (VISSL's flat key), not in "
            "the optimizer's section."
        )
    section.pop("weight_decay_units", None)  # read by build_optimizer, not an argument
    return {**kwargs, **section}


def weight_decay_units(o: DictConfig) -> str:
    """``OPTIMIZER.<name>.weight_decay_units`` (torch when absent); see the module docstring."""
    name = o.name
    units = o[name].get("weight_decay_units", "torch") if name in o and OmegaConf.is_dict(o[name]) else "torch"
    if units not in WEIGHT_DECAY_UNITS:
        raise ConfigError(
            f"config.OPTIMIZER.{name}.weight_decay_units='{units}': expected one of {', '.join(WEIGHT_DECAY_UNITS)}."
        )
    if units == "big_vision" and name not in DECOUPLED:
        raise ConfigError(
            f"config.OPTIMIZER.{name}.weight_decay_units=big_vision: only the decoupled optimizers "
            f"({', '.join(DECOUPLED)}) take big_vision's units; {name}'s weight decay is not decoupled."
        )
    return units


def peak_lr(cfg: DictConfig) -> float:
    """The largest value of the learning-rate schedule after auto LR scaling (big_vision's ``lr``)."""
    from vissl_vit.config.derive import auto_scaled_schedule, schedule_spec, schedule_values

    where = "config.OPTIMIZER.param_schedulers.lr"
    spec = schedule_spec(OmegaConf.to_container(cfg.OPTIMIZER.param_schedulers.lr, resolve=True), where)
    spec, _ = auto_scaled_schedule(spec, cfg, where)
    return max(float(v) for _, v in schedule_values(spec, where))


def to_torch_units(groups: list[dict], lr_peak: float, where: str) -> None:
    """big_vision's weight decay -> torch AdamW's, in place: each group's ``weight_decay`` and
    ``wd_scale`` divided by ``lr_peak`` (exempt groups stay at 0; fixed ones are converted too)."""
    if not lr_peak > 0:
        raise ConfigError(
            f"{where}=big_vision divides the weight decay by the peak learning rate, but the lr schedule's "
            f"largest value is {lr_peak:g}: expected > 0."
        )
    for g in groups:
        g["weight_decay"] = g["weight_decay"] / lr_peak
        if g["wd_scale"] is not None:
            g["wd_scale"] = g["wd_scale"] / lr_peak


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``OPTIMIZER.name`` over the model's parameter groups.

    The learning rate and the weight decay are set by the schedules at every step (times each
    group's ``lr_scale`` / ``wd_scale``); the values here are their start.

    Args:
        cfg: the ``config`` node.
        model: the model (on its device already, for fused kernels).
    """
    o = cfg.OPTIMIZER
    if o.param_group_constructor not in PARAM_GROUP_CONSTRUCTORS:
        raise ConfigError(
            f"config.OPTIMIZER.param_group_constructor='{o.param_group_constructor}': expected one of "
            f"{', '.join(PARAM_GROUP_CONSTRUCTORS)} (layer-wise LR decay is lr_decay)."
        )
    decay = o.layer_wise_lr_decay.decay
    if o.param_group_constructor == "lr_decay" and not 0 < decay <= 1:
        raise ConfigError(f"config.OPTIMIZER.layer_wise_lr_decay.decay={decay}: expected a factor in (0, 1].")
    groups = get_param_groups(
        model,
        o.weight_decay,
        o.regularize_bn,
        o.regularize_bias,
        list(o.non_regularized_parameters),
        regularize_1d_params=o.regularize_1d_params,
        layer_decay=decay if o.param_group_constructor == "lr_decay" else None,
        overrides=OmegaConf.to_container(o.param_group_overrides, resolve=True),
        regularize_only_kernels=o.get("regularize_only_kernels", False),
    )
    if weight_decay_units(o) == "big_vision":
        lr_peak = peak_lr(cfg)
        to_torch_units(groups, lr_peak, f"config.OPTIMIZER.{o.name}.weight_decay_units")
        logger.info(
            "Weight decay in big_vision's units: theta <- theta - sched(t) x %g x theta on the decayed groups, "
            "torch's weight_decay %g / peak lr %g = %g",
            o.weight_decay,
            o.weight_decay,
            lr_peak,
            o.weight_decay / lr_peak,
        )
    if not any(g["params"] for g in groups):
        if not cfg.TEST_ONLY:
            raise ConfigError("The model has no trainable parameter (all frozen): nothing to train.")
        # TEST_ONLY of a frozen model: the trainer still holds an optimizer; it never steps
        groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr_scale": 1.0, "weight_decay": 0.0, "wd_scale": 0.0}]
    return call_with_kwargs(
        OPTIMIZERS.get(o.name), {"lr": 0.0, **optimizer_kwargs(o)}, f"config.OPTIMIZER.{o.name}", groups
    )


def build_lr_scheduler(derived: DerivedValues) -> ParamScheduler:
    """The learning-rate schedule (already auto-scaled in ``derived``)."""
    return build_param_scheduler(derived.lr_schedule, derived.num_epochs, derived.max_iterations)


def build_wd_scheduler(derived: DerivedValues) -> ParamScheduler:
    """The weight-decay schedule of ``OPTIMIZER.param_schedulers.weight_decay`` (constant
    ``OPTIMIZER.weight_decay`` by default): the decayed groups' weight decay at progress ``where``."""
    return build_param_scheduler(derived.weight_decay_schedule, derived.num_epochs, derived.max_iterations)
