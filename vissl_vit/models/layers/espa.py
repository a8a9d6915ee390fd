"""E-SPA attention and SimplEsT-ViT's skip-free, norm-free block.

E-SPA (Exponential Signal-Preserving Attention): He et al., "Deep Transformers without Shortcuts: Modifying
Self-attention for Faithful Signal Propagation" (ICLR 2023, arXiv:2302.10322), non-causal variant (symmetric
square roots, App. A). Block and init as in SimplEsT-ViT (richardcepka/SimplEsT-ViT ``models/simplEsT_vit.py``;
specs in RECIPES.md 6.1-6.2): ``x = Attn_l(x); x = TReLU(W2 TReLU(W1 x + b1) + b2)``, no skips, no norms.

At init W_q = 0, so softmax(q k^T / sqrt(d_h) + B_l) = softmax(B_l) = A_l / d_l, and the layer mixes tokens by
the fixed matrix A_l = Sigma_l^{1/2} Sigma_{l-1}^{-1/2}, which maps the token kernel Sigma_{l-1} to Sigma_l,
Sigma_l[i, j] = exp(-gamma_l |i - j|): the kernel decays slowly from I (l = 0) to a long-range one (l = L),
instead of collapsing to rank one as plain attention does without skips.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vissl_vit.models.layers.tat import TATMlp, tat_leaky_relu_slope

logger = logging.getLogger(__name__)


def espa_gamma(layer_index: int, depth: int, gamma_max_depth: float = 0.005) -> float:
    """gamma_l of E-SPA's schedule: gamma_L = ``gamma_max_depth``, alpha_L = sqrt(1 - exp(-2 gamma_L)),
    gamma_l = -log(1 - alpha_L^(2l/L)) / 2; gamma_0 = inf (Sigma_0 = I). L=12: gamma_1 = 0.5713, gamma_12 = 0.005.

    Args:
        layer_index: l in 0..depth (1-based for blocks).
        depth: number of blocks L.
        gamma_max_depth: gamma at the last block; SimplEsT-ViT uses 0.005.
    """
    if layer_index == 0:
        return math.inf
    alpha_max = math.sqrt(1.0 - math.exp(-2.0 * gamma_max_depth))
    return -0.5 * math.log(1.0 - alpha_max ** (2.0 * layer_index / depth))


def _psd_sqrt(matrix: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Symmetric (inverse) square root by eigh; eigenvalues clamped at max * N * eps as the source does."""
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    floor = eigvals.max() * eigvals.numel() * torch.finfo(eigvals.dtype).eps
    eigvals = eigvals.clamp(min=floor)
    root = eigvals.rsqrt() if inverse else eigvals.sqrt()
    return (eigvecs * root) @ eigvecs.T


def espa_attention_matrix(
    num_tokens: int, layer_index: int, depth: int, gamma_max_depth: float = 0.005
) -> torch.Tensor:
    """A_l = Sigma_l^{1/2} Sigma_{l-1}^{-1/2}, float64 on CPU, [N, N], every entry > 0 (RECIPES 6.2).

    Tokens are at raster positions 0..N-1 (1-D distance, as the source). Entries that round-off makes <= 0
    (far off-diagonal entries at small l; 2 of 64 x 64 at l = 1) are clamped to |min| + float32 eps, the
    source's rule (it clamps the float32 matrix), so that log(A_l) stays finite.

    Args:
        num_tokens: N, the number of tokens the layer will see.
        layer_index: l in 1..depth.
        depth: number of blocks L.
        gamma_max_depth: gamma_L.
    """

    def kernel_root(index: int, inverse: bool) -> torch.Tensor:
        if index == 0:
            return torch.eye(num_tokens, dtype=torch.float64, device="cpu")
        pos = torch.arange(num_tokens, dtype=torch.float64, device="cpu")
        sigma = torch.exp(-espa_gamma(index, depth, gamma_max_depth) * (pos[:, None] - pos[None, :]).abs())
        return _psd_sqrt(sigma, inverse)

    attn = kernel_root(layer_index, inverse=False) @ kernel_root(layer_index - 1, inverse=True)
    min_value = attn.min().item()
    if min_value <= 0:
        logger.debug(
            "E-SPA A_%d (N=%d) has entries <= 0 (min %.3g) from round-off; clamped", layer_index, num_tokens, min_value
        )
        attn = attn.clamp(min=abs(min_value) + torch.finfo(torch.float32).eps)
    return attn


