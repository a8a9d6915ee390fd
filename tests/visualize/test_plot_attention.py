"""Attention pictures of real (tiny) run folders: ``plot_attention`` and ``tools/plot_attention.py``.

Two runs are trained once for the module: quick_vit (class token, 2 epochs, so that two checkpoints
differ) and quick_vit with the SimpleViT overlay (no class token, ``gap``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vissl_vit import compose_config, run_train_engine
from vissl_vit.errors import ConfigError
from vissl_vit.visualize.attention import (
    _trunk_of,
    attention_picture_size,
    default_blocks,
    main,
    matrices_picture_size,
    patch_maps,
    plot_attention,
)

# 32 images / 16 per batch: 2 iterations an epoch
SHORT = ["config.DATA.SYNTHETIC.NUM_IMAGES=32", "config.DATA.TEST.BATCHSIZE_PER_REPLICA=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("attn")
    vit, gap = base / "vit", base / "gap"
    run_train_engine(compose_config(["config=test/quick_vit", f"config.CHECKPOINT.DIR={vit}", *SHORT]))
    gap_args = ["config=test/quick_vit", "+config/test/overlays=simplevit", f"config.CHECKPOINT.DIR={gap}"]
    run_train_engine(compose_config([*gap_args, *SHORT, "config.OPTIMIZER.num_epochs=1"]))
    return vit, gap


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_pictures_of_a_run_have_their_size_and_follow_images_and_weights(runs, tmp_path):
    vit, _ = runs
    paths = plot_attention(str(vit), images=3)
    assert paths == [str(vit / "pictures" / "attention.png"), str(vit / "pictures" / "attention_matrices.png")]
    # 2 blocks (default: both), mean of heads: the image column + 2 panels of 128 px; 56 px of titles
    assert attention_picture_size(3, 2) == (384, 440) and matrices_picture_size(2) == (256, 184)
    assert Image.open(paths[0]).size == (384, 440)
    assert Image.open(paths[1]).size == (256, 184)
    first, first_matrices = _pixels(paths[0]), _pixels(paths[1])
    # other images (the training split's), other weights (the first epoch's checkpoint)
    other_images = plot_attention(str(vit), str(tmp_path / "a"), images=3, split="TRAIN", matrices=False)
    other_weights = plot_attention(str(vit), str(tmp_path / "b"), images=3, weights="model_phase0.torch")
    assert len(other_images) == 1 and len(other_weights) == 2
    assert not np.array_equal(_pixels(other_images[0]), first)
    assert not np.array_equal(_pixels(other_weights[0]), first)
    assert not np.array_equal(_pixels(other_weights[1]), first_matrices)


def test_command_line_on_a_gap_model_with_heads_and_errors(runs, tmp_path, capsys):
    _, gap = runs
    out = tmp_path / "pics" / "gap.png"
    assert main([str(gap), "--blocks", "1", "--heads", "0", "1", "--images", "2", "--out", str(out), "--matrices"]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(tmp_path / "pics" / "gap_matrices.png")]
    assert Image.open(out).size == (128 * 3, 56 + 128 * 2)  # image + block 1 x heads 0, 1
    assert Image.open(tmp_path / "pics" / "gap_matrices.png").size == (256, 184)
    assert main([str(gap), "--blocks", "0", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vissl_vit: error: blocks=[0, 2]: expected indices in 0..1 (the trunk has 2 blocks)."
    with pytest.raises(ConfigError, match=r"heads=\[2\]: expected indices in 0\.\.1"):
        plot_attention(str(gap), str(tmp_path), heads=[2])


def test_class_token_row_or_attention_received():
    attn = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)).softmax(-1)
    m, has_cls = patch_maps(attn, (2, 2), None)  # 1 + 4 tokens: the class token's row over the patches
    assert has_cls and m.shape == (2, 1, 2, 2)
    assert torch.equal(m[:, 0], attn[:, :, 0, 1:].mean(1).reshape(2, 2, 2))
    m, has_cls = patch_maps(attn[:, :, 1:, 1:], (2, 2), [2, 0])  # no class token: mean over the queries
    assert not has_cls and m.shape == (2, 2, 2, 2)
    assert torch.equal(m[:, 0], attn[:, 2, 1:, 1:].mean(0 + 1).reshape(2, 2, 2))
    with pytest.raises(ConfigError, match="does not fit a 3x3 patch grid"):
        patch_maps(attn, (3, 3), None)


def test_default_blocks_are_the_seeds_quarters():
    assert default_blocks(1) == [0] and default_blocks(2) == [0, 1] and default_blocks(3) == [0, 1, 2]
    assert (
        default_blocks(12) == [0, 3, 6, 9] and default_blocks(8) == [0, 2, 4, 6] and default_blocks(4) == [0, 1, 2, 3]
    )


def test_a_trunk_without_attention_is_one_error():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(2, 2)

    with pytest.raises(ConfigError, match=r"^the model of RUN \(Linear\) cannot return attention maps"):
        _trunk_of(Model(), "RUN")
