"""The augmentation grid (issue 16): the batches drawn are the ones the train engine's model
receives (its forward's input, multi-crop and device-side mixup included, compared exactly), the
picture has the size its layout gives, its pixels are the denormalised views, and it changes with
the config; soft targets' titles; the command line, with a run folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vissl_vit import compose_config, run_train_engine
from vissl_vit.engine import train_engine
from vissl_vit.errors import ConfigError
from vissl_vit.visualize.augmentations import main, model_batches, plot_augmentations, target_title

SWAV = ["config=test/quick_swav", "config.OPTIMIZER.num_epochs=1"]
NORMALIZED = (
    'config.DATA.TRAIN.TRANSFORMS=[{"name": "RandomHorizontalFlip"}, {"name": "ToTensor"}, '
    '{"name": "Normalize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}]'
)
CUTMIXUP = [
    "config=test/quick_vit",
    "config.DATA.TRAIN.COLLATE_FUNCTION=cutmixup_collator",
    'config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "num_classes": 4}',
    NORMALIZED,
]
DEVICE_MIXUP = ["config=test/quick_vit", "config.OPTIMIZER.num_epochs=1", "config.DATA.TRAIN.DEVICE_MIXUP.p=0.2"]


def _cfg(overrides, tmp_path, name="run"):
    return compose_config([*overrides, f"config.CHECKPOINT.DIR={tmp_path / name}"])


def _first_forward_input(cfg, monkeypatch):
    """Train the config; the input of the model's first forward (the first training step's)."""
    seen = []
    real = train_engine.build_model

    def recording(c):
        model = real(c)
        model.register_forward_pre_hook(lambda m, args: seen.append(args[0]) if not seen else None)
        return model

    monkeypatch.setattr(train_engine, "build_model", recording)
    run_train_engine(cfg)
    return seen[0]


@pytest.mark.parametrize("overrides", [SWAV, DEVICE_MIXUP], ids=["swav_multicrop", "device_mixup"])
def test_the_batch_drawn_is_what_the_engine_feeds_the_model(overrides, tmp_path, monkeypatch):
    cfg = _cfg(overrides, tmp_path)
    (batch,), _ = model_batches(cfg)
    fed = _first_forward_input(cfg, monkeypatch)
    if isinstance(fed, list):  # SwAV: 2 x 16 px + 2 x 8 px views
        assert [tuple(v.shape) for v in fed] == [(16, 3, 16, 16)] * 2 + [(16, 3, 8, 8)] * 2
        assert all(torch.equal(a, b) for a, b in zip(batch["data"], fed))
    else:  # mixed on the "device" as the trainer mixes: not the collated images
        assert torch.equal(batch["data"], fed)
        assert batch["label"].shape == (16, 4) and torch.allclose(batch["label"].sum(1), torch.ones(16))
        assert (batch["label"].max(1).values < 1).any()  # some targets are mixed


def test_multicrop_grid_size_and_pixels(tmp_path):
    cfg = _cfg(SWAV, tmp_path)
    path = plot_augmentations(cfg, samples=3)
    assert path == str(tmp_path / "run" / "pictures" / "augmentations.png")
    # views 16, 16, 8, 8 px at x6 (the 16 px view drawn >= 96 px high), 8 px apart, 10 px margins;
    # each of the 3 rows has 30 px of title above it and 8 px below
    width, height = 10 + (96 + 8 + 96 + 8 + 48 + 8 + 48) + 10, 10 + 3 * (30 + 96 + 8) + 10
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape == (height, width, 3)
    # every view pixel's block centre is that pixel of the batch (ToTensor in [0, 1], no Normalize)
    (batch,), _ = model_batches(cfg)
    for row in range(3):
        top, left = 10 + row * (30 + 96 + 8) + 30, 10
        for view, px in zip(batch["data"], (96, 96, 48, 48)):
            want = (view[row].permute(1, 2, 0).numpy() * 255).round()
            centres = img[top + 3 : top + px : 6, left + 3 : left + px : 6]
            assert np.abs(centres - want).max() <= 1
            left += px + 8


def test_normalised_mixup_pixels_are_denormalised_and_the_picture_changes(tmp_path):
    cfg = _cfg(CUTMIXUP, tmp_path)
    path = plot_augmentations(cfg, out=str(tmp_path / "mix.png"), samples=2)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    # single views, 2 to a row: 16 px at x6 in columns 130 px wide (room for the titles)
    assert img.shape == (10 + 30 + 96 + 8 + 10, 10 + 130 + 8 + 130 + 10, 3)
    (batch,), _ = model_batches(cfg)
    want = ((batch["data"][0] * 0.25 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(img[43:136:6, 13:106:6] - want).max() <= 1
    plain = plot_augmentations(_cfg(CUTMIXUP[:1] + [NORMALIZED], tmp_path), out=str(tmp_path / "plain.png"), samples=2)
    seed1 = plot_augmentations(
        _cfg(CUTMIXUP + ["config.SEED_VALUE=1"], tmp_path), out=str(tmp_path / "seed1.png"), samples=2
    )
    again = plot_augmentations(cfg, out=str(tmp_path / "again.png"), samples=2)
    pixels = {p: np.asarray(Image.open(p).convert("RGB")) for p in (plain, seed1, again)}
    assert (pixels[again] == img).all()  # the same config: the same batch, the same picture
    assert (pixels[plain] != img).any(axis=-1).mean() > 0.05  # unmixed images
    assert (pixels[seed1] != img).any(axis=-1).mean() > 0.05  # other draws


def test_titles_name_the_two_heaviest_classes_of_a_soft_target():
    soft = torch.tensor([0.1, 0.62, 0.0, 0.28])
    assert target_title(soft, None) == "1: 0.62 | 3: 0.28"
    assert target_title(soft, ["ant", "bee", "cat", "dog"]) == "bee: 0.62 | dog: 0.28"
    assert target_title(torch.tensor(2), ["ant", "bee", "cat"]) == "label cat"
    assert target_title(torch.tensor(17), None, "sample_index") == "#17"


def test_the_command_line_with_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run_train_engine(_cfg(["config=test/quick_moco", "config.OPTIMIZER.num_epochs=1"], tmp_path))
    assert main(["--run", str(run), "--samples", "2", "--batches", "2"]) == 0
    out = run / "pictures" / "augmentations.png"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    # two batches of 2 samples, a row each; MoCo's two 16 px views
    assert Image.open(out).size == (10 + 96 + 8 + 96 + 10, 10 + 4 * (30 + 96 + 8) + 10)
    assert main(["--run", str(tmp_path / "nowhere")]) == 2
    assert "no train_config.yaml there" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="samples=0"):
        plot_augmentations(_cfg(SWAV, tmp_path), samples=0)
