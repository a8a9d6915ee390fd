"""Training on one's own folder of images (issue 17): split folders, class counts, resizing, flat
folders, the data summary, and each mistake's one-line error before anything is built."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from vissl_vit import build_dataloader, build_dataset, compose_config, run_train_engine
from vissl_vit.data.build import describe_data
from vissl_vit.errors import ConfigError, DataError

CLASSES = ("ant", "bee", "cat")
AUTO_HEAD = 'config.MODEL.HEAD.PARAMS=[["vision_transformer_head", {"in_plane": 32, "num_classes": "auto"}]]'


def _images(folder, n, size=(48, 40), seed=0):
    """n random RGB PNGs of size (width, height) + k pixels, k = 0..n-1 (every image its own size)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (size[1] + i, size[0] + i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{i}.png"))


def make_classes(root, classes=CLASSES, per_class=4, seed=0):
    for c, name in enumerate(classes):
        _images(os.path.join(root, name), per_class, seed=seed + c)
    return str(root)


def make_splits(root, train="train", val="val", val_per_class=2):
    make_classes(root / train)
    make_classes(root / val, per_class=val_per_class, seed=10)
    return str(root)


def _compose(*overrides):
    return compose_config(["config=test/quick_vit", *overrides]).config


def _folder(path, split="TRAIN"):
    return [f"config.DATA.{split}.DATA_SOURCES=[disk_folder]", f"config.DATA.{split}.DATA_PATHS=[{path}]"]


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value), str(excinfo.value)
    return str(excinfo.value)


@pytest.mark.parametrize(("train", "val"), [("train", "val"), ("training", "validation"), ("train", "eval")])
def test_parent_folder_with_train_and_val_is_split_as_timm_does(tmp_path, train, val):
    root = make_splits(tmp_path, train, val)
    cfg = _compose(*_folder(root), AUTO_HEAD)
    assert list(cfg.DATA.TRAIN.DATA_PATHS) == [os.path.join(root, train)]
    # the synthetic test default of the test config is replaced by the val folder, not kept
    assert list(cfg.DATA.TEST.DATA_SOURCES) == ["disk_folder"]
    assert list(cfg.DATA.TEST.DATA_PATHS) == [os.path.join(root, val)]
    assert cfg.MODEL.HEAD.PARAMS[0][1]["num_classes"] == 3
    train_ds, test_ds = build_dataset(cfg, "TRAIN"), build_dataset(cfg, "TEST")
    assert (len(train_ds), len(test_ds)) == (12, 6)  # not train/ and val/ as two classes
    assert train_ds.sources[0].classes == list(CLASSES) == test_ds.sources[0].classes
    # composing the resolved config again changes nothing (a run folder's train_config.yaml reruns it)
    again = _compose(*_folder(cfg.DATA.TRAIN.DATA_PATHS[0]), *_folder(cfg.DATA.TEST.DATA_PATHS[0], "TEST"), AUTO_HEAD)
    assert list(again.DATA.TRAIN.DATA_PATHS) == list(cfg.DATA.TRAIN.DATA_PATHS)


def test_train_folder_given_directly_finds_its_val_folder(tmp_path):
    root = make_splits(tmp_path)
    cfg = compose_config(["config=own_data/vit_own_images", f"config.DATA.TRAIN.DATA_PATHS=[{root}/train]"]).config
    assert list(cfg.DATA.TEST.DATA_PATHS) == [os.path.join(root, "val")]


def test_class_folder_root_keeps_working_and_a_class_named_train_is_a_class(tmp_path, monkeypatch):
    root = make_classes(tmp_path / "vehicles", classes=("bus", "car", "train"))
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = _compose(*_folder("~/vehicles"), AUTO_HEAD, "config.TEST_MODEL=False")  # ~ expanded
    assert list(cfg.DATA.TRAIN.DATA_PATHS) == [root]
    assert build_dataset(cfg, "TRAIN").sources[0].classes == ["bus", "car", "train"]
    assert cfg.MODEL.HEAD.PARAMS[0][1]["num_classes"] == 3


def test_real_training_images_with_a_synthetic_test_phase_is_an_error(tmp_path):
    root = make_classes(tmp_path / "imgs")
    with pytest.raises(ConfigError, match=r"config.DATA.TEST.DATA_SOURCES=\['synthetic'\] but config.DATA.TRAIN") as e:
        _compose(*_folder(root), AUTO_HEAD)
    assert "has no val folder" in _one_line(e) and "config.TEST_MODEL=False" in str(e.value)


