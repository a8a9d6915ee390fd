"""Data sources on small files made here, bad images, transforms, labels."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vissl_vit import build_dataset, compose_config
from vissl_vit.data.dataset import VisslDataset
from vissl_vit.data.datasets.disk import FileListSource, FolderSource
from vissl_vit.data.datasets.torchvision_files import read_idx, torchvision_dataset
from vissl_vit.errors import ConfigError, DataError

FMNIST = "/usr/share/datasets/fashion-mnist"


def make_folder(root, classes=("cat", "dog"), per_class=3, size=8):
    paths = []
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            p = root / name / f"{i}.png"
            Image.fromarray(np.full((size, size, 3), 40 * c + i, dtype=np.uint8)).save(p)
            paths.append(str(p))
    return paths


def test_disk_folder_labels_follow_sorted_classes(tmp_path):
    make_folder(tmp_path, classes=("zebra", "ant"))
    src = FolderSource(str(tmp_path))
    assert src.classes == ["ant", "zebra"] and len(src) == 6
    assert [src.label(i) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert src.load(4).size == (8, 8)


def test_disk_filelist_with_mmap(tmp_path):
    paths = make_folder(tmp_path / "imgs")
    np.save(tmp_path / "files.npy", np.array(paths))
    np.save(tmp_path / "labels.npy", np.arange(len(paths)))
    src = FileListSource(str(tmp_path / "files.npy"), str(tmp_path / "labels.npy"), mmap=True)
    assert len(src) == 6 and src.label(5) == 5 and src.describe(2) == paths[2]
    np.save(tmp_path / "short.npy", np.arange(2))
    with pytest.raises(DataError, match="has 2 labels but"):
        FileListSource(str(tmp_path / "files.npy"), str(tmp_path / "short.npy"), mmap=False)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        FolderSource(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="does not exist"):
        FileListSource(str(tmp_path / "nope.npy"), None, mmap=True)


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_gz_and_plain_and_torchvision_layout(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (5, 28, 28))
    labels = np.arange(5)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz")), imgs)
    src = torchvision_dataset(str(tmp_path), None, "FashionMNIST", train=False, mmap=False)
    assert len(src) == 5 and src.label(3) == 3 and np.array_equal(np.asarray(src.load(2)), imgs[2])
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte", imgs)
    _write_idx(raw / "train-labels-idx1-ubyte", labels)
    assert len(torchvision_dataset(str(tmp_path / "tv"), None, "MNIST", train=True, mmap=False)) == 5
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        torchvision_dataset(str(tmp_path), None, "FashionMNIST", train=True, mmap=False)
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "x.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2])))
    with pytest.raises(DataError, match="truncated"):
        read_idx(str(tmp_path / "trunc" / "x.gz"))


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    cfg = compose_config(["config=quickstart/vit_fashion_mnist"]).config
    train, test = build_dataset(cfg, "TRAIN"), build_dataset(cfg, "TEST")
    assert (len(train), len(test)) == (60000, 10000)
    sample = test[(0, 0)]
    assert sample["data"].shape == (1, 28, 28) and sample["label"] == 9  # the first test image is an ankle boot


def test_corrupt_image_is_replaced_counted_and_named(tmp_path):
    paths = make_folder(tmp_path)
    with open(paths[1], "wb") as f:
        f.write(b"not a png")
    ds = VisslDataset([FolderSource(str(tmp_path))], transform=None)
    good = ds[(0, 0)]
    assert good["bad"] == 0 and good["bad_path"] == ""
    bad = ds[(1, 0)]
    assert bad["bad"] == 1 and bad["bad_path"] == paths[1]
    assert bad["label"] == 0 and bad["data"].getpixel((0, 0)) == (2, 2, 2)  # the next image took its place


def test_label_types_and_limit():
    cfg = compose_config(
        ["config=test/quick_vit", "config.DATA.TRAIN.LABEL_TYPE=sample_index", "config.DATA.TRAIN.DATA_LIMIT=10"]
    ).config
    ds = build_dataset(cfg, "TRAIN")
    assert len(ds) == 10 and ds[(7, 0)]["label"] == 7
    cfg = compose_config(["config=test/quick_vit", "config.DATA.TRAIN.LABEL_TYPE=zero"]).config
    assert {build_dataset(cfg, "TRAIN")[(i, 0)]["label"] for i in range(5)} == {0}


def test_transforms_are_seeded_per_sample_and_leave_global_rng_alone():
    cfg = compose_config(
        ["config=test/quick_vit", "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 8}, {name: ToTensor}]"]
    ).config
    ds = build_dataset(cfg, "TRAIN")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = ds[(3, 11)]["data"], ds[(3, 11)]["data"], ds[(3, 12)]["data"]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_transform_and_bad_arguments():
    cfg = compose_config(
        ["config=test/quick_vit", "config.DATA.TRAIN.TRANSFORMS=[{name: RandomHorizontalFlop}]"]
    ).config
    with pytest.raises(
        ConfigError, match="unknown transform 'RandomHorizontalFlop'.*Did you mean 'RandomHorizontalFlip'"
    ):
        build_dataset(cfg, "TRAIN")
    cfg = compose_config(["config=test/quick_vit", "config.DATA.TRAIN.TRANSFORMS=[{name: RandomCrop, sise: 8}]"]).config
    with pytest.raises(ConfigError, match=r"TRANSFORMS\[0\] 'RandomCrop': unknown argument 'sise'"):
        build_dataset(cfg, "TRAIN")


def test_empty_class_folder_is_refused(tmp_path):
    make_folder(tmp_path, classes=("ant", "cat", "zebra"))
    for p in (tmp_path / "cat").iterdir():
        p.unlink()
    (tmp_path / "cat" / "notes.txt").write_text("no images here")  # not an image: still empty
    (tmp_path / "bird").mkdir()
    with pytest.raises(DataError, match=r"the class folder\(s\) 'bird', 'cat' under .* hold no images"):
        FolderSource(str(tmp_path))


def test_file_list_whose_paths_are_all_missing_is_refused(tmp_path):
    np.save(tmp_path / "files.npy", np.array([f"/nowhere/img{i}.jpg" for i in range(100)]))
    with pytest.raises(DataError, match=r"none of the image paths in .*files.npy' exists \(32 spread over the list"):
        FileListSource(str(tmp_path / "files.npy"), None, mmap=False)
    paths = make_folder(tmp_path / "imgs")  # one existing path among missing ones is a bad-image matter
    np.save(tmp_path / "some.npy", np.array(["/nowhere/a.jpg", paths[0], "/nowhere/b.jpg"]))
    assert len(FileListSource(str(tmp_path / "some.npy"), None, mmap=False)) == 3


@pytest.mark.timeout(60)  # without the check, reading the FIFO blocks forever
def test_fifo_named_like_an_image_is_an_unreadable_image(tmp_path):
    paths = make_folder(tmp_path)
    fifo = tmp_path / "cat" / "1a.jpg"  # sorts after cat/1.png
    os.mkfifo(fifo)
    src = FolderSource(str(tmp_path))
    ds = VisslDataset([src], transform=None)
    i = [src.describe(k) for k in range(len(src))].index(str(fifo))
    sample = ds[(i, 0)]
    assert sample["bad"] == 1 and sample["bad_path"] == str(fifo)
    assert sample["data"].getpixel((0, 0)) == (2, 2, 2)  # cat/2.png took its place
    assert len(paths) == 6


def test_label_sources_win_over_sample_index(tmp_path):
    # VISSL's rule (vissl/data/ssl_dataset.py, GenericSSLDataset.__getitem__: label_objs first) and
    # VISSL's tutorial 1gpu_vit_example: LABEL_SOURCES [disk_folder] + LABEL_TYPE sample_index trains on
    # the class labels.
    make_folder(tmp_path, classes=("ant", "bee"), per_class=3)
    data = [
        "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
        "config.DATA.TRAIN.DATASET_NAMES=[tiny]",
        f"config.DATA.TRAIN.DATA_PATHS=[{tmp_path}]",
        "config.TEST_MODEL=False",
        'config.MODEL.HEAD.PARAMS=[["vision_transformer_head", {"in_plane": 32, "num_classes": "auto"}]]',  # the head's size is the folder's class count
    ]
    for label_type in ("sample_index", "zero"):
        cfg = compose_config(
            [
                "config=test/quick_vit",
                *data,
                "config.DATA.TRAIN.LABEL_SOURCES=[disk_folder]",
                f"config.DATA.TRAIN.LABEL_TYPE={label_type}",
            ]
        ).config
        ds = build_dataset(cfg, "TRAIN")
        assert [ds[(i, 0)]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    # without label sources sample_index applies
    cfg = compose_config(["config=test/quick_vit", *data, "config.DATA.TRAIN.LABEL_TYPE=sample_index"]).config
    ds = build_dataset(cfg, "TRAIN")
    assert [ds[(i, 0)]["label"] for i in range(6)] == [0, 1, 2, 3, 4, 5]
