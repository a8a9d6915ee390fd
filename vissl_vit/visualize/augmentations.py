"""What the model sees: the first training batches, built exactly as the train engine builds them
(``build_dataset`` + ``build_dataloader`` with DATA.TRAIN's transforms and collator, then
DATA.TRAIN.DEVICE_MIXUP as the trainer applies it), drawn as a grid of images, denormalised::

    python tools/plot_augmentations.py config=test/quick_swav --samples 6
    python tools/plot_augmentations.py --run ./runs/my_run --out aug.png

One row per sample. Multi-view batches (MoCo's two views, SwAV / DINO multi-crop) show every view
of the sample along its row, each at its own size (an 8 px crop beside a 16 px one is half as
big); single-view batches show one image per sample. Titles say the label; where the targets are
soft (``cutmixup_collator``, DEVICE_MIXUP) they give the two classes of largest weight with their
weights (``3: 0.62 | 1: 0.38``), and the collator's ``mix_lambda`` when there is one.

The batches are those of the run's first epoch: the sampler at epoch 0 and each sample's seed, as
in training (the dataset seeds each sample's transforms), so the same config draws the same
picture. Runs on the CPU; no model is built.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vissl_vit.errors import ConfigError
from vissl_vit.visualize.common import denormalize, new_figure, save_png, to_display

# The largest view is drawn at least this many pixels high (small images are enlarged by a whole
# factor, nearest neighbour, so every view keeps its size relative to the others).
MIN_VIEW_PX = 96
# Pixels above each image for its title (two lines of 8 pt text), and between images.
TITLE_PX, GAP_PX, MARGIN_PX = 30, 8, 10
# Room for a title's width (a soft target's "3: 0.62 | 1: 0.38"), and single-view samples per row.
TITLE_W_PX, SINGLE_PER_ROW = 130, 4


def class_names(dataset: Any) -> list[str] | None:
    """The class names of a data set's labels (its single source's folders or shards' classes),
    or None when unknown (several sources, synthetic data, sample-index labels)."""
    sources = getattr(dataset, "sources", [])
    if len(sources) != 1 or getattr(dataset, "label_type", "standard") != "standard":
        return None
    names = getattr(sources[0], "classes", None)
    return [str(n) for n in names] if names else None


def _name(label: int, names: list[str] | None) -> str:
    return names[label] if names and 0 <= label < len(names) else str(label)


def target_title(target: torch.Tensor, names: list[str] | None, label_type: str = "standard") -> str:
    """A sample's target as a title: a class (``label 3`` or its name), a sample index (``#17``,
    SSL's LABEL_TYPE sample_index), or a soft target's two classes of largest weight
    (``3: 0.62 | 1: 0.38``)."""
    if target.is_floating_point() and target.dim() == 1 and target.numel() > 1:
        w, c = target.float().topk(min(2, target.numel()))
        return " | ".join(f"{_name(int(ci), names)}: {float(wi):.2f}" for wi, ci in zip(w, c))
    value = int(target.reshape(-1)[0])
    return f"#{value}" if label_type == "sample_index" else f"label {_name(value, names)}"


def _config_node(cfg: DictConfig) -> DictConfig:
    return cfg.config if "config" in cfg else cfg


def model_batches(cfg: DictConfig, batches: int = 1) -> tuple[list[dict[str, Any]], Any]:
    """The first ``batches`` training batches of epoch 0 as the model receives them: the engine's
    dataset, loader and collator, then DEVICE_MIXUP (the trainer's batch transform, on the CPU
    here, for micro-batch number ``b`` of rank 0, as the trainer numbers them). Returns the batches
    and the data set.

    Args:
        cfg: a composed config (the root, or its ``config`` node).
        batches: how many batches (at least 1).
    """
    from vissl_vit.data import build_dataloader, build_dataset
    from vissl_vit.data.collators.device_mixup import build_device_mixup

    cfg = _config_node(cfg)
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ConfigError(f"plot_augmentations: batches={batches!r}; expected a whole number >= 1.")
    if not len(cfg.DATA.TRAIN.DATA_SOURCES):
        raise ConfigError("config.DATA.TRAIN.DATA_SOURCES=[]: expected a training set to draw samples from.")
    dataset = build_dataset(cfg, "TRAIN")
    loader = build_dataloader(cfg, "TRAIN", dataset, 0, 1, torch.device("cpu"))
    loader.sampler.set_epoch(0)
    loader.sampler.set_start_iteration(0)
    mixup = build_device_mixup(cfg, cfg.SEED_VALUE)
    out: list[dict[str, Any]] = []
    for number, batch in enumerate(loader):
        if mixup is not None:
            # the trainer's call: number = iteration x accumulation + micro-batch, i.e. the b-th batch
            views = batch["data"] if isinstance(batch["data"], list) else [batch["data"]]
            mixed = [mixup(v, batch["label"], number, 0) for v in views]
            batch["data"] = [m[0] for m in mixed] if isinstance(batch["data"], list) else mixed[0][0]
            batch["label"] = mixed[0][1]
        out.append(batch)
        if len(out) == batches:
            break
    if not out:
        raise ConfigError("config.DATA.TRAIN: the loader gave no batch (fewer images than a batch with DROP_LAST?).")
    return out, dataset


def _cells(batch: dict[str, Any], samples: int) -> list[list[torch.Tensor]]:
    """Per sample, its views [C, H, W] (one for a single-view batch)."""
    views = batch["data"] if isinstance(batch["data"], list) else [batch["data"]]
    n = min(samples, views[0].shape[0])
    return [[v[i] for v in views] for i in range(n)]


def _mix_lambda(batch: dict[str, Any], i: int) -> float | None:
    lam = batch.get("mix_lambda")
    if not isinstance(lam, torch.Tensor):
        return None
    return float(lam[i]) if lam.dim() == 1 else float(lam[0, i])  # [B], or [crops, B] (SSL mixing)


def plot_augmentations(
    cfg: DictConfig, out: str | None = None, samples: int = 8, batches: int = 1, min_view_px: int = MIN_VIEW_PX
) -> str:
    """Draw the first ``samples`` samples of each of the first ``batches`` training batches, as the
    model sees them (see the module's docstring); returns the PNG's path.

    Args:
        cfg: a composed config (the root, or its ``config`` node).
        out: the PNG; default ``<CHECKPOINT.DIR>/pictures/augmentations.png``.
        samples: samples per batch (rows); at most the batch size.
        batches: batches drawn, one after the other.
        min_view_px: the largest view's height on the picture, at least (whole-factor enlargement).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"plot_augmentations: samples={samples!r}; expected a whole number >= 1.")
    node = _config_node(cfg)
    out = out or os.path.join(node.CHECKPOINT.DIR, "pictures", "augmentations.png")
    got, dataset = model_batches(node, batches)
    names, label_type = class_names(dataset), node.DATA.TRAIN.LABEL_TYPE
    transforms = OmegaConf.to_container(node.DATA.TRAIN.TRANSFORMS, resolve=True)
    blocks = [(b, i, cells) for b, batch in enumerate(got) for i, cells in enumerate(_cells(batch, samples))]
    # each sample is a block of its views side by side, each view at its own size times `scale`;
    # a multi-view sample has a row of its own, single views go SINGLE_PER_ROW to a row
    sizes = [[(v.shape[-1], v.shape[-2]) for v in cells] for _, _, cells in blocks]
    scale = max(1, math.ceil(min_view_px / max(h for row in sizes for _, h in row)))
    views = max(len(r) for r in sizes)
    per_row = 1 if views > 1 else min(SINGLE_PER_ROW, len(blocks))
    # view column widths (a title needs TITLE_W_PX under the first view of a single-view block)
    col_w = [
        max(max(r[c][0] for r in sizes if c < len(r)) * scale, 0 if views > 1 else TITLE_W_PX) for c in range(views)
    ]
    block_w = sum(col_w) + GAP_PX * (views - 1)
    grid = [list(range(k, min(k + per_row, len(blocks)))) for k in range(0, len(blocks), per_row)]
    row_h = [max(h for k in line for _, h in sizes[k]) * scale for line in grid]
    width = max(2 * MARGIN_PX + per_row * block_w + GAP_PX * (per_row - 1), TITLE_W_PX + 2 * MARGIN_PX)
    height = 2 * MARGIN_PX + sum(row_h) + len(grid) * (TITLE_PX + GAP_PX)
    fig = new_figure(width, height)
    top = MARGIN_PX
    for line, rh in zip(grid, row_h):
        top += TITLE_PX
        for slot, k in enumerate(line):
            b, i, cells = blocks[k]
            batch, left = got[b], MARGIN_PX + slot * (block_w + GAP_PX)
            for c, (view, (w, h)) in enumerate(zip(cells, sizes[k])):
                box = [left / width, 1 - (top + h * scale) / height, w * scale / width, h * scale / height]
                ax = fig.add_axes(box)
                ax.imshow(
                    to_display(denormalize(view, transforms)), cmap="gray", vmin=0, vmax=1, interpolation="nearest"
                )
                ax.set_xticks([])
                ax.set_yticks([])
                size = f"{h}x{w}" if len(cells) > 1 else ""
                if c == 0:
                    lam = _mix_lambda(batch, i)
                    first = (
                        f"b{b} #{i}" + (f"  lam {lam:.2f}" if lam is not None else "") + (f"  {size}" if size else "")
                    )
                    size = first + "\n" + target_title(batch["label"][i], names, label_type)
                ax.set_title(size, fontsize=7, loc="left", pad=2)
                left += col_w[c] + GAP_PX
        top += rh + GAP_PX
    return save_png(fig, out)


USAGE = """usage: python tools/plot_augmentations.py config=<path> [config.KEY=value ...] [+config/<group>=<name> ...]
                                      [--run RUN_DIR] [--out FILE.png] [--batches 1] [--samples 8]

  config=... / overrides   the run's config, as for tools/run_distributed_engines.py
  --run RUN_DIR            use RUN_DIR/train_config.yaml (overrides still apply); the picture goes to
                           RUN_DIR/pictures/augmentations.png unless --out is given
  --out FILE.png           the picture (default <CHECKPOINT.DIR>/pictures/augmentations.png)
  --batches N              draw the first N training batches (default 1)
  --samples N              samples of each batch, one row each (default 8)
"""


def overrides_for(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """The tool's command line -> (config arguments, options)."""
    from vissl_vit.utils.cli import split_options

    args, opts = split_options(
        list(argv),
        values={
            "--run": ("run", str),
            "--out": ("out", str),
            "--batches": ("batches", int),
            "--samples": ("samples", int),
        },
        switches={},
        defaults={"run": None, "out": None, "batches": 1, "samples": 8},
        usage=USAGE,
    )
    if opts["run"] is not None:
        from vissl_vit.load_run import run_config_file

        config_file = run_config_file(opts["run"], "--run")
        if any(a.startswith("config=") for a in args):
            raise ConfigError(f"--run {opts['run']} and {next(a for a in args if a.startswith('config='))}: give one.")
        args = [f"config={config_file}", *args]
        opts["out"] = opts["out"] or os.path.join(os.path.abspath(opts["run"]), "pictures", "augmentations.png")
    return args, opts


def run(argv: list[str]) -> None:
    from vissl_vit.config import compose_config

    args, opts = overrides_for(argv)
    print(plot_augmentations(compose_config(args), opts["out"], opts["samples"], opts["batches"]))


def main(argv: list[str] | None = None) -> int:
    """The command line (tools/plot_augmentations.py); returns the exit status."""
    from vissl_vit.utils.cli import cli_main

    return cli_main(run, sys.argv[1:] if argv is None else argv, USAGE)
