"""Vision Transformer trunk.

"An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale", Dosovitskiy et al.,
ICLR 2021 (https://arxiv.org/abs/2010.11929); DeiT's stochastic depth (Touvron et al., 2021).

Parameter names follow timm and DINO (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.attn.qkv``, ``norm``) so their weights load with at most a prefix mapping; timm's
``fc_norm`` (its name for the final norm when it normalises after pooling) is our ``norm``.

Average pooling comes in two orders. VISSL's ``lastPOOL`` / ``concatPOOL{n}`` (and DINO's and
big_vision's ``gap``) average the patch tokens *after* the final norm: timm's
``global_pool="avg", fc_norm=False``. timm's default for average pooling, ``fc_norm=True``,
averages first and then normalises. ``classifier="gap"`` is VISSL's order; ``fc_norm=True``
selects timm's, as the trunk's default output ``lastFCNORM``.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vissl_vit.models.layers import Block, PatchEmbed, resample_pos_embed, sincos_2d_pos_embed
from vissl_vit.registry import TRUNKS

# Feature names of forward(x, out_feat_keys). {n}: the last n blocks; {i}: block i (from 0).
FEATURE_PATTERNS = {
    "lastCLS": "class token of the last block, after the final norm ([B, D])",
    "concatCLS{n}": "class tokens of the last n blocks, each normed, concatenated ([B, n*D])",
    "blkCLS{i}": "class token after block i (from 0), normed ([B, D])",
    "lastBLK": "every token of the last block, normed ([B, L, D])",
    "lastMAP": "attention weights of the last block ([B, heads, L, L])",
    "lastPOOL": "mean of the last block's patch tokens, each normed first (VISSL, DINO) ([B, D])",
    "concatPOOL{n}": "lastPOOL of each of the last n blocks, concatenated ([B, n*D])",
    "lastFCNORM": "mean of the last block's patch tokens, then normed (timm's fc_norm order) ([B, D])",
}
_FEATURE_RE = re.compile(r"^(lastCLS|lastBLK|lastMAP|lastPOOL|lastFCNORM|concatCLS(\d+)|blkCLS(\d+)|concatPOOL(\d+))$")


def feature_width(key: str, hidden_dim: int, num_layers: int) -> int | None:
    """Width of a flat feature ([B, width]) of the trunk, or None for the non-flat ones (lastBLK,
    lastMAP). An unknown name, or one asking for blocks the trunk does not have, raises ValueError."""
    m = _FEATURE_RE.match(key)
    if not m:
        raise ValueError(
            f"unknown feature '{key}' of the vision_transformer trunk; known: {', '.join(FEATURE_PATTERNS)}"
        )
    n = int(m.group(2) or m.group(4) or 1)
    if not 1 <= n <= num_layers or (m.group(3) is not None and int(m.group(3)) >= num_layers):
        raise ValueError(f"feature '{key}' asks for blocks the trunk does not have (it has {num_layers})")
    if m.group(1) in ("lastBLK", "lastMAP"):
        return None
    return hidden_dim * n


@TRUNKS.register("vision_transformer")
class VisionTransformer(nn.Module):
    """ViT trunk returning the features named in ``out_feat_keys``.

    Args:
        image_size: input side the position embeddings are made for.
        patch_size: side of the square patches.
        in_chans: image channels.
        num_layers: transformer blocks.
        num_heads: attention heads per block.
        hidden_dim: token width.
        mlp_dim: hidden width of the blocks' MLPs.
        dropout_rate: dropout after the embeddings, MLP layers and attention projections.
        attention_dropout_rate: dropout of the attention weights.
        classifier: default feature: "token" (lastCLS) or "gap" (lastPOOL, VISSL's order).
        fc_norm: with "gap", average first and norm after (timm's ``fc_norm=True``): the
            default feature is then lastFCNORM.
        use_class_token: prepend a learned class token.
        drop_path_rate: stochastic depth of the last block (linear from 0 at the first).
        qkv_bias: bias in the qkv projections.
        qk_scale: attention scale, None for head_dim ** -0.5.
        pos_embed_type: "learned", or "sincos" (fixed 2-D sine-cosine, MoCo v3).
        freeze_patch_embed: keep the patch projection at its random init (MoCo v3's stability trick).
        checkpoint_mlp: recompute block MLPs in the backward pass.
        checkpoint_block: recompute whole blocks in the backward pass.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_layers: int = 12,
        num_heads: int = 12,
        hidden_dim: int = 768,
        mlp_dim: int = 3072,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        classifier: Literal["token", "gap"] = "token",
        fc_norm: bool = False,
        use_class_token: bool = True,
        drop_path_rate: float = 0.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        pos_embed_type: Literal["learned", "sincos"] = "learned",
        freeze_patch_embed: bool = False,
        checkpoint_mlp: bool = False,
        checkpoint_block: bool = False,
    ) -> None:
        super().__init__()
        if classifier not in ("token", "gap"):
            raise ValueError(f"classifier must be 'token' or 'gap', got {classifier!r}")
        if fc_norm and classifier != "gap":
            raise ValueError("fc_norm=True (timm's pooling order) needs classifier='gap'")
        if classifier == "token" and not use_class_token:
            raise ValueError("classifier='token' needs use_class_token=True")
        if pos_embed_type not in ("learned", "sincos"):
            raise ValueError(f"pos_embed_type must be 'learned' or 'sincos', got {pos_embed_type!r}")
        self.classifier = classifier
        self.fc_norm = fc_norm
        self.embed_dim = hidden_dim
        self.num_prefix_tokens = 1 if use_class_token else 0
        self.checkpoint_block = checkpoint_block
        self.patch_embed = PatchEmbed(patch_size, in_chans, hidden_dim)
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_dim)) if use_class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, hidden_dim))
        self.pos_drop = nn.Dropout(dropout_rate)
        rates = [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]
        self.blocks = nn.ModuleList(
            Block(
                hidden_dim,
                num_heads,
                mlp_dim,
                qkv_bias,
                qk_scale,
                dropout_rate,
                attention_dropout_rate,
                r,
                checkpoint_mlp,
            )
            for r in rates
        )
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self._init_weights()
        if pos_embed_type == "sincos":
            grid = image_size // patch_size
            self.pos_embed.data.copy_(sincos_2d_pos_embed(grid, hidden_dim, self.num_prefix_tokens))
            self.pos_embed.requires_grad = False
        if freeze_patch_embed:
            # MoCo v3: a fixed random patch projection (Xavier-uniform over the patch) avoids the
            # training instability that shows as loss spikes with ViTs
            proj = self.patch_embed.proj
            bound = (6.0 / (in_chans * patch_size * patch_size + hidden_dim)) ** 0.5
            nn.init.uniform_(proj.weight, -bound, bound)
            nn.init.zeros_(proj.bias)
            proj.weight.requires_grad = False
            proj.bias.requires_grad = False

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that conventionally get no weight decay."""
        return {"pos_embed", "cls_token"}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, prefix + H/p * W/p, D] with position embeddings."""
        x, grid = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = resample_pos_embed(self.pos_embed, grid, self.num_prefix_tokens)
        return self.pos_drop(x + pos)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        # VISSL's FeatAvgPool over the normed tokens (its interms are norm(x)); the class token,
        # which VISSL refuses to pool, is left out
        return self.norm(x)[:, self.num_prefix_tokens :].mean(dim=1)

    def _pool_fc_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x[:, self.num_prefix_tokens :].mean(dim=1))

    def default_feature(self) -> str:
        """The feature ``forward`` returns without ``out_feat_keys``."""
        if self.classifier == "token":
            return "lastCLS"
        return "lastFCNORM" if self.fc_norm else "lastPOOL"

    def _cls(self, x: torch.Tensor, key: str) -> torch.Tensor:
        if self.cls_token is None:
            raise ValueError(f"feature '{key}' needs a class token (use_class_token=False)")
        return self.norm(x[:, 0])

    def parse_feature_keys(self, out_feat_keys: list[str]) -> int:
        """Check feature names; return how many of the last blocks' outputs they need."""
        depth = len(self.blocks)
        need = 1
        for key in out_feat_keys:
            m = _FEATURE_RE.match(key)
            if not m:
                known = ", ".join(FEATURE_PATTERNS)
                raise ValueError(f"unknown feature '{key}' of the vision_transformer trunk; known: {known}")
            n = int(m.group(2) or m.group(4) or 1)
            if m.group(3) is not None:
                n = depth - int(m.group(3))
            if not 1 <= n <= depth:
                raise ValueError(f"feature '{key}' asks for blocks the trunk does not have (it has {depth})")
            need = max(need, n)
        return need

    def forward(self, x: torch.Tensor, out_feat_keys: list[str] | None = None) -> list[torch.Tensor]:
        """Images [B, C, H, W] -> one tensor per name in ``out_feat_keys`` (default: the classifier's)."""
        keys = list(out_feat_keys) if out_feat_keys else [self.default_feature()]
        keep = self.parse_feature_keys(keys)
        want_map = "lastMAP" in keys
        x = self.embed(x)
        outs: list[torch.Tensor] = []  # outputs of the last `keep` blocks
        attn = None
        depth = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            last = i == depth - 1
            if self.checkpoint_block and self.training and torch.is_grad_enabled() and not (last and want_map):
                x = checkpoint(lambda t, b=blk: b(t)[0], x, use_reentrant=False)
            else:
                x, a = blk(x, return_attention=last and want_map)
                attn = a if last else attn
            if i >= depth - keep:
                outs.append(x)
        feats = []
        for key in keys:
            m = _FEATURE_RE.match(key)
            name = m.group(1)
            if name == "lastCLS":
                feats.append(self._cls(outs[-1], key))
            elif name == "lastPOOL":
                feats.append(self._pool(outs[-1]))
            elif name == "lastFCNORM":
                feats.append(self._pool_fc_norm(outs[-1]))
            elif name == "lastBLK":
                feats.append(self.norm(outs[-1]))
            elif name == "lastMAP":
                feats.append(attn)
            elif name.startswith("concatCLS"):
                feats.append(torch.cat([self._cls(o, key) for o in outs[-int(m.group(2)) :]], dim=-1))
            elif name.startswith("blkCLS"):
                feats.append(self._cls(outs[int(m.group(3)) - (depth - keep)], key))
            else:  # concatPOOL{n}
                feats.append(torch.cat([self._pool(o) for o in outs[-int(m.group(4)) :]], dim=-1))
        return feats

    @torch.no_grad()
    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block [B, heads, L, L], for visualisation (DINO's name)."""
        return self.forward(x, ["lastMAP"])[0]
