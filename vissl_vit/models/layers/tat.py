"""TAT activations and SUO initialisation for networks without skips or normalisation.

TAT (Tailored Activation Transformation): Martens et al., "Rapid training of deep neural networks without
skip connections or normalization layers using Deep Kernel Shaping" (DKS, arXiv:2110.01765) and Zhang et
al., "Deep Learning without Shortcuts: Shaping the Kernel with Tailored Rectifiers" (TAT, ICLR 2022,
arXiv:2203.08120). As used by SimplEsT-ViT (richardcepka/SimplEsT-ViT ``models/simplEsT_vit.py``; specs in
RECIPES.md 6.3-6.4): the leaky-ReLU slope is chosen so that the composed C-map of all 2L MLP activations
sends correlation 0 to ``eta``; attention (E-SPA, ``espa.py``) is treated as kernel-preserving.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def lrelu_cmap(c: float, negative_slope: float) -> float:
    """Local C-map of one TReLU (TAT Eq. 9): output correlation of two unit-q inputs of correlation ``c``.

    Args:
        c: input correlation in [-1, 1].
        negative_slope: the leaky-ReLU slope alpha in [0, 1].
    """
    c = min(max(c, -1.0), 1.0)  # round-off above 1 would make sqrt(1 - c^2) complex
    a = negative_slope
    return c + (1 - a) ** 2 / (math.pi * (1 + a**2)) * (math.sqrt(1 - c**2) - c * math.acos(c))


def tat_leaky_relu_slope(depth: int, eta: float = 0.9, tol: float = 1e-8, max_evals: int = 100) -> float:
    """The TReLU negative slope for a skip-free transformer of ``depth`` blocks (RECIPES 6.3).

    Solves C_a^{(2 depth)}(0) = eta (two MLP activations per block) by bisection on a in [0, 1],
    starting at 0.5, as SimplEsT-ViT's ``binary_search`` (tolerance on |C(0) - eta|, at most ``max_evals``
    evaluations). C(0) decreases from its ReLU value (a = 0) to 0 (a = 1, linear), so a solution exists
    only if even ReLU reaches eta. Depth 12 -> 0.238503, 24 -> 0.421162.

    Args:
        depth: number of transformer blocks L.
        eta: target C(0) of the whole network (SimplEsT-ViT's ``c_val_0_target``); typical 0.9.
        tol: tolerance on |C(0) - eta|.
        max_evals: evaluations of the composed C-map before giving up.

    Raises:
        ValueError: depth < 1, eta outside (0, 1), or no slope reaches eta (e.g. depth 6 with eta 0.9).
    """
    if depth < 1:
        raise ValueError(f"tat_leaky_relu_slope: depth={depth} must be >= 1")
    if not 0.0 < eta < 1.0:
        raise ValueError(f"tat_leaky_relu_slope: eta={eta} must be in (0, 1)")
    n_act = 2 * depth

    def network_c0(a: float) -> float:
        c = 0.0
        for _ in range(n_act):
            c = lrelu_cmap(c, a)
        return c

    relu_c0 = network_c0(0.0)
    if relu_c0 < eta:
        raise ValueError(
            f"tat_leaky_relu_slope: no TReLU slope reaches C(0)=eta={eta} with depth={depth} ({n_act} activations): "
            f"even ReLU gives only {relu_c0:.4f}; use a smaller eta or a deeper network"
        )
    lo, hi, a = 0.0, 1.0, 0.5
    for _ in range(max_evals):
        value = network_c0(a)
        if abs(value - eta) < tol:
            return a
        if value < eta:  # too linear: lower the slope
            hi = a
        else:
            lo = a
        a = 0.5 * (lo + hi)
    raise ValueError(
        f"tat_leaky_relu_slope: no slope within tol={tol} after {max_evals} evals (depth={depth}, eta={eta})"
    )


def trelu_output_scale(negative_slope: float) -> float:
    """sqrt(2 / (1 + a^2)): makes E[TReLU(u)^2] = 1 for u ~ N(0, 1) (TAT Lemma 1)."""
    return math.sqrt(2.0 / (1.0 + negative_slope**2))


class TReLU(nn.Module):
    """Tailored ReLU: ``sqrt(2 / (1 + a^2)) * LeakyReLU_a(x)`` (TAT, arXiv:2203.08120 Sec. 4).

    Args:
        negative_slope: the leaky-ReLU slope a, usually from :func:`tat_leaky_relu_slope`.
    """

    def __init__(self, negative_slope: float) -> None:
        super().__init__()
        if not 0.0 <= negative_slope <= 1.0:
            raise ValueError(f"TReLU: negative_slope={negative_slope} must be in [0, 1]")
        self.negative_slope = negative_slope
        self.output_scale = trelu_output_scale(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_scale * F.leaky_relu(x, negative_slope=self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope:.6f}, output_scale={self.output_scale:.6f}"


def scaled_uniform_orthogonal_(weight: torch.Tensor, gain: float = 1.0, dks_torch_layout: bool = False) -> torch.Tensor:
    """SUO init (DKS, arXiv:2110.01765 "Parameter distributions"; RECIPES 6.4), in place.

    A uniform orthogonal matrix times ``gain * max(sqrt(fan_out / fan_in), 1)``, so that a layer with zero
    bias preserves the mean squared activation (q value): a contraction has orthonormal rows (W W^T = I),
    an expansion orthonormal columns scaled so that W^T W = (fan_out / fan_in) I.

    Args:
        weight: a 2-D weight; read as torch's (fan_out, fan_in) layout of ``nn.Linear``.
        gain: extra factor on top of the SUO scale; leave at 1 for DKS/TAT.
        dks_torch_layout: read ``weight`` as (fan_in, fan_out) instead, as DKS's PyTorch port (and so
            SimplEsT-ViT, which calls it on ``nn.Linear`` weights) does. This moves the sqrt(out/in) gain from
            the expanding to the contracting layer: MLP fc1 (D -> 4D) gets gain 1 and fc2 (4D -> D) gain 2,
            and a D -> C head gets sqrt(D / C). True reproduces the source's init exactly.

    Returns:
        ``weight``.
    """
    if weight.ndim != 2:
        raise ValueError(f"scaled_uniform_orthogonal_: expected a 2-D weight, got shape {tuple(weight.shape)}")
    fan_out, fan_in = weight.shape
    if dks_torch_layout:
        fan_out, fan_in = fan_in, fan_out
    # uniform orthogonal matrices are closed under transposition, so only the gain depends on the layout
    return nn.init.orthogonal_(weight, gain=gain * max(math.sqrt(fan_out / fan_in), 1.0))


class TATMlp(nn.Module):
    """SimplEsT-ViT's feed-forward: ``TReLU(fc2(TReLU(fc1(x))))``, SUO weights, zero biases (RECIPES 6.1).

    An activation after both linears (the source's ``FeedForward`` of two ``Layer``s); no dropout.

    Args:
        dim: input and output width.
        hidden_dim: hidden width.
        negative_slope: TReLU slope (:func:`tat_leaky_relu_slope`).
        bias: biases in both linears.
        dks_torch_layout: see :func:`scaled_uniform_orthogonal_`.
    """

    def __init__(
        self, dim: int, hidden_dim: int, negative_slope: float, bias: bool = True, dks_torch_layout: bool = False
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = TReLU(negative_slope)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.dks_torch_layout = dks_torch_layout
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2):
            scaled_uniform_orthogonal_(fc.weight, dks_torch_layout=self.dks_torch_layout)
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.act(self.fc1(x))))
