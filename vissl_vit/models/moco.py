"""MoCo's model: the online network, a momentum copy of it, and the momentum update.

MoCo v2 ("Improved Baselines with Momentum Contrastive Learning", Chen et al. 2020): the query
is the online encoder's embedding of view 0, the key the momentum encoder's embedding of view 1.
MoCo v3 ("An Empirical Study of Training Self-Supervised Vision Transformers", Chen, Xie, He,
ICCV 2021): both views through both encoders, a predictor head on the online side only, and a
momentum that rises to 1 on a cosine schedule.

The momentum encoder is a submodule, so it is in the model's state dict and in every
checkpoint (``classy_state_dict.base_model.model.momentum_encoder``).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Literal

import torch
from torch import nn

from vissl_vit.models.ema import ema_update_
from vissl_vit.models.model import TrunkHeadModel
from vissl_vit.utils.distributed import batch_shuffle, batch_unshuffle, get_world_size

logger = logging.getLogger(__name__)


def momentum_at(base: float, schedule: Literal["constant", "cosine"], progress: float) -> float:
    """The momentum at training progress in [0, 1]: constant, or cosine from ``base`` to 1 (MoCo v3, BYOL)."""
    if schedule == "constant":
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class MoCoModel(TrunkHeadModel):
    """Online trunk + heads, and a momentum encoder (trunk + the heads but the predictor).

    Args:
        base: the online model (trunk and heads: projector, and the predictor for v3).
        version: "v2" (query view 0, key view 1) or "v3" (symmetric, predictor = last head).
        momentum: base momentum of the EMA update (0.999 for v2, 0.99 for v3 ViTs).
        momentum_schedule: "constant" or "cosine" (to 1 at the end of training).
        shuffle_bn: shuffle the key batch across processes (v2's shuffle-BN) when several run.
    """

    # the hooks the trainer must run for this model (engine/hooks/build.py): the EMA after each step
    trainer_hooks: tuple[str, ...] = ("momentum_encoder_hook",)

    def __init__(
        self,
        base: TrunkHeadModel,
        version: Literal["v2", "v3"],
        momentum: float,
        momentum_schedule: Literal["constant", "cosine"],
        shuffle_bn: bool,
    ) -> None:
        super().__init__(base.trunk, list(base.heads), base.out_feat_keys)
        if version == "v3" and len(base.heads) < 2:
            raise ValueError("MoCo v3 needs two heads in MODEL.HEAD.PARAMS: a projector, then a predictor")
        self.version, self.momentum, self.momentum_schedule = version, momentum, momentum_schedule
        self.shuffle_bn = shuffle_bn
        self.num_key_heads = len(base.heads) - 1 if version == "v3" else len(base.heads)
        key_heads = copy.deepcopy(nn.ModuleList(list(base.heads)[: self.num_key_heads]))
        self.momentum_encoder = TrunkHeadModel(copy.deepcopy(base.trunk), list(key_heads), base.out_feat_keys)
        for p in self.momentum_encoder.parameters():
            p.requires_grad = False

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The (online, target) module pairs of the momentum update: the trunk and each head but
        the predictor, each with its copy in the momentum encoder."""
        pairs = [(self.trunk, self.momentum_encoder.trunk)]
        pairs += list(zip(list(self.heads)[: self.num_key_heads], self.momentum_encoder.heads))
        return pairs

    def _pair_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The parameters of :meth:`ema_pairs`: (online, target), in the same order."""
        online: list[nn.Parameter] = []
        target: list[nn.Parameter] = []
        for src, dst in self.ema_pairs():
            online += list(src.parameters())
            target += list(dst.parameters())
        return online, target

    @torch.no_grad()
    def _keys(self, views: list[torch.Tensor]) -> torch.Tensor:
        if self.shuffle_bn and get_world_size() > 1:
            keys = []
            for v in views:  # shuffle-BN: each BN sees another process's samples
                shuffled, idx = batch_shuffle(v)
                keys.append(batch_unshuffle(self.momentum_encoder(shuffled)[0], idx))
            return torch.cat(keys)
        return self.momentum_encoder(views)[0]

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """views: [view0, view1] each [B, C, H, W] -> [queries [V*B, D], keys [V*B, D]].

        v2: queries of view 0 and keys of view 1 (V = 1); v3: both views through both encoders.
        """
        if not isinstance(views, (list, tuple)) or len(views) != 2:
            raise ValueError("MoCo needs two views per image: use ImgReplicatePil and moco_collator")
        if self.version == "v2":
            return [super().forward([views[0]])[0], self._keys([views[1]])]
        return [super().forward(list(views))[0], self._keys(list(views))]

    @torch.no_grad()
    def reset_momentum_encoder(self) -> None:
        """Make the momentum encoder a copy of the online trunk and key heads (after loading weights)."""
        online, target = self._pair_params()
        torch._foreach_copy_(target, online)

    @torch.no_grad()
    def update_momentum_encoder(self, progress: float) -> float:
        """EMA of the online weights into the momentum encoder (the parameters of :meth:`ema_pairs`;
        its BatchNorm statistics are its own, from its forwards); returns the momentum used."""
        m = momentum_at(self.momentum, self.momentum_schedule, progress)
        online, target = self._pair_params()
        ema_update_(target, online, m)
        return m
