"""The ``extract_features`` and ``nearest_neighbor`` engines.

extract_features: every process runs the frozen trunk (weights from MODEL.WEIGHTS_INIT) over its
share of each split (in data set order, rank r taking every world-th image), writes its features,
image indices and labels as ``rank{r}_<split>_<feature>_{features,inds,targets}.npy``, and rank 0
merges the shards into ``<split>_<feature>_*.npy`` sorted by image index (the padding that evens out
the shares is dropped) and removes them. Files are written atomically.

nearest_neighbor: extract_features (or read EXTRACT_FEATURES' files from NEAREST_NEIGHBOR.FEATURES_DIR),
then weighted kNN on rank 0; see NEAREST_NEIGHBOR in defaults.yaml.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from vissl_vit.benchmark.knn import knn_search, weighted_knn_accuracy
from vissl_vit.data import build_dataloader, build_dataset
from vissl_vit.data.build import log_data_summary
from vissl_vit.engine.hooks.guards import BadImages, bad_in_batches, gather_objects
from vissl_vit.engine.parallel import amp_dtype
from vissl_vit.engine.train_engine import get_device, seed_all
from vissl_vit.errors import UserError
from vissl_vit.models import apply_weights_init, build_model
from vissl_vit.models.feature_eval import FeatureEvalModel, feature_names, parse_pool_ops_map
from vissl_vit.utils.distributed import get_world_size
from vissl_vit.utils.environment import write_environment
from vissl_vit.utils.logging import progress_bar, setup_logging
from vissl_vit.utils.tensors import to_device

logger = logging.getLogger(__name__)
KINDS = ("features", "inds", "targets")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def features_dir(cfg: DictConfig) -> str:
    """EXTRACT_FEATURES.OUTPUT_DIR, or <CHECKPOINT.DIR>/features."""
    return os.path.abspath(cfg.EXTRACT_FEATURES.OUTPUT_DIR or os.path.join(cfg.CHECKPOINT.DIR, "features"))


def feature_file(folder: str, split: str, name: str, kind: str) -> str:
    """<folder>/<split>_<name>_<kind>.npy, split in lower case as in VISSL."""
    return os.path.join(folder, f"{split.lower()}_{name}_{kind}.npy")


def _default_feature(cfg: DictConfig) -> str:
    """The trunk's default feature (its ``default_feature()``), from the config."""
    from vissl_vit.models.trunks.base import trunk_class

    return trunk_class(cfg.MODEL.TRUNK).default_feature_from_config(cfg.MODEL.TRUNK)


def extracts_trunk_features(cfg: DictConfig, num_heads: int) -> bool:
    """Whether extraction writes trunk features (else the head chain's output, feature "heads").

    EVAL_TRUNK_AND_HEAD evaluates the whole model (VISSL's kNN base configs: FREEZE_TRUNK_AND_HEAD
    with EVAL_TRUNK_AND_HEAD, so that VISSL's kNN runs on "heads"); otherwise
    EXTRACT_TRUNK_FEATURES_ONLY decides. Without heads there is only the trunk.
    """
    fe = cfg.MODEL.FEATURE_EVAL_SETTINGS
    return not num_heads or (fe.EXTRACT_TRUNK_FEATURES_ONLY and not fe.EVAL_TRUNK_AND_HEAD)


def build_extraction_model(cfg: DictConfig) -> tuple[FeatureEvalModel, list[str], bool]:
    """The frozen model, the names of what it outputs, and whether they are trunk features."""
    fe = cfg.MODEL.FEATURE_EVAL_SETTINGS
    base = build_model(cfg)
    apply_weights_init(base, cfg)
    names, pools = parse_pool_ops_map(OmegaConf.to_container(fe.LINEAR_EVAL_FEAT_POOL_OPS_MAP, resolve=True))
    trunk_only = extracts_trunk_features(cfg, len(base.heads))
    if isinstance(base, FeatureEvalModel):
        model = base
    else:  # a training config (e.g. the pretraining one): its trunk, and its head chain when asked for
        heads = [] if trunk_only else list(base.heads)
        model = FeatureEvalModel(
            base.trunk, heads, names or None, pools, fe.SHOULD_FLATTEN_FEATS, freeze_heads=bool(heads)
        )
    model.eval()
    return model, (names or [_default_feature(cfg)]) if trunk_only else ["heads"], trunk_only


