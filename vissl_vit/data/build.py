"""build_dataset and build_dataloader: DATA.* -> dataset -> sampler -> collator -> loader."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.context
import os
import signal
import threading
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from vissl_vit.data.dataset import VisslDataset, effective_label_type
from vissl_vit.data.datasets.synthetic import SyntheticSource
from vissl_vit.data.sampler import IndexSampler, build_sampler
from vissl_vit.data.transforms import build_transforms
from vissl_vit.engine.run_lock import close_inherited_locks
from vissl_vit.errors import ConfigError
from vissl_vit.registry import COLLATORS, DATASETS

logger = logging.getLogger(__name__)


def build_dataset(cfg: DictConfig, split: str) -> VisslDataset:
    """The dataset of ``DATA.<split>`` (split is "TRAIN" or "TEST").

    Args:
        cfg: the ``config`` node.
        split: "TRAIN" or "TEST".
    """
    d = cfg.DATA[split]
    where = f"config.DATA.{split}"
    sources = []
    for k, source in enumerate(d.DATA_SOURCES):
        name = d.DATASET_NAMES[k] if len(d.DATASET_NAMES) else source
        if source == "synthetic":
            s = cfg.DATA.SYNTHETIC
            seed = cfg.SEED_VALUE + (0 if split == "TRAIN" else 1)
            sources.append(SyntheticSource(s.NUM_IMAGES, s.IMAGE_SIZE, s.NUM_CHANNELS, s.NUM_CLASSES, seed))
            continue
        if k >= len(d.DATA_PATHS):
            raise ConfigError(f"{where}.DATA_PATHS needs a path for data source {k} ('{source}', '{name}').")
        label_path = None
        if len(d.LABEL_SOURCES) > k and d.LABEL_SOURCES[k] == "disk_filelist":
            if k >= len(d.LABEL_PATHS):
                raise ConfigError(f"{where}.LABEL_PATHS needs a .npy label file for data source {k}.")
            label_path = d.LABEL_PATHS[k]
        factory = DATASETS.get(source)
        sources.append(factory(d.DATA_PATHS[k], label_path, name, split == "TRAIN", d.MMAP_MODE))
    entries = with_size_transforms(cfg, split, OmegaConf.to_container(d.TRANSFORMS, resolve=True))
    transforms = build_transforms(entries, f"{where}.TRANSFORMS")
    check_makes_tensors(list(d.TRANSFORMS), f"{where}.TRANSFORMS")
    label_type = effective_label_type(d.LABEL_TYPE, list(d.LABEL_SOURCES), where)
    # SLICE picks images class by class first, then DATA_LIMIT takes the first N of those
    return VisslDataset(sources, transforms, label_type, d.DATA_LIMIT, d.SLICE, f"{where}.SLICE")


# Transforms that set the size of the image (or of each view); any entry with a ``size`` argument does too.
SIZE_TRANSFORMS = frozenset(
    {"RandomResizedCrop", "Resize", "CenterCrop", "RandomCrop", "FiveCrop", "TenCrop", "ImgPilToMultiCrop"}
)
_DISK_SOURCES = ("disk_folder", "disk_filelist", "tar_shards")  # images of any size, each its own


def sets_image_size(entries: list[dict[str, Any]]) -> bool:
    """Whether a TRANSFORMS list sets the image size (nested containers' transforms included)."""
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        if entry.get("name") in SIZE_TRANSFORMS or "size" in entry or "size_crops" in entry:
            return True
        if isinstance(entry.get("transforms"), list) and sets_image_size(entry["transforms"]):
            return True
    return False


def with_size_transforms(cfg: DictConfig, split: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A split's TRANSFORMS, with Resize + CenterCrop to the trunk's input size in front when it reads
    images from disk and no transform sets the size.

    Images on disk have any size, each its own: without a resize, a batch of them fails in
    default_collate ("stack expects each tensor to be equal size"), and images of one size other
    than the trunk's IMAGE_SIZE pass silently with interpolated position embeddings. Resizing is
    chosen over an error because it is what an evaluation pipeline does anyway (timm's and
    torchvision's: resize the shorter side, crop the centre) and it leaves a first run on one's own
    folder to one override; the inserted steps are logged, and any size-setting transform in the
    list (RandomResizedCrop, Resize, CenterCrop, RandomCrop, ImgPilToMultiCrop, any ``size``
    argument) turns it off. Synthetic and torchvision data have one known size and are left alone.

    Args:
        cfg: the ``config`` node.
        split: "TRAIN" or "TEST".
        entries: the split's TRANSFORMS as plain dicts.
    """
    if not any(s in _DISK_SOURCES for s in cfg.DATA[split].DATA_SOURCES) or sets_image_size(entries):
        return entries
    _, height, width = _trunk_input(cfg)
    size: int | list[int] = height if height == width else [height, width]
    logger.info(
        "config.DATA.%s.TRANSFORMS sets no image size: Resize(%s) and CenterCrop(%s) to the trunk's input size "
        "come first (add a RandomResizedCrop, Resize or CenterCrop to choose otherwise)",
        split,
        size,
        size,
    )
    return [{"name": "Resize", "size": size}, {"name": "CenterCrop", "size": size}] + list(entries)


def transform_names(entries: list[Any]) -> list[str]:
    """The names of a TRANSFORMS list, those nested in torchvision's containers (``transforms:``) included."""
    names: list[str] = []
    for entry in entries:
        if hasattr(entry, "keys") and "name" in entry:
            names.append(str(entry["name"]))
            nested = entry.get("transforms")
            if nested is not None and not isinstance(nested, str):
                names += transform_names(list(nested))
    return names


def check_makes_tensors(entries: list[Any], where: str) -> None:
    """Refuse a TRANSFORMS list without a ToTensor (ToTensor, PILToTensor, VISSL's ImgToTensor...):
    the loader would hand PIL images to the collator, which fails at the first step with a
    traceback from default_collate (from a loader worker).

    Args:
        entries: the split's TRANSFORMS.
        where: its config key, for the message.
    """
    names = transform_names(entries)
    if not any("ToTensor" in n for n in names):
        raise ConfigError(
            f"{where}={names} has no ToTensor: the images would reach the batch as PIL images (a default_collate "
            "error at the first step); add {name: ToTensor} after the image transforms (before Normalize)."
        )


_WARNING = "WARNING: "


def _shape(data: Any) -> str:
    if isinstance(data, torch.Tensor):
        return "x".join(str(n) for n in data.shape)
    if isinstance(data, (list, tuple)):
        shapes = [_shape(v) for v in data]
        groups = {s: shapes.count(s) for s in shapes}
        return f"{len(data)} views (" + ", ".join(f"{n} x {s}" for s, n in groups.items()) + ")"
    return type(data).__name__


def describe_data(cfg: DictConfig, split: str, dataset: VisslDataset) -> list[str]:
    """The data summary of one split, as lines to log at the start of a run: each source (its
    kind, root, number of images, classes with the first names), the labels used, and the size of
    one image after the transforms (image 0, augmented with seed 0). A line starting with
    ``WARNING: `` tells of an image that does not fit the trunk (another size: the position
    embeddings are interpolated; another number of channels: the first step fails).

    The engines call it on the primary process after building each dataset (see
    :func:`log_data_summary`).

    Args:
        cfg: the ``config`` node.
        split: "TRAIN" or "TEST".
        dataset: the split's dataset, from :func:`build_dataset`.
    """
    d = cfg.DATA[split]
    total = dataset.offsets[-1]
    limit = f" (DATA_LIMIT: the first {len(dataset)} of {total})" if len(dataset) < total else ""
    if dataset.split_slice:
        limited = f", then DATA_LIMIT: the first {len(dataset)}" if len(dataset) < dataset.sliced_length else ""
        limit = f" (SLICE {dataset.split_slice}: {dataset.sliced_length} of {total}, class by class{limited})"
    lines = [f"{split} data: {len(dataset)} images{limit}, from {len(dataset.sources)} source(s)"]
    for k, (kind, source) in enumerate(zip(d.DATA_SOURCES, dataset.sources)):
        name = f" {d.DATASET_NAMES[k]}" if k < len(d.DATASET_NAMES) else ""
        text = source.summary()
        if kind == "synthetic":
            s = cfg.DATA.SYNTHETIC
            text += f", random {s.IMAGE_SIZE}x{s.IMAGE_SIZE}, {s.NUM_CLASSES} classes (config.DATA.SYNTHETIC)"
        elif hasattr(source, "labels") and source.labels is not None and not hasattr(source, "classes"):
            text += f", {len(np.unique(np.asarray(source.labels)))} classes"
        lines.append(f"  source {k}: {kind}{name}: {text}")
    labels = {
        "standard": "the class of each image",
        "sample_index": "the image's index (classes unused)",
        "zero": "0 (classes unused)",
    }[dataset.label_type]
    lines.append(f"  labels: {labels}")
    if len(dataset):
        data = dataset[(0, 0)]["data"]
        lines.append(f"  after the transforms: {_shape(data)} (image 0)")
        channels, height, width = _trunk_input(cfg)
        first = data[0] if isinstance(data, (list, tuple)) and data else data
        if isinstance(first, torch.Tensor) and first.ndim == 3:
            if first.shape[0] != channels:
                lines.append(
                    f"{_WARNING}{split} images have {first.shape[0]} channels after the transforms, the trunk takes "
                    f"{channels} (config.MODEL.TRUNK...IN_CHANNELS)"
                )
            if tuple(first.shape[1:]) != (height, width) and not isinstance(data, (list, tuple)):
                lines.append(
                    f"{_WARNING}{split} images are {first.shape[1]}x{first.shape[2]} after the transforms, the trunk's "
                    f"IMAGE_SIZE is {height}x{width}: its position embeddings are interpolated"
                )
    return lines


def _trunk_input(cfg: DictConfig) -> tuple[int, int, int]:
    from vissl_vit.models.trunks.base import trunk_class

    return trunk_class(cfg.MODEL.TRUNK).input_shape_from_config(cfg.MODEL.TRUNK)


def log_data_summary(cfg: DictConfig, split: str, dataset: VisslDataset) -> list[str]:
    """Log :func:`describe_data`'s lines (INFO; the ``WARNING: `` ones as warnings) and return them."""
    lines = describe_data(cfg, split, dataset)
    for line in lines:
        if line.startswith(_WARNING):
            logger.warning("%s", line[len(_WARNING) :])
        else:
            logger.info("%s", line)
    return lines


# Signals that stop a run: the training process handles them (PreemptionHook finishes the step,
# checkpoints and exits 0; the launcher handles Ctrl-C), never its loader workers.
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}


def _ignore_stop_signals_but_the_parents() -> None:
    """Make this loader worker deaf to SIGTERM, SIGUSR1 and SIGINT unless its parent sends them.

    A scheduler's SIGTERM to the whole process group (SLURM, most others), or a terminal's Ctrl-C,
    would kill the workers under the training process, which then dies with "DataLoader worker
    killed" instead of writing its preemption checkpoint. Plain SIG_IGN is not enough: the loader
    (and multiprocessing at exit) stops a worker that does not finish with SIGTERM, and a worker
    deaf to it would hang its parent's exit. So the signals stay blocked (the worker was forked
    with them blocked, see _ShieldedForkProcess) and a thread takes them with sigwaitinfo, which
    tells who sent each: the parent's means "exit", anyone else's is dropped.
    """
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # (already so when forked by the context below)

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo(_STOP_SIGNALS)
            if info.si_pid == parent:
                os._exit(0)  # as torch's own worker SIGTERM handler does: the loader counts 0 as a clean stop

    threading.Thread(target=wait, name="stop-signals", daemon=True).start()


def _worker_init(_: int) -> None:
    # one intra-op thread per worker: workers are separate processes competing for the cores
    torch.set_num_threads(1)
    _ignore_stop_signals_but_the_parents()
    close_inherited_locks()  # the run folder's lock belongs to the training process


class _ShieldedForkProcess(multiprocessing.context.ForkProcess):
    """A loader worker forked with the stop signals blocked in the forking thread. The child
    inherits the mask, and so does every thread it starts: from its first instruction, a stop
    signal waits (pending) for _worker_init's sigwaitinfo instead of killing the worker, and
    this loader's own thread is blocked only for the moment of the fork."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _ShieldedForkContext(multiprocessing.context.ForkContext):
    Process = _ShieldedForkProcess


def _loader_context(workers: int) -> multiprocessing.context.BaseContext | None:
    """The loader's multiprocessing context: fork with the stop signals blocked, wherever fork
    exists, also in spawned ranks (whose default start method is spawn): a spawned loader worker
    spends seconds importing torch, and starts threads, before _worker_init can shield it.
    Elsewhere (no fork), the default."""
    if workers == 0 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    return _ShieldedForkContext()


def _build_sampler(
    cfg: DictConfig,
    split: str,
    dataset_len: int,
    rank: int,
    world_size: int,
    step_batch: int,
    for_extraction: bool,
) -> IndexSampler:
    """The split's sampler: DeiT's repeated augmentation when ``DATA.TRAIN.REPEATED_AUGMENTATIONS``
    is above 1 (training only), otherwise the resumable distributed sampler.

    Args:
        cfg: the ``config`` node.
        split: "TRAIN" or "TEST".
        dataset_len: number of samples of the split.
        rank: this process's rank.
        world_size: number of processes.
        step_batch: per-replica samples of one optimizer step (skipped and dropped whole).
        for_extraction: every image once in data set order (never repeated).
    """
    d = cfg.DATA[split]
    kwargs: dict[str, Any] = {
        "dataset_len": dataset_len,
        "num_replicas": world_size,
        "rank": rank,
        "batch_size": step_batch,
        "shuffle": split == "TRAIN" and not for_extraction,
        "seed": cfg.SEED_VALUE,
        "drop_last": d.DROP_LAST and not for_extraction,
    }
    if split != "TRAIN" or for_extraction:
        return build_sampler("distributed", **kwargs)
    repeats = cfg.DATA.TRAIN.REPEATED_AUGMENTATIONS
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 0:
        raise ConfigError(
            f"config.DATA.TRAIN.REPEATED_AUGMENTATIONS={repeats!r} must be an integer >= 0: 0 or 1 for none, "
            "3 for DeiT's repeated augmentation."
        )
    if repeats <= 1:
        return build_sampler("distributed", **kwargs)
    if world_size < repeats and rank == 0:
        logger.warning(
            "config.DATA.TRAIN.REPEATED_AUGMENTATIONS=%d with %d process(es): some copies of an image share a "
            "process (DeiT puts them on %d different GPUs)",
            repeats,
            world_size,
            repeats,
        )
    return build_sampler("repeated_augmentation", num_repeats=repeats, **kwargs)


def build_dataloader(
    cfg: DictConfig,
    split: str,
    dataset: VisslDataset,
    rank: int,
    world_size: int,
    device: torch.device,
    for_extraction: bool = False,
) -> DataLoader:
    """The loader of one split; its sampler is ``loader.sampler`` (an IndexSampler: set_epoch / set_start_iteration).

    Args:
        cfg: the ``config`` node.
        split: "TRAIN" or "TEST".
        dataset: from build_dataset.
        rank: this process's rank.
        world_size: number of processes.
        device: where the model runs (pinned memory on CUDA only).
        for_extraction: every image once in data set order (no shuffle, no dropped tail; the
            sampler pads the last shares by repeating), collated by default_collate.
    """
    d = cfg.DATA[split]
    # the sampler skips and drops whole optimizer steps: accumulation x micro-batch
    step_batch = d.BATCHSIZE_PER_REPLICA * (cfg.OPTIMIZER.grad_accumulation_steps if split == "TRAIN" else 1)
    sampler = _build_sampler(cfg, split, len(dataset), rank, world_size, step_batch, for_extraction)
    collate: Any = COLLATORS.get("default_collate" if for_extraction else d.COLLATE_FUNCTION)
    params = OmegaConf.to_container(d.COLLATE_FUNCTION_PARAMS, resolve=True)
    if params and not for_extraction:
        collate = functools.partial(collate, **params)
    workers = cfg.DATA.NUM_DATALOADER_WORKERS
    return DataLoader(
        dataset,
        batch_size=d.BATCHSIZE_PER_REPLICA,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=cfg.DATA.PIN_MEMORY and device.type == "cuda",
        drop_last=d.DROP_LAST and not for_extraction,
        persistent_workers=workers > 0,
        prefetch_factor=cfg.DATA.PREFETCH_FACTOR if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        multiprocessing_context=_loader_context(workers),
        # a private generator: creating an iterator must not consume the global RNG (exact resume)
        generator=torch.Generator().manual_seed(cfg.SEED_VALUE),
    )
