"""Samplers behind one protocol (issue 13): DeiT's repeated-augmentation sampler against its definition
(RECIPES.md section 2.2, deit/samplers.py::RASampler, timm's RepeatAugSampler), exact mid-epoch resume,
one seed per copy, and the default sampler unchanged."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from timm.data.distributed_sampler import RepeatAugSampler

from vissl_vit.config.paths import defaults_path
from vissl_vit.data.build import _build_sampler
from vissl_vit.data.dataset import sample_seed
from vissl_vit.data.sampler import (
    SAMPLERS,
    IndexSampler,
    RepeatedAugmentationSampler,
    ResumableDistributedSampler,
    build_sampler,
)
from vissl_vit.errors import ConfigError

# Data set sizes that are multiples of nothing useful: 1283 is prime (>= 256: DeiT's rounding to 256
# applies), 97 is prime (< 256: timm's ceil(N / W) fallback).
SIZES = (1283, 97)
WORLDS = (1, 2, 4)


def rasampler_reference(n: int, world: int, rank: int, perm_seed: int, repeats: int = 3) -> list[int]:
    """RECIPES.md 2.2 / deit/samplers.py::RASampler, written from the definition: permutation, each
    index repeated in a row, wrap-padded to ceil(R N / W) W, rank r takes [r::W], then the first
    floor(N // 256 * 256 / W) (ceil(N / W) for N < 256, timm's selected_round fallback)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    rep = torch.repeat_interleave(perm, repeats).tolist()
    total = math.ceil(repeats * n / world) * world
    rep += rep[: total - len(rep)]
    selected = math.floor(n // 256 * 256 / world) if n >= 256 else math.ceil(n / world)
    return rep[rank::world][:selected]


def ra(n: int, world: int, rank: int, seed: int = 0, batch: int = 4, drop_last: bool = False, repeats: int = 3):
    return RepeatedAugmentationSampler(
        dataset_len=n,
        num_replicas=world,
        rank=rank,
        batch_size=batch,
        shuffle=True,
        seed=seed,
        drop_last=drop_last,
        num_repeats=repeats,
    )


def indices(sampler) -> list[int]:
    return [i for i, _ in sampler]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("world", WORLDS)
def test_indices_per_rank_and_epoch_equal_the_definition(n: int, world: int):
    for epoch in (0, 1, 5):
        for rank in range(world):
            # seed 0: the permutation is DeiT's manual_seed(epoch)
            s = ra(n, world, rank, seed=0)
            s.set_epoch(epoch)
            assert indices(s) == rasampler_reference(n, world, rank, perm_seed=epoch)
            assert len(s) == len(rasampler_reference(n, world, rank, perm_seed=epoch))
            # another seed: the permutation is the default sampler's, seeded by seed * 1_000_003 + epoch
            s = ra(n, world, rank, seed=7)
            s.set_epoch(epoch)
            assert indices(s) == rasampler_reference(n, world, rank, perm_seed=7 * 1_000_003 + epoch)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("world", (1, 2, 4, 8))
def test_seed_zero_matches_timm_repeat_aug_sampler(n: int, world: int):
    # timm/data/distributed_sampler.py::RepeatAugSampler(selected_round=256) reproduces DeiT's RASampler
    for epoch in (0, 3):
        for rank in range(world):
            ref = RepeatAugSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=True, num_repeats=3)
            ref.set_epoch(epoch)
            s = ra(n, world, rank, seed=0)
            s.set_epoch(epoch)
            assert indices(s) == list(ref) and len(s) == len(ref)


def _epoch(n: int, world: int, epoch: int = 0, seed: int = 3) -> list[list[tuple[int, int]]]:
    out = []
    for rank in range(world):
        s = ra(n, world, rank, seed=seed)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_the_three_copies_land_on_three_ranks_and_an_epoch_has_about_n_over_3_images():
    n, world = 1283, 4
    ranks_of = defaultdict(list)
    for rank, share in enumerate(_epoch(n, world)):
        for index, _ in share:
            ranks_of[index].append(rank)
    # no image twice on one rank, and all but the (at most 2) images cut by the selection have 3 copies
    assert all(len(set(r)) == len(r) for r in ranks_of.values())
    assert sum(len(r) != 3 for r in ranks_of.values()) <= 2
    # the selected positions are [0, W S) of the repeated list: ceil(W S / 3) distinct images
    selected = math.floor(n // 256 * 256 / world)
    assert len(ranks_of) == math.ceil(world * selected / 3)
    assert abs(len(ranks_of) - n / 3) <= 256 / 3  # DeiT drops up to 255 samples by rounding to 256
    assert sum(len(r) for r in ranks_of.values()) == world * selected


def test_copies_get_different_seeds():
    n, world, seed, epoch = 1283, 4, 3, 2
    seeds_of = defaultdict(list)
    for share in _epoch(n, world, epoch=epoch, seed=seed):
        for index, s in share:
            seeds_of[index].append(s)
    for index, seeds in seeds_of.items():
        assert len(set(seeds)) == len(seeds)
        # copy c of an image has sample_seed(seed, epoch, index, c), c in 0..2
        assert set(seeds) <= {sample_seed(seed, epoch, index, c) for c in range(3)}
    # world 1: the copies share a rank (and often a batch) but still differ
    (share,) = _epoch(n, 1, epoch=epoch, seed=seed)
    assert share[0][0] == share[1][0] == share[2][0] and len({s for _, s in share[:3]}) == 3


def test_copies_of_one_image_draw_different_crops():
    # the dataset seeds its transforms with sample_seed (vissl_vit/data/dataset.py::_transform)
    from vissl_vit.data.dataset import VisslDataset
    from vissl_vit.data.datasets.synthetic import SyntheticSource
    from vissl_vit.data.transforms import build_transforms

    tf = build_transforms([{"name": "RandomResizedCrop", "size": 8}, {"name": "ToTensor"}], "test")
    ds = VisslDataset([SyntheticSource(4, 32, 3, 10, 0)], tf)
    share = list(ra(4, 1, 0, seed=1))
    a, b = (ds[item]["data"] for item in share[:2])
    assert share[0][0] == share[1][0] and not torch.equal(a, b)


@pytest.mark.parametrize("drop_last", (False, True))
def test_resume_mid_epoch_gives_the_remaining_indices_exactly(drop_last: bool):
    n, world, batch = 1283, 4, 8
    for rank in range(world):
        full = ra(n, world, rank, seed=5, batch=batch, drop_last=drop_last)
        full.set_epoch(3)
        full_list = list(full)
        for k in (1, 7, len(full_list) // batch, len(full_list) // batch + 2):
            s = ra(n, world, rank, seed=5, batch=batch, drop_last=drop_last)
            s.set_epoch(3)
            s.set_start_iteration(k)
            assert list(s) == full_list[k * batch :] and len(s) == len(full_list[k * batch :])


def test_drop_last_keeps_whole_steps_of_the_selection():
    n, world, batch = 1283, 2, 24
    selected = math.floor(n // 256 * 256 / world)  # 640, not a multiple of 24
    s = ra(n, world, 1, seed=0, batch=batch, drop_last=True)
    assert len(s) == selected // batch * batch
    assert indices(s) == rasampler_reference(n, world, 1, perm_seed=0)[: selected // batch * batch]
    assert RepeatedAugmentationSampler.samples_per_replica(n, world, 3) == selected


def _default_reference(
    n: int, world: int, rank: int, batch: int, shuffle: bool, seed: int, drop_last: bool, epoch: int
):
    """The default sampler's definition (its docstring): order seeded by seed * 1_000_003 + epoch,
    drop the tail that does not fill a global batch or pad by repeating, rank r takes [r::W]."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    else:
        order = list(range(n))
    per_rank = n // (batch * world) * batch if drop_last else math.ceil(n / world)
    total = per_rank * world
    padded = [order[i % n] for i in range(total)]
    return [(i, sample_seed(seed, epoch, i)) for i in padded[rank::world]]


@pytest.mark.parametrize("world", WORLDS)
def test_default_sampler_unchanged(world: int):
    for n in SIZES:
        for drop_last in (True, False):
            for shuffle in (True, False):
                for rank in range(world):
                    s = ResumableDistributedSampler(n, world, rank, 5, shuffle, 11, drop_last)
                    s.set_epoch(2)
                    assert list(s) == _default_reference(n, world, rank, 5, shuffle, 11, drop_last, 2)


def test_sample_seed_of_copy_zero_is_the_three_argument_seed():
    # splitmix64 finaliser of seed, epoch, index (the seeds every run drew before the copy argument)
    m = (1 << 64) - 1
    for seed, epoch, index in ((0, 0, 0), (3, 1, 17), (2**31, 10**6, 10**9)):
        x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index * 0x8CB92BA72F3D8DD7) & m
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        assert sample_seed(seed, epoch, index) == sample_seed(seed, epoch, index, 0) == (x ^ (x >> 31)) >> 1
    assert len({sample_seed(0, 1, i, c) for i in range(1000) for c in range(3)}) == 3000


def test_samplers_follow_the_protocol_and_are_built_by_name():
    kwargs = dict(dataset_len=10, num_replicas=2, rank=0, batch_size=2, shuffle=True, seed=0, drop_last=False)
    for name in SAMPLERS:
        assert isinstance(build_sampler(name, **kwargs), IndexSampler)
    with pytest.raises(ConfigError, match="repeated_augmentation"):
        build_sampler("repeated_augmentations", **kwargs)
    with pytest.raises(ValueError, match="num_repeats"):
        build_sampler("repeated_augmentation", num_repeats=0, **kwargs)


def _cfg(repeats):
    return OmegaConf.create(
        {
            "SEED_VALUE": 0,
            "DATA": {
                "TRAIN": {"DROP_LAST": True, "REPEATED_AUGMENTATIONS": repeats},
                "TEST": {"DROP_LAST": False},
            },
        }
    )


def test_build_wires_the_key():
    default = yaml.safe_load(defaults_path().read_text())["config"]["DATA"]["TRAIN"]["REPEATED_AUGMENTATIONS"]
    assert default == 0
    s = _build_sampler(_cfg(3), "TRAIN", 1283, 1, 4, 8, for_extraction=False)
    assert isinstance(s, RepeatedAugmentationSampler) and s.num_repeats == 3
    for repeats in (0, 1):
        assert type(_build_sampler(_cfg(repeats), "TRAIN", 100, 0, 1, 8, False)) is ResumableDistributedSampler
    # test phases and feature extraction never repeat
    assert type(_build_sampler(_cfg(3), "TEST", 100, 0, 1, 8, False)) is ResumableDistributedSampler
    assert type(_build_sampler(_cfg(3), "TRAIN", 100, 0, 1, 8, True)) is ResumableDistributedSampler
    for bad in (-1, 2.5, "3"):
        with pytest.raises(ConfigError, match="REPEATED_AUGMENTATIONS"):
            _build_sampler(_cfg(bad), "TRAIN", 100, 0, 1, 8, False)
