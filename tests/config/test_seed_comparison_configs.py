"""The configs of the seeds' comparisons (RECIPES.md sections 5 and 6): RescaleViT's four norm
variants are ViT-B/16 with only the norms changed, SimplEsT-ViT-S/4 differs from the SimpleViT-S/4
baseline by exactly the missing out-projections and LayerNorms (RECIPES 6.7), and each setup's
optimizer, augmentation and dropout are the seed's."""

from __future__ import annotations

import pytest
import timm
import torch

from vissl_vit import build_model, compose_config

SUP = "pretrain/vision_transformer/supervised"
RESCALE = f"{SUP}/rescalevit/cifar10_b16"
SIMPLEST = f"{SUP}/simplest/cifar10_s4_tat"


def _cfg(config: str, *overlays: str, extra: tuple[str, ...] = ()):
    args = [f"config={config}", *(f"+config/{o}" for o in overlays), "config.MACHINE.DEVICE=cpu", *extra]
    return compose_config(args).config


def _count(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def test_rescalevit_variants_are_vit_b16_with_other_norms():
    ln = _cfg(RESCALE)
    with torch.device("meta"):
        ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert _count(ln) == n_ref  # LayerNorm: timm's ViT-B/16, class token, qkv bias, 10 classes
    for norm in ("bn", "gn"):  # affine per channel, as LayerNorm's: the same count
        assert _count(_cfg(RESCALE, f"{SUP}/rescalevit/overlays={norm}")) == n_ref
    rescale = _cfg(RESCALE, f"{SUP}/rescalevit/overlays=rescale")
    d, depth = 768, 12
    # no norm (2 per block + the final one, weight and bias each), a Bias1D per branch and one scalar s per block
    assert _count(rescale) == n_ref - (2 * depth + 1) * 2 * d + depth * (2 * d + 1)
    o = ln.OPTIMIZER
    assert (o.name, o.momentum, o.weight_decay, o.num_train_steps) == ("sgd", 0.9, 0.0, 20000)
    lr = o.param_schedulers.lr
    assert (lr.name, lr.value, lr.warmup_steps, lr.decay_type) == ("big_vision", 0.05, 500, "cosine")
    rrc = ln.DATA.TRAIN.TRANSFORMS[0]
    assert (rrc.name, list(rrc.scale)) == ("RandomResizedCrop", [0.05, 1.0])
    assert "RandomHorizontalFlip" not in {t.name for t in ln.DATA.TRAIN.TRANSFORMS}
    assert ln.MODEL.TRUNK.VISION_TRANSFORMERS.WEIGHT_INIT == "rescalevit"


def test_simplest_differs_from_its_simplevit_baseline_by_the_missing_projections_and_norms():
    simplest = _cfg(SIMPLEST)
    simplevit = _cfg(SIMPLEST, f"{SUP}/simplest/overlays=simplevit_s4")
    d, depth = 384, 12
    # SimpleViT: out-projection (weight, bias) and two LayerNorms per block, the head's LayerNorm;
    # SimplEsT: a qkv bias (SimpleViT's qkv has none)
    assert _count(simplevit) - _count(simplest) == depth * (d * d + d + 4 * d - 3 * d) + 2 * d
    assert 19e6 < _count(simplest) < 21e6  # "~20 M" (seed 003 README)


@pytest.mark.parametrize(
    ("overlays", "optimizer", "lr", "augmented", "dropout"),
    [
        ((), "adam", 5e-4, False, (0.0, 0.2)),  # TAT setup: no augmentation, dropout before pooling
        (("shampoo",), "shampoo", 7e-4, False, (0.0, 0.2)),
        (("simplevit_s4",), "adam", 1e-3, False, (0.0, 0.2)),
        (("simplevit_setup",), "adam", 5e-4, True, (0.0, 0.0)),
        (("shampoo", "simplevit_setup"), "shampoo", 7e-4, True, (0.0, 0.0)),
        (("simplevit_s4", "simplevit_setup"), "adam", 1e-3, True, (0.0, 0.0)),
    ],
)
def test_simplest_setups_are_the_seeds(overlays, optimizer, lr, augmented, dropout):
    cfg = _cfg(SIMPLEST, *(f"{SUP}/simplest/overlays={o}" for o in overlays))
    o = cfg.OPTIMIZER
    assert (o.name, o.param_schedulers.lr.value, o.regularize_bias) == (optimizer, lr, False)
    names = [t.name for t in cfg.DATA.TRAIN.TRANSFORMS]
    assert (names[:3] == ["RandomCrop", "RandomHorizontalFlip", "torchvision.RandAugment"]) is augmented
    assert (cfg.DATA.TRAIN.DEVICE_MIXUP.p == 0.2) is augmented
    ls = cfg.LOSS.cross_entropy_multiple_output_single_target.label_smoothing
    assert ls == (0.0 if augmented else 0.1)
    with torch.device("meta"):
        trunk = build_model(cfg).trunk
    pool = trunk.final_drop.p if isinstance(trunk.final_drop, torch.nn.Dropout) else 0.0
    assert (trunk.pos_drop.p, pool) == dropout
