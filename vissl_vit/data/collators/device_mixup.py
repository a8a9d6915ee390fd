"""big_vision's mixup, applied on the device to a batch already transferred (RECIPES.md 4.3).

big_vision (``utils.py::get_mixup``, ``train.py``) draws one ``a ~ Beta(p, p)`` per device and step,
takes ``a = max(a, 1 - a)`` (the image's own share is the larger), and mixes every image and its
one-hot label with the batch rolled by one: ``a x + (1 - a) roll(x, 1, axis=0)``. "p=0.2" is the
Beta parameter, applied to every batch, not a probability.

Here ``a`` is drawn on the CPU from a numpy generator seeded by ``(seed, rank, iteration)``: no
state to save (a resumed run draws the same ``a`` at the same step), each process its own draw as
each big_vision device, and no device-to-host sync (``a`` is a Python float). Only the mixing runs
on the images' device, in their dtype. Not a collator (COLLATE_FUNCTION): the trainer calls it
after the transfer, so a GPU run pays two multiply-adds per batch and the loader workers nothing.

``partner: permutation`` mixes each image with the batch in a random order instead, as SimplEsT-ViT's
``tricks/mixup.py::mix_mixup`` does (``torch.randperm``; its own share ``1 - min(z, 1 - z)``, the same
``a``); the order is drawn from the same ``(seed, rank, iteration)`` generator, so it resumes too. A
permutation may pair an image with itself; the roll never does.
"""

from __future__ import annotations

import numpy as np
import torch

from vissl_vit.errors import ConfigError

WHERE = "config.DATA.TRAIN.DEVICE_MIXUP"
PARTNERS = ("roll", "permutation")


def check_mixup_args(p: object, partner: object) -> None:
    """``p`` a number >= 0 (0: off) and ``partner`` one of :data:`PARTNERS`, else a ConfigError:
    what the config's validation checks at compose and :class:`DeviceMixup` on construction."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or p < 0:
        raise ConfigError(f"{WHERE}.p={p!r}: expected the Beta parameter, a number >= 0 (0: off).")
    if partner not in PARTNERS:
        raise ConfigError(f"{WHERE}.partner={partner!r}: expected one of {', '.join(PARTNERS)}.")


class DeviceMixup:
    """``(images, target) -> (a x + (1 - a) roll(x, 1, 0), same for the one-hot target)``.

    Args:
        p: the Beta parameter (> 0; big_vision's vit_s16_i1k: 0.2).
        num_classes: classes of the one-hot targets.
        seed: the run's seed (``SEED_VALUE``); with the rank and the iteration, it seeds each draw.
        partner: ``roll`` (big_vision: sample i with sample i - 1) or ``permutation`` (SimplEsT-ViT:
            sample i with sample perm[i] of a random permutation).
    """

    def __init__(self, p: float, num_classes: int, seed: int, partner: str = "roll") -> None:
        check_mixup_args(p, partner)
        if not p > 0:
            raise ConfigError(f"{WHERE}.p={p!r}: expected a Beta parameter > 0 (0 is off: no DeviceMixup is built).")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"{WHERE}.num_classes={num_classes!r}: expected a number of classes >= 1 (or auto).")
        self.p, self.num_classes, self.seed, self.partner = float(p), num_classes, int(seed), partner

    def _rng(self, iteration: int, rank: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, rank, iteration])

    def draw(self, iteration: int, rank: int) -> float:
        """``max(a, 1 - a)``, ``a ~ Beta(p, p)``, from the generator of ``(seed, rank, iteration)``."""
        a = float(self._rng(iteration, rank).beta(self.p, self.p))
        return max(a, 1.0 - a)

    def order(self, batch: int, iteration: int, rank: int) -> np.ndarray:
        """The partner of each sample for ``partner: permutation``: drawn after ``a``, from the same
        generator (so the draw of ``a`` does not depend on the partner rule)."""
        rng = self._rng(iteration, rank)
        rng.beta(self.p, self.p)
        return rng.permutation(batch)

    def soft_target(self, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One-hot ``[B, C]`` from class indices ``[B]``; a ``[B, C]`` distribution is kept as it is.
        Made with scatter: ``F.one_hot`` would read the targets' maximum on the host."""
        if target.is_floating_point():
            if target.shape[-1] != self.num_classes:
                raise ValueError(f"soft targets have {target.shape[-1]} classes; DEVICE_MIXUP has {self.num_classes}")
            return target.to(dtype)
        out = torch.zeros(target.shape[0], self.num_classes, dtype=dtype, device=target.device)
        return out.scatter_(1, target.long().view(-1, 1), 1.0)

    def __call__(
        self, images: torch.Tensor, target: torch.Tensor, iteration: int, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch on its device.

        Args:
            images: ``[B, ...]`` floating images (on the device).
            target: ``[B]`` class indices or ``[B, C]`` distributions (on the device).
            iteration: the optimizer step (the trainer's ``iteration``: micro-batches of one step
                share ``a``, each rolled within itself).
            rank: this process's rank.

        Returns:
            The mixed images and the ``[B, num_classes]`` float32 soft targets.
        """
        a = self.draw(iteration, rank)
        soft = self.soft_target(target, torch.float32)
        if self.partner == "permutation":
            idx = torch.from_numpy(self.order(images.shape[0], iteration, rank)).to(images.device)
            return a * images + (1.0 - a) * images[idx], a * soft + (1.0 - a) * soft[idx]
        # sample i with sample i - 1 (sample 0 with the last): jnp.roll(x, 1, axis=0)
        return a * images + (1.0 - a) * images.roll(1, 0), a * soft + (1.0 - a) * soft.roll(1, 0)


def build_device_mixup(cfg: object, seed: int) -> DeviceMixup | None:
    """``DATA.TRAIN.DEVICE_MIXUP`` -> a :class:`DeviceMixup`, or None when ``p`` is 0 (off).

    Args:
        cfg: the ``config`` node (its ``auto`` class count resolved by config.derive.resolve_data).
        seed: the run's seed.
    """
    node = cfg.DATA.TRAIN.get("DEVICE_MIXUP")  # type: ignore[attr-defined]
    if node is None or node.get("p", 0) == 0:
        return None
    return DeviceMixup(node.p, node.num_classes, seed, node.get("partner", "roll"))
