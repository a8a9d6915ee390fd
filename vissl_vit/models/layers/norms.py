"""Token normalisations of RescaleViT: BatchNorm and GroupNorm over tokens, and a norm-free rescaled block.

RescaleViT (ChaofanTao/RescaleViT, HKU COMP9501 project; ``models/modeling.py``, ``models/rescale_mapping.py``)
compares LayerNorm with two norms that mix tokens and with no norm at all:

- ``TokenBatchNorm``: per-channel statistics over batch x tokens (class token included), running stats.
- ``TokenGroupNorm``: per-sample statistics over (the channels of a group x all tokens).
- ``RescaleBlock``: no norm; a mean-centring ``Bias1D`` before each branch, the MLP branch scaled by a
  learnable ``s`` times 1/sqrt(depth) and the identity by sqrt(i / (i + 1)), after RescaleNet (Shao et al.,
  "Is normalization indispensable for training deep neural networks?", NeurIPS 2020).

``build_norm_layer(kind)`` gives the ``norm_layer(dim)`` callable that ``Block`` takes. Every norm here
takes and returns tokens [B, L, D].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from vissl_vit.models.layers.attention import Attention
from vissl_vit.models.layers.block import LayerNorm6
from vissl_vit.models.layers.drop_path import DropPath
from vissl_vit.models.layers.mlp import Mlp
from vissl_vit.utils import distributed as du


def _check_tokens(x: torch.Tensor, dim: int, name: str) -> None:
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} expects tokens [B, L, {dim}], got shape {tuple(x.shape)}")


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over batch x tokens: each channel is normalised with the statistics of all B * L tokens.

    The BatchNorm1d is a child (``bn``) that sees [B, D, L], so ``nn.SyncBatchNorm.convert_sync_batchnorm``
    swaps it for a SyncBatchNorm (statistics over the global batch) and the transposes stay around it;
    MoCo's shuffle-BN works on it as on any BN.

    Args:
        dim: token width (channels).
        eps: added to the variance (RescaleViT: 1e-6).
        momentum: running-statistics momentum (torch's default 0.1, as RescaleViT).
    """

    def __init__(self, dim: int, eps: float = 1e-6, momentum: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.dim, "TokenBatchNorm")
        # [B, L, D] -> [B, D, L]: BatchNorm1d reduces over dims 0 and 2, i.e. batch and tokens
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class TokenGroupNorm(nn.Module):
    """GroupNorm over tokens: per sample, each group of dim / num_groups channels is normalised with the
    statistics of those channels over all L tokens (so, unlike LayerNorm, it mixes tokens).

    Args:
        dim: token width; a multiple of ``num_groups``.
        num_groups: channel groups (RescaleViT: 4).
        eps: added to the variance (RescaleViT: 1e-6).
    """

    def __init__(self, dim: int, num_groups: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        if num_groups < 1 or dim % num_groups:
            raise ValueError(f"TokenGroupNorm: dim={dim} must be a multiple of num_groups={num_groups}")
        self.dim = dim
        self.gn = nn.GroupNorm(num_groups, dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.dim, "TokenGroupNorm")
        # [B, L, D] -> [B, D, L]: GroupNorm reduces over (D / G channels, L tokens) per sample
        return self.gn(x.transpose(1, 2)).transpose(1, 2)


def _in_backward() -> bool:
    """True while autograd runs a backward pass, e.g. when a checkpointed block is recomputed."""
    # torch.autograd.graph uses the same private call to tell whether it runs inside the engine
    return torch._C._current_graph_task_id() != -1


class Bias1D(nn.Module):
    """RescaleViT's mean-centring bias: ``x + b - mu`` on tokens [B, L, D].

    ``mu`` [1, 1, D] is the running average of the per-call mean over batch x tokens during the first
    ``threshold`` forward calls, then frozen. During those calls the output is ``x + 0.01 b - mu`` (as in
    the source). As in the source, calls in eval mode count too. ``mu`` and ``count`` are buffers, so a
    checkpoint carries them and a resumed run continues the warm-up where it stopped.

    Beyond the source (single-GPU runs): under torch.distributed the batch mean is all-reduced over ranks
    (weighted by tokens) before the update, so every rank holds the same ``mu``. Every rank must therefore
    run the first ``threshold`` forward calls together. A recomputation inside the backward pass (activation
    checkpointing) neither updates ``mu`` nor counts, and repeats the previous call's branch.

    Args:
        dim: token width.
        threshold: forward calls that estimate ``mu`` (RescaleViT: 8).
    """

    def __init__(self, dim: int, threshold: int = 8) -> None:
        super().__init__()
        if threshold < 0:
            raise ValueError(f"Bias1D: threshold={threshold} must be >= 0")
        self.dim = dim
        self.threshold = threshold
        self.bias = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("mean", torch.zeros(1, 1, dim))  # mu
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))
        self._frozen = False  # host-side copy of count >= threshold: no device sync once frozen
        self._last_warm = False  # the branch of the last forward, for a recomputation in backward

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._frozen = False  # re-read count: a resumed run may still be warming up

    def _warming_up(self) -> bool:
        if not self._frozen and int(self.count) >= self.threshold:  # a host sync, only before freezing
            self._frozen = True
        return not self._frozen

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        # sum and number of tokens, summed over ranks: the mean over the global batch x tokens
        tokens = torch.full((1,), float(x.shape[0] * x.shape[1]), device=x.device)  # float32 even for bf16 x
        stats = torch.cat([x.detach().float().sum(dim=(0, 1)), tokens])
        if du.is_initialized():
            dist.all_reduce(stats)
        batch_mean = (stats[:-1] / stats[-1]).view(1, 1, -1).to(self.mean.dtype)
        self.mean += (batch_mean - self.mean) / (self.count + 1)
        self.count += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.dim, "Bias1D")
        if _in_backward():
            warm = self._last_warm
        else:
            warm = self._last_warm = self._warming_up()
            if warm:
                self._update(x)
        if warm:
            return x + (self.bias * 0.01 - self.mean)
        return x + (self.bias - self.mean)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, threshold={self.threshold}"


