"""build_dataset and build_dataloader: DATA.* -> dataset -> sampler -> collator -> loader."""

from __future__ import annotations

import functools
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from vissl_vit.data.dataset import VisslDataset
from vissl_vit.data.datasets.synthetic import SyntheticSource
from vissl_vit.data.sampler import ResumableDistributedSampler
from vissl_vit.data.transforms import build_transforms
from vissl_vit.errors import ConfigError
from vissl_vit.registry import COLLATORS, DATASETS


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
    return VisslDataset(sources, transforms, d.LABEL_TYPE, d.DATA_LIMIT)


def _worker_init(_: int) -> None:
    # one intra-op thread per worker: workers are separate processes competing for the cores
    torch.set_num_threads(1)


def build_dataloader(
    cfg: DictConfig,
    split: str,
    dataset: VisslDataset,
    rank: int,
    world_size: int,
    device: torch.device,
    for_extraction: bool = False,
) -> DataLoader:
    """The loader of one split; its sampler is ``loader.sampler`` (set_epoch / set_start_iteration).

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
    sampler = ResumableDistributedSampler(
        len(dataset),
        world_size,
        rank,
        step_batch,
        shuffle=split == "TRAIN" and not for_extraction,
        seed=cfg.SEED_VALUE,
        drop_last=d.DROP_LAST and not for_extraction,
    )
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
        # a private generator: creating an iterator must not consume the global RNG (exact resume)
        generator=torch.Generator().manual_seed(cfg.SEED_VALUE),
    )
