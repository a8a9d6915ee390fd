"""The dataset every loader reads: sources -> (seeded) transforms -> sample dicts, with bad-image handling."""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vissl_vit.data.datasets.base import ImageSource
from vissl_vit.errors import DataError

logger = logging.getLogger(__name__)


_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int, copy: int = 0) -> int:
    """The seed of one sample's augmentations: a function of (seed, epoch, index, copy) only, so that
    a resumed run, any number of workers, and any world size draw the same augmentations.

    A splitmix64 finaliser over a mix of the four: cheap enough for the sampler's hot loop.
    ``copy`` numbers the repeats of one image within an epoch (repeated augmentation): each copy
    gets its own crops. Copy 0 adds nothing to the mix, so the seeds of a sampler without
    repeats are those of (seed, epoch, index) alone, as before the argument existed.
    """
    x = (
        seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index * 0x8CB92BA72F3D8DD7 + copy * 0xA24BAED4963EE407
    ) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def effective_label_type(label_type: str, label_sources: list[str], where: str) -> str:
    """The label type a data split really uses: with LABEL_SOURCES set, the sources' labels win.

    VISSL's rule (vissl/data/ssl_dataset.py, ``GenericSSLDataset.__getitem__``): when label sources
    are loaded, each sample's label comes from them whatever LABEL_TYPE says; sample_index and zero
    apply only without label sources. VISSL's ViT tutorial relies on it (LABEL_SOURCES
    [disk_folder] with LABEL_TYPE sample_index trains on the classes).

    Args:
        label_type: ``DATA.<split>.LABEL_TYPE``.
        label_sources: ``DATA.<split>.LABEL_SOURCES``.
        where: ``config.DATA.<split>``, for the log line.
    """
    if len(label_sources) > 0 and label_type != "standard":
        logger.info(
            "%s.LABEL_TYPE=%s is not used: LABEL_SOURCES=%s is set, so the labels come from it (as in VISSL)",
            where,
            label_type,
            list(label_sources),
        )
        return "standard"
    return label_type


class VisslDataset(Dataset):
    """Concatenated sources with transforms, returning ``{"data", "label", "index", "seed", "bad", "bad_path"}``.

    Indices are ``(index, seed)`` pairs from a sampler of :mod:`vissl_vit.data.sampler`:
    the transforms run under RNGs seeded with ``seed`` (the caller's RNG states are restored
    afterwards). An image that fails to load is replaced by the next readable one, and the sample is
    marked ``bad=1`` with the failed path, so the trainer can count failures and stop past a limit.

    Args:
        sources: the data sources, concatenated in order.
        transform: applied to each PIL image.
        label_type: "standard" (class), "sample_index" or "zero".
        limit: use only the first ``limit`` images; -1 for all.
    """

    def __init__(
        self,
        sources: list[ImageSource],
        transform: Callable[[Any], Any] | None,
        label_type: str = "standard",
        limit: int = -1,
    ) -> None:
        self.sources = sources
        self.transform = transform
        self.label_type = label_type
        self.offsets = np.cumsum([0] + [len(s) for s in sources]).tolist()
        total = self.offsets[-1]
        self.length = total if limit < 0 else min(limit, total)

    def __len__(self) -> int:
        return self.length

    def _locate(self, index: int) -> tuple[ImageSource, int]:
        k = bisect.bisect_right(self.offsets, index) - 1
        return self.sources[k], index - self.offsets[k]

    def _label(self, index: int) -> int:
        if self.label_type == "sample_index":
            return index
        if self.label_type == "zero":
            return 0
        source, i = self._locate(index)
        return source.label(i)

    def __getitem__(self, item: tuple[int, int] | int) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        bad_path = ""
        for attempt in range(self.length):
            j = (index + attempt) % self.length
            source, i = self._locate(j)
            try:
                img = source.load(i)
                break
            except Exception as e:  # noqa: BLE001  any decode failure: count it, take the next image
                if not bad_path:
                    bad_path = source.describe(i)
                    logger.warning("Unreadable image %s (%s: %s); using the next one", bad_path, type(e).__name__, e)
        else:
            raise DataError(f"No image of the data set could be read (the first one tried: {bad_path}).")
        data = self._transform(img, seed)
        return {
            "data": data,
            "label": self._label(j),
            "index": index,
            "seed": seed,
            "bad": int(bool(bad_path)),
            "bad_path": bad_path,
        }

    def _transform(self, img: Any, seed: int) -> Any:
        if self.transform is None:
            return img
        in_worker = torch.utils.data.get_worker_info() is not None
        # in the main process (0 workers) the caller's RNG streams (dropout...) must not move
        states = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # the CPU generator only: torch.manual_seed would also queue a CUDA seeding, recording a
        # stack trace each time (1 ms a sample); transforms run on the CPU
        torch.default_generator.manual_seed(seed)
        try:
            return self.transform(img)
        finally:
            if states is not None:
                random.setstate(states[0])
                np.random.set_state(states[1])
                torch.set_rng_state(states[2])