def test_split_root_without_the_split_is_an_error(tmp_path):
    make_classes(tmp_path / "val")
    make_classes(tmp_path / "test")
    with pytest.raises(ConfigError, match=r"holds the split folders \['test', 'val'\] but none for TRAIN") as e:
        _compose(*_folder(tmp_path), AUTO_HEAD)
    _one_line(e)


@pytest.mark.parametrize("outputs", [2, 4])
def test_head_whose_outputs_differ_from_the_class_folders_is_refused(tmp_path, outputs):
    root = make_classes(tmp_path / "imgs")
    head = f'config.MODEL.HEAD.PARAMS=[["vision_transformer_head", {{"in_plane": 32, "num_classes": {outputs}}}]]'
    with pytest.raises(ConfigError) as e:
        _compose(*_folder(root), head, "config.TEST_MODEL=False")
    assert _one_line(e) == (
        f"config.MODEL.HEAD.PARAMS[0] 'vision_transformer_head' outputs {outputs} classes (num_classes={outputs}) "
        f"but the training folder '{root}' has 3 class folders (ant, bee, cat): set num_classes to 3, or to auto "
        "to follow the folder."
    )
    mlp = 'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [32, "auto"]}]]'
    assert _compose(*_folder(root), mlp, "config.TEST_MODEL=False").MODEL.HEAD.PARAMS[0][1]["dims"] == [32, 3]


def test_val_folder_without_the_training_classes_is_refused(tmp_path):
    root = make_splits(tmp_path)
    for p in (tmp_path / "val" / "bee").iterdir():
        p.unlink()
    (tmp_path / "val" / "bee").rmdir()
    with pytest.raises(
        ConfigError, match=r"does not hold the class folders .* \(missing: bee; not in training: none\)"
    ):
        _compose(*_folder(root), AUTO_HEAD)


def test_transforms_without_to_tensor_are_refused(tmp_path):
    cfg = _compose("config.DATA.TEST.TRANSFORMS=[{name: CenterCrop, size: 16}, {name: Normalize, mean: [0], std: [1]}]")
    with pytest.raises(ConfigError) as e:
        build_dataset(cfg, "TEST")
    assert _one_line(e).startswith(
        "config.DATA.TEST.TRANSFORMS=['CenterCrop', 'Normalize'] has no ToTensor: the images would reach the batch"
    )
    with pytest.raises(ConfigError, match=r"config.DATA.TRAIN.TRANSFORMS=\[\] has no ToTensor"):
        build_dataset(_compose("config.DATA.TRAIN.TRANSFORMS=[]"), "TRAIN")
    nested = "config.DATA.TRAIN.TRANSFORMS=[{name: RandomApply, p: 1.0, transforms: [{name: ToTensor}]}]"
    build_dataset(_compose(nested), "TRAIN")  # inside a torchvision container counts
    # and through the engine: the one line before the first step, not a default_collate traceback
    with pytest.raises(ConfigError, match=r"^config.DATA.TRAIN.TRANSFORMS=\['RandomHorizontalFlip'\] has no"):
        run_train_engine(
            compose_config(
                [
                    "config=test/quick_vit",
                    "config.DATA.TRAIN.TRANSFORMS=[{name: RandomHorizontalFlip}]",
                    f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
                ]
            )
        )


def test_images_of_different_sizes_are_resized_to_the_trunk(tmp_path, caplog):
    root = make_classes(tmp_path / "imgs")  # 48x40 .. 51x43 pixels, the trunk takes 16x16
    cfg = _compose(*_folder(root), AUTO_HEAD, "config.TEST_MODEL=False", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=12")
    caplog.set_level(logging.INFO, logger="vissl_vit.data.build")
    ds = build_dataset(cfg, "TRAIN")
    assert "Resize(16) and CenterCrop(16) to the trunk's input size come first" in caplog.text
    batch = next(iter(build_dataloader(cfg, "TRAIN", ds, 0, 1, torch.device("cpu"))))
    assert batch["data"].shape == (12, 3, 16, 16)
    # exactly torchvision's Resize + CenterCrop before the config's transforms (a flip, then ToTensor)
    reference = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])
    img = ds.sources[0].load(5)
    sample = ds[(5, 7)]["data"]
    assert torch.equal(sample, reference(img)) or torch.equal(sample, reference(img).flip(-1))
    # a list that sets the size itself is left as it is
    crop = "config.DATA.TRAIN.TRANSFORMS=[{name: RandomCrop, size: 8}, {name: ToTensor}]"
    cfg = _compose(*_folder(root), AUTO_HEAD, "config.TEST_MODEL=False", crop)
    assert build_dataset(cfg, "TRAIN")[(0, 0)]["data"].shape == (3, 8, 8)


