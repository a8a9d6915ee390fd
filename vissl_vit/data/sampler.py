"""Samplers of the loaders: a small protocol, the resumable distributed sampler, and DeiT's
repeated-augmentation sampler (Touvron et al. 2021, "Training data-efficient image transformers",
https://arxiv.org/abs/2012.12877; Hoffer et al. 2020, "Augment your batch", for the idea).

Every sampler yields ``(index, sample_seed)`` pairs: the dataset seeds each sample's augmentations
with the second (see :func:`~vissl_vit.data.dataset.sample_seed`), so a resumed run draws the same
crops as the interrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import Sampler

from vissl_vit.data.dataset import sample_seed
from vissl_vit.errors import ConfigError, did_you_mean


@runtime_checkable
class IndexSampler(Protocol):
    """What the loader, the trainer and the test phases ask of a sampler, and nothing more.

    A sampler is built with the keyword arguments ``dataset_len, num_replicas, rank, batch_size,
    shuffle, seed, drop_last`` (plus its own, e.g. ``num_repeats``) and yields this rank's share of
    one epoch as ``(index, sample_seed)`` pairs. ``batch_size`` is the per-replica optimizer step
    (micro-batch x accumulation): the unit that ``set_start_iteration`` skips and ``drop_last`` drops.
    """

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order ``__iter__`` yields."""

    def set_start_iteration(self, iteration: int) -> None:
        """Skip this rank's first ``iteration`` steps of the epoch (exact mid-epoch resume)."""

    def __len__(self) -> int:
        """Samples ``__iter__`` yields from the start iteration on."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """This rank's ``(index, sample_seed)`` pairs of the epoch, from the start iteration on."""


