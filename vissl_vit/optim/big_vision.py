"""big_vision's Adam (optax ``scale_by_adam``) with its first moment in bfloat16, optionally.

big_vision trains SimpleViT with ``optax.scale_by_adam(mu_dtype='bfloat16')`` (RECIPES.md 4.1-4.2):
the first moment is stored in bfloat16 (half the memory of the moment), the second in float32.
torch's Adam and AdamW keep both moments in the parameter's dtype and offer no such option, so this
module writes the small optimizer itself, following optax's update to the letter:

    m = (1 - b1) g + b1 mu          # mu as stored: b1 mu is computed (and rounded) in mu's dtype,
                                    # the sum in the gradient's (float32), as JAX promotes it
    nu = (1 - b2) g^2 + b2 nu       # float32 (the parameter's dtype)
    u = (m / (1 - b1^k)) / (sqrt(nu / (1 - b2^k)) + eps)      # k = 1, 2, ...: optax's bias correction
    mu = m cast to mu_dtype         # the update used m before the cast, as optax does
    theta <- theta - lr wd theta - lr u

The last line is torch AdamW's decoupled weight decay (``theta <- theta (1 - lr wd) - lr u``, the
same: ``u`` does not depend on theta), so the groups' ``lr`` and ``weight_decay`` mean here what
they mean for ``adamw``, and the trainer sets them the same way. big_vision's decay, ``sched(t) wd
theta`` with ``lr(t) = lr_peak sched(t)``, is ``weight_decay = wd / lr_peak``: that conversion is
``weight_decay_units: big_vision`` in the optimizer's section (optim/build.py), which works for
``adamw`` as well. With ``mu_dtype`` None this is Adam(W) with optax's bias-correction order
(torch divides ``sqrt(nu)`` by ``sqrt(1 - b2^k)``), equal to torch's AdamW to float rounding.

Not fused and not foreach: one small loop over the parameters (a few hundred kernels a step for a
ViT-S); bfloat16 first moments exist to match big_vision, not for speed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from vissl_vit.errors import ConfigError
from vissl_vit.registry import OPTIMIZERS

MU_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class BigVisionAdam(torch.optim.Optimizer):
    """Adam as optax's ``scale_by_adam`` (optionally bfloat16 first moment) with AdamW's decay.

    Args:
        params: parameters or parameter groups (each may carry its own ``weight_decay``).
        lr: learning rate (the trainer sets each group's at every step).
        betas: (b1, b2).
        eps: added to the bias-corrected ``sqrt(nu)`` (optax's ``eps``; ``eps_root`` is 0).
        weight_decay: decoupled weight decay, torch AdamW's units: ``theta <- theta - lr wd theta``.
        mu_dtype: dtype the first moment is stored in ("bfloat16", "float32" or the torch dtype); None
            for the parameter's (optax's None). Kept in the groups by name: a torch.dtype in a
            param group would stop torch.distributed.checkpoint's optimizer state dict.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mu_dtype: str | torch.dtype | None = None,
    ) -> None:
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if isinstance(mu_dtype, torch.dtype):
            mu_dtype = str(mu_dtype).removeprefix("torch.")
        if mu_dtype is not None and mu_dtype not in MU_DTYPES:
            raise ValueError(f"mu_dtype must be None or one of {list(MU_DTYPES)}, got {mu_dtype!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "mu_dtype": mu_dtype}
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts every floating state tensor to its parameter's dtype on load; put each
        first moment back in its group's mu_dtype (exact: bfloat16 -> float32 -> bfloat16)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group["mu_dtype"] is None:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state and "mu" in state:
                    state["mu"] = state["mu"].to(MU_DTYPES[group["mu_dtype"]])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("BigVisionAdam does not take sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    mu_dtype = group["mu_dtype"]
                    state["mu"] = torch.zeros_like(p, dtype=MU_DTYPES[mu_dtype] if mu_dtype else p.dtype)
                    state["nu"] = torch.zeros_like(p)
                state["step"] += 1
                k = int(state["step"])  # a CPU tensor: no device sync
                # b1 mu in the stored dtype (rounded there, as JAX's weak-typed float x bfloat16),
                # then the sum in the gradient's dtype
                m = torch.add(state["mu"].mul(b1), g, alpha=1.0 - b1).to(g.dtype)
                nu = state["nu"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
                u = (m / (1.0 - b1**k)) / ((nu / (1.0 - b2**k)).sqrt_().add_(eps))
                state["mu"] = m.to(state["mu"].dtype)
                if wd != 0:
                    p.mul_(1.0 - lr * wd)
                p.add_(u.to(p.dtype), alpha=-lr)
        return loss


@OPTIMIZERS.register("big_vision_adam")
def big_vision_adam(
    groups: list[dict], lr: float, betas: list[float], eps: float, mu_dtype: str | None = None
) -> torch.optim.Optimizer:
    """big_vision's ``scale_by_adam`` with AdamW's decoupled decay (:class:`BigVisionAdam`).

    Args:
        groups: parameter groups, each with its weight decay.
        lr: initial learning rate (the schedule sets it every step).
        betas: (b1, b2); big_vision: optax's (0.9, 0.999).
        eps: optax's eps (1e-8).
        mu_dtype: bfloat16 (big_vision's vit_s16_i1k), float32, or None for the parameters' dtype.
    """
    if mu_dtype is not None and mu_dtype not in MU_DTYPES:
        raise ConfigError(
            f"config.OPTIMIZER.big_vision_adam.mu_dtype={mu_dtype!r}: expected null (the parameters' dtype), "
            f"{' or '.join(MU_DTYPES)}."
        )
    return BigVisionAdam(groups, lr=lr, betas=tuple(betas), eps=eps, mu_dtype=mu_dtype)