def _shard(folder: str, rank: int, split: str, name: str, kind: str) -> str:
    return os.path.join(folder, f"rank{rank}_{split.lower()}_{name}_{kind}.npy")


@torch.no_grad()
def _extract_split(
    model: FeatureEvalModel,
    loader: DataLoader,
    trunk_only: bool,
    device: torch.device,
    dtype: torch.dtype | None,
    names: list[str],
    shard: Any,
    bar: Any = None,
) -> tuple[int, dict[int, str]]:
    """Write this rank's shards, streaming the features into memory-mapped .npy files (so a rank
    never holds its share in memory); returns the number of images written and the unreadable
    images met (data set index -> path; another image's features took their place).

    Args:
        shard: ``shard(name, kind)`` -> the path of one of this rank's shard files.
        bar: a progress bar (``progress_bar``) advanced per batch, or None.
    """
    n = len(loader.sampler)
    inds, targets = np.zeros(n, np.int64), np.zeros(n, np.int64)
    feats: list[np.ndarray] = []
    pos = 0
    bad: dict[int, str] = {}
    for batch in loader:
        bad.update(bad_in_batches([batch]))
        if isinstance(batch["data"], (list, tuple)):
            raise UserError(
                "Feature extraction takes one view per image, but the transforms make several (a pretraining "
                "config?): give both splits deterministic transforms, as the configs under benchmark/ do."
            )
        x = to_device(batch["data"], device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model.features(x) if trunk_only else model(x)
        b = out[0].shape[0]
        if not feats:  # the shapes are known now: one preallocated file per feature
            feats = [
                np.lib.format.open_memmap(shard(name, "features") + ".tmp", "w+", np.float32, (n, *f.shape[1:]))
                for name, f in zip(names, out)
            ]
        for mm, f in zip(feats, out):
            mm[pos : pos + b] = f.float().cpu().numpy()
        inds[pos : pos + b] = batch["index"].numpy()
        targets[pos : pos + b] = batch["label"].numpy()
        pos += b
        if bar is not None:
            bar.update(1)
    for name, mm in zip(names, feats):
        mm.flush()
        del mm
        os.replace(shard(name, "features") + ".tmp", shard(name, "features"))
    for name in names:
        if not feats:  # no images on this rank: empty shards, so that the merge finds them
            _save_npy(shard(name, "features"), np.zeros((0, 0), np.float32))
        _save_npy(shard(name, "inds"), inds[:pos])
        _save_npy(shard(name, "targets"), targets[:pos])
    return pos, bad


def _merge(folder: str, split: str, name: str, world_size: int, chunk: int = 65536) -> int:
    """Rank 0: join the ranks' shards in data set order, drop the padding (repeated indices), and
    remove the shards; returns the image count. Features are copied in chunks of rows between
    memory-mapped files."""
    shard = {(r, kind): _shard(folder, r, split, name, kind) for r in range(world_size) for kind in KINDS}
    inds = [np.load(shard[r, "inds"]) for r in range(world_size)]
    if not sum(len(i) for i in inds):
        raise UserError(f"{split} has no images to extract features from.")
    offsets = np.cumsum([0] + [len(i) for i in inds])
    unique, first = np.unique(np.concatenate(inds), return_index=True)  # sorted by image index
    targets = np.concatenate([np.load(shard[r, "targets"]) for r in range(world_size)])[first]
    feats = [np.load(shard[r, "features"], mmap_mode="r") for r in range(world_size)]
    shape = next(f.shape for f in feats if len(f))
    out_path = feature_file(folder, split, name, "features")
    out = np.lib.format.open_memmap(out_path + ".tmp", "w+", np.float32, (len(unique), *shape[1:]))
    for start in range(0, len(first), chunk):
        pos = first[start : start + chunk]
        rank_of = np.searchsorted(offsets, pos, side="right") - 1
        for r in np.unique(rank_of):
            rows = rank_of == r
            out[start : start + chunk][rows] = feats[r][pos[rows] - offsets[r]]
    out.flush()
    del out, feats
    os.replace(out_path + ".tmp", out_path)
    _save_npy(feature_file(folder, split, name, "inds"), unique)
    _save_npy(feature_file(folder, split, name, "targets"), targets)
    for path in shard.values():
        os.remove(path)
    return len(unique)


def _setup(cfg_root: DictConfig, rank: int, local_rank: int) -> tuple[DictConfig, str, torch.device]:
    OmegaConf.set_readonly(cfg_root, True)
    cfg = cfg_root.config
    run_dir = os.path.abspath(cfg.CHECKPOINT.DIR)
    os.makedirs(run_dir, exist_ok=True)
    setup_logging(run_dir, rank, all_ranks=cfg.LOG_ALL_RANKS)
    if cfg.MACHINE.CPU_THREADS > 0:
        torch.set_num_threads(cfg.MACHINE.CPU_THREADS)
    if rank == 0:
        tmp = os.path.join(run_dir, f".{cfg.ENGINE_NAME}_config.yaml.tmp")
        with open(tmp, "w") as f:
            f.write(OmegaConf.to_yaml(cfg_root))
        os.replace(tmp, os.path.join(run_dir, f"{cfg.ENGINE_NAME}_config.yaml"))
        write_environment(run_dir, get_world_size())  # env.json: versions, devices, git commit, command
    seed_all(cfg.SEED_VALUE)
    return cfg, run_dir, get_device(cfg, local_rank)


def extract_features(cfg: DictConfig, rank: int, world_size: int, device: torch.device) -> tuple[str, list[str]]:
    """Write the merged feature files of EXTRACT_FEATURES.SPLITS; returns (folder, feature names)."""
    folder = features_dir(cfg)
    os.makedirs(folder, exist_ok=True)
    model, names, trunk_only = build_extraction_model(cfg)
    model.to(device)
    dtype = amp_dtype(cfg, device)
    for split in cfg.EXTRACT_FEATURES.SPLITS:
        start = time.perf_counter()
        shard = functools.partial(_shard, folder, rank, split)
        dataset = build_dataset(cfg, split)
        if rank == 0:
            log_data_summary(cfg, split, dataset)
        loader = build_dataloader(cfg, split, dataset, rank, world_size, device, for_extraction=True)
        show = rank == 0 and cfg.HOOKS.PROGRESS_BAR.USE_PROGRESS_BAR
        bar = progress_bar(show, len(loader), f"extract {split}", unit="batch")  # on a terminal only
        try:
            _, bad = _extract_split(model, loader, trunk_only, device, dtype, names, shard, bar)
        finally:
            if bar is not None:
                bar.close()
        # every rank takes part in the gather and raises alike: no rank is left waiting in the barrier
        tally = BadImages(split, len(dataset), cfg.DATA.MAX_BAD_IMAGE_FRACTION)
        tally.report_and_check(gather_objects(bad), " during feature extraction")
        _barrier()
        if rank == 0:
            for name in names:
                n = _merge(folder, split, name, world_size)
                logger.info(
                    "%s %s features of %d images -> %s (%.1f s)",
                    split,
                    name,
                    n,
                    feature_file(folder, split, name, "features"),
                    time.perf_counter() - start,
                )
        _barrier()
    return folder, names


def run_extract_features_engine(
    cfg_root: DictConfig, rank: int = 0, local_rank: int = 0, world_size: int = 1
) -> tuple[str, list[str]]:
    """ENGINE_NAME extract_features."""
    cfg, _, device = _setup(cfg_root, rank, local_rank)
    return extract_features(cfg, rank, world_size, device)


def load_features(folder: str, split: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], labels [N]) of a split from extract_features' files."""
    paths = [feature_file(folder, split, name, kind) for kind in ("features", "targets")]
    for p in paths:
        if not os.path.exists(p):
            there = sorted(os.path.basename(f) for f in glob.glob(os.path.join(folder, "*_features.npy")))
            raise UserError(f"No feature file {p}; {folder} holds: {', '.join(there) or 'no features'}.")
    feats, labels = (torch.from_numpy(np.load(p)) for p in paths)
    if feats.ndim != 2:
        raise UserError(f"{paths[0]} holds features of shape {tuple(feats.shape)}; kNN needs flat [N, D] features.")
    return feats.float(), labels.long()