class ESPAttention(nn.Module):
    """Multi-head E-SPA attention without output projection (parameter ``qkv`` as timm's; heads concatenated).

    ``out = d_l * SDPA(q, k, v, attn_mask=B_l)`` with the fixed buffers B_l = log(A_l / d_l) [1, 1, N, N]
    (shared by all heads) and d_l = rowsum(A_l) [1, 1, N, 1]. Init: W_q = 0, qkv bias 0, W_k, W_v ~ N(0, 1/D).
    The buffers are not saved in state dicts: ``reset_parameters`` recomputes them (after ``to_empty``).
    A float attn_mask keeps SDPA off the FlashAttention kernel (memory-efficient or math kernels).

    Args:
        dim: token width D.
        num_heads: heads; ``dim`` must be a multiple of it.
        layer_index: l, this layer's 1-based position among the ``depth`` blocks.
        depth: number of blocks L.
        num_tokens: N, tokens per input (patches only; no class token).
        gamma_max_depth: gamma_L of the kernel schedule (0.005 in SimplEsT-ViT).
        qkv_bias: bias in the qkv projection (True in SimplEsT-ViT).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        layer_index: int,
        depth: int,
        num_tokens: int,
        gamma_max_depth: float = 0.005,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ESPAttention: dim={dim} must be a multiple of num_heads={num_heads}")
        if not 1 <= layer_index <= depth:
            raise ValueError(f"ESPAttention: layer_index={layer_index} must be in 1..depth={depth}")
        if num_tokens < 1:
            raise ValueError(f"ESPAttention: num_tokens={num_tokens} must be >= 1")
        if gamma_max_depth <= 0:
            raise ValueError(f"ESPAttention: gamma_max_depth={gamma_max_depth} must be > 0")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.layer_index = layer_index
        self.depth = depth
        self.num_tokens = num_tokens
        self.gamma_max_depth = gamma_max_depth
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # built on the CPU explicitly so that a torch.device("meta") context still gets real values
        self.register_buffer("log_bias", torch.empty(1, 1, num_tokens, num_tokens, device="cpu"), persistent=False)
        self.register_buffer("row_scale", torch.empty(1, 1, num_tokens, 1, device="cpu"), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        dim = self.qkv.in_features
        with torch.no_grad():
            nn.init.zeros_(self.qkv.weight[:dim])  # W_q = 0: attention starts at exactly A_l
            nn.init.normal_(self.qkv.weight[dim:], std=dim**-0.5)  # W_k, W_v ~ N(0, 1/D)
            if self.qkv.bias is not None:
                nn.init.zeros_(self.qkv.bias)
            attn = espa_attention_matrix(self.num_tokens, self.layer_index, self.depth, self.gamma_max_depth)
            row_sum = attn.sum(dim=1, keepdim=True)  # [N, 1]
            self.log_bias.copy_(torch.log(attn / row_sum))
            self.row_scale.copy_(row_sum)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, N, D] -> (output [B, N, D], if asked the weights d_l * softmax(.) [B, heads, N, N], rows sum to d_l)."""
        B, N, D = x.shape
        if N != self.num_tokens:
            raise ValueError(
                f"ESPAttention: built for num_tokens={self.num_tokens}, got an input with {N} tokens; E-SPA's fixed "
                "bias needs the token count it was built for (same image and patch size, no class token)"
            )
        # qkv: [3, B, heads, N, head_dim]
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # buffers follow the activations' dtype (bf16 autocast): SDPA wants a float mask of the query's dtype
        log_bias = self.log_bias.to(q.dtype)
        row_scale = self.row_scale.to(q.dtype)
        attn = None
        if return_attention:
            attn = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1) + log_bias).softmax(dim=-1) * row_scale
            out = attn @ v
        else:
            out = row_scale * F.scaled_dot_product_attention(q, k, v, attn_mask=log_bias)
        return out.transpose(1, 2).reshape(B, N, D), attn

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, depth={self.depth}, num_tokens={self.num_tokens}"


class ESPABlock(nn.Module):
    """SimplEsT-ViT block: ``x = attn(x); x = mlp(x)`` with E-SPA attention and a TAT MLP; no skips, no norms.

    Same forward contract as :class:`~vissl_vit.models.layers.block.Block`. No dropout inside the block (the
    source has dropout only before the head).

    Args:
        dim: token width D.
        num_heads: attention heads.
        mlp_dim: hidden width of the MLP.
        layer_index: this block's 1-based index l among ``depth``.
        depth: number of blocks L; sets the E-SPA schedule and the TReLU slope.
        num_tokens: tokens per input N (the patch grid, raster order).
        gamma_max_depth: gamma_L of E-SPA (0.005).
        c_val_0_target: TAT's target C(0) of the whole network (eta, 0.9); ignored if ``negative_slope`` is given.
        negative_slope: TReLU slope; None to solve it from ``depth`` and ``c_val_0_target``.
        qkv_bias: bias of the qkv projection.
        mlp_bias: biases of the MLP linears.
        dks_torch_layout: SUO gain on the source's (DKS PyTorch port's) layout; see ``scaled_uniform_orthogonal_``.
        checkpoint_mlp: recompute the MLP in the backward pass to save memory.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        layer_index: int,
        depth: int,
        num_tokens: int,
        gamma_max_depth: float = 0.005,
        c_val_0_target: float = 0.9,
        negative_slope: float | None = None,
        qkv_bias: bool = True,
        mlp_bias: bool = True,
        dks_torch_layout: bool = False,
        checkpoint_mlp: bool = False,
    ) -> None:
        super().__init__()
        if negative_slope is None:
            negative_slope = tat_leaky_relu_slope(depth, c_val_0_target)
        self.attn = ESPAttention(dim, num_heads, layer_index, depth, num_tokens, gamma_max_depth, qkv_bias)
        self.mlp = TATMlp(dim, mlp_dim, negative_slope, bias=mlp_bias, dks_torch_layout=dks_torch_layout)
        self.checkpoint_mlp = checkpoint_mlp

    def init_weights(self) -> None:
        """E-SPA's and TAT's initialisation (zero queries, SUO MLP), which a trunk's weight-init scheme
        must not overwrite: the trunk calls this after its scheme (``layers/init.py``)."""
        self.attn.reset_parameters()
        self.mlp.reset_parameters()

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, attn = self.attn(x, return_attention=return_attention)
        if self.checkpoint_mlp and self.training and torch.is_grad_enabled():
            return checkpoint(self.mlp, x, use_reentrant=False), attn
        return self.mlp(x), attn


def simplest_stem_init_(conv: nn.Conv2d) -> nn.Conv2d:
    """SimplEsT-ViT's patch-embedding init (RECIPES 6.1): weight ~ N(0, 1/fan_in), fan_in = C * P * P; bias 0.

    Args:
        conv: the patch-embedding convolution (e.g. ``PatchEmbed.proj``).
    """
    fan_in = math.prod(conv.weight.shape[1:])  # in_channels / groups * kh * kw
    nn.init.normal_(conv.weight, mean=0.0, std=fan_in**-0.5)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv
