"""kNN retrieval pictures: a few test images and their nearest training images by the trunk's
features, as the kNN benchmark sees them (``NEAREST_NEIGHBOR``: the trunk's feature, flattened,
L2-normalised, cosine similarity)::

    python tools/plot_retrieval.py ./runs/mocov3_fashion_mnist --queries 6 --k 5 --max-train 2000

One row per query: the query, then its ``k`` nearest training images, most similar first. Titles
give each image's class (its name where the data set has class folders or shards) and each
neighbour's cosine similarity; the query's frame is green when its nearest neighbour has its class
and red when not (what a 1-NN classifier would get right or wrong).

The model comes from ``load_run_model`` (the newest checkpoint, or
``model_final.safetensors``); both splits are read with that transform (DATA.TEST.TRANSFORMS), so
the pictures show what the trunk was given, denormalised. The training images are up to
``max_train`` evenly spaced over DATA.TRAIN (not the first ones: a folder data set is sorted by
class), the queries evenly spaced over DATA.TEST; the labels are the classes (LABEL_TYPE standard),
also for a self-supervised run trained on sample indices. Where DATA.TEST holds images of
DATA.TRAIN, a query finds itself first, at similarity 1.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from vissl_vit.errors import ConfigError
from vissl_vit.visualize.augmentations import class_names
from vissl_vit.visualize.common import denormalize, new_figure, save_png, to_display

# Each image is drawn CELL_PX pixels square, with TITLE_PX above it for two lines of title.
CELL_PX, TITLE_PX, GAP_PX, MARGIN_PX = 96, 28, 8, 10
# The query's frame: matplotlib's tab:green when its nearest neighbour has its class, tab:red when not.
MATCH, MISMATCH = "#2ca02c", "#d62728"


@dataclass
class Retrieval:
    """Queries and their neighbours.

    Args:
        query_images: [Q, C, H, W] the queries as the trunk saw them (eval transform).
        query_labels: [Q] their classes.
        images: [Q, k, C, H, W] the neighbours, most similar first.
        labels: [Q, k] their classes.
        similarity: [Q, k] cosine similarity of each neighbour to its query.
        train_index: [Q, k] the neighbours' indices in DATA.TRAIN.
        query_index: [Q] the queries' indices in DATA.TEST.
        train_names / test_names: class names of each split, or None.
        transforms: the eval transform's entries (DATA.TEST.TRANSFORMS), to denormalise the images.
    """

    query_images: torch.Tensor
    query_labels: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    similarity: torch.Tensor
    train_index: torch.Tensor
    query_index: torch.Tensor
    train_names: list[str] | None
    test_names: list[str] | None
    transforms: list[Any]


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"plot_retrieval: {name}={value!r}; expected a whole number >= 1.")
    return value


def _eval_dataset(cfg: DictConfig, split: str) -> Any:
    """``split``'s data set with the eval transform (DATA.TEST.TRANSFORMS) and class labels."""
    from vissl_vit.data import build_dataset

    cfg = cfg.copy()
    OmegaConf.set_readonly(cfg, False)
    OmegaConf.update(cfg, f"DATA.{split}.TRANSFORMS", OmegaConf.to_container(cfg.DATA.TEST.TRANSFORMS), merge=False)
    OmegaConf.update(cfg, f"DATA.{split}.LABEL_TYPE", "standard")
    if not len(cfg.DATA[split].DATA_SOURCES):
        raise ConfigError(f"config.DATA.{split}.DATA_SOURCES=[] in the run's config: expected a data set to read.")
    return build_dataset(cfg, split)


def _spaced(n: int, count: int) -> list[int]:
    """``count`` indices evenly spaced over range(n) (all of them when count >= n)."""
    if count >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, count).round().astype(int).tolist()))


@torch.no_grad()
def _features(trunk: Any, feature: str, dataset: Any, indices: list[int], chunk: int = 64) -> tuple[torch.Tensor, ...]:
    """(images, labels, L2-normalised flattened features) of ``dataset[indices]``."""
    images, labels, feats = [], [], []
    for start in range(0, len(indices), chunk):
        samples = [dataset[i] for i in indices[start : start + chunk]]
        x = torch.stack([s["data"] for s in samples])
        images.append(x)
        labels.append(torch.tensor([int(s["label"]) for s in samples]))
        feats.append(trunk(x, [feature])[0].flatten(1).float())
    return torch.cat(images), torch.cat(labels), F.normalize(torch.cat(feats), dim=1)