class RescaleBlock(nn.Module):
    """RescaleViT's norm-free block (i = ``layer_index``, L = ``depth``, s = ``mlp_scale``, init 1)::

        x = x + DropPath(Attn(Bias1D_1(x)))                                  # attention residual not rescaled
        x = DropPath(MLP(Bias1D_2(x))) * s / sqrt(L) + sqrt(i / (i + 1)) * x

    Parameter names follow ``Block`` where they mean the same (``attn``, ``mlp``); there is no ``norm1``/``norm2``
    (``bias1``/``bias2`` stand before the branches). Same forward contract as ``Block``.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_dim: hidden width of the MLP.
        layer_index: 1-based index i of the block in the trunk.
        depth: number of blocks L.
        qkv_bias: bias in the qkv projection.
        qk_scale: attention scale, None for head_dim ** -0.5.
        dropout: dropout after the MLP layers and the attention projection.
        attn_drop: dropout of the attention weights.
        drop_path: stochastic-depth rate of both residual branches (not in the source, 0 reproduces it).
        act_layer: the MLP's activation class.
        attn_layer: ``attn_layer(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)``, as for ``Block``.
        mlp_layer: ``mlp_layer(dim, hidden_dim, dropout, act_layer)``, as for ``Block``.
        bias_threshold: forward calls over which each ``Bias1D`` estimates its mean (RescaleViT: 8).
        checkpoint_mlp: recompute the MLP (not its ``Bias1D``) in the backward pass to save memory.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        layer_index: int,
        depth: int,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        dropout: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        attn_layer: Callable[..., nn.Module] = Attention,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        bias_threshold: int = 8,
        checkpoint_mlp: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= layer_index <= depth:
            raise ValueError(f"RescaleBlock: layer_index={layer_index} must be in 1..depth={depth} (1-based)")
        self.bias1 = Bias1D(dim, bias_threshold)
        self.attn = attn_layer(dim, num_heads, qkv_bias, qk_scale, attn_drop, dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.bias2 = Bias1D(dim, bias_threshold)
        self.mlp = mlp_layer(dim, mlp_dim, dropout, act_layer)
        self.mlp_scale = nn.Parameter(torch.ones(1))  # s, learned
        self.branch_scale = depth**-0.5  # 1 / sqrt(L), fixed
        self.skip_scale = math.sqrt(layer_index / (layer_index + 1))  # fixed down-weighting of the identity
        self.checkpoint_mlp = checkpoint_mlp

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, attn = self.attn(self.bias1(x), return_attention=return_attention)
        x = x + self.drop_path(y)
        del y
        y = self.bias2(x)
        if self.checkpoint_mlp and self.training and torch.is_grad_enabled():
            y = checkpoint(self.mlp, y, use_reentrant=False)
        else:
            y = self.mlp(y)
        return self.drop_path(y * (self.mlp_scale * self.branch_scale)) + self.skip_scale * x, attn

    def extra_repr(self) -> str:
        return f"branch_scale={self.branch_scale:.4f}, skip_scale={self.skip_scale:.4f}"


NORM_KINDS = ("layernorm", "batchnorm", "groupnorm", "none")


def build_norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """The ``norm_layer(dim)`` callable of a norm kind, for ``Block`` and a trunk's final norm.

    Args:
        kind: "layernorm" (eps 1e-6), "batchnorm" (``TokenBatchNorm``), "groupnorm" (``TokenGroupNorm``, 4
            groups) or "none" (``nn.Identity``, which ignores ``dim``).
    """
    layers: dict[str, Callable[[int], nn.Module]] = {
        "layernorm": LayerNorm6,
        "batchnorm": TokenBatchNorm,
        "groupnorm": TokenGroupNorm,
        "none": nn.Identity,
    }
    if kind not in layers:
        raise ValueError(f"norm kind {kind!r} is not one of {', '.join(NORM_KINDS)}")
    return layers[kind]
