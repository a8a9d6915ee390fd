"""Shampoo with Adam grafting (SimplEsT-ViT's "Shampoo@25"), resumable from plain-tensor checkpoints.

Library: ``pytorch_optimizer.ScalableShampoo`` (kozistr/pytorch_optimizer 4.1.0, Apache-2.0, on
PyPI and maintained), a port of Google's Scalable Shampoo (Anil et al. 2020) with layer-wise
grafting, blocking of large dimensions and SVD or Schur-Newton inverse roots (the SVD replaced
here by the seed's eigendecomposition root, see :func:`inverse_root`). The seed
(SimplEsT-ViT, RECIPES.md 6.5) trains with Meta's Distributed Shampoo (Shi & Lee), which is not on
the package index; this module maps the seed's settings onto ScalableShampoo and adds, in a
subclass, the three pieces of the seed's semantics the library lacks (switchable, see below).

The seed's settings and where they go (``OPTIMIZER.shampoo`` in defaults.yaml):

==============================================  ==============================================
seed (Meta ``DistributedShampoo``)              here
==============================================  ==============================================
``precondition_frequency=25``                   ``preconditioning_compute_steps: 25``
``start_preconditioning_step=25``               ``start_preconditioning_step: 25``
``betas=(0.9, 0.999)``                          ``OPTIMIZER.betas``; beta2 is the factor
                                                matrices' EMA and the graft's second moment
``grafting_beta2=0.999``                        (= beta2: one beta2 for both in the library)
``epsilon=1e-12``                               ``root_inverse_eps: 1e-12`` (ours: added to the
                                                eigenvalues before the inverse root), with
                                                ``matrix_eps: 0`` (factor matrices start at 0)
``grafting_type=ADAM, grafting_epsilon=1e-8``   ``graft_type: rmsprop`` + ``bias_correction``,
                                                epsilon ``OPTIMIZER.eps`` (the library's
                                                ``diagonal_eps``)
``max_preconditioner_dim=8192``                 ``block_size: 8192``, and
                                                ``no_preconditioning_for_layers_with_dim_gt:
                                                null`` (never skip: block instead)
``use_decoupled_weight_decay=False``            ``weight_decay_type: l2`` (ours, see below)
root ``2 x order``                              the library's ``2 x rank`` (L^-1/4 G R^-1/4)
``RootInvMethod.EIGEN``                         ``use_svd: True`` (the name is the library's;
                                                here it is Meta's eigendecomposition root,
                                                :func:`inverse_root`, not the library's SVD)
bias correction on                              ``bias_correction: True`` (ours, see below)
first moment an EMA, no Nesterov                ``moving_average_for_momentum: True``,
                                                ``nesterov: False``
==============================================  ==============================================

Added here (each a key; False / the library's value gives the library's behaviour):

- ``weight_decay_type: l2``: ``g <- g + wd theta`` before anything (factor statistics, graft
  statistics, preconditioning), as the seed (Meta's ``_per_group_step_impl`` adds it to the grads
  first) and torch's Adam do. The library's coupled mode (``l2_after_preconditioning``) adds
  ``wd theta`` to the grafted direction instead, bypassing the preconditioner and the graft's
  scaling; ``decoupled`` is the library's ``theta <- theta (1 - lr wd)``.
- ``bias_correction``: Adam's. The RMSProp graft divides by ``sqrt(v / (1 - beta2^k)) + eps``
  (torch Adam's order; the library: ``sqrt(v) + eps``), the update is divided by ``1 - beta1^t``
  (the first moments are EMAs from zero), and the factor matrices by ``1 - beta2^k`` before the
  inverse root (only its size relative to ``root_inverse_eps`` matters: grafting fixes the norm).
  Without it the early steps are larger than Adam's by about ``(1 - beta1^t) / sqrt(1 - beta2^t)``
  (betas 0.9, 0.999): 3.2x at step 1, 6.5x at 10, 5.9x at 25, 1.3x at 1000.
- ``root_inverse_eps``: the inverse root is ``U (s + eps)^(-1/p) V^T`` of the (bias-corrected)
  factor matrix, Meta's ``(L + eps I)^(-1/p)``; the library uses ``s^(-1/p)`` with only the
  initial ``matrix_eps I`` as a floor, which decays by beta2 every step (an exactly zero
  singular value, e.g. a dead unit's row, then gives inf). ``use_svd: False`` (Schur-Newton) is
  the library's unchanged, with ``matrix_eps`` its ridge.

What stays different from the seed (not reproducible with this library):

- Order of momentum and preconditioning: the seed preconditions the first moment (the EMA of
  the gradient, bias-corrected) with ``L^-1/4 . R^-1/4`` and grafts it to Adam's direction
  ``m_hat / (sqrt(v_hat) + eps)``, so its grafted phase is exactly Adam. The library
  preconditions (and grafts) each step's gradient and keeps the EMA of the preconditioned
  directions: the grafted phase is an EMA of ``g_s / (sqrt(v_hat_s) + eps)`` (Adam up to the
  change of ``v`` within the EMA's window), and after a recompute the old directions in the
  momentum keep the old preconditioner.
- Grafting norm: per parameter (the library's layer-wise grafting); Meta's implementation grafts
  per block, which differs only for parameters blocked above ``block_size``.
- 1-D parameters (biases, norm scales): the library never preconditions them (their update is
  the graft's, i.e. Adam-like); the seed's Shampoo preconditions a vector with one full factor
  matrix (root 2) when its length is at most max_preconditioner_dim.
- ``shape_interpretation`` (the library's default True, False here) merges consecutive dimensions
  while their product stays <= ``block_size``, and a tensor of at most ``block_size`` elements
  becomes 1-D, i.e. is not preconditioned at all: with 8192, every matrix of a small ViT (a 64 x
  64 projection) would take grafted Adam-like steps only, and ViT-S's (384, 3, 16, 16) patch
  kernel would become (1152, 256). False keeps every dimension (that kernel: four factors,
  root 8), which is what a Shampoo of the seed's kind does with matrices.
- The momentum EMA and ``beta2`` of the graft cannot be set apart from the factor matrices'
  (the seed's ``grafting_beta2`` equals its beta2 in its runs, so nothing is lost there).
- One ``beta1`` bias correction per group step (``t`` counts the group's steps), not per
  parameter: a parameter that missed steps (no gradient) is corrected as if it had not.
- Numerics: the root's ``eigh`` always in float64 (the seed: in the factor's float32, float64 on a
  retry), no distribution of the root computation across
  ranks (each rank computes every root: DDP only), no FSDP / DTensor parameters.
- A step a guard rejects (trainer.py ``_optimizer_step``) is put back in the weights but not in
  Shampoo's state (as for every optimizer that is not fused); the run raises before a checkpoint.

Checkpoints: ScalableShampoo keeps Python objects (``PreConditioner``, ``Graft``) in
``optimizer.state``, which ``torch.load(weights_only=True)`` cannot read. :class:`Shampoo`'s
``state_dict`` writes plain tensors per parameter: ``momentum``, ``statistics_i`` and
``pre_conditioners_i`` (the factor matrices and their inverse roots, one per block and axis; the
library's stacked tensor, used when all factors have one shape, is unstacked), ``num_statistics``,
``graft_momentum``, ``graft_statistics`` and ``graft_count`` (where the graft has them);
``load_state_dict`` rebuilds the objects for the parameters the state holds (a parameter not yet
stepped gets its state at its first step, as in an uninterrupted run) and fills them, so a loaded
optimizer continues bit for bit.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any

import torch
from pytorch_optimizer.optimizer.shampoo import ScalableShampoo
from pytorch_optimizer.optimizer.utils.graft import AdaGradGraft, LayerWiseGrafting, RMSPropGraft, build_graft
from pytorch_optimizer.optimizer.utils.partition import PreConditionerType
from pytorch_optimizer.optimizer.utils.preconditioner import PreConditioner

from vissl_vit.errors import ConfigError, UserError

GRAFT_TYPES = {
    "none": LayerWiseGrafting.NONE,
    "sgd": LayerWiseGrafting.SGD,
    "adagrad": LayerWiseGrafting.ADAGRAD,
    "rmsprop": LayerWiseGrafting.RMSPROP,
    "sqrtn": LayerWiseGrafting.SQRTN,
}
PRE_CONDITIONER_TYPES = {
    "all": PreConditionerType.ALL,
    "input": PreConditionerType.INPUT,
    "output": PreConditionerType.OUTPUT,
}
WEIGHT_DECAY_TYPES = ("l2", "l2_after_preconditioning", "decoupled")


def inverse_root(matrix: torch.Tensor, power: int, eps: float, scale: float = 1.0) -> torch.Tensor:
    """``(scale M + eps I)^(-1/power)`` of a symmetric PSD matrix (or a stack of them), as the seed's
    Meta Shampoo computes it (``matrix_functions._matrix_root_eigen``): ``eigh``, the eigenvalues
    shifted up by ``-min(lambda_min, 0)`` (round-off makes those of a near-singular factor slightly
    negative), then ``+ eps``, then ``Q diag(lambda^(-1/power)) Q^T``. In float64 (Meta: the factor's
    dtype, float64 only on a retry), returned in the input's dtype.

    Not the library's SVD: the SVD of a symmetric matrix with a slightly negative eigenvalue returns
    its absolute value with opposite singular vectors, so ``U (s + eps)^(-1/p) V^T`` gets a large
    negative eigenvalue (about ``-eps^(-1/p)``: -1000 for 1e-12 and p = 4) and the step goes uphill.
    """
    sym = matrix.to(torch.float64) * scale
    sym = (sym + sym.mT) / 2
    lam, q = torch.linalg.eigh(sym)
    lam = lam - lam.amin(dim=-1, keepdim=True).clamp(max=0.0)
    lam = lam.add(eps).pow_(-1.0 / power)
    return ((q * lam.unsqueeze(-2)) @ q.mT).to(matrix.dtype)


class SeedPreConditioner(PreConditioner):
    """The library's factor matrices and inverse roots, with the seed's epsilon and bias correction
    in the SVD root (see the module docstring); Schur-Newton (``use_svd=False``) is unchanged."""

    def __init__(
        self, var: torch.Tensor, beta2: float, *args: Any, root_inverse_eps: float, bias_correction: bool, **kwargs: Any
    ):
        super().__init__(var, beta2, *args, **kwargs)
        self.root_inverse_eps = root_inverse_eps
        self.bias_correction = bias_correction
        self.num_statistics = 0  # statistics updates so far: the k of the bias correction 1 - beta2^k

    def add_statistics(self, grad: torch.Tensor) -> None:
        if len(self.statistics) == 0:
            return
        super().add_statistics(grad)
        self.num_statistics += 1

    def compute_pre_conditioners(self) -> None:
        if not self.use_svd or len(self.statistics) == 0:
            super().compute_pre_conditioners()
            return
        scale = 1.0
        if self.bias_correction and self.beta2 < 1.0 and self.num_statistics > 0:
            scale = 1.0 / (1.0 - self.beta2**self.num_statistics)
        p, eps = self.exponent_for_pre_conditioner, self.root_inverse_eps
        if self.is_same_shapes:  # one batched SVD over the stacked factors, as the library
            self.pre_conditioners = inverse_root(self.statistics, p, eps, scale)
            return
        for i, statistic in enumerate(self.statistics):
            self.pre_conditioners[i] = inverse_root(statistic, p, eps, scale)


class AdamGraft(RMSPropGraft):
    """The library's RMSProp graft with Adam's bias correction of the second moment:
    ``g / (sqrt(v) / sqrt(1 - beta2^k) + eps)``, ``k`` the number of statistics updates."""

    def __init__(self, var: torch.Tensor, diagonal_eps: float):
        super().__init__(var, diagonal_eps)
        self.count = 0
        self.beta2 = 0.0

    def add_statistics(self, grad: torch.Tensor, beta2: float) -> None:
        super().add_statistics(grad, beta2)
        self.count += 1
        self.beta2 = beta2

    def precondition_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        correction = math.sqrt(1.0 - self.beta2**self.count) if self.count > 0 else 1.0  # as torch's Adam
        return grad.div(self.statistics.sqrt().div_(correction).add_(self.diagonal_eps))


class Shampoo(ScalableShampoo):
    """``ScalableShampoo`` with the seed's weight decay, bias correction and epsilon (module
    docstring) and a ``state_dict`` of plain tensors (exact resume from ``weights_only`` files).

    Args:
        params: parameters or parameter groups (each may carry its own ``weight_decay``).
        lr: learning rate (the trainer sets each group's at every step).
        betas: (beta1, beta2): the momentum EMA; the factor matrices' and the graft's EMA.
        weight_decay: the decay of the groups without their own.
        weight_decay_type: l2 (``g <- g + wd theta`` first, the seed's), l2_after_preconditioning
            (the library's coupled mode) or decoupled (``theta <- theta (1 - lr wd)``).
        bias_correction: Adam's bias corrections (graft second moment, update, factor matrices).
        root_inverse_eps: added to the factor matrices' eigenvalues before the SVD inverse root.
        kwargs: ScalableShampoo's other arguments (``graft_type``, ``block_size``, ...), as its
            own (integer enums for ``graft_type`` and ``pre_conditioner_type``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        weight_decay_type: str = "l2",
        bias_correction: bool = True,
        root_inverse_eps: float = 1e-12,
        **kwargs: Any,
    ):
        if weight_decay_type not in WEIGHT_DECAY_TYPES:
            raise ValueError(
                f"weight_decay_type={weight_decay_type!r}: expected one of {', '.join(WEIGHT_DECAY_TYPES)}"
            )
        for fixed in ("decoupled_weight_decay", "decoupled_learning_rate"):
            if fixed in kwargs:  # set from weight_decay_type / fixed: the bias correction scales lr
                raise ValueError(f"{fixed} is set by Shampoo itself, not an argument")
        self.weight_decay_type = weight_decay_type
        self.bias_correction = bias_correction
        self.root_inverse_eps = root_inverse_eps
        super().__init__(
            params,
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
            decoupled_weight_decay=weight_decay_type == "decoupled",
            decoupled_learning_rate=True,
            **kwargs,
        )

    def __str__(self) -> str:
        return "Shampoo"

    # ---------------------------------------------------------------------------------------------
    # per-parameter state
    # ---------------------------------------------------------------------------------------------

    def _new_state(self, p: torch.Tensor, beta2: float) -> dict[str, Any]:
        """A parameter's fresh state: zero momentum, the factor matrices, the graft."""
        pre_conditioner = SeedPreConditioner(
            p,
            beta2,
            self.inverse_exponent_override,
            self.block_size,
            self.skip_preconditioning_rank_lt,
            self.no_preconditioning_for_layers_with_dim_gt,
            self.shape_interpretation,
            self.pre_conditioner_type,
            self.matrix_eps,
            self.use_svd,
            root_inverse_eps=self.root_inverse_eps,
            bias_correction=self.bias_correction,
        )
        if self.bias_correction and self.graft_type == LayerWiseGrafting.RMSPROP:
            graft = AdamGraft(p, self.diagonal_eps)
        else:
            graft = build_graft(p, self.graft_type, self.diagonal_eps)
        return {"momentum": torch.zeros_like(p), "pre_conditioner": pre_conditioner, "graft": graft}

    def init_group(self, group: dict[str, Any], **kwargs: Any) -> None:
        if "step" not in group:
            group["step"] = 0
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse or torch.is_complex(p):
                raise ValueError(f"{self}: sparse gradients and complex parameters are not supported")
            if len(self.state[p]) == 0:
                self.state[p].update(self._new_state(p, group["betas"][1]))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step of the library's update, with the L2 term in the gradients (``l2``) and the
        first moment's bias correction as a factor on this step's lr (the library's update is
        ``theta <- theta - lr m`` with ``decoupled_learning_rate``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(g, g["lr"], g["weight_decay"]) for g in self.param_groups]
        grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            for group, lr, wd in groups:
                if self.bias_correction and group["moving_average_for_momentum"]:
                    correction = 1.0 - group["betas"][0] ** (group.get("step", 0) + 1)
                    group["lr"] = lr / correction
                    if group["decoupled_weight_decay"]:  # its decay is theta (1 - lr wd): keep lr wd
                        group["weight_decay"] = wd * correction
                if self.weight_decay_type == "l2":
                    if wd != 0.0:
                        for p in group["params"]:
                            if p.grad is not None:
                                grads.append((p, p.grad))
                                p.grad = p.grad.add(p, alpha=wd)
                    group["weight_decay"] = 0.0
            super().step()
        finally:
            for p, grad in grads:
                p.grad = grad
            for group, lr, wd in groups:
                group["lr"], group["weight_decay"] = lr, wd
        return loss

    # ---------------------------------------------------------------------------------------------
    # checkpoints: plain tensors only
    # ---------------------------------------------------------------------------------------------

    @staticmethod
    def _plain(state: dict[str, Any]) -> dict[str, Any]:
        """A parameter's state as tensors (see the module docstring)."""
        if "pre_conditioner" not in state:
            return dict(state)
        pc, graft = state["pre_conditioner"], state["graft"]
        out: dict[str, Any] = {"momentum": state["momentum"]}
        for name in ("statistics", "pre_conditioners"):
            for i, t in enumerate(getattr(pc, name)):  # a list, or the stacked tensor's rows
                out[f"{name}_{i}"] = t
        out["num_statistics"] = torch.tensor(getattr(pc, "num_statistics", 0), dtype=torch.int64)
        out["graft_momentum"] = graft.momentum
        if isinstance(graft, (RMSPropGraft, AdaGradGraft)):
            out["graft_statistics"] = graft.statistics
        if isinstance(graft, AdamGraft):
            out["graft_count"] = torch.tensor(graft.count, dtype=torch.int64)
            out["graft_beta2"] = torch.tensor(graft.beta2, dtype=torch.float64)
        return out

    def _restore(self, p: torch.Tensor, beta2: float, saved: dict[str, Any], key: Any) -> dict[str, Any]:
        """The state objects of parameter ``p`` rebuilt and filled from its plain state ``saved``."""

        def get(name: str) -> torch.Tensor:
            if name not in saved:
                raise UserError(
                    f"The checkpoint's Shampoo state of parameter {key} has no '{name}': it was written with other "
                    "Shampoo settings (block_size, graft_type, shape_interpretation, ...) or another optimizer."
                )
            return saved[name].detach().clone().to(p.device)

        state = self._new_state(p, beta2)
        pc, graft = state["pre_conditioner"], state["graft"]
        state["momentum"] = get("momentum")
        n = len(pc.statistics)
        extra = [k for k in saved if k.startswith("statistics_") and int(k.split("_")[-1]) >= n]
        if extra:
            raise UserError(
                f"The checkpoint's Shampoo state of parameter {key} has {n + len(extra)} factor matrices, the "
                f"optimizer {n}: it was written with other Shampoo settings (block_size, shape_interpretation, ...)."
            )
        for name in ("statistics", "pre_conditioners"):
            tensors = [get(f"{name}_{i}") for i in range(n)]
            setattr(pc, name, torch.stack(tensors) if pc.is_same_shapes else tensors)
        pc.num_statistics = int(saved.get("num_statistics", 0))
        graft.momentum = get("graft_momentum")
        if isinstance(graft, (RMSPropGraft, AdaGradGraft)):
            graft.statistics = get("graft_statistics")
        if isinstance(graft, AdamGraft):
            graft.count = int(get("graft_count"))
            graft.beta2 = float(get("graft_beta2"))
        return state

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["state"] = {k: self._plain(v) for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_state = state_dict["state"]
        # the groups (lr, betas, step, ...) the usual way; the per-parameter state rebuilt below
        super().load_state_dict({**state_dict, "state": {}})
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, key in zip(group["params"], saved_group["params"]):
                if key not in saved_state:
                    continue
                saved = saved_state[key]
                if "pre_conditioner" in saved:  # an in-memory state dict of the library's own layout
                    saved = self._plain(saved)
                self.state[p] = self._restore(p, group["betas"][1], saved, key)


def no_preconditioning_dim(value: int | None) -> int:
    """``no_preconditioning_for_layers_with_dim_gt``: None is never (block instead, as the seed)."""
    return sys.maxsize if value is None else value


_POSITIVE_INTS = (
    "start_preconditioning_step",
    "preconditioning_compute_steps",
    "statistics_compute_steps",
    "block_size",
)
_BOOLS = ("shape_interpretation", "moving_average_for_momentum", "nesterov", "bias_correction", "use_svd")


def build_shampoo(
    groups: list[dict], lr: float, betas: list[float], eps: float, settings: dict[str, Any], where: str
) -> Shampoo:
    """:class:`Shampoo` from the config's values, each checked (a ConfigError naming ``where.<key>``).

    Args:
        groups: parameter groups, each with its weight decay.
        lr: initial learning rate (the schedule sets it every step).
        betas: ``OPTIMIZER.betas``.
        eps: ``OPTIMIZER.eps``, the graft's epsilon (the library's ``diagonal_eps``; the seed's
            ``grafting_epsilon``).
        settings: the section's keys (the registered function's keyword arguments) and ``nesterov``.
        where: the section's config path, ``config.OPTIMIZER.shampoo``.
    """
    s = dict(settings)

    def bad(key: str, expected: str) -> ConfigError:
        return ConfigError(f"{where}.{key}={s[key]!r}: expected {expected}.")

    for key in _POSITIVE_INTS:
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
            raise bad(key, "an integer >= 1")
    for key in _BOOLS:
        if not isinstance(s[key], bool):
            raise bad(key, "True or False")
    for key in ("skip_preconditioning_rank_lt", "inverse_exponent_override"):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 0:
            raise bad(key, "an integer >= 0")
    dim = s["no_preconditioning_for_layers_with_dim_gt"]
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise bad("no_preconditioning_for_layers_with_dim_gt", "null (never skip) or an integer >= 1")
    for key in ("root_inverse_eps", "matrix_eps"):
        if isinstance(s[key], bool) or not isinstance(s[key], (int, float)) or not s[key] >= 0:
            raise bad(key, "a number >= 0")
    if not s["use_svd"] and not s["matrix_eps"] > 0:
        raise bad("matrix_eps", "> 0 with use_svd False (the Schur-Newton iteration's ridge)")
    if s["graft_type"] not in GRAFT_TYPES:
        raise bad("graft_type", f"one of {', '.join(GRAFT_TYPES)}")
    if s["pre_conditioner_type"] not in PRE_CONDITIONER_TYPES:
        raise bad("pre_conditioner_type", f"one of {', '.join(PRE_CONDITIONER_TYPES)}")
    if s["weight_decay_type"] not in WEIGHT_DECAY_TYPES:
        raise bad("weight_decay_type", f"one of {', '.join(WEIGHT_DECAY_TYPES)}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"config.OPTIMIZER.betas={list(betas)}: expected two numbers in [0, 1) for shampoo.")
    if not eps >= 0:
        raise ConfigError(f"config.OPTIMIZER.eps={eps!r}: expected a number >= 0 (shampoo's graft epsilon).")
    return Shampoo(
        groups,
        lr=lr,
        betas=tuple(betas),
        weight_decay_type=s.pop("weight_decay_type"),
        bias_correction=s.pop("bias_correction"),
        root_inverse_eps=float(s.pop("root_inverse_eps")),
        graft_type=GRAFT_TYPES[s.pop("graft_type")],
        pre_conditioner_type=PRE_CONDITIONER_TYPES[s.pop("pre_conditioner_type")],
        no_preconditioning_for_layers_with_dim_gt=no_preconditioning_dim(
            s.pop("no_preconditioning_for_layers_with_dim_gt")
        ),
        matrix_eps=float(s.pop("matrix_eps")),
        diagonal_eps=float(eps),
        **s,
    )
