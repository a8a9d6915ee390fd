"""The dataset every loader reads: sources -> (seeded) transforms -> sample dicts, with bad-image handling."""

from __future__ import annotations

import bisect
import logging
import random
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vissl_vit.data.datasets.base import ImageSource
from vissl_vit.errors import ConfigError, DataError

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


# TFDS's split-slice syntax, the bracket part: "[:99%]", "[99%:]", "[-10:]", "[10:20]", "[:33.3%]"
_BOUND = r"\s*(-?\d+(?:\.\d+)?%|-?\d+)?\s*"
_SLICE_RE = re.compile(rf"^\[{_BOUND}:{_BOUND}\]$")


def parse_slice(spec: str, where: str) -> tuple[str | None, str | None]:
    """The two bounds of a split slice ``"[from:to]"`` as written (None when left out).

    Each bound is an int (images) or a percentage (``99%``, ``33.5%``), negative from the end, as in
    TFDS (``train[:99%]``); ``""`` is the whole split, returned as ``(None, None)``. The brackets may
    be left out (``99%:``): on a command line and in YAML a bare ``[99%:]`` reads as a list.

    Args:
        spec: the slice string.
        where: its config key, for the message.
    """
    text = "" if spec is None else str(spec).strip()
    if text == "":
        return None, None
    m = _SLICE_RE.match(text if text.startswith("[") else f"[{text}]")  # "99%:" as "[99%:]"
    bad = [b for b in (m.groups() if m else ()) if b and b.endswith("%") and abs(float(b[:-1])) > 100]
    if m is None or bad:
        raise ConfigError(
            f"{where}={spec!r} is not a split slice: expected '[from:to]' with each bound empty, an int or a "
            "percentage within [-100%, 100%] (e.g. '[:99%]', '[99%:]', '[-10:]', '[:1000]'; quoted in YAML, or "
            "without the brackets: 99%:), or '' for all."
        )
    return m.group(1), m.group(2)


def _class_boundary(bound: str | None, n: int, default: int) -> int:
    """One slice bound as an index into a class of ``n`` images.

    A percentage rounds to the closest image, as TFDS's default rounding; a negative bound counts
    from the end. A percentage strictly between 0% and 100% (either sign) stays in [1, n - 1] for
    a class of two images or more, so that both sides of the cut keep every such class.
    """
    if bound is None:
        return default
    if bound.endswith("%"):
        pct = float(bound[:-1])
        b = int(round(pct * n / 100))
        b = n + b if pct < 0 else b
        if 0 < abs(pct) < 100 and n >= 2:
            b = min(max(b, 1), n - 1)
    else:
        b = int(bound)
        b = n + b if b < 0 else b
    return min(max(b, 0), n)


def slice_indices(labels: np.ndarray, spec: str, where: str) -> np.ndarray:
    """The indices a split slice keeps of one source whose images have ``labels``, in increasing order.

    The slice applies to each class on its own (class-balanced): ``[:99%]`` keeps the first 99% of
    every class's images in the source's order and ``[99%:]`` the rest, so the two are disjoint and
    together the whole source, and a class of two images or more is in both. An int bound counts
    images of each class: ``[-10:]`` is the last 10 images of every class. Unlabeled images (label
    -1) form one group. big_vision slices ``train[:99%]`` of TFDS's shuffled ImageNet; a plain
    slice of a class-ordered folder would instead leave whole classes out (mup-vit's finding).

    Args:
        labels: one label per image of the source.
        spec: the slice, see :func:`parse_slice`.
        where: its config key, for the message.
    """
    lo, hi = parse_slice(spec, where)
    labels = np.asarray(labels)
    if lo is None and hi is None:
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")  # grouped by class, each group in the source's order
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    keep = []
    for start, n in zip(starts.tolist(), counts.tolist()):
        a, b = _class_boundary(lo, n, 0), _class_boundary(hi, n, n)
        keep.append(order[start + a : start + max(a, b)])
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


def source_labels(source: ImageSource) -> np.ndarray:
    """Every label of a source, at once when it can give them (``all_labels``, a ``labels`` array)."""
    if callable(getattr(source, "all_labels", None)):
        return np.asarray(source.all_labels())
    labels = getattr(source, "labels", None)
    if labels is not None and not callable(labels) and len(labels) == len(source):
        return np.asarray(labels)
    return np.fromiter((source.label(i) for i in range(len(source))), np.int64, len(source))


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
        limit: use only the first ``limit`` images (of those the slice keeps); -1 for all.
        split_slice: a TFDS-style slice applied to each source, class by class
            (:func:`slice_indices`), before ``limit``; "" for all.
        slice_key: the config key of ``split_slice``, for error messages.
    """

    def __init__(
        self,
        sources: list[ImageSource],
        transform: Callable[[Any], Any] | None,
        label_type: str = "standard",
        limit: int = -1,
        split_slice: str = "",
        slice_key: str = "SLICE",
    ) -> None:
        self.sources = sources
        self.transform = transform
        self.label_type = label_type
        self.offsets = np.cumsum([0] + [len(s) for s in sources]).tolist()
        self.split_slice = "" if split_slice is None else str(split_slice).strip()
        # kept images as indices into the concatenated sources; None keeps them all (no copy)
        self.indices: np.ndarray | None = None
        if parse_slice(self.split_slice, slice_key) != (None, None):
            self.indices = np.concatenate(
                [
                    off + slice_indices(source_labels(s), self.split_slice, slice_key)
                    for s, off in zip(sources, self.offsets)
                ]
            ).astype(np.int64)
        self.sliced_length = self.offsets[-1] if self.indices is None else len(self.indices)
        self.length = self.sliced_length if limit < 0 else min(limit, self.sliced_length)

    def __len__(self) -> int:
        return self.length

    def _locate(self, index: int) -> tuple[ImageSource, int]:
        k = bisect.bisect_right(self.offsets, index) - 1
        return self.sources[k], index - self.offsets[k]

    def _global(self, index: int) -> int:
        """The index into the concatenated sources of dataset item ``index``."""
        return index if self.indices is None else int(self.indices[index])

    def _label(self, index: int) -> int:
        if self.label_type == "sample_index":
            return index
        if self.label_type == "zero":
            return 0
        source, i = self._locate(self._global(index))
        return source.label(i)

    def __getitem__(self, item: tuple[int, int] | int) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        bad_path = ""
        for attempt in range(self.length):
            j = (index + attempt) % self.length
            source, i = self._locate(self._global(j))
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