def retrieve(
    run_dir: str, queries: int = 6, k: int = 5, max_train: int = 2000, feature: str = "", weights: str | None = None
) -> Retrieval:
    """Nearest training images of ``queries`` test images, by cosine similarity of trunk features.

    Args:
        run_dir: a run folder (train_config.yaml and a checkpoint or model_final.safetensors).
        queries: test images (evenly spaced over DATA.TEST).
        k: neighbours per query.
        max_train: training images searched (evenly spaced over DATA.TRAIN).
        feature: the trunk feature (e.g. ``lastCLS``, ``concatCLS4``); "" for NEAREST_NEIGHBOR.FEATURE
            of the run's config, else the trunk's default feature (what the kNN benchmark uses).
        weights: another weights file than the newest checkpoint (``load_run``'s ``weights``).
    """
    from vissl_vit.benchmark.knn import knn_search
    from vissl_vit.load_run import load_run_model

    queries, k, max_train = _positive("queries", queries), _positive("k", k), _positive("max_train", max_train)
    model, cfg = load_run_model(run_dir, weights)
    trunk = model.trunk
    feature = feature or cfg.NEAREST_NEIGHBOR.FEATURE or trunk.default_feature()
    train_ds, test_ds = _eval_dataset(cfg, "TRAIN"), _eval_dataset(cfg, "TEST")
    bank_idx = _spaced(len(train_ds), max_train)
    k = min(k, len(bank_idx))
    bank_images, bank_labels, bank = _features(trunk, feature, train_ds, bank_idx)
    query_idx = _spaced(len(test_ds), queries)
    q_images, q_labels, q = _features(trunk, feature, test_ds, query_idx)
    sim, idx = knn_search(bank, q, k, backend="torch")  # the benchmark's exact search: [Q, k]
    return Retrieval(
        query_images=q_images,
        query_labels=q_labels,
        images=bank_images[idx],
        labels=bank_labels[idx],
        similarity=sim,
        train_index=torch.tensor(bank_idx)[idx],
        query_index=torch.tensor(query_idx),
        train_names=class_names(train_ds),
        test_names=class_names(test_ds),
        transforms=OmegaConf.to_container(cfg.DATA.TEST.TRANSFORMS, resolve=True),
    )


def _class(label: int, names: list[str] | None) -> str:
    return names[label] if names and 0 <= label < len(names) else f"class {label}"


def _frame(ax: Any, color: str | None) -> None:
    for spine in ax.spines.values():
        spine.set_visible(color is not None)
        if color is not None:
            spine.set_edgecolor(color)
            spine.set_linewidth(4)


def draw_retrieval(r: Retrieval, out: str, cell_px: int = CELL_PX) -> str:
    """Draw a :class:`Retrieval` (see the module's docstring) to ``out``; returns the path."""
    transforms = r.transforms
    nq, k = r.labels.shape
    width = 2 * MARGIN_PX + (k + 1) * cell_px + k * GAP_PX + GAP_PX  # a wider gap after the query
    height = 2 * MARGIN_PX + nq * (TITLE_PX + cell_px + GAP_PX)
    fig = new_figure(width, height)
    for row in range(nq):
        top = MARGIN_PX + row * (TITLE_PX + cell_px + GAP_PX) + TITLE_PX
        cells = [(r.query_images[row], None)] + [(r.images[row, j], j) for j in range(k)]
        for col, (img, j) in enumerate(cells):
            left = MARGIN_PX + col * (cell_px + GAP_PX) + (GAP_PX if col else 0)
            ax = fig.add_axes([left / width, 1 - (top + cell_px) / height, cell_px / width, cell_px / height])
            ax.imshow(to_display(denormalize(img, transforms)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j is None:
                label = int(r.query_labels[row])
                _frame(ax, MATCH if int(r.labels[row, 0]) == label else MISMATCH)
                title = f"query {int(r.query_index[row])}\n{_class(label, r.test_names)}"
            else:
                _frame(ax, None)
                title = f"{_class(int(r.labels[row, j]), r.train_names)}\nsim {float(r.similarity[row, j]):.3f}"
            ax.set_title(title, fontsize=7, loc="left", pad=2)
    return save_png(fig, out)


def plot_retrieval(
    run_dir: str,
    out: str | None = None,
    queries: int = 6,
    k: int = 5,
    max_train: int = 2000,
    feature: str = "",
    weights: str | None = None,
) -> str:
    """A run's kNN retrieval picture (see the module's docstring); returns the PNG's path.

    Args:
        run_dir: the run folder.
        out: the PNG; default ``<run_dir>/pictures/retrieval.png``.
        queries, k, max_train, feature, weights: as for :func:`retrieve`.
    """
    r = retrieve(run_dir, queries, k, max_train, feature, weights)
    return draw_retrieval(r, out or os.path.join(run_dir, "pictures", "retrieval.png"))


USAGE = """usage: python tools/plot_retrieval.py RUN_DIR [--queries 6] [--k 5] [--max-train 2000] [--feature NAME]
                                  [--weights FILE] [--out FILE.png]

  RUN_DIR          a run folder (train_config.yaml, a checkpoint or model_final.safetensors)
  --queries N      test images, evenly spaced over DATA.TEST (default 6)
  --k N            nearest training images per query (default 5)
  --max-train N    training images searched, evenly spaced over DATA.TRAIN (default 2000)
  --feature NAME   the trunk feature (default: NEAREST_NEIGHBOR.FEATURE, else the trunk's default)
  --weights FILE   a weights file instead of the newest checkpoint (e.g. model_best.torch)
  --out FILE.png   the picture (default RUN_DIR/pictures/retrieval.png)
"""


def run(argv: list[str]) -> None:
    from vissl_vit.utils.cli import split_options

    args, opts = split_options(
        argv,
        values={
            "--queries": ("queries", int),
            "--k": ("k", int),
            "--max-train": ("max_train", int),
            "--feature": ("feature", str),
            "--weights": ("weights", str),
            "--out": ("out", str),
        },
        switches={},
        defaults={"queries": 6, "k": 5, "max_train": 2000, "feature": "", "weights": None, "out": None},
        usage=USAGE,
    )
    if len(args) != 1:
        raise ConfigError(f"expected one RUN_DIR, got {len(args)} ({' '.join(args) or 'none'}).\n{USAGE}")
    out = opts.pop("out")
    print(plot_retrieval(args[0], out, **opts))


def main(argv: list[str] | None = None) -> int:
    """The command line (tools/plot_retrieval.py); returns the exit status."""
    from vissl_vit.utils.cli import cli_main

    return cli_main(run, sys.argv[1:] if argv is None else argv, USAGE)
