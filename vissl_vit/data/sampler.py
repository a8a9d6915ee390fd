"""A distributed sampler that can resume mid-epoch and seeds each sample's augmentations."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from vissl_vit.data.dataset import sample_seed


class ResumableDistributedSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)`` for this rank's share of an epoch.

    The epoch's order is a permutation seeded by ``(seed, epoch)``; rank r takes every
    world-th index of it from r. ``set_start_iteration(k)`` skips this rank's first k batches,
    which is how a run resumed mid-epoch sees exactly the samples the interrupted run had left.

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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start_iteration(self, iteration: int) -> None:
        self.start_iteration = iteration

    def __len__(self) -> int:
        return max(self.num_samples - self.start_iteration * self.batch_size, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.num_replicas
        if total > len(order):  # pad by repeating from the start
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        mine = order[:total][self.rank :: self.num_replicas]
        for index in mine[self.start_iteration * self.batch_size :]:
            yield index, sample_seed(self.seed, self.epoch, index)