def test_flat_folder_trains_self_supervised_and_is_refused_for_a_supervised_loss(tmp_path):
    flat = tmp_path / "unlabeled"
    _images(flat, 6)
    cfg = compose_config(["config=test/quick_moco", *_folder(flat)]).config  # LABEL_TYPE sample_index
    ds = build_dataset(cfg, "TRAIN")
    assert len(ds) == 6 and ds.sources[0].flat and ds.sources[0].classes == []
    sample = ds[(4, 0)]
    assert sample["label"] == 4 and [v.shape for v in sample["data"]] == [(3, 16, 16)] * 2
    assert ds.sources[0].label(4) == -1  # the source itself has no labels
    with pytest.raises(ConfigError) as e:
        _compose(*_folder(flat), "config.TEST_MODEL=False")
    assert _one_line(e) == (
        f"config.DATA.TRAIN.DATA_PATHS[0]='{flat}' is a flat folder of images (no class sub-folders), but "
        "config.LOSS.name=cross_entropy_multiple_output_single_target needs a class per image: put each class's "
        f"images in {flat}/<class>/, or train self-supervised (e.g. config=test/quick_moco) with "
        "config.DATA.TRAIN.LABEL_TYPE=sample_index."
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class sub-folders and no images"):
        build_dataset(compose_config(["config=test/quick_moco", *_folder(tmp_path / "empty")]).config, "TRAIN")


def test_data_summary_names_source_images_classes_and_size(tmp_path):
    root = make_splits(tmp_path)
    cfg = _compose(*_folder(root), AUTO_HEAD, "config.DATA.TEST.DATA_LIMIT=4")
    assert describe_data(cfg, "TRAIN", build_dataset(cfg, "TRAIN")) == [
        "TRAIN data: 12 images, from 1 source(s)",
        f"  source 0: disk_folder: '{root}/train': 12 images, 3 classes (ant, bee, cat)",
        "  labels: the class of each image",
        "  after the transforms: 3x16x16 (image 0)",
    ]
    lines = describe_data(cfg, "TEST", build_dataset(cfg, "TEST"))
    assert lines[0] == "TEST data: 4 images (DATA_LIMIT: the first 4 of 6), from 1 source(s)"
    crop = "config.DATA.TRAIN.TRANSFORMS=[{name: RandomCrop, size: 8}, {name: ToTensor}]"
    cfg = _compose(*_folder(root), AUTO_HEAD, crop)
    assert describe_data(cfg, "TRAIN", build_dataset(cfg, "TRAIN"))[-1] == (
        "WARNING: TRAIN images are 8x8 after the transforms, the trunk's IMAGE_SIZE is 16x16: its position "
        "embeddings are interpolated"
    )


@pytest.mark.timeout(120)
def test_the_example_config_trains_on_a_folder_with_one_override(tmp_path):
    root = make_splits(tmp_path / "data")
    one = f"config.DATA.TRAIN.DATA_PATHS=[{root}]"  # the only data override the user gives
    quick = ["config.OPTIMIZER.num_epochs=2", "config.DATA.NUM_DATALOADER_WORKERS=0"]
    trainer = run_train_engine(
        compose_config(["config=own_data/vit_own_images", one, *quick, f"config.CHECKPOINT.DIR={tmp_path / 'run'}"])
    )
    assert trainer.iteration == 2  # 12 images, a batch of 64 without DROP_LAST: one step an epoch
    test_hook = next(h for h in trainer.hooks if type(h).__name__ == "TestHook")
    test_ds = test_hook.loader.dataset
    assert test_ds.sources[0].root == os.path.join(root, "val") and len(test_ds) == 6
    saved = (tmp_path / "run" / "train_config.yaml").read_text()
    assert f"{root}/val" in saved and "num_classes: 3" in saved


@pytest.mark.timeout(120)
def test_the_self_supervised_example_trains_on_a_flat_folder(tmp_path):
    flat = tmp_path / "photos"
    _images(flat, 12)
    quick = ["config.OPTIMIZER.num_epochs=1", "config.DATA.NUM_DATALOADER_WORKERS=0"]
    small = ["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=6"]  # the config's 64 would need 64 images
    cfg = compose_config(
        ["config=own_data/mocov3_own_images", f"config.DATA.TRAIN.DATA_PATHS=[{flat}]", *quick, *small]
        + [f"config.CHECKPOINT.DIR={tmp_path / 'run'}"]
    )
    assert run_train_engine(cfg).iteration == 2
