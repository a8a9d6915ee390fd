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
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from vissl_vit.errors import ConfigError
from vissl_vit.models.layers import (
    NORM_KINDS,
    Block,
    ESPABlock,
    PatchEmbed,
    RescaleBlock,
    build_norm_layer,
    resample_pos_embed,
    sincos_2d_pos_embed,
    tat_leaky_relu_slope,
)
from vissl_vit.models.layers.init import apply_weight_init
from vissl_vit.models.trunks.base import Trunk
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


def collect_attention(
    blocks: Sequence[nn.Module], x: torch.Tensor, wanted: list[int], before: Any = None
) -> dict[int, torch.Tensor]:
    """Run ``blocks`` on the embedded tokens ``x`` up to the deepest of ``wanted`` (checked by
    :func:`check_attention_blocks`), only those building their attention weights; ``before(i, x)``,
    when given, may change the tokens before block ``i`` (ConViT's class token). Returns the maps in
    the order of ``wanted``."""
    maps: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(blocks[: max(wanted) + 1] if wanted else []):
        if before is not None:
            x = before(i, x)
        x, attn = blk(x, return_attention=i in wanted)
        if attn is not None:
            maps[i] = attn
    return {i: maps[i] for i in wanted}


def check_attention_blocks(blocks: Sequence[int], depth: int, trunk: str) -> list[int]:
    """The distinct block indices of ``blocks`` (0-based), in the order given; ValueError naming the
    first one that is not a block of a ``depth``-block trunk (negative indices included)."""
    out: list[int] = []
    for b in blocks:
        if isinstance(b, bool) or not hasattr(b, "__index__"):  # ints, numpy and 0-d tensor integers
            raise ValueError(f"attention maps of the {trunk} trunk: block {b!r} is not an integer index")
        b = b.__index__()
        if not 0 <= b < depth:
            raise ValueError(
                f"attention maps of the {trunk} trunk: block {b} is out of range (it has {depth} blocks: 0..{depth - 1})"
            )
        if b not in out:
            out.append(b)
    return out


BLOCKS = ("prenorm", "rescale", "espa")
NORMS = NORM_KINDS
ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "relu": nn.ReLU}