def epoch_order(dataset_len: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The epoch's order of the whole data set, the same on every rank.

    A permutation from a generator seeded with ``seed * 1_000_003 + epoch`` (with seed 0 that is
    DeiT's ``manual_seed(epoch)``); ``shuffle=False`` keeps the data set order (test sets).

    Args:
        dataset_len: number of samples.
        shuffle: permute; False gives ``range(dataset_len)``.
        seed: base seed (``config.SEED_VALUE``).
        epoch: the epoch.
    """
    if not shuffle:
        return list(range(dataset_len))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(dataset_len, generator=g).tolist()


class _ResumableSampler(Sampler[tuple[int, int]]):
    """What both samplers share: the epoch, and skipping this rank's first k batches on resume.
    Subclasses set ``num_samples`` (this rank's samples per epoch) and ``batch_size``."""

    num_samples: int
    batch_size: int
    epoch: int = 0
    start_iteration: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start_iteration(self, iteration: int) -> None:
        self.start_iteration = iteration

    def __len__(self) -> int:
        return max(self.num_samples - self.start_iteration * self.batch_size, 0)


class ResumableDistributedSampler(_ResumableSampler):
    """Yields ``(index, sample_seed)`` for this rank's share of an epoch.

    The epoch's order is :func:`epoch_order`; rank r takes every world-th index of it from r.
    ``set_start_iteration(k)`` skips this rank's first k batches, which is how a run resumed
    mid-epoch sees exactly the samples the interrupted run had left.

    Args:
        dataset_len: number of samples.
        num_replicas: world size.
        rank: this process's rank.
        batch_size: per-replica batch size (to skip whole batches).
        shuffle: permute each epoch; False keeps the data set order (test sets).
        seed: base seed.
        drop_last: drop the tail that does not fill a global batch (otherwise pad by repeating).
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int,
        rank: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
    ) -> None:
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0
        self.start_iteration = 0
        if drop_last:
            self.num_samples = (dataset_len // (batch_size * num_replicas)) * batch_size
        else:
            self.num_samples = math.ceil(dataset_len / num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = epoch_order(self.dataset_len, self.shuffle, self.seed, self.epoch)
        total = self.num_samples * self.num_replicas
        if total > len(order):  # pad by repeating from the start
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        mine = order[:total][self.rank :: self.num_replicas]
        for index in mine[self.start_iteration * self.batch_size :]:
            yield index, sample_seed(self.seed, self.epoch, index)


# DeiT's RASampler keeps floor(N // 256 * 256 / W) samples per rank: the data set size rounded down
# to a multiple of 256 (deit/samplers.py; timm's RepeatAugSampler calls it selected_round).
_SELECTED_ROUND = 256


class RepeatedAugmentationSampler(_ResumableSampler):
    """DeiT's repeated augmentation (``RASampler``): each image R times per epoch, on R ranks.

    Follows ``deit/samplers.py::RASampler`` (facebookresearch/deit 7e160fe, with ``num_repeats``),
    which timm's ``RepeatAugSampler`` (``timm/data/distributed_sampler.py``) reproduces with
    ``selected_round=256, selected_ratio=0``. With N images, W ranks and R repeats, per epoch:

    1. ``order = epoch_order(N, shuffle, seed, epoch)``: one permutation, the same on all ranks
       (DeiT seeds with ``epoch`` alone, which is ``seed = 0`` here);
    2. each index repeated R times in a row: ``rep = [a]*R + [b]*R + ...`` (length R·N);
    3. padded by wrapping to ``W * ceil(R·N / W)`` (position p reads ``rep[p % (R·N)]``, as timm does;
       DeiT's ``indices += indices[:pad]`` is the same whenever it runs);
    4. rank r takes positions ``r, r + W, r + 2W, ...``, so the R copies of an image (R consecutive
       positions) go to R different ranks when W >= R;
    5. only the first ``S = floor(N // 256 * 256 / W)`` of them (DeiT's ``num_selected_samples``),
       so an epoch is still about N samples over all ranks but only about N / R distinct images.
       For N < 256, where DeiT's S would be 0, S = ceil(N / W) (timm's fallback); S is at most
       ``ceil(R·N / W)`` (timm's bound, never reached by DeiT's formula).

    vissl_vit's own additions: ``drop_last`` cuts S down to whole steps (S // batch_size · batch_size,
    as the distributed sampler drops the tail that does not fill a global batch);
    ``set_start_iteration(k)`` skips this rank's first k steps; and each copy gets its own
    augmentation seed: the copy at position p is copy number ``(p // (R·N)) · R + p % R`` of its image,
    and its seed is ``sample_seed(seed, epoch, index, copy)``, so the R copies draw different crops.

    Args:
        dataset_len: number of samples N.
        num_replicas: world size W.
        rank: this process's rank.
        batch_size: per-replica optimizer step (micro-batch x accumulation), the unit skipped and dropped.
        shuffle: permute each epoch; False repeats the data set order.
        seed: base seed.
        drop_last: keep only whole steps of the selected samples.
        num_repeats: R, copies of each image per epoch; 3 in DeiT.
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int,
        rank: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        num_repeats: int = 3,
    ) -> None:
        if num_repeats < 1:
            raise ValueError(f"num_repeats={num_repeats} must be at least 1 (3 is DeiT's repeated augmentation).")
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.num_repeats = num_repeats
        self.epoch = 0
        self.start_iteration = 0
        self.num_samples = self.samples_per_replica(dataset_len, num_replicas, num_repeats)
        if drop_last:
            self.num_samples = (self.num_samples // batch_size) * batch_size

    @staticmethod
    def samples_per_replica(dataset_len: int, num_replicas: int, num_repeats: int) -> int:
        """S, the samples each rank takes per epoch before ``drop_last`` (see the class docstring).

        Args:
            dataset_len: number of samples N.
            num_replicas: world size W.
            num_repeats: R.
        """
        if dataset_len >= _SELECTED_ROUND:
            # integer floor division: DeiT's int(math.floor(N // 256 * 256 / W)) without the float
            selected = (dataset_len // _SELECTED_ROUND * _SELECTED_ROUND) // num_replicas
        else:
            selected = math.ceil(dataset_len / num_replicas)
        return min(selected, math.ceil(dataset_len * num_repeats / num_replicas))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = epoch_order(self.dataset_len, self.shuffle, self.seed, self.epoch)
        repeats = self.num_repeats
        n = len(order) * repeats  # length of the repeated list, before padding
        for j in range(self.start_iteration * self.batch_size, self.num_samples):
            p = self.rank + j * self.num_replicas  # position in the repeated, padded list
            q = p % n  # padding wraps to the start
            index = order[q // repeats]
            copy = (p // n) * repeats + q % repeats
            yield index, sample_seed(self.seed, self.epoch, index, copy)


# Samplers by name. A plain dict until vissl_vit/registry.py gains a SAMPLERS registry; each entry
# takes the keyword arguments of IndexSampler's docstring (plus its own) and returns an IndexSampler.
SAMPLERS: dict[str, Callable[..., IndexSampler]] = {
    "distributed": ResumableDistributedSampler,
    "repeated_augmentation": RepeatedAugmentationSampler,
}


def build_sampler(name: str, **kwargs: Any) -> IndexSampler:
    """The sampler registered as ``name``, built with ``kwargs``.

    Args:
        name: a key of :data:`SAMPLERS`.
        **kwargs: the sampler's keyword arguments (see :class:`IndexSampler`).
    """
    if name not in SAMPLERS:
        raise ConfigError(
            f"Unknown sampler '{name}'.{did_you_mean(name, SAMPLERS)} Known sampler names: {', '.join(sorted(SAMPLERS))}."
        )
    return SAMPLERS[name](**kwargs)
