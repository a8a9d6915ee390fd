"""ConViT trunk: gated positional self-attention (GPSA) blocks, then plain self-attention blocks.

"ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases", d'Ascoli et al.,
ICML 2021 (https://arxiv.org/abs/2103.10697); official code facebookresearch/convit, and timm's
``timm/models/convit.py``, whose parameter names and initialisation this trunk follows (so timm's
``convit_{tiny,small,base}`` weights load through the timm path of ``models/weights.py``).

Layout (../shared/RECIPES.md 1.3): patch tokens + position embeddings (no class-token slot) run
through ``n_gpsa_layers`` GPSA blocks; the class token is prepended only then, and the remaining
blocks are ordinary multi-head self-attention. A GPSA head mixes content attention with a
positional attention over relative offsets, gated per head; the "local init" makes each head's
positional attention a soft convolution tap at its own offset (RECIPES 1.2).

Differences from VISSL's ``convit`` trunk (vissl/models/trunks/convit.py), on purpose:

- VISSL re-initialises every Linear after the GPSA local init ran, which erases it whatever
  ``USE_LOCAL_INIT`` says; here the local init is applied last and survives.
- ``out_feat_keys`` are honoured, with the ViT trunk's feature names (VISSL returns one feature).
- ``CLASSIFIER: gap`` averages the patch tokens only (timm's ``global_pool="avg"``); VISSL's
  average includes the class token.
- LayerNorm eps 1e-6 (official code and timm); VISSL's torch default is 1e-5.
- ``CLASS_TOKEN_IN_LOCAL_LAYERS: True`` is refused: VISSL's GPSA then builds relative offsets for
  ``int(sqrt(N + 1))`` grids that do not fit the N + 1 tokens (a shape error at the first step).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from vissl_vit.errors import ConfigError
from vissl_vit.models.layers import Attention, Block, PatchEmbed, resample_pos_embed
from vissl_vit.models.trunks.base import Trunk
from vissl_vit.models.trunks.vision_transformer import check_attention_blocks, collect_attention
from vissl_vit.registry import TRUNKS

FEATURE_PATTERNS = {
    "lastCLS": "class token of the last block, after the final norm ([B, D])",
    "concatCLS{n}": "class tokens of the last n blocks (all after the GPSA blocks), each normed ([B, n*D])",
    "blkCLS{i}": "class token after block i (from 0; i >= N_GPSA_LAYERS), normed ([B, D])",
    "lastBLK": "every token of the last block, normed ([B, L, D]; the class token first if it has joined)",
    "lastMAP": "attention weights of the last block ([B, heads, L, L])",
    "lastPOOL": "mean of the last block's patch tokens, each normed first (timm's global_pool='avg') ([B, D])",
    "concatPOOL{n}": "lastPOOL of each of the last n blocks, concatenated ([B, n*D])",
}
# VISION_TRANSFORMERS keys of the vision_transformer trunk that ConViT does not have -> the only
# value accepted (the one that means "off"); a key the section lacks is not checked
_VIT_OPTIONS_NOT_IN_CONVIT = {
    "FC_NORM": False,
    "USE_CLASS_TOKEN": True,
    "DROP_PATH_UNIFORM": False,
    "POS_EMBED": "learned",
    "FREEZE_PATCH_EMBED": False,
    "LAYER_SCALE_INIT": None,
    "NORM_LAYER": "layernorm",
    "ACT_LAYER": "gelu",
    "BLOCK": "prenorm",
    "WEIGHT_INIT": "timm",
}
_FEATURE_RE = re.compile(r"^(lastCLS|lastBLK|lastMAP|lastPOOL|concatCLS(\d+)|blkCLS(\d+)|concatPOOL(\d+))$")


def relative_offsets(side: int, locality_dim: int = 1, device: Any = None) -> torch.Tensor:
    """Offsets between the tokens of a ``side`` x ``side`` grid (row-major), [1, N, N, 3 * locality_dim].

    Channel groups (each repeated ``locality_dim`` times, VISSL's D_pos): Δx (column of the key
    minus column of the query), Δy (rows), Δx² + Δy². As ``GPSA.get_rel_indices`` in timm and
    ``set_rel_indices`` in VISSL.
    """
    coords = torch.arange(side, dtype=torch.float32, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)  # [N]
    dx = cols[None, :] - cols[:, None]  # [N query, N key]
    dy = rows[None, :] - rows[:, None]
    offsets = torch.stack([dx, dy, dx**2 + dy**2], dim=-1)  # [N, N, 3]
    return offsets.repeat_interleave(locality_dim, dim=-1)[None]


class GPSA(nn.Module):
    """Gated positional self-attention (timm's parameter names ``qk``, ``v``, ``proj``, ``pos_proj``,
    ``gating_param``). Patch tokens only: the token count must be a square grid.

    Written here rather than wrapping timm's ``GPSA``: VISSL's ``LOCALITY_DIM`` (the positional
    projection reads 3 x locality_dim repeated offsets and its score is divided by locality_dim)
    has no timm counterpart, and the block contract needs the attention weights on request.

    Args:
        dim: token width.
        num_heads: heads; a square number (4, 9, 16) gives every head a local init.
        qkv_bias: bias in the ``qk`` and ``v`` projections.
        qk_scale: content-attention scale, None for head_dim ** -0.5.
        attn_drop: dropout of the attention weights.
        proj_drop: dropout after the output projection.
        locality_strength: alpha of the local init: the inverse temperature of the positional softmax.
        locality_dim: repeats of each offset channel (VISSL's D_pos); 1 is timm's and the official layout.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        locality_strength: float = 1.0,
        locality_dim: int = 1,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        if locality_dim < 1:
            raise ValueError(f"locality_dim must be >= 1, got {locality_dim}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.locality_strength = locality_strength
        self.locality_dim = locality_dim
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pos_proj = nn.Linear(3 * locality_dim, num_heads)
        # lambda_h, per head; sigmoid(1) = 0.73 of the attention starts positional
        self.gating_param = nn.Parameter(torch.ones(num_heads))
        # offsets of the last grid seen, [1, N, N, 3 * locality_dim]; derived, so not saved
        self.register_buffer("rel_indices", torch.zeros(1, 0, 0, 3 * locality_dim), persistent=False)

    @torch.no_grad()
    def local_init(self) -> None:
        """The convolutional init (RECIPES 1.2): ``v`` = identity; head h1 + K*h2 of the first K² heads
        (K = floor(sqrt(heads))) scores offset δ by -α‖δ - (h2 - c, h1 - c)‖² + const, c the kernel centre."""
        self.v.weight.copy_(torch.eye(self.dim))
        k = int(self.num_heads**0.5)
        center = (k - 1) / 2 if k % 2 == 0 else k // 2
        ld = self.locality_dim
        w = self.pos_proj.weight  # [heads, 3 * ld]
        for h1 in range(k):
            for h2 in range(k):
                head = h1 + k * h2
                w[head, :ld] = 2 * (h2 - center)  # multiplies Δx
                w[head, ld : 2 * ld] = 2 * (h1 - center)  # multiplies Δy
                w[head, 2 * ld :] = -1.0  # multiplies Δx² + Δy²
        w.mul_(self.locality_strength)

    def _offsets(self, n: int) -> torch.Tensor:
        if self.rel_indices.shape[1] != n or self.rel_indices.device != self.pos_proj.weight.device:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"GPSA needs a square grid of patch tokens, got {n} tokens")
            self.rel_indices = relative_offsets(side, self.locality_dim, self.pos_proj.weight.device)
        return self.rel_indices

    def get_attention(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] patch tokens -> gated attention weights [B, heads, N, N] (after dropout)."""
        B, N, D = x.shape
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qk.unbind(0)  # [B, heads, N, head_dim]
        content = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        # the positional score does not depend on the sample: [1, heads, N, N], broadcast over B
        offsets = self._offsets(N).to(self.pos_proj.weight.dtype)
        pos = self.pos_proj(offsets).permute(0, 3, 1, 2)
        if self.locality_dim > 1:
            pos = pos / self.locality_dim
        pos = pos.softmax(dim=-1)
        gate = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)
        attn = (1.0 - gate) * content + gate * pos
        # exact arithmetic keeps the rows at sum 1; the official code renormalises anyway
        attn = attn / attn.sum(dim=-1, keepdim=True)
        return self.attn_drop(attn)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, N, D] -> output [B, N, D] and, if asked, the attention weights [B, heads, N, N]."""
        B, N, D = x.shape
        attn = self.get_attention(x)
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, heads, N, head_dim]
        out = (attn @ v).transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(out)), (attn if return_attention else None)


