"""tar_shards and tools/make_shards.py: shards written from tiny folders, read back as disk_folder reads them."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import REPO
from tests.data.test_datasets import make_folder
from vissl_vit import build_dataset, compose_config, run_train_engine
from vissl_vit.data.dataset import VisslDataset
from vissl_vit.data.datasets import shards as shards_module
from vissl_vit.data.datasets.disk import FolderSource
from vissl_vit.data.datasets.shards import ShardSource, expand_braces, split_key
from vissl_vit.data.sampler import ResumableDistributedSampler
from vissl_vit.errors import DataError


def _tool():
    spec = importlib.util.spec_from_file_location("make_shards_tool", REPO / "tools" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _noisy_folder(root, classes=("zebra", "ant", "cat"), per_class=3, size=8):
    """Class folders of random images (PNG and JPEG), so that a mix-up of two images shows."""
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(root / name)
        for i in range(per_class):
            img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
            img.save(root / name / (f"{i}.png" if i % 2 == 0 else f"{i}.jpg"))


def _shards(tmp_path, src, *args):
    out = tmp_path / "shards"
    assert _tool().main([str(src), str(out / "train-%06d.tar"), *args]) == 0
    return out


def test_brace_expansion_as_webdataset_writes_it():
    assert expand_braces("/d/train-{000000..000002}.tar") == [f"/d/train-00000{i}.tar" for i in range(3)]
    assert expand_braces("s{8..10}.tar") == ["s8.tar", "s9.tar", "s10.tar"]
    assert expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    for pattern in ("t{000..12}.tar", "t{1..010}x{a,b}", "{3..1}.tar", "d{0,1}/s{00..02}.tar"):  # bash's own expansion
        bash = subprocess.run(["bash", "-c", f"printf '%s\\n' {pattern}"], capture_output=True, text=True, check=True)
        assert expand_braces(pattern) == bash.stdout.split(), pattern
    assert split_key("dir/n01.x.jpg") == ("dir/n01", "x.jpg")  # WebDataset: the key ends at the first dot


def test_shards_hold_the_folders_images_and_labels(tmp_path, capsys):
    src = tmp_path / "src"
    _noisy_folder(src)
    out = _shards(tmp_path, src, "--max-count", "4")
    printed = capsys.readouterr().out
    assert f"3 shard(s); DATA_PATHS: {out}/train-{{000000..000002}}.tar\n" in printed
    assert sorted(os.listdir(out)) == ["classes.txt", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert (out / "classes.txt").read_text() == "0\tant\n1\tcat\n2\tzebra\n"
    folder = FolderSource(str(src))
    for path in (f"{out}/train-{{000000..000002}}.tar", str(out)):  # a brace pattern, a folder
        shards = ShardSource(path)
        assert len(shards) == len(folder) == 9 and len(shards.shards) == 3
        assert [shards.label(i) for i in range(9)] == [folder.label(i) for i in range(9)]
        for i in range(9):
            with open(folder.describe(i), "rb") as f:
                assert shards.read_bytes(i) == f.read()  # byte for byte
            assert np.array_equal(np.asarray(shards.load(i)), np.asarray(folder.load(i)))
        assert shards.summary() == f"'{path}': 3 shards, 9 images, 3 classes (ant, cat, zebra)"
    (tmp_path / "list.txt").write_text("shards/train-000000.tar\n# a comment\nshards/train-000002.tar\n")
    assert len(ShardSource(str(tmp_path / "list.txt"))) == 4 + 1  # a list file, relative to its folder


def test_shuffle_size_limit_and_unlabeled_folder(tmp_path):
    src = tmp_path / "src"
    _noisy_folder(src, per_class=4)
    out = _shards(tmp_path, src, "--shuffle", "--seed", "3", "--max-size-mb", "0.01")
    shards, folder = ShardSource(str(out)), FolderSource(str(src))
    for path in shards.shards:  # each shard's members (headers + data in 512-byte blocks + the end blocks)
        with tarfile.open(path) as t:
            used = sum(512 + -(-m.size // 512) * 512 for m in t) + 1024
            assert used <= 10_000 and len(t.getmembers()) >= 3 * 2  # two samples or more a shard
    assert len(shards.shards) > 1 and sorted(shards.shards) == shards.shards
    by_bytes = {open(p, "rb").read(): label for p, label in folder.samples}
    pairs = [by_bytes[shards.read_bytes(i)] for i in range(len(shards))]
    assert pairs == [shards.label(i) for i in range(len(shards))] and pairs != sorted(pairs)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p, _ in folder.samples[:3]:
        os.link(p, flat / os.path.basename(p).replace(".", f"_{len(os.listdir(flat))}."))
    out = tmp_path / "unlabeled"
    assert _tool().main([str(flat), str(out / "u-%d.tar")]) == 0
    unlabeled = ShardSource(str(out / "u-0.tar"))
    assert len(unlabeled) == 3 and unlabeled.flat and unlabeled.all_labels().tolist() == [-1, -1, -1]
    assert not os.path.exists(out / "classes.txt") and "unlabeled" in unlabeled.summary()


def test_corrupt_member_is_counted_and_replaced(tmp_path):
    src = tmp_path / "src"
    make_folder(src)
    out = _shards(tmp_path, src)
    shards = ShardSource(str(out))
    with open(shards.shards[0], "r+b") as f:  # overwrite image 1's bytes inside the tar
        f.seek(int(shards.offsets[1]))
        f.write(b"\0" * int(shards.sizes[1]))
    ds = VisslDataset([ShardSource(str(out))], transform=None)
    assert ds[(0, 0)]["bad"] == 0
    bad = ds[(1, 0)]
    assert bad["bad"] == 1 and bad["bad_path"] == f"{shards.shards[0]}:000000001.png"
    assert bad["label"] == 0 and bad["data"].getpixel((0, 0)) == (2, 2, 2)  # the next image took its place


def test_missing_shard_and_bad_inputs_are_one_line_errors(tmp_path):
    src = tmp_path / "src"
    make_folder(src)
    out = _shards(tmp_path, src)
    pattern = f"{out}/train-{{000000..000001}}.tar"
    with pytest.raises(DataError, match=r"1 of the 2 shard\(s\) of '.*train-\{000000..000001\}.tar' do not exist"):
        ShardSource(pattern)
    with pytest.raises(DataError, match="holds no .tar shards"):
        ShardSource(str(tmp_path / "src"))
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as t:
        t.addfile(tarfile.TarInfo("a.txt"), io.BytesIO(b""))
    with pytest.raises(DataError, match="not an uncompressed tar"):
        ShardSource(str(tmp_path / "x.tar.gz"))
    assert _tool().main([str(src), str(tmp_path / "no-number.tar")]) == 2  # one-line error, no traceback
    shard = ShardSource(str(out))
    with open(shard.shards[0], "r+b") as f:  # damage the header of image 2's member
        f.seek(int(shard.offsets[2]) - 512 + 148)  # its checksum field
        f.write(b"garbage!")
    with pytest.raises(DataError, match=r"has a damaged tar header at byte \d+"):
        ShardSource(str(out))  # not a shard silently cut short after image 1


def test_two_workers_give_the_batches_of_none(tmp_path):
    src = tmp_path / "src"
    _noisy_folder(src, per_class=4)
    source = ShardSource(str(_shards(tmp_path, src, "--max-count", "5")))
    source.load(0)  # a handle opened in the parent before the workers fork
    from torchvision.transforms import ToTensor

    ds = VisslDataset([source], transform=ToTensor())
    items = [(i, i) for i in range(len(ds))][::-1]

    def batches(workers):
        loader = DataLoader(
            ds, batch_size=3, sampler=items, num_workers=workers, multiprocessing_context="fork" if workers else None
        )
        return [(b["data"], b["label"]) for b in loader]

    serial, parallel = batches(0), batches(2)
    parent_fd = source._fds[0]

    class WorkerFds(torch.utils.data.Dataset):  # the handle of shard 0 each worker reads with
        def __len__(self):
            return 4

        def __getitem__(self, i):
            source.load(0)
            return source._fds[0]

    fds = list(DataLoader(WorkerFds(), batch_size=None, num_workers=2, multiprocessing_context="fork"))
    assert parent_fd not in fds  # each worker opened its own, none reads through the parent's
    assert len(serial) == 4 and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(serial, parallel)
    )


def test_train_engine_reads_tar_shards(tmp_path):
    src = tmp_path / "src"
    make_folder(src, per_class=4, size=16)
    out = _shards(tmp_path, src, "--max-count", "3")
    trainer = run_train_engine(
        compose_config(
            [
                "config=test/quick_vit",
                "config.DATA.TRAIN.DATA_SOURCES=[tar_shards]",
                f"config.DATA.TRAIN.DATA_PATHS=['{out}/train-{{000000..000002}}.tar']",
                "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
                "config.OPTIMIZER.num_train_steps=2",
                "config.DATA.NUM_DATALOADER_WORKERS=2",  # the engine's own (forked) loader workers
                "config.TEST_MODEL=False",
                f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
            ]
        )
    )
    assert trainer.iteration == 2
    # the engine's usual resumable sampler: exact resume mid-epoch comes with it
    assert type(trainer.train_loader.sampler) is ResumableDistributedSampler
    assert isinstance(trainer.train_loader.dataset.sources[0], ShardSource)


def test_index_is_cached_beside_each_shard_and_redone_when_the_shard_changes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_folder(src)
    out = _shards(tmp_path, src, "--max-count", "4")
    first = ShardSource(str(out))
    assert sorted(os.listdir(out))[-2:] == ["train-000001.tar", "train-000001.tar.index.json"]
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("indexed the tar again"))
    monkeypatch.setattr(shards_module, "_INDEX_MEMO", {})  # another process: only the files beside the shards
    again = ShardSource(str(out))  # from the cache: no tar read
    assert again.keys == first.keys and np.array_equal(again.offsets, first.offsets)
    assert np.array_equal(again.labels, first.labels)
    monkeypatch.setattr(tarfile, "open", real_open)
    assert _tool().main([str(src), str(out / "train-%06d.tar"), "--max-count", "2"]) == 0  # rewritten shards
    assert len(ShardSource(f"{out}/train-{{000000..000002}}.tar")) == 6  # the stale caches were not used


def test_index_is_read_once_per_process_until_a_shard_changes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_folder(src)
    out = _shards(tmp_path, src, "--max-count", "4")
    reads = []
    real = shards_module.cached_index
    monkeypatch.setattr(shards_module, "cached_index", lambda path: reads.append(path) or real(path))
    cfg = compose_config(
        [
            "config=test/quick_vit",
            "config.DATA.TRAIN.DATA_SOURCES=[tar_shards]",
            f"config.DATA.TRAIN.DATA_PATHS=[{out}]",
            'config.MODEL.HEAD.PARAMS=[["vision_transformer_head", {"in_plane": 32, "num_classes": "auto"}]]',
        ]
    ).config  # fmt: skip  (the labels check and the class count both read the shards)
    first = len(reads)
    assert first == 2  # two shards, each read once
    source = build_dataset(cfg, "TRAIN").sources[0]
    assert len(reads) == first  # the data set too used what the config's checks read
    with pytest.raises(ValueError, match="read-only"):
        source.labels[0] = 5  # shared between sources: none can change another's
    assert _tool().main([str(src), str(out / "train-%06d.tar"), "--max-count", "2"]) == 0  # rewritten shards
    assert len(ShardSource(f"{out}/train-{{000000..000002}}.tar")) == 6
    assert len(reads) == first + 3  # a shard set that changed is read again


def test_num_classes_auto_and_a_supervised_loss_on_unlabeled_shards(tmp_path):
    from vissl_vit.data.datasets.shards import write_shards
    from vissl_vit.errors import ConfigError

    make_folder(tmp_path / "images", classes=("cat", "dog", "owl"), per_class=2)
    write_shards(str(tmp_path / "images"), str(tmp_path / "shards" / "train-%06d.tar"), max_count=4)
    base = ["config=test/quick_vit", "config.TEST_MODEL=False", "config.DATA.TRAIN.DATA_SOURCES=[tar_shards]"]
    cfg = compose_config(
        [*base, f"config.DATA.TRAIN.DATA_PATHS=[{tmp_path / 'shards'}]",
         'config.MODEL.HEAD.PARAMS=[["vision_transformer_head", {"in_plane": 32, "num_classes": "auto"}]]']
    ).config  # fmt: skip
    assert cfg.MODEL.HEAD.PARAMS[0][1]["num_classes"] == 3  # the .cls labels' classes
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(flat / f"{i}.png")
    write_shards(str(flat), str(tmp_path / "flat_shards" / "s-%06d.tar"))
    with pytest.raises(ConfigError, match=r"the shards have no \.cls labels"):
        compose_config([*base, f"config.DATA.TRAIN.DATA_PATHS=[{tmp_path / 'flat_shards'}]"])