def nearest_neighbor(cfg: DictConfig, folder: str, feature: str) -> dict[str, Any]:
    """Weighted kNN of TEST's features against TRAIN's (rank 0); returns the record."""
    nn_cfg = cfg.NEAREST_NEIGHBOR
    train_feats, train_labels = load_features(folder, "TRAIN", feature)
    test_feats, test_labels = load_features(folder, "TEST", feature)
    start = time.perf_counter()
    # VISSL's knn_utils normalises only with L2_NORM_FEATS; raw inner products otherwise
    bank, queries = train_feats, test_feats
    if nn_cfg.L2_NORM_FEATS:
        bank, queries = F.normalize(train_feats, dim=1), F.normalize(test_feats, dim=1)
    ks = list(nn_cfg.TOPK)
    sim, idx = knn_search(bank, queries, max(ks), nn_cfg.BACKEND, nn_cfg.INDEX, nn_cfg.IVF_NLIST, nn_cfg.IVF_NPROBE)
    results = weighted_knn_accuracy(sim, idx, train_labels, test_labels, ks, nn_cfg.TEMPERATURE)
    return {
        "weights": cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE or "random-init",
        "feature": feature,
        "temperature": nn_cfg.TEMPERATURE,
        "l2_norm_feats": bool(nn_cfg.L2_NORM_FEATS),
        "backend": nn_cfg.BACKEND,
        "index": nn_cfg.INDEX,
        "train_images": int(train_labels.shape[0]),
        "test_images": int(test_labels.shape[0]),
        "results": results,
        "search_seconds": round(time.perf_counter() - start, 2),
    }


