"""Small layer modules shared by the trunks."""

from vissl_vit.models.layers.attention import Attention
from vissl_vit.models.layers.block import Block
from vissl_vit.models.layers.drop_path import DropPath
from vissl_vit.models.layers.espa import ESPABlock, ESPAttention, simplest_stem_init_
from vissl_vit.models.layers.init import WEIGHT_INITS, apply_weight_init
from vissl_vit.models.layers.mlp import Mlp
from vissl_vit.models.layers.norms import (
    NORM_KINDS,
    Bias1D,
    RescaleBlock,
    TokenBatchNorm,
    TokenGroupNorm,
    build_norm_layer,
)
from vissl_vit.models.layers.patch_embed import PatchEmbed
from vissl_vit.models.layers.pos_embed import resample_pos_embed, sincos_2d_pos_embed
from vissl_vit.models.layers.tat import TATMlp, TReLU, scaled_uniform_orthogonal_, tat_leaky_relu_slope

__all__ = [
    "NORM_KINDS",
    "WEIGHT_INITS",
    "Attention",
    "Bias1D",
    "Block",
    "DropPath",
    "ESPABlock",
    "ESPAttention",
    "Mlp",
    "PatchEmbed",
    "RescaleBlock",
    "TATMlp",
    "TReLU",
    "TokenBatchNorm",
    "TokenGroupNorm",
    "apply_weight_init",
    "build_norm_layer",
    "resample_pos_embed",
    "scaled_uniform_orthogonal_",
    "simplest_stem_init_",
    "sincos_2d_pos_embed",
    "tat_leaky_relu_slope",
]
