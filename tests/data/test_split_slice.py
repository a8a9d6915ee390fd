"""DATA.<split>.SLICE: TFDS-style split slicing ("[:99%]" / "[99%:]", big_vision's minival), applied
class by class so that a label-ordered folder keeps every class on both sides (issue 15)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from vissl_vit import build_dataset, compose_config
from vissl_vit.data.build import describe_data
from vissl_vit.data.dataset import VisslDataset, parse_slice, slice_indices
from vissl_vit.data.datasets.disk import FolderSource
from vissl_vit.data.datasets.synthetic import SyntheticSource
from vissl_vit.errors import ConfigError

# a label-ordered folder: class sizes 1, 2, 3, 7 and 150 (150 images: 1% is 1.5 -> 2, TFDS's rounding)
SIZES = {"a_one": 1, "b_two": 2, "c_three": 3, "d_seven": 7, "e_many": 150}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("classes")
    for c, (name, n) in enumerate(SIZES.items()):
        os.makedirs(root / name)
        for i in range(n):
            Image.new("L", (2, 2), color=c).save(root / name / f"{i:03d}.png")
    return str(root)


def _kept(source, spec: str) -> list[int]:
    """The source indices a dataset with SLICE=spec reads, in dataset order."""
    ds = VisslDataset([source], None, split_slice=spec)
    return [ds._global(j) for j in range(len(ds))]


def _per_class(source, kept: list[int]) -> dict[int, int]:
    labels = [source.label(i) for i in kept]
    return {c: labels.count(c) for c in range(len(SIZES))}


def test_complementary_disjoint_and_class_balanced_on_a_label_ordered_folder(folder):
    src = FolderSource(folder)
    train, minival = _kept(src, "[:99%]"), _kept(src, "[99%:]")
    assert not set(train) & set(minival)
    assert sorted(train + minival) == list(range(len(src)))
    assert train == sorted(train) and minival == sorted(minival)  # the data set's order is kept
    # per class: round(0.99 n) kept for training (TFDS's rounding), clamped to [1, n - 1] so that
    # every class of >= 2 images is also in the minival; a class of one image stays in training
    assert _per_class(src, train) == {0: 1, 1: 1, 2: 2, 3: 6, 4: 148}
    assert _per_class(src, minival) == {0: 0, 1: 1, 2: 1, 3: 1, 4: 2}
    # each class's first images train, its last ones are the minival (the folder's sorted order)
    labels = np.array([src.label(i) for i in range(len(src))])
    for c in range(len(SIZES)):
        members = np.flatnonzero(labels == c).tolist()
        cut = _per_class(src, train)[c]
        assert [i for i in train if labels[i] == c] == members[:cut]
        assert [i for i in minival if labels[i] == c] == members[cut:]
    # a plain TFDS slice of this ordered folder (first round(0.99 x 163) = 161 images) would leave
    # the minival only the last class: the reason for slicing class by class
    assert set(labels[int(round(0.99 * len(src))) :].tolist()) == {4}


def test_int_bounds_count_images_per_class_and_empty_is_all(folder):
    src = FolderSource(folder)
    assert _per_class(src, _kept(src, "[-2:]")) == {0: 1, 1: 2, 2: 2, 3: 2, 4: 2}
    assert _per_class(src, _kept(src, "[:3]")) == {0: 1, 1: 2, 2: 3, 3: 3, 4: 3}
    assert _per_class(src, _kept(src, "[1:3]")) == {0: 0, 1: 1, 2: 2, 3: 2, 4: 2}
    assert _kept(src, "") == _kept(src, "[:]") == _kept(src, "[0%:100%]") == list(range(len(src)))
    assert sorted(_kept(src, "[:50%]") + _kept(src, "50%:")) == list(range(len(src)))  # brackets optional


def test_tfds_rounding_of_percent_bounds():
    labels = np.zeros(150, np.int64)
    assert len(slice_indices(labels, "[:99%]", "k")) == 148  # round(148.5) = 148, half to even
    assert len(slice_indices(labels, "[:33.3%]", "k")) == 50  # round(49.95)
    assert slice_indices(labels, "[-1%:]", "k").tolist() == list(range(148, 150))
    assert slice_indices(np.full(10, -1), "[:50%]", "k").tolist() == [0, 1, 2, 3, 4]  # unlabeled: one group


@pytest.mark.parametrize("bad", ["[:99]%", "99%", "[:101%]", "[a:b]", "[::2]", "[:9.5]", "train[:99%]"])
def test_a_bad_slice_is_a_one_line_config_error(bad):
    with pytest.raises(ConfigError) as e:
        parse_slice(bad, "config.DATA.TRAIN.SLICE")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"config.DATA.TRAIN.SLICE={bad!r} is not a split slice")


def test_synthetic_source_slices_by_its_labels():
    src = SyntheticSource(200, 4, 3, 5, seed=0)
    train, minival = _kept(src, "[:90%]"), _kept(src, "[90%:]")
    assert sorted(train + minival) == list(range(200)) and not set(train) & set(minival)
    labels = np.array([src.label(i) for i in range(200)])
    for c in range(5):
        n = int((labels == c).sum())
        assert int((labels[train] == c).sum()) == round(0.9 * n)


HEAD = 'config.MODEL.HEAD.PARAMS=[["vision_transformer_head", {"in_plane": 32, "num_classes": 5}]]'


def _compose(*overrides):
    return compose_config(["config=test/quick_vit", HEAD, *overrides]).config


def test_config_key_composes_with_data_limit_slice_first(folder):
    src = ["config.DATA.TEST.DATA_SOURCES=[disk_folder]", f"config.DATA.TEST.DATA_PATHS=[{folder}]"]
    cfg = _compose(*src, "config.DATA.TEST.SLICE=99%:", "config.DATA.TEST.DATA_LIMIT=3")
    ds = build_dataset(cfg, "TEST")
    # the slice keeps 5 images (one of each class but the first, and two of the last), DATA_LIMIT
    # then the first 3 of them: labels 1, 2, 3
    assert len(ds) == 3 and ds.sliced_length == 5
    assert [ds[(j, 0)]["label"] for j in range(3)] == [1, 2, 3]
    assert describe_data(cfg, "TEST", ds)[0] == (
        "TEST data: 3 images (SLICE 99%:: 5 of 163, class by class, then DATA_LIMIT: the first 3), from 1 source(s)"
    )
    with pytest.raises(ConfigError, match=r"^config\.DATA\.TEST\.SLICE='99%' is not a split slice"):
        build_dataset(_compose(*src, "config.DATA.TEST.SLICE=99%"), "TEST")