def format_knn_table(record: dict[str, Any]) -> str:
    """The printed result table."""
    lines = [
        f"kNN ({record['feature']} features, T={record['temperature']}, {record['backend']} {record['index']}) "
        f"of {record['weights']}: {record['test_images']} queries, {record['train_images']} bank images",
        "    k   top-1   top-5",
    ]
    for k, r in record["results"].items():
        lines.append(f"{k:>5}  {r['top_1']:6.2f}  {r['top_5']:6.2f}")
    return "\n".join(lines)


def run_nearest_neighbor_engine(
    cfg_root: DictConfig, rank: int = 0, local_rank: int = 0, world_size: int = 1
) -> dict[str, Any] | None:
    """ENGINE_NAME nearest_neighbor; returns the record on rank 0."""
    cfg, run_dir, device = _setup(cfg_root, rank, local_rank)
    if cfg.NEAREST_NEIGHBOR.FEATURES_DIR:
        folder = os.path.abspath(cfg.NEAREST_NEIGHBOR.FEATURES_DIR)
        names = feature_names(cfg.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP) or [_default_feature(cfg)]
        if not extracts_trunk_features(cfg, len(cfg.MODEL.HEAD.PARAMS)):
            names = ["heads"]
    else:
        folder, names = extract_features(cfg, rank, world_size, device)
    if rank != 0:
        return None
    feature = cfg.NEAREST_NEIGHBOR.FEATURE or names[0]
    record = nearest_neighbor(cfg, folder, feature)
    print(format_knn_table(record), flush=True)
    with open(os.path.join(run_dir, "nearest_neighbor.json"), "a") as f:
        f.write(json.dumps(record) + "\n")
    return record
