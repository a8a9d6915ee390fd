"""Weight-initialisation schemes of the ViT family, chosen by name (``VISION_TRANSFORMERS.WEIGHT_INIT``).

Each scheme follows one reference implementation exactly; they differ where it matters (the
fused qkv projection, the patch embedding, the biases):

- ``timm``: timm's ``init_weights_vit_timm`` (DeiT): linears trunc-normal(0.02) with zero biases,
  position embedding trunc-normal(0.02), class token normal(1e-6), patch projection left at
  PyTorch's default.
- ``jax``: big_vision's ``models/vit.py`` (SimpleViT, "Better plain ViT baselines"): q, k, v and
  out kernels each xavier-uniform on their own (D, D) matrix, so the fused qkv gets U(+-sqrt(3/D))
  and not the U(+-sqrt(3/(2D))) that xavier on the fused (3D, D) matrix gives (timm's ``jax`` mode,
  and torch's MultiheadAttention, fall into that trap; mup-vit fixes it the same way); MLP kernels
  xavier-uniform with biases N(0, 1e-6); the patch projection lecun-normal with the truncation
  correction (Flax's truncated normal: std sqrt(1/fan_in) / 0.8796, cut at 2 std, timm's
  ``lecun_normal_``); learned position embeddings normal(1/sqrt(D)); class token zeros. The head's
  zero init belongs to the head (``vision_transformer_head``).
- ``moco``: moco-v3's ``vits.py``: qkv uniform(+-sqrt(6 / (3D/3 + D))) (xavier over one of q, k, v),
  other linears xavier-uniform, zero biases, class token normal(1e-6), patch projection
  xavier-uniform over the patch (fan_in = C p p, fan_out = D) with zero bias.
- ``rescalevit``: RescaleViT's (jeonsworld's ViT-pytorch ``models/modeling.py``, RECIPES.md 5):
  position embedding and class token zeros (never re-initialised when training from scratch); the
  patch projection and the attention's q, k, v and out linears left at PyTorch's default
  (U(+-1/sqrt(fan_in)) for weights and biases; the fused qkv draws the same as three (D, D)
  linears, since the bound depends on fan_in only); MLP kernels xavier-uniform with biases
  N(0, 1e-6).
- ``torch``: nothing re-initialised: PyTorch's defaults for every layer, the position embedding and
  class token as created (zeros); the seed SimplEsT-ViT's ``simple_vit.py`` baseline, which never
  initialises anything itself.
- ``simplest``: SimplEsT-ViT's stem, weight N(0, 1/(C p p)) and zero bias; its blocks initialise
  themselves (they define ``init_weights``), as do blocks of any scheme that do.

Position embeddings that are fixed (sin-cos) are written by the trunk after the scheme runs.
"""

from __future__ import annotations

import math

import torch
from timm.layers import lecun_normal_
from torch import nn

WEIGHT_INITS = ("timm", "jax", "moco", "rescalevit", "torch", "simplest")


def _xavier_uniform_rows(weight: torch.Tensor, parts: int) -> None:
    """Xavier-uniform on each of ``parts`` equal row blocks of ``weight`` [parts*out, in] (fused q, k, v)."""
    out, fan_in = weight.shape[0] // parts, weight.shape[1]
    bound = math.sqrt(6.0 / (out + fan_in))
    nn.init.uniform_(weight, -bound, bound)


def apply_weight_init(trunk: nn.Module, scheme: str) -> None:
    """Initialise a ViT-family trunk (timm's parameter names) in place with ``scheme``.

    Args:
        trunk: the trunk; reads ``patch_embed.proj``, ``pos_embed``, ``cls_token`` (may be None) and
            the ``nn.Linear`` modules by their names (``attn.qkv``, ``attn.proj``, ``mlp.fc1/fc2``).
        scheme: one of ``WEIGHT_INITS``.
    """
    if scheme not in WEIGHT_INITS:
        raise ValueError(f"unknown weight init '{scheme}'; known: {', '.join(WEIGHT_INITS)}")
    pos, cls = trunk.pos_embed, trunk.cls_token
    proj = trunk.patch_embed.proj
    if scheme == "timm":
        nn.init.trunc_normal_(pos, std=0.02)
        if cls is not None:
            nn.init.normal_(cls, std=1e-6)
        for m in trunk.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    elif scheme == "jax":
        nn.init.normal_(pos, std=pos.shape[-1] ** -0.5)
        if cls is not None:
            nn.init.zeros_(cls)
        lecun_normal_(proj.weight)
        nn.init.zeros_(proj.bias)
        for name, m in trunk.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            mlp = name.split(".")[-1] in ("fc1", "fc2")
            if name.endswith("qkv"):
                _xavier_uniform_rows(m.weight, 3)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=1e-6) if mlp else nn.init.zeros_(m.bias)
    elif scheme == "moco":
        nn.init.trunc_normal_(pos, std=0.02)  # replaced by sin-cos in moco-v3's configs
        if cls is not None:
            nn.init.normal_(cls, std=1e-6)
        for name, m in trunk.named_modules():
            if isinstance(m, nn.Linear):
                if name.endswith("qkv"):
                    _xavier_uniform_rows(m.weight, 3)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        fan_in = proj.weight[0].numel()
        bound = math.sqrt(6.0 / (fan_in + proj.weight.shape[0]))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)
    elif scheme == "torch":
        nn.init.zeros_(pos)  # as created; sin-cos embeddings are written by the trunk afterwards
        if cls is not None:
            nn.init.zeros_(cls)
    elif scheme == "rescalevit":
        nn.init.zeros_(pos)
        if cls is not None:
            nn.init.zeros_(cls)
        for name, m in trunk.named_modules():
            if isinstance(m, nn.Linear) and name.split(".")[-1] in ("fc1", "fc2"):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=1e-6)
    else:  # simplest
        nn.init.normal_(proj.weight, std=proj.weight[0].numel() ** -0.5)
        nn.init.zeros_(proj.bias)
        nn.init.trunc_normal_(pos, std=0.02)
        if cls is not None:
            nn.init.normal_(cls, std=1e-6)
    for m in trunk.modules():  # blocks with an initialisation of their own (E-SPA's zero queries)
        if m is not trunk and hasattr(m, "init_weights"):
            m.init_weights()
