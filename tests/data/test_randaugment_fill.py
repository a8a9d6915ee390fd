"""RandAugment's fill colour: VISSL's grey 128 by default, DeiT's ImageNet-mean colour on request,
equal to timm's geometric operations at the same angle."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from timm.data.auto_augment import rotate as timm_rotate

from vissl_vit.data.transforms.rand_augment import RandAugment
from vissl_vit.errors import ConfigError

DEIT_FILL = [round(255 * m) for m in (0.485, 0.456, 0.406)]  # timm's img_mean: (124, 116, 104)


def _white(mode: str) -> Image.Image:
    return Image.new(mode, (16, 16), 255 if mode == "L" else (255, 255, 255))


def test_the_default_fill_is_vissls_grey_and_deits_is_timms_img_mean():
    assert DEIT_FILL == [124, 116, 104]
    img = _white("RGB")
    grey = RandAugment(interpolation="bicubic")._geometric(img, "rotate", 30.0)
    assert grey.getpixel((0, 0)) == (128, 128, 128)
    deit = RandAugment(interpolation="bicubic", fill=DEIT_FILL)._geometric(img, "rotate", 30.0)
    assert deit.getpixel((0, 0)) == (124, 116, 104)
    # the same rotation as timm's op with its hparams (img_mean fill, bicubic)
    ref = timm_rotate(img, 30.0, fillcolor=tuple(DEIT_FILL), resample=Image.BICUBIC)
    assert np.array_equal(np.asarray(deit), np.asarray(ref))


def test_fill_in_other_modes_and_bad_fill():
    out = RandAugment(interpolation="bilinear", fill=DEIT_FILL)._geometric(_white("L"), "shear_x", 0.3)
    assert out.getpixel((15, 15)) == 124  # past the right edge; a one-band image takes the first value
    with pytest.raises(ConfigError, match="fill"):
        RandAugment(fill=[300, 0, 0])


def test_torchvision_prefix_names_torchvisions_class_over_the_registry():
    """``torchvision.RandAugment`` is torchvision's (SimplEsT-ViT's CIFAR recipe: RandAugment(2, 10),
    14 ops, zero fill), while ``RandAugment`` stays VISSL's; a wrong name after the prefix is refused."""
    import torchvision.transforms as T

    from vissl_vit.data.transforms.build import build_transform

    tv = build_transform({"name": "torchvision.RandAugment", "num_ops": 2, "magnitude": 10}, "t")
    assert type(tv) is T.RandAugment and (tv.num_ops, tv.magnitude) == (2, 10)
    assert isinstance(build_transform({"name": "RandAugment"}, "t"), RandAugment)
    with pytest.raises(ConfigError, match="RandAugmnt"):
        build_transform({"name": "torchvision.RandAugmnt"}, "t")
