"""Every YAML under configs/ composes, and its model, loss, optimizer and schedule build."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from tests.data.test_datasets import make_folder
from vissl_vit import build_loss, build_model, build_optimizer, compose_config, derive_run_values
from vissl_vit.config import list_configs
from vissl_vit.optim import build_lr_scheduler

OVERLAY_DIRS = ("overlays", "models", "heads")
# an overlay folder -> the config it is composed over in this test
OVERLAY_BASES = {
    "test/overlays": "test/quick_vit",
    "quickstart/overlays": "quickstart/vit_fashion_mnist",
    "pretrain/vision_transformer/supervised/models": "pretrain/vision_transformer/supervised/1gpu_vit_example",
    "pretrain/vision_transformer/supervised/deit/models": "pretrain/vision_transformer/supervised/deit/in1k_300ep",
    "pretrain/vision_transformer/supervised/deit3/models": "pretrain/vision_transformer/supervised/deit3/in1k_800ep",
    "pretrain/vision_transformer/supervised/simplevit/heads": "pretrain/vision_transformer/supervised/simplevit_s16_i1k",
    "pretrain/vision_transformer/supervised/rescalevit/overlays": (
        "pretrain/vision_transformer/supervised/rescalevit/cifar10_b16"
    ),
    "pretrain/vision_transformer/supervised/simplest/overlays": (
        "pretrain/vision_transformer/supervised/simplest/cifar10_s4_tat"
    ),
    "pretrain/vision_transformer/moco/models": "pretrain/vision_transformer/moco/vit_s16_mocov3",
    "pretrain/vision_transformer/swav/models": "pretrain/vision_transformer/swav/deit_s16",
    "benchmark/linear_image_classification/fashion_mnist/models": (
        "benchmark/linear_image_classification/fashion_mnist/eval_linear"
    ),
    "benchmark/linear_image_classification/imagenet1k/models": (
        "benchmark/linear_image_classification/imagenet1k/eval_linear"
    ),
    "benchmark/nearest_neighbor/fashion_mnist/models": "benchmark/nearest_neighbor/fashion_mnist/eval_knn",
    "benchmark/nearest_neighbor/imagenet1k/models": "benchmark/nearest_neighbor/imagenet1k/eval_knn",
}
# the benchmark configs that leave PARAMS_FILE to the user refuse a random trunk; allowed here
ALLOW_RANDOM = "config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True"
# overlays that only make sense over a particular config of their folder
OVERLAY_BASE_OVERRIDES = {"test/overlays/moco_v2": "test/quick_moco"}
MAIN = [c for c in list_configs() if not set(Path(c).parts) & set(OVERLAY_DIRS)]
OVERLAYS = [c for c in list_configs() if set(Path(c).parts) & set(OVERLAY_DIRS)]


def _build(overrides: list[str]) -> None:
    cfg = compose_config(overrides).config
    world = cfg.DISTRIBUTED.NUM_NODES * cfg.DISTRIBUTED.NUM_PROC_PER_NODE
    size = 4 * cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA * world
    lr = cfg.OPTIMIZER.param_schedulers.lr
    if lr.name == "big_vision":  # a warm-up counted in steps needs a run longer than it
        epochs = max(cfg.OPTIMIZER.num_epochs, 1)
        size = max(size, -(-(lr.warmup_steps + 2) // epochs) * size // 4 * cfg.OPTIMIZER.grad_accumulation_steps)
    derived = derive_run_values(cfg, train_dataset_size=size)
    vit = cfg.MODEL.TRUNK.VISION_TRANSFORMERS
    small = vit.HIDDEN_DIM <= 128
    # the published sizes (ViT-B/L, ConViT-B) are built on the meta device: their structure, parameter
    # names and optimizer groups, without the seconds their CPU initialisation takes
    with contextlib.nullcontext() if small else torch.device("meta"):
        model = build_model(cfg)
    build_loss(cfg)
    if cfg.ENGINE_NAME == "train":  # the evaluation engines train nothing
        build_optimizer(cfg, model)
        sched = build_lr_scheduler(derived)
        assert sched(0.5) >= 0.0
    if small:  # a forward and a loss on the small models
        x = torch.randn(2, vit.IN_CHANNELS, vit.IMAGE_SIZE, vit.IMAGE_SIZE)
        views = {"moco_collator": 2, "multicrop_collator": cfg.LOSS.swav_loss.num_crops}
        if cfg.DATA.TRAIN.COLLATE_FUNCTION == "cutmixup_collator" and cfg.LOSS.name == "swav_loss":
            views["cutmixup_collator"] = cfg.LOSS.swav_loss.num_crops
        n = views.get(cfg.DATA.TRAIN.COLLATE_FUNCTION)
        out = model([x] * n if n else x)
        loss = build_loss(cfg)(out, torch.zeros(2, dtype=torch.long))
        assert torch.isfinite(loss)


# the configs whose head counts the classes of the user's folder (num_classes: auto) get one
OWN_DATA = "own_data/"


@pytest.mark.parametrize("name", MAIN)
def test_config_composes_and_builds(name, tmp_path):
    data = []
    if name.startswith(OWN_DATA):
        for split in ("train", "val"):
            make_folder(tmp_path / "imgs" / split, classes=("ant", "bee", "cat"))
        data = [f"config.DATA.TRAIN.DATA_PATHS=[{tmp_path / 'imgs'}]"]
    _build([f"config={name}", "config.MACHINE.DEVICE=cpu", ALLOW_RANDOM, *data])


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_composes_and_builds(name):
    group, leaf = str(Path(name).parent), Path(name).name
    assert group in OVERLAY_BASES, f"add a base config for the overlay folder {group} to OVERLAY_BASES"
    base = OVERLAY_BASE_OVERRIDES.get(name, OVERLAY_BASES[group])
    _build([f"config={base}", f"+config/{group}={leaf}", "config.MACHINE.DEVICE=cpu", ALLOW_RANDOM])