@TRUNKS.register("convit")
class ConViT(Trunk):
    """ConViT trunk returning the features named in ``out_feat_keys``.

    Args:
        image_size: input side the position embeddings are made for (other sides: interpolated).
        patch_size: side of the square patches.
        in_chans: image channels.
        num_layers: transformer blocks, GPSA ones included.
        num_heads: attention heads per block (4, 9, 16 in the paper).
        hidden_dim: token width (timm: 48 per head; VISSL's configs: 64 per head, the paper's "+" models).
        mlp_dim: hidden width of the blocks' MLPs.
        dropout_rate: dropout after the embeddings, MLP layers and attention projections.
        attention_dropout_rate: dropout of the attention weights.
        classifier: default feature: "token" (lastCLS) or "gap" (lastPOOL, patch tokens only).
        drop_path_rate: stochastic depth of the last block (linear from 0 at the first).
        qkv_bias: bias in the query/key/value projections.
        qk_scale: content-attention scale, None for head_dim ** -0.5.
        n_gpsa_layers: the first blocks that are GPSA (timm's ``local_up_to_layer``); the class token
            joins after them.
        class_token_in_local_layers: VISSL's key; only False is supported (see the module docstring).
        locality_strength: alpha of the local init; <= 0 gives GPSA block i the strength 1 / (i + 1) (VISSL).
        locality_dim: VISSL's D_pos (see :class:`GPSA`); 1 for timm's layout and weights.
        use_local_init: apply the convolutional init to the GPSA blocks (else they keep trunc-normal weights).
        checkpoint_mlp: recompute block MLPs in the backward pass.
        checkpoint_block: recompute whole blocks in the backward pass.
    """

    CONFIG_SECTIONS = ("VISION_TRANSFORMERS", "CONVIT")
    FEATURE_PATTERNS = FEATURE_PATTERNS
    block_types = (Block,)

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_layers: int = 12,
        num_heads: int = 9,
        hidden_dim: int = 432,
        mlp_dim: int = 1728,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        classifier: Literal["token", "gap"] = "token",
        drop_path_rate: float = 0.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        n_gpsa_layers: int = 10,
        class_token_in_local_layers: bool = False,
        locality_strength: float = 1.0,
        locality_dim: int = 1,
        use_local_init: bool = True,
        checkpoint_mlp: bool = False,
        checkpoint_block: bool = False,
    ) -> None:
        super().__init__()
        if classifier not in ("token", "gap"):
            raise ValueError(f"classifier must be 'token' or 'gap', got {classifier!r}")
        if class_token_in_local_layers:
            raise ValueError("class_token_in_local_layers=True is not supported: GPSA needs a square grid of tokens")
        if not 0 <= n_gpsa_layers <= num_layers:
            raise ValueError(f"n_gpsa_layers={n_gpsa_layers} must be in [0, num_layers={num_layers}]")
        if classifier == "token" and n_gpsa_layers == num_layers:
            raise ValueError("classifier='token' needs a block after the GPSA blocks (n_gpsa_layers < num_layers)")
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        self.classifier = classifier
        self.fc_norm = False  # timm's ConViT always norms the tokens before pooling
        self.embed_dim = hidden_dim
        self.n_gpsa_layers = n_gpsa_layers
        # one token (the class token) before the patch tokens in the output, with no slot in the
        # position embedding: timm's no_embed_class, as the weights loader reads it
        self.num_prefix_tokens = 1
        self.no_embed_class = True
        self.checkpoint_block = checkpoint_block
        self.patch_embed = PatchEmbed(patch_size, in_chans, hidden_dim)
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_dim))
        self.pos_drop = nn.Dropout(dropout_rate)
        blocks = []
        for i in range(num_layers):
            if i < n_gpsa_layers:
                alpha = locality_strength if locality_strength > 0 else 1.0 / (i + 1)
                attn_layer = partial(GPSA, locality_strength=alpha, locality_dim=locality_dim)
            else:
                attn_layer = Attention
            blocks.append(
                Block(
                    hidden_dim,
                    num_heads,
                    mlp_dim,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    dropout=dropout_rate,
                    attn_drop=attention_dropout_rate,
                    drop_path=drop_path_rate * i / max(num_layers - 1, 1),
                    attn_layer=attn_layer,
                    checkpoint_mlp=checkpoint_mlp,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self._init_weights(use_local_init)

    def _init_weights(self, use_local_init: bool) -> None:
        # timm's order (convit.py ConVit.__init__): every Linear / LayerNorm first, the local init last
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if use_local_init:
            for m in self.modules():
                if isinstance(m, GPSA):
                    m.local_init()

    # ---- from the config ---------------------------------------------------------------------

    @classmethod
    def kwargs_from_config(cls, trunk_cfg: DictConfig) -> dict[str, Any]:
        """``MODEL.TRUNK`` (VISION_TRANSFORMERS + CONVIT) -> keyword arguments of ``__init__``."""
        vit, cv = trunk_cfg.VISION_TRANSFORMERS, trunk_cfg.CONVIT
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
            "drop_path_rate": vit.DROP_PATH_RATE,
            "qkv_bias": vit.QKV_BIAS,
            # VISSL writes False for "the default scale"
            "qk_scale": None if isinstance(vit.QK_SCALE, bool) else float(vit.QK_SCALE),
            "checkpoint_mlp": vit.CHECKPOINT_MLP,
            "checkpoint_block": vit.CHECKPOINT_BLOCK,
            "n_gpsa_layers": cv.N_GPSA_LAYERS,
            "class_token_in_local_layers": cv.CLASS_TOKEN_IN_LOCAL_LAYERS,
            "locality_strength": float(cv.LOCALITY_STRENGTH),
            "locality_dim": cv.LOCALITY_DIM,
            "use_local_init": cv.USE_LOCAL_INIT,
        }

    @classmethod
    def check_config(cls, trunk_cfg: DictConfig) -> None:
        """Refuse CONVIT values and VISION_TRANSFORMERS options this trunk does not have."""
        vit, cv = trunk_cfg.VISION_TRANSFORMERS, trunk_cfg.CONVIT
        key = "config.MODEL.TRUNK"
        if cv.CLASS_TOKEN_IN_LOCAL_LAYERS:
            raise ConfigError(
                f"{key}.CONVIT.CLASS_TOKEN_IN_LOCAL_LAYERS=True is not supported: GPSA layers need a square grid of "
                "patch tokens (VISSL fails on it with a shape error); set it to False."
            )
        if not 0 <= cv.N_GPSA_LAYERS <= vit.NUM_LAYERS:
            raise ConfigError(
                f"{key}.CONVIT.N_GPSA_LAYERS={cv.N_GPSA_LAYERS}: expected 0 .. NUM_LAYERS ({vit.NUM_LAYERS})."
            )
        if vit.CLASSIFIER == "token" and cv.N_GPSA_LAYERS == vit.NUM_LAYERS:
            raise ConfigError(
                f"{key}.CONVIT.N_GPSA_LAYERS={cv.N_GPSA_LAYERS} = NUM_LAYERS leaves no block for the class token "
                "(it joins after the GPSA blocks): lower it, or set VISION_TRANSFORMERS.CLASSIFIER=gap."
            )
        if cv.LOCALITY_DIM < 1:
            raise ConfigError(f"{key}.CONVIT.LOCALITY_DIM={cv.LOCALITY_DIM}: expected an integer >= 1 (1 is timm's).")
        if vit.HIDDEN_DIM % vit.NUM_HEADS:
            raise ConfigError(
                f"{key}.VISION_TRANSFORMERS.HIDDEN_DIM={vit.HIDDEN_DIM} is not a multiple of NUM_HEADS={vit.NUM_HEADS}."
            )
        for name, only in _VIT_OPTIONS_NOT_IN_CONVIT.items():
            if name in vit and vit[name] != only:
                raise ConfigError(
                    f"{key}.VISION_TRANSFORMERS.{name}={vit[name]} is not an option of the convit trunk "
                    f"(it supports {only} only)."
                )

    @classmethod
    def timm_reference(cls, trunk_cfg: DictConfig, num_classes: int) -> nn.Module | None:
        """timm's ``ConVit`` of the same shape (its ``embed_dim`` is per head), or None for VISSL's
        LOCALITY_DIM > 1 layout, which timm does not have."""
        from timm.models.convit import ConVit

        vit, cv = trunk_cfg.VISION_TRANSFORMERS, trunk_cfg.CONVIT
        if cv.LOCALITY_DIM != 1:
            return None
        return ConVit(
            img_size=vit.IMAGE_SIZE,
            patch_size=vit.PATCH_SIZE,
            in_chans=vit.IN_CHANNELS,
            num_classes=num_classes,
            global_pool="token" if vit.CLASSIFIER == "token" else "avg",
            embed_dim=vit.HIDDEN_DIM // vit.NUM_HEADS,
            depth=vit.NUM_LAYERS,
            num_heads=vit.NUM_HEADS,
            mlp_ratio=vit.MLP_DIM / vit.HIDDEN_DIM,
            qkv_bias=vit.QKV_BIAS,
            local_up_to_layer=cv.N_GPSA_LAYERS,
            locality_strength=float(cv.LOCALITY_STRENGTH),
        )

    # ---- the built trunk ---------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Parameter names that conventionally get no weight decay (timm's ConVit's)."""
        return {"pos_embed", "cls_token"}

    def default_feature(self) -> str:
        """The feature ``forward`` returns without ``out_feat_keys``."""
        return "lastCLS" if self.classifier == "token" else "lastPOOL"

    def _parse(self, key: str) -> tuple[re.Match, int]:
        """A feature name -> its match and how many of the last blocks' outputs it needs."""
        depth, first_cls = len(self.blocks), self.n_gpsa_layers
        m = _FEATURE_RE.match(key)
        if not m:
            raise ValueError(f"unknown feature '{key}' of the convit trunk; known: {', '.join(FEATURE_PATTERNS)}")
        n = int(m.group(2) or m.group(4) or 1)
        if m.group(3) is not None:
            n = depth - int(m.group(3))
        if not 1 <= n <= depth:
            raise ValueError(f"feature '{key}' asks for blocks the trunk does not have (it has {depth})")
        if m.group(1).startswith(("lastCLS", "concatCLS", "blkCLS")) and depth - n < first_cls:
            raise ValueError(
                f"feature '{key}' needs the class token of a block before it joins (after the "
                f"{first_cls} GPSA blocks, i.e. from block {first_cls})"
            )
        return m, n

    def feature_width(self, key: str) -> int | None:
        """Width of the flat feature ``key``, None for lastBLK / lastMAP; ValueError if unknown."""
        m, n = self._parse(key)
        if m.group(1) in ("lastBLK", "lastMAP"):
            return None
        return self.embed_dim * (n if m.group(1).startswith("concat") else 1)

    def _cls(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x[:, 0])

    def _pool(self, x: torch.Tensor, index: int) -> torch.Tensor:
        # mean of the normed patch tokens; block outputs from n_gpsa_layers on start with the class token
        start = 1 if index >= self.n_gpsa_layers else 0
        return self.norm(x)[:, start:].mean(dim=1)

    def forward(self, x: torch.Tensor, out_feat_keys: list[str] | None = None) -> list[torch.Tensor]:
        """Images [B, C, H, W] -> one tensor per name in ``out_feat_keys`` (default: the classifier's)."""
        keys = list(out_feat_keys) if out_feat_keys else [self.default_feature()]
        parsed = [self._parse(k) for k in keys]
        keep = max(n for _, n in parsed)
        want_map = "lastMAP" in keys
        B = x.shape[0]
        x, grid = self.patch_embed(x)  # [B, N, D]
        x = self.pos_drop(x + resample_pos_embed(self.pos_embed, grid, 0))
        depth = len(self.blocks)
        outs: list[torch.Tensor] = []  # outputs of the last `keep` blocks
        attn = None
        for i, blk in enumerate(self.blocks):
            if i == self.n_gpsa_layers:
                x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # [B, 1 + N, D]
            last = i == depth - 1
            if self.checkpoint_block and self.training and torch.is_grad_enabled() and not (last and want_map):
                x = checkpoint(lambda t, b=blk: b(t)[0], x, use_reentrant=False)
            else:
                x, a = blk(x, return_attention=last and want_map)
                attn = a if last else attn
            if i >= depth - keep:
                outs.append(x)
        first = depth - keep  # block index of outs[0]
        feats = []
        for m, n in parsed:
            name = m.group(1)
            if name == "lastCLS":
                feats.append(self._cls(outs[-1]))
            elif name == "lastPOOL":
                feats.append(self._pool(outs[-1], depth - 1))
            elif name == "lastBLK":
                feats.append(self.norm(outs[-1]))
            elif name == "lastMAP":
                feats.append(attn)
            elif name.startswith("concatCLS"):
                feats.append(torch.cat([self._cls(o) for o in outs[-n:]], dim=-1))
            elif name.startswith("blkCLS"):
                feats.append(self._cls(outs[int(m.group(3)) - first]))
            else:  # concatPOOL{n}
                feats.append(torch.cat([self._pool(outs[j], first + j) for j in range(keep - n, keep)], dim=-1))
        return feats

    @torch.no_grad()
    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block [B, heads, L, L], for visualisation (DINO's name)."""
        return self.forward(x, ["lastMAP"])[0]

    @torch.no_grad()
    def get_attention_maps(self, x: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """Attention weights of the chosen blocks (0-based), in one forward pass without gradients.

        GPSA blocks (0 .. n_gpsa_layers - 1) return their gated mix of content and positional
        attention over the N patch tokens only ([B, heads, N, N]); the blocks after them attend over
        the class token and the patches ([B, heads, 1 + N, 1 + N], the class token first). Rows sum
        to 1. The pass stops after the deepest chosen block; ``forward`` is untouched. Call it in
        eval mode (dropout otherwise applies, to GPSA's returned weights too).

        Args:
            x: images [B, C, H, W].
            blocks: block indices, 0 .. num_layers - 1.

        Raises:
            ValueError: a block index out of range.
        """
        wanted = check_attention_blocks(blocks, len(self.blocks), "convit")
        if not wanted:
            return {}
        x, grid = self.patch_embed(x)  # [B, N, D]
        x = self.pos_drop(x + resample_pos_embed(self.pos_embed, grid, 0))

        def join_class_token(i: int, t: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, 1 + N, D]
            return torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) if i == self.n_gpsa_layers else t

        return collect_attention(self.blocks, x, wanted, before=join_class_token)
