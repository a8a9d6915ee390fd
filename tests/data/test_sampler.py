"""The resumable distributed sampler: partitions, padding, resume mid-epoch, seeds."""

from __future__ import annotations

from vissl_vit.data.dataset import sample_seed
from vissl_vit.data.sampler import ResumableDistributedSampler as S


def test_ranks_partition_the_epoch():
    shards = [list(S(100, 4, r, batch_size=5, shuffle=True, seed=0, drop_last=True)) for r in range(4)]
    indices = [i for s in shards for i, _ in s]
    assert len(indices) == 100 and sorted(indices) == list(range(100))
    assert all(len(s) == 25 for s in shards)


def test_drop_last_and_padding():
    assert len(list(S(103, 2, 0, batch_size=10, shuffle=False, seed=0, drop_last=True))) == 50
    padded = [i for r in range(2) for i, _ in S(103, 2, r, batch_size=10, shuffle=False, seed=0, drop_last=False)]
    assert len(padded) == 104 and set(padded) == set(range(103))


def test_epochs_differ_and_are_reproducible():
    s = S(50, 1, 0, batch_size=5, shuffle=True, seed=3, drop_last=True)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert [i for i, _ in e0] != [i for i, _ in e1]
    s.set_epoch(0)
    assert list(s) == e0


def test_resume_mid_epoch_yields_the_remaining_batches():
    full = list(S(60, 2, 1, batch_size=4, shuffle=True, seed=7, drop_last=True))
    s = S(60, 2, 1, batch_size=4, shuffle=True, seed=7, drop_last=True)
    s.set_start_iteration(3)
    assert list(s) == full[12:] and len(s) == len(full) - 12


def test_sample_seeds_depend_on_seed_epoch_index_only():
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    assert len({sample_seed(0, e, i) for e in range(5) for i in range(1000)}) == 5000
    assert 0 <= sample_seed(2**31, 10**6, 10**9) < 2**63
