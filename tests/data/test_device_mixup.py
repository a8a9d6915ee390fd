"""big_vision's mixup on the device (RECIPES.md 4.3): a = max(a, 1 - a), a ~ Beta(p, p), one per
step and process, partner = the batch rolled by one, one-hot targets mixed the same way."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vissl_vit.config import compose_config
from vissl_vit.data.collators.device_mixup import DeviceMixup, build_device_mixup
from vissl_vit.errors import ConfigError
from vissl_vit.losses.cross_entropy import CrossEntropyMultipleOutputSingleTargetLoss


def _batch(n: int = 5, classes: int = 7):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 4, 4, generator=g), torch.tensor([3, 0, 6, 2, 5])[:n]


def test_values_exact_for_a_given_a(monkeypatch):
    mix = DeviceMixup(0.2, 7, seed=0)
    monkeypatch.setattr(mix, "draw", lambda iteration, rank: 0.7)
    x, y = _batch()
    images, soft = mix(x, y, iteration=3, rank=0)
    for i in range(5):
        j = (i - 1) % 5  # jnp.roll(x, 1, axis=0): sample i is mixed with sample i - 1, 0 with the last
        assert torch.equal(images[i], 0.7 * x[i] + (1.0 - 0.7) * x[j])
        expected = torch.zeros(7)
        expected[y[i]] += 0.7
        expected[y[j]] += 1.0 - 0.7
        assert torch.equal(soft[i], expected)
    assert soft.dtype == torch.float32 and torch.allclose(soft.sum(1), torch.ones(5))
    assert images[0].sub(0.7 * x[0]).sub(0.3 * x[4]).abs().max() < 1e-6  # the partner of 0 is the last


def test_soft_targets_in_are_mixed_the_same_way(monkeypatch):
    mix = DeviceMixup(0.2, 7, seed=0)
    monkeypatch.setattr(mix, "draw", lambda iteration, rank: 0.6)
    x, y = _batch()
    one_hot = F.one_hot(y, 7).float()
    _, a = mix(x, y, 0, 0)
    _, b = mix(x, one_hot, 0, 0)
    assert torch.equal(a, b)


def test_distribution_of_a():
    """E[max(a, 1 - a)] for a ~ Beta(p, p) is 1/2 + 4^-p / (p B(p, p)) (substitute u = x (1 - x) in
    E|a - 1/2|); p = 0.2: 0.8989. 20,000 draws: within 5 standard errors."""
    p = 0.2
    mix = DeviceMixup(p, 10, seed=1)
    draws = np.array([mix.draw(it, 0) for it in range(20_000)])
    beta = math.gamma(p) ** 2 / math.gamma(2 * p)
    expected = 0.5 + 4**-p / (p * beta)
    assert expected == pytest.approx(0.8989, abs=1e-4)
    assert draws.min() >= 0.5 and draws.max() <= 1.0
    assert abs(draws.mean() - expected) < 5 * draws.std() / math.sqrt(len(draws))
    # Beta(0.2, 0.2) is U-shaped: most draws are near 1 (a mild mix), as big_vision's
    assert (draws > 0.9).mean() > 0.5


def test_determinism_per_seed_rank_iteration():
    a = DeviceMixup(0.2, 10, seed=5)
    b = DeviceMixup(0.2, 10, seed=5)  # a resumed run: a new object, no saved state
    assert [a.draw(i, 0) for i in range(20)] == [b.draw(i, 0) for i in range(20)]
    assert a.draw(3, 0) != a.draw(3, 1)  # each process its own a
    assert a.draw(3, 0) != a.draw(4, 0)
    assert a.draw(3, 0) != DeviceMixup(0.2, 10, seed=6).draw(3, 0)
    x, y = _batch()
    assert all(torch.equal(u, v) for u, v in zip(a(x, y, 9, 2), b(x, y, 9, 2)))


def test_cross_entropy_takes_the_soft_targets():
    """VISSL's cross_entropy_multiple_output_single_target on the mixed targets is mup-vit's
    two-hot loss a CE(y) + (1 - a) CE(roll(y))."""
    mix = DeviceMixup(0.2, 7, seed=0)
    x, y = _batch()
    _, soft = mix(x, y, 11, 0)
    a = mix.draw(11, 0)
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    loss = CrossEntropyMultipleOutputSingleTargetLoss()([logits], soft)
    two_hot = a * F.cross_entropy(logits, y) + (1 - a) * F.cross_entropy(logits, y.roll(1, 0))
    torch.testing.assert_close(loss, two_hot, rtol=1e-6, atol=1e-7)


def test_config_off_by_default_and_auto_classes():
    cfg = compose_config(["config=test/quick_vit"]).config
    assert build_device_mixup(cfg, 0) is None  # p: 0.0
    cfg = compose_config(["config=test/quick_vit", "config.DATA.TRAIN.DEVICE_MIXUP.p=0.2"]).config
    assert cfg.DATA.TRAIN.DEVICE_MIXUP.num_classes == 4  # auto: the synthetic data's classes
    mix = build_device_mixup(cfg, cfg.SEED_VALUE)
    assert (mix.p, mix.num_classes) == (0.2, 4)


def test_permutation_partner_is_simplest_vits_mix_mixup(monkeypatch):
    """partner: permutation (SimplEsT-ViT's mix_mixup): sample i with sample perm[i], the same a; the
    permutation is a function of (seed, rank, iteration), and a does not change with the rule."""
    mix = DeviceMixup(0.2, 7, seed=3, partner="permutation")
    x, y = _batch()
    images, soft = mix(x, y, iteration=11, rank=1)
    a = mix.draw(11, 1)
    assert a == DeviceMixup(0.2, 7, seed=3).draw(11, 1)
    perm = mix.order(5, 11, 1)
    assert sorted(perm.tolist()) == list(range(5))
    one_hot = F.one_hot(y, 7).float()
    for i in range(5):
        torch.testing.assert_close(images[i], a * x[i] + (1 - a) * x[perm[i]], rtol=0, atol=0)
        torch.testing.assert_close(soft[i], a * one_hot[i] + (1 - a) * one_hot[perm[i]], rtol=0, atol=0)
    orders = {tuple(mix.order(5, it, 0).tolist()) for it in range(40)}
    assert len(orders) > 20  # a new order every step, not a fixed one
    cfg = compose_config(
        [
            "config=test/quick_vit",
            "config.DATA.TRAIN.DEVICE_MIXUP.p=0.2",
            "config.DATA.TRAIN.DEVICE_MIXUP.partner=permutation",
        ]
    ).config
    assert build_device_mixup(cfg, 0).partner == "permutation"
    with pytest.raises(ConfigError, match="partner='shuffle'"):
        DeviceMixup(0.2, 7, 0, partner="shuffle")


@pytest.mark.parametrize(("p", "classes", "match"), [(-0.1, 4, "p=-0.1"), (0.2, 0, "num_classes=0")])
def test_bad_values_are_config_errors(p, classes, match):
    with pytest.raises(ConfigError, match=match):
        DeviceMixup(p, classes, 0)


# --------------------------------------------------------------------------------------------------
# in the engine: built from the config, run by the Trainer on each micro-batch, refused where wrong
# --------------------------------------------------------------------------------------------------


def _quick(tmp_path, *extra: str) -> list[str]:
    return [
        "config=test/quick_vit",
        "config.TEST_MODEL=False",
        "config.OPTIMIZER.num_epochs=1",
        f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
        *extra,
    ]


def test_the_engine_mixes_each_micro_batch_on_the_device(tmp_path, monkeypatch):
    from vissl_vit import run_train_engine

    seen: list[tuple[int, int, float]] = []
    original = DeviceMixup.__call__

    def recorded(self, images, target, iteration, rank):  # noqa: ANN001, ANN202
        out, soft = original(self, images, target, iteration, rank)
        seen.append((iteration, rank, float(soft.max(dim=1).values.min())))
        return out, soft

    monkeypatch.setattr(DeviceMixup, "__call__", recorded)
    trainer = run_train_engine(
        compose_config(
            _quick(
                tmp_path,
                "config.DATA.TRAIN.DEVICE_MIXUP.p=0.2",
                "config.LOSS.name=cross_entropy_multiple_output_single_target",
            )
        )
    )
    assert trainer.iteration == 4
    assert [(i, r) for i, r, _ in seen] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    # mixed two-hot targets: the larger weight is max(a, 1 - a) in [0.5, 1), not a one-hot 1
    assert all(0.5 <= m < 1 for *_, m in seen)


def test_off_by_default_the_trainer_has_no_batch_transform(tmp_path):
    from vissl_vit import run_train_engine

    assert run_train_engine(compose_config(_quick(tmp_path))).batch_transform is None


@pytest.mark.parametrize(
    "extra, match",
    [
        (["config.DATA.TRAIN.DEVICE_MIXUP.p=-1"], r"DEVICE_MIXUP\.p=-1(\.0)?: expected the Beta parameter"),
        (
            ["config.DATA.TRAIN.DEVICE_MIXUP.p=0.2", "config.DATA.TRAIN.COLLATE_FUNCTION=cutmixup_collator"],
            r"both mix the batch: keep one",
        ),
    ],
)
def test_device_mixup_is_refused_where_it_cannot_run(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        compose_config(_quick(tmp_path, *extra))
