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
    transforms = build_transforms(OmegaConf.to_container(d.TRANSFORMS, resolve=True), f"{where}.TRANSFORMS")
    label_type = effective_label_type(d.LABEL_TYPE, list(d.LABEL_SOURCES), where)
    return VisslDataset(sources, transforms, label_type, d.DATA_LIMIT)


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