@TRUNKS.register("vision_transformer")
class VisionTransformer(Trunk):
    """ViT trunk returning the features named in ``out_feat_keys``, assembled from layers chosen by keyword.

    The seeds' variants are options of this one trunk: DeiT-III's LayerScale (``init_values``),
    RescaleViT's norms (``norm_layer``) and rescaled block (``block="rescale"``), SimplEsT-ViT's
    E-SPA + TAT block without skips or norms (``block="espa"``), big_vision's SimpleViT
    (``use_class_token=False, classifier="gap", pos_embed_type="sincos", weight_init="jax"``).

    Args:
        image_size: input side the position embeddings are made for.
        patch_size: side of the square patches.
        in_chans: image channels.
        num_layers: transformer blocks.
        num_heads: attention heads per block.
        hidden_dim: token width.
        mlp_dim: hidden width of the blocks' MLPs.
        dropout_rate: dropout after the embeddings, MLP layers and attention projections.
        pool_dropout_rate: dropout on the last block's output, before the final norm and the
            pooling (the seed SimplEsT-ViT's SimpleViT baseline drops out only there); None: the
            ``dropout_rate`` for ``block="espa"`` (SimplEsT-ViT's one dropout, and its embeddings
            and blocks then have none), 0 for the other blocks.
        attention_dropout_rate: dropout of the attention weights.
        classifier: default feature: "token" (lastCLS) or "gap" (lastPOOL, VISSL's order).
        fc_norm: with "gap", average first and norm after (timm's ``fc_norm=True``): the
            default feature is then lastFCNORM.
        use_class_token: prepend a learned class token.
        no_embed_class: the position embedding has no class-token slot and is added before the
            class token is prepended (DeiT-III, timm's ``no_embed_class``).
        drop_path_rate: stochastic depth: the last block's rate, linear from 0 at the first, or
            every block's rate with ``drop_path_uniform``.
        drop_path_uniform: the same rate in every block (DeiT-III) instead of timm's linear ramp.
        qkv_bias: bias in the qkv projections.
        qk_scale: attention scale, None for head_dim ** -0.5.
        pos_embed_type: "learned", or "sincos" (fixed 2-D sine-cosine, MoCo v3, big_vision).
        freeze_patch_embed: keep the patch projection at a random Xavier-uniform init (MoCo v3's
            stability trick).
        init_values: LayerScale's initial value (1e-4 for DeiT-III at every size), None for none.
        norm_layer: "layernorm", "batchnorm" (over batch and tokens), "groupnorm" (4 groups, over
            the group's channels and all tokens) or "none" (RescaleViT's variants).
        act_layer: the MLP activation: "gelu" (exact), "gelu_tanh" (JAX's default), "relu".
        block: "prenorm" (ViT), "rescale" (RescaleViT, no norms) or "espa" (SimplEsT-ViT: E-SPA
            attention + TAT MLP, no skips, no norms).
        weight_init: "timm", "jax" (big_vision), "moco" (moco-v3) or "simplest"; see
            :mod:`vissl_vit.models.layers.init`.
        espa_gamma_max_depth: E-SPA's decay of the last layer's target kernel (0.005).
        tat_eta: TAT's target C-map value at 0 of the whole MLP stack (0.9).
        espa_suo_torch_layout: E-SPA blocks: SimplEsT-ViT's scaled-uniform-orthogonal init as its code
            runs it on torch's (out, in) weights (the gain lands on the narrowing layer: fc2 gets
            2 for MLP_DIM = 4 D), instead of the DKS paper's fan-out/fan-in rule (False).
        checkpoint_mlp: recompute block MLPs in the backward pass.
        checkpoint_block: recompute whole blocks in the backward pass.
    """

    CONFIG_SECTIONS = ("VISION_TRANSFORMERS",)
    FEATURE_PATTERNS = FEATURE_PATTERNS

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
        pool_dropout_rate: float | None = None,
        classifier: Literal["token", "gap"] = "token",
        fc_norm: bool = False,
        use_class_token: bool = True,
        no_embed_class: bool = False,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        pos_embed_type: Literal["learned", "sincos"] = "learned",
        freeze_patch_embed: bool = False,
        init_values: float | None = None,
        norm_layer: Literal["layernorm", "batchnorm", "groupnorm", "none"] = "layernorm",
        act_layer: Literal["gelu", "gelu_tanh", "relu"] = "gelu",
        block: Literal["prenorm", "rescale", "espa"] = "prenorm",
        weight_init: Literal["timm", "jax", "moco", "rescalevit", "torch", "simplest"] = "timm",
        espa_gamma_max_depth: float = 0.005,
        tat_eta: float = 0.9,
        espa_suo_torch_layout: bool = True,
        checkpoint_mlp: bool = False,
        checkpoint_block: bool = False,
    ) -> None:
        super().__init__()
        problems = _option_problems(
            classifier,
            fc_norm,
            use_class_token,
            pos_embed_type,
            norm_layer,
            act_layer,
            block,
            weight_init,
            drop_path_rate,
        )
        if problems:
            raise ValueError(problems[0])
        self.classifier = classifier
        self.fc_norm = fc_norm
        self.embed_dim = hidden_dim
        self.num_prefix_tokens = 1 if use_class_token else 0
        self.no_embed_class = no_embed_class
        self.checkpoint_block = checkpoint_block
        # LayerNorm and no norm act on each token alone: norm(x)[:, 0] == norm(x[:, 0]), and the
        # class-token features skip normalising the other tokens
        self._token_wise_norm = norm_layer in ("layernorm", "none")
        self.patch_embed = PatchEmbed(patch_size, in_chans, hidden_dim)
        grid = image_size // patch_size
        num_patches = grid * grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_dim)) if use_class_token else None
        pos_tokens = num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_tokens, hidden_dim))
        # SimplEsT-ViT drops out the last block's tokens before pooling, not the embeddings
        self.pos_drop = nn.Dropout(0.0 if block == "espa" else dropout_rate)
        if pool_dropout_rate is None:
            pool_dropout_rate = dropout_rate if block == "espa" else 0.0
        self.final_drop = nn.Dropout(pool_dropout_rate) if pool_dropout_rate else nn.Identity()
        if drop_path_uniform:
            rates = [drop_path_rate] * num_layers
        else:
            rates = [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]
        norm = build_norm_layer(norm_layer)
        act = ACTIVATIONS[act_layer]
        common = dict(qkv_bias=qkv_bias, qk_scale=qk_scale, dropout=dropout_rate, attn_drop=attention_dropout_rate)
        blocks: list[nn.Module] = []
        if block == "espa":  # TAT's slope depends on the depth only: solve it once
            slope = tat_leaky_relu_slope(num_layers, tat_eta)
        for i, r in enumerate(rates):
            if block == "prenorm":
                blk = Block(
                    hidden_dim, num_heads, mlp_dim, **common, drop_path=r, init_values=init_values,
                    norm_layer=norm, act_layer=act, checkpoint_mlp=checkpoint_mlp,
                )  # fmt: skip
            elif block == "rescale":
                blk = RescaleBlock(
                    hidden_dim, num_heads, mlp_dim, layer_index=i + 1, depth=num_layers, **common,
                    drop_path=r, act_layer=act,
                )  # fmt: skip
            else:
                blk = ESPABlock(
                    hidden_dim, num_heads, mlp_dim, layer_index=i + 1, depth=num_layers, num_tokens=num_patches,
                    gamma_max_depth=espa_gamma_max_depth, c_val_0_target=tat_eta, negative_slope=slope,
                    qkv_bias=qkv_bias, dks_torch_layout=espa_suo_torch_layout, checkpoint_mlp=checkpoint_mlp,
                )  # fmt: skip
            blocks.append(blk)
        self.blocks = nn.ModuleList(blocks)
        self.block_types = (type(blocks[0]),) if blocks else ()
        self.norm = norm(hidden_dim)
        apply_weight_init(self, weight_init)
        if pos_embed_type == "sincos":
            prefix = 0 if no_embed_class else self.num_prefix_tokens
            self.pos_embed.data.copy_(sincos_2d_pos_embed(grid, hidden_dim, prefix))
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

    # ---- the contract: from the config -----------------------------------------------------------

    @classmethod
    def kwargs_from_config(cls, trunk_cfg: DictConfig) -> dict[str, Any]:
        """MODEL.TRUNK.VISION_TRANSFORMERS -> keyword arguments."""
        vit = trunk_cfg.VISION_TRANSFORMERS
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
            "pool_dropout_rate": vit.get("POOL_DROPOUT_RATE"),
            "classifier": vit.CLASSIFIER,
            "fc_norm": vit.FC_NORM,
            "use_class_token": vit.USE_CLASS_TOKEN,
            "no_embed_class": vit.NO_EMBED_CLASS,
            "drop_path_rate": vit.DROP_PATH_RATE,
            "drop_path_uniform": vit.DROP_PATH_UNIFORM,
            "qkv_bias": vit.QKV_BIAS,
            "pos_embed_type": vit.POS_EMBED,
            "freeze_patch_embed": vit.FREEZE_PATCH_EMBED,
            # VISSL writes False for "the default scale"
            "qk_scale": None if isinstance(vit.QK_SCALE, bool) else float(vit.QK_SCALE),
            "init_values": None if vit.LAYER_SCALE_INIT is None else float(vit.LAYER_SCALE_INIT),
            "norm_layer": vit.NORM_LAYER,
            "act_layer": vit.ACT_LAYER,
            "block": vit.BLOCK,
            "weight_init": vit.WEIGHT_INIT,
            "espa_gamma_max_depth": vit.ESPA_GAMMA_MAX_DEPTH,
            "tat_eta": vit.TAT_ETA,
            "espa_suo_torch_layout": vit.ESPA_SUO_TORCH_LAYOUT,
            "checkpoint_mlp": vit.CHECKPOINT_MLP,
            "checkpoint_block": vit.CHECKPOINT_BLOCK,
        }

    @classmethod
    def check_config(cls, trunk_cfg: DictConfig) -> None:
        vit = trunk_cfg.VISION_TRANSFORMERS
        prefix = "config.MODEL.TRUNK.VISION_TRANSFORMERS"
        for key in ("IMAGE_SIZE", "PATCH_SIZE", "IN_CHANNELS", "NUM_LAYERS", "NUM_HEADS", "HIDDEN_DIM", "MLP_DIM"):
            if vit[key] < 1:
                raise ConfigError(f"{prefix}.{key}={vit[key]}: expected at least 1.")
        if vit.IMAGE_SIZE % vit.PATCH_SIZE:
            raise ConfigError(
                f"{prefix}.IMAGE_SIZE={vit.IMAGE_SIZE} must be a multiple of PATCH_SIZE={vit.PATCH_SIZE}."
            )
        if vit.HIDDEN_DIM % vit.NUM_HEADS:
            raise ConfigError(f"{prefix}.HIDDEN_DIM={vit.HIDDEN_DIM} must be a multiple of NUM_HEADS={vit.NUM_HEADS}.")
        problems = _option_problems(
            vit.CLASSIFIER, vit.FC_NORM, vit.USE_CLASS_TOKEN, vit.POS_EMBED, vit.NORM_LAYER, vit.ACT_LAYER,
            vit.BLOCK, vit.WEIGHT_INIT, vit.DROP_PATH_RATE, prefix,
        )  # fmt: skip
        if problems:
            raise ConfigError(problems[0])
        if vit.POS_EMBED == "sincos" and vit.HIDDEN_DIM % 4:
            raise ConfigError(f"{prefix}.POS_EMBED='sincos' needs HIDDEN_DIM divisible by 4, got {vit.HIDDEN_DIM}.")
        if vit.BLOCK == "espa":
            try:
                tat_leaky_relu_slope(int(vit.NUM_LAYERS), float(vit.TAT_ETA))
            except ValueError as e:
                raise ConfigError(f"{prefix}.BLOCK='espa' with NUM_LAYERS={vit.NUM_LAYERS}: {e}") from None

    @classmethod
    def feature_width_from_config(cls, trunk_cfg: DictConfig, key: str) -> int | None:
        vit = trunk_cfg.VISION_TRANSFORMERS
        return feature_width(key, int(vit.HIDDEN_DIM), int(vit.NUM_LAYERS))

    @classmethod
    def default_feature_from_config(cls, trunk_cfg: DictConfig) -> str:
        vit = trunk_cfg.VISION_TRANSFORMERS
        if vit.CLASSIFIER == "token":
            return "lastCLS"
        return "lastFCNORM" if vit.FC_NORM else "lastPOOL"

    @classmethod
    def num_params_from_config(cls, trunk_cfg: DictConfig) -> int:
        vit = trunk_cfg.VISION_TRANSFORMERS
        if vit.NUM_LAYERS <= 1000:  # exact: the structure, built without memory
            return super().num_params_from_config(trunk_cfg)
        # absurd depths (refused for memory): the plain ViT's closed form, without building
        d, m, p = int(vit.HIDDEN_DIM), int(vit.MLP_DIM), int(vit.PATCH_SIZE)
        prefix = 1 if vit.USE_CLASS_TOKEN else 0
        block = 3 * d * d + (3 * d if vit.QKV_BIAS else 0) + d * d + d + 2 * d * m + m + d + 4 * d
        tokens = (int(vit.IMAGE_SIZE) // max(p, 1)) ** 2 + prefix
        return int(vit.NUM_LAYERS) * block + int(vit.IN_CHANNELS) * p * p * d + d + prefix * d + tokens * d + 2 * d

    @classmethod
    def size_summary(cls, trunk_cfg: DictConfig) -> str:
        vit = trunk_cfg.VISION_TRANSFORMERS
        return f"NUM_LAYERS={vit.NUM_LAYERS}, HIDDEN_DIM={vit.HIDDEN_DIM}, MLP_DIM={vit.MLP_DIM}"

    @classmethod
    def timm_reference(cls, trunk_cfg: DictConfig, num_classes: int) -> nn.Module | None:
        """timm's VisionTransformer of the same shape (prenorm LayerNorm blocks only)."""
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        v = trunk_cfg.VISION_TRANSFORMERS
        if v.BLOCK != "prenorm" or v.NORM_LAYER != "layernorm":
            return None
        return TimmViT(
            img_size=v.IMAGE_SIZE,
            patch_size=v.PATCH_SIZE,
            in_chans=v.IN_CHANNELS,
            embed_dim=v.HIDDEN_DIM,
            depth=v.NUM_LAYERS,
            num_heads=v.NUM_HEADS,
            mlp_ratio=v.MLP_DIM / v.HIDDEN_DIM,
            qkv_bias=v.QKV_BIAS,
            class_token=v.USE_CLASS_TOKEN,
            no_embed_class=v.NO_EMBED_CLASS,
            init_values=v.LAYER_SCALE_INIT,
            global_pool="token" if v.CLASSIFIER == "token" else "avg",
            fc_norm=bool(v.FC_NORM) if v.CLASSIFIER == "gap" else None,
            num_classes=num_classes,
            drop_path_rate=v.DROP_PATH_RATE,
        )

    # ---- the contract: the built trunk -------------------------------------------------------------

    def feature_width(self, key: str) -> int | None:
        return feature_width(key, self.embed_dim, len(self.blocks))

    def no_weight_decay(self) -> set[str]:
        """Parameter names that conventionally get no weight decay."""
        return {"pos_embed", "cls_token"}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, prefix + H/p * W/p, D] with position embeddings."""
        x, grid = self.patch_embed(x)
        if self.no_embed_class:  # DeiT-III: the class token carries no position
            x = x + resample_pos_embed(self.pos_embed, grid, 0)
            if self.cls_token is not None:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            return self.pos_drop(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = resample_pos_embed(self.pos_embed, grid, self.num_prefix_tokens)
        return self.pos_drop(x + pos)

    def _normed(self, x: torch.Tensor, cache: dict[int, torch.Tensor]) -> torch.Tensor:
        """The final norm over all tokens of one block output, computed once per output."""
        if id(x) not in cache:
            cache[id(x)] = self.norm(x)
        return cache[id(x)]

    def _pool(self, x: torch.Tensor, cache: dict[int, torch.Tensor]) -> torch.Tensor:
        # VISSL's FeatAvgPool over the normed tokens (its interms are norm(x)); the class token,
        # which VISSL refuses to pool, is left out
        return self._normed(x, cache)[:, self.num_prefix_tokens :].mean(dim=1)

    def _pool_fc_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x[:, self.num_prefix_tokens :].mean(dim=1))

    def default_feature(self) -> str:
        """The feature ``forward`` returns without ``out_feat_keys``."""
        if self.classifier == "token":
            return "lastCLS"
        return "lastFCNORM" if self.fc_norm else "lastPOOL"

    def _cls(self, x: torch.Tensor, key: str, cache: dict[int, torch.Tensor]) -> torch.Tensor:
        if self.cls_token is None:
            raise ValueError(f"feature '{key}' needs a class token (use_class_token=False)")
        if self._token_wise_norm:  # LayerNorm: normalise the class token alone
            return self.norm(x[:, 0])
        return self._normed(x, cache)[:, 0]  # batch or group statistics take every token

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
            if m.group(1) == "lastFCNORM" and not self._token_wise_norm:
                raise ValueError("feature 'lastFCNORM' (norm of the mean token) needs a token-wise norm (layernorm)")
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
            if last:
                x = self.final_drop(x)
            if i >= depth - keep:
                outs.append(x)
        feats = []
        cache: dict[int, torch.Tensor] = {}
        for key in keys:
            m = _FEATURE_RE.match(key)
            name = m.group(1)
            if name == "lastCLS":
                feats.append(self._cls(outs[-1], key, cache))
            elif name == "lastPOOL":
                feats.append(self._pool(outs[-1], cache))
            elif name == "lastFCNORM":
                feats.append(self._pool_fc_norm(outs[-1]))
            elif name == "lastBLK":
                feats.append(self._normed(outs[-1], cache))
            elif name == "lastMAP":
                feats.append(attn)
            elif name.startswith("concatCLS"):
                feats.append(torch.cat([self._cls(o, key, cache) for o in outs[-int(m.group(2)) :]], dim=-1))
            elif name.startswith("blkCLS"):
                feats.append(self._cls(outs[int(m.group(3)) - (depth - keep)], key, cache))
            else:  # concatPOOL{n}
                feats.append(torch.cat([self._pool(o, cache) for o in outs[-int(m.group(4)) :]], dim=-1))
        return feats

    @torch.no_grad()
    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block [B, heads, L, L], for visualisation (DINO's name)."""
        return self.forward(x, ["lastMAP"])[0]

    @torch.no_grad()
    def get_attention_maps(self, x: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """Attention weights of the chosen blocks (0-based), in one forward pass without gradients.

        Every block kind returns its map: softmax(q k^T * scale) for "prenorm" and "rescale" blocks
        (rows sum to 1), E-SPA's d_l * softmax(q k^T / sqrt(d_h) + B_l) for "espa" (rows sum to
        d_l = rowsum(A_l), see :class:`~vissl_vit.models.layers.espa.ESPAttention`). The pass stops
        after the deepest chosen block; ``forward`` is untouched (its blocks never build the maps).
        Call it on a trunk in eval mode: in training mode dropout applies and batch norm and
        RescaleViT's Bias1D update their statistics, as in any forward.

        Args:
            x: images [B, C, H, W].
            blocks: block indices, 0 .. num_layers - 1.

        Returns:
            block index -> weights [B, heads, L, L] (L counts the class token first when there is one).

        Raises:
            ValueError: a block index out of range.
        """
        wanted = check_attention_blocks(blocks, len(self.blocks), "vision_transformer")
        return collect_attention(self.blocks, self.embed(x), wanted) if wanted else {}


def _option_problems(
    classifier: str,
    fc_norm: bool,
    use_class_token: bool,
    pos_embed_type: str,
    norm_layer: str,
    act_layer: str,
    block: str,
    weight_init: str,
    drop_path_rate: float,
    prefix: str = "",
) -> list[str]:
    """What is wrong with a combination of the trunk's options, each as one sentence naming the key
    (config names under ``prefix``, else the keyword arguments)."""
    from vissl_vit.models.layers.init import WEIGHT_INITS

    def name(key: str, kwarg: str) -> str:
        return f"{prefix}.{key}" if prefix else kwarg

    out = []
    choices = [
        ("CLASSIFIER", "classifier", classifier, ("token", "gap")),
        ("POS_EMBED", "pos_embed_type", pos_embed_type, ("learned", "sincos")),
        ("NORM_LAYER", "norm_layer", norm_layer, NORMS),
        ("ACT_LAYER", "act_layer", act_layer, tuple(ACTIVATIONS)),
        ("BLOCK", "block", block, BLOCKS),
        ("WEIGHT_INIT", "weight_init", weight_init, WEIGHT_INITS),
    ]
    for key, kwarg, value, allowed in choices:
        if value not in allowed:
            out.append(f"{name(key, kwarg)}='{value}': expected one of {', '.join(allowed)}.")

    def bare(key: str, kwarg: str) -> str:
        return key if prefix else kwarg

    fc, cl, ct, nl, bl = (
        name("FC_NORM", "fc_norm"),
        bare("CLASSIFIER", "classifier"),
        bare("USE_CLASS_TOKEN", "use_class_token"),
        bare("NORM_LAYER", "norm_layer"),
        name("BLOCK", "block"),
    )
    dp = bare("DROP_PATH_RATE", "drop_path_rate")
    if fc_norm and classifier != "gap":
        out.append(f"{fc}=True (timm's order of average pooling) needs {cl}='gap'.")
    if fc_norm and norm_layer != "layernorm":
        out.append(f"{fc}=True (the norm of the mean token) needs {nl}='layernorm'.")
    if classifier == "token" and not use_class_token:
        out.append(f"{name('CLASSIFIER', 'classifier')}='token' needs {ct}=True; use {cl}='gap' without it.")
    if block in ("rescale", "espa") and norm_layer != "none":
        out.append(f"{bl}='{block}' has no normalisation layers: set {nl}='none' (got '{norm_layer}').")
    if block == "espa" and drop_path_rate:
        out.append(f"{bl}='espa' has no residual branches to drop: set {dp}=0 (got {drop_path_rate}).")
    if block == "espa" and use_class_token:
        out.append(f"{bl}='espa' attends over the patch grid only: set {ct}=False and {cl}='gap'.")
    return out
