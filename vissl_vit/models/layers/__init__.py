"""Small layer modules shared by the trunks."""

from vissl_vit.models.layers.attention import Attention
from vissl_vit.models.layers.block import Block
from vissl_vit.models.layers.drop_path import DropPath
from vissl_vit.models.layers.mlp import Mlp
from vissl_vit.models.layers.patch_embed import PatchEmbed
from vissl_vit.models.layers.pos_embed import resample_pos_embed, sincos_2d_pos_embed

__all__ = ["Attention", "Block", "DropPath", "Mlp", "PatchEmbed", "resample_pos_embed", "sincos_2d_pos_embed"]
