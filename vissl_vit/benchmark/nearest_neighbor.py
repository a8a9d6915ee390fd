"""kNN evaluation of a trained (or randomly initialised) trunk, from a run's config.

    python tools/nearest_neighbor_test.py config=quickstart/mocov3_fashion_mnist [--random-init]

The memory bank is DATA.TRAIN's images with DATA.TEST's (deterministic) transforms and their
class labels; the queries are DATA.TEST. Weights come from the newest checkpoint of
CHECKPOINT.DIR (or --weights PATH). Results are printed and appended to
<CHECKPOINT.DIR>/nearest_neighbor.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from vissl_vit.benchmark.knn import extract_features, knn_classify
from vissl_vit.config import compose_config
from vissl_vit.data.build import build_dataset
from vissl_vit.data.collators.default import default_collate
from vissl_vit.engine.checkpoint import find_latest, load_checkpoint, load_model_state
from vissl_vit.engine.train_engine import get_device, seed_all
from vissl_vit.errors import UserError
from vissl_vit.models import build_model
from vissl_vit.utils.cli import cli_main, split_options
from vissl_vit.utils.logging import setup_logging

USAGE = """usage: python tools/nearest_neighbor_test.py config=<path> [config.KEY=value ...]
                                         [--weights PATH | --random-init] [--k 10,20,100,200]
                                         [--temperature 0.07] [--feature lastCLS]
"""


def _parse(argv: list[str]) -> tuple[list[str], dict]:
    return split_options(
        argv,
        values={
            "--weights": ("weights", str),
            "--k": ("k", lambda v: [int(k) for k in v.split(",")]),
            "--temperature": ("temperature", float),
            "--feature": ("feature", str),
        },
        switches={"--random-init": ("random_init", True)},
        defaults={"weights": None, "random_init": False, "k": [10, 20, 100, 200], "temperature": 0.07, "feature": None},
        usage=USAGE,
    )


def _loader(cfg, split: str, sources_split: str) -> DataLoader:
    # images of `sources_split`, with the test split's transforms, batch size and class labels
    merged = OmegaConf.merge(cfg, {"DATA": {split: {"LABEL_TYPE": "standard"}}})
    merged.DATA[split].DATA_SOURCES = cfg.DATA[sources_split].DATA_SOURCES
    merged.DATA[split].DATASET_NAMES = cfg.DATA[sources_split].DATASET_NAMES
    merged.DATA[split].DATA_PATHS = cfg.DATA[sources_split].DATA_PATHS
    merged.DATA[split].LABEL_SOURCES = cfg.DATA[sources_split].LABEL_SOURCES
    merged.DATA[split].LABEL_PATHS = cfg.DATA[sources_split].LABEL_PATHS
    merged.DATA[split].DATA_LIMIT = cfg.DATA[sources_split].DATA_LIMIT
    dataset = build_dataset(merged, split)
    return DataLoader(
        dataset,
        batch_size=cfg.DATA.TEST.BATCHSIZE_PER_REPLICA,
        num_workers=cfg.DATA.NUM_DATALOADER_WORKERS,
        collate_fn=default_collate,
    )


def run(argv: list[str]) -> dict:
    """Evaluate and return {"weights": ..., "results": {k: {"top_1", "top_5"}}}."""
    overrides, opts = _parse(argv)
    root = compose_config(overrides)
    cfg = OmegaConf.create(OmegaConf.to_container(root.config))
    if not cfg.DATA.TEST.DATA_SOURCES:
        raise UserError("kNN needs DATA.TEST (the queries and their transforms); the config has none.")
    run_dir = os.path.abspath(cfg.CHECKPOINT.DIR)
    setup_logging(None, 0)
    seed_all(cfg.SEED_VALUE)
    device = get_device(cfg, 0)
    model = build_model(cfg)
    weights = "random-init"
    if not opts["random_init"]:
        weights = opts["weights"] or find_latest(run_dir)
        if weights is None:
            raise UserError(f"No checkpoint in {run_dir}: train first, pass --weights PATH, or use --random-init.")
        load_model_state(model, load_checkpoint(weights)["classy_state_dict"]["base_model"]["model"])
    trunk = model.trunk.to(device)
    start = time.perf_counter()
    train_feats, train_labels = extract_features(trunk, _loader(cfg, "TEST", "TRAIN"), device, opts["feature"])
    test_feats, test_labels = extract_features(trunk, _loader(cfg, "TEST", "TEST"), device, opts["feature"])
    results = {
        str(k): knn_classify(train_feats, train_labels, test_feats, test_labels, k, opts["temperature"])
        for k in opts["k"]
    }
    record = {
        "weights": weights,
        "feature": opts["feature"] or "default",
        "temperature": opts["temperature"],
        "train_images": len(train_labels),
        "test_images": len(test_labels),
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(f"kNN ({record['feature']} features, T={opts['temperature']}) of {weights}:")
    print("    k   top-1   top-5")
    for k, r in results.items():
        print(f"{k:>5}  {r['top_1']:6.2f}  {r['top_5']:6.2f}")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "nearest_neighbor.json"), "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli_main(run, sys.argv[1:] if argv is None else argv, USAGE)
