"""Attention maps of a trained run, as PNG pictures.

Two pictures, of the blocks and heads chosen, over the first images of the run's test data:

- ``attention.png`` (DINO's ``visualize_attention.py``): one row per image, the image first, then one
  panel per block (and head): the class token's attention over the patches, upsampled to the image
  and laid over it. A block whose tokens hold no class token (``gap`` models without one,
  SimplEsT-ViT's E-SPA, ConViT's GPSA blocks) shows instead the attention each patch *receives*,
  averaged over the query tokens; the panel's title says which.
- ``attention_matrices.png`` (RescaleViT's figures): the token-by-token matrices [L, L] of the same
  blocks for the first image (rows: queries, columns: keys; the class token first).

Weights are averaged over the heads unless heads are chosen (then one panel per head). Each attention
panel is min-max scaled on its own: the pictures compare where a block looks, not how sharply.

    python tools/plot_attention.py ./runs/my_run --blocks 0 3 6 9 --matrices

Only the run folder is needed (its train_config.yaml and weights): :func:`plot_attention` is what an
end-of-run hook calls.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vissl_vit.errors import ConfigError
from vissl_vit.visualize.common import denormalize, new_figure, save_png, to_display

PANEL_PX = 128  # side of one square panel, in pixels
HEADER_PX = 56  # the band above the panels: the picture's title and the column titles
UPSAMPLING = ("nearest", "bilinear")


def default_blocks(depth: int) -> list[int]:
    """The blocks at each quarter of the depth, as the seeds show them (DINO's and RescaleViT's
    0, 3, 6, 9 of 12 blocks; 0, 2, 4, 6 of 8; every block of 4 or fewer)."""
    return sorted({k * depth // 4 for k in range(4)}) if depth >= 4 else list(range(depth))


def attention_picture_size(n_images: int, n_panels: int, panel_px: int = PANEL_PX) -> tuple[int, int]:
    """(width, height) in pixels of ``attention.png``: the image column plus ``n_panels`` columns, a row per image."""
    return panel_px * (1 + n_panels), HEADER_PX + panel_px * n_images


def matrices_picture_size(n_panels: int, panel_px: int = PANEL_PX) -> tuple[int, int]:
    """(width, height) in pixels of ``attention_matrices.png``: one row of ``n_panels`` matrices."""
    return panel_px * max(n_panels, 1), HEADER_PX + panel_px


def load_images(cfg: Any, split: str, n: int) -> tuple[torch.Tensor, list[Any]]:
    """The first ``n`` images of the run's ``DATA.<split>``, through the split's transforms as the engine
    builds them (``build_dataset``; image i with seed i, so random transforms repeat): [n, C, H, W] and
    the split's TRANSFORMS entries (to undo their normalisation for display)."""
    from vissl_vit.data.build import build_dataset

    where = f"config.DATA.{split}"
    if split not in ("TRAIN", "TEST"):
        raise ConfigError(f"split={split!r}: expected TRAIN or TEST.")
    if not len(cfg.DATA[split].DATA_SOURCES):
        raise ConfigError(f"{where}.DATA_SOURCES is empty: the run has no {split} data to draw (try another split).")
    dataset = build_dataset(cfg, split)
    if not len(dataset):
        raise ConfigError(f"{where}: the data set has no images.")
    out = []
    for i in range(min(n, len(dataset))):
        data = dataset[(i, i)]["data"]
        if isinstance(data, (list, tuple)):  # multi-crop: the first view
            data = data[0]
        if not isinstance(data, torch.Tensor) or data.dim() != 3:
            raise ConfigError(f"{where}.TRANSFORMS: expected an image tensor [C, H, W] per sample, got {type(data)}.")
        out.append(data)
    return torch.stack(out), list(cfg.DATA[split].TRANSFORMS)


def patch_maps(attn: torch.Tensor, grid: tuple[int, int], heads: Sequence[int] | None) -> tuple[torch.Tensor, bool]:
    """Attention weights [B, heads, L, L] -> one map per patch and per head choice [B, K, gh, gw].

    With a class token (L = prefix + gh * gw, prefix >= 1, the class token first): its row over the
    patches. Without one (L = gh * gw): the mean over the queries of each patch's column (the attention
    each patch receives). K is 1 (mean over the heads) or ``len(heads)``. Also returns whether the
    class token's row was used.
    """
    B, H, L, _ = attn.shape
    gh, gw = grid
    prefix = L - gh * gw
    if prefix < 0:
        raise ConfigError(f"attention over {L} tokens does not fit a {gh}x{gw} patch grid")
    attn = attn.float()
    per_head = attn[:, :, 0, prefix:] if prefix else attn.mean(dim=2)  # [B, heads, gh * gw]
    per_head = per_head.reshape(B, H, gh, gw)
    if heads is None:
        return per_head.mean(dim=1, keepdim=True), prefix > 0
    return per_head[:, list(heads)], prefix > 0


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def _head_label(heads: Sequence[int] | None, k: int) -> str:
    return "mean of heads" if heads is None else f"head {heads[k]}"


def _axes(fig: Any, left_px: int, top_px: int, side_px: int, width: int, height: int) -> Any:
    """Axes of ``side_px`` square at pixel (left, top) of a ``width`` x ``height`` figure, no ticks."""
    ax = fig.add_axes([left_px / width, 1 - (top_px + side_px) / height, side_px / width, side_px / height])
    ax.set_axis_off()
    return ax


def draw_attention_grid(
    images: torch.Tensor,
    maps: dict[int, torch.Tensor],
    grid: tuple[int, int],
    heads: Sequence[int] | None,
    transforms: Sequence[Any],
    title: str,
    upsample: str = "nearest",
    panel_px: int = PANEL_PX,
) -> Any:
    """The DINO-style picture: rows are images, columns the image then each block (and head).

    Args:
        images: the model's inputs [N, C, H, W] (normalised as the model saw them).
        maps: block -> attention weights [N, heads, L, L].
        grid: the patch grid (gh, gw).
        heads: head indices, or None for the mean over heads.
        transforms: the TRANSFORMS entries the images went through (to denormalise them).
        title: the picture's title.
        upsample: "nearest" (DINO's, one block per patch) or "bilinear".
        panel_px: side of each panel in pixels.
    """
    n, _, h, w = images.shape
    k = 1 if heads is None else len(heads)
    width, height = attention_picture_size(n, len(maps) * k, panel_px)
    fig = new_figure(width, height)
    fig.text(0.5, 1 - 4 / height, title, ha="center", va="top", fontsize=7, wrap=True)
    shown = denormalize(images, transforms)
    per_block = {b: patch_maps(a, grid, heads) for b, a in maps.items()}
    pad = 2
    for row in range(n):
        top = HEADER_PX + row * panel_px
        img = to_display(shown[row])
        grey = img.ndim == 2
        ax = _axes(fig, pad, top + pad, panel_px - 2 * pad, width, height)
        ax.imshow(img, cmap="gray" if grey else None, vmin=0.0, vmax=1.0)
        if row == 0:
            ax.set_title("image", fontsize=7, pad=2)
        col = 1
        for b, (m, has_cls) in per_block.items():
            # [K, gh, gw] -> [K, H, W], over the image
            up = F.interpolate(m[row][None], size=(h, w), mode=upsample)[0]
            for j in range(k):
                ax = _axes(fig, col * panel_px + pad, top + pad, panel_px - 2 * pad, width, height)
                ax.imshow(img, cmap="gray" if grey else None, vmin=0.0, vmax=1.0)
                ax.imshow(_minmax(up[j]).numpy(), cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0)
                if row == 0:
                    what = "cls" if has_cls else "received"
                    ax.set_title(f"block {b} ({what})\n{_head_label(heads, j)}", fontsize=6, pad=2)
                col += 1
    return fig


def draw_attention_matrices(
    maps: dict[int, torch.Tensor], heads: Sequence[int] | None, title: str, panel_px: int = PANEL_PX
) -> Any:
    """RescaleViT-style token-by-token matrices [L, L] of the first image, one panel per block (and head)."""
    k = 1 if heads is None else len(heads)
    width, height = matrices_picture_size(len(maps) * k, panel_px)
    fig = new_figure(width, height)
    fig.text(0.5, 1 - 4 / height, title, ha="center", va="top", fontsize=7, wrap=True)
    pad, col = 2, 0
    for b, a in maps.items():
        a = a[0].float()  # [heads, L, L]
        mats = a.mean(dim=0, keepdim=True) if heads is None else a[list(heads)]
        for j in range(k):
            ax = _axes(fig, col * panel_px + pad, HEADER_PX + pad, panel_px - 2 * pad, width, height)
            ax.imshow(mats[j].numpy(), cmap="viridis")
            ax.set_title(f"block {b}, {_head_label(heads, j)}", fontsize=6, pad=2)
            col += 1
    return fig


def _trunk_of(model: Any, run_dir: str) -> Any:
    trunk = getattr(model, "trunk", model)
    if not callable(getattr(trunk, "get_attention_maps", None)):
        raise ConfigError(
            f"the model of {run_dir} ({type(trunk).__name__}) cannot return attention maps: its trunk has no "
            "get_attention_maps (vision_transformer and convit trunks have)."
        )
    return trunk


def _num_heads(trunk: Any) -> int | None:
    """Heads per block (``attn.num_heads``, which every block of both trunks has); None if unknown."""
    heads = {getattr(getattr(blk, "attn", None), "num_heads", None) for blk in trunk.blocks}
    return heads.pop() if len(heads) == 1 else None


def _check_heads(heads: list[int] | None, num_heads: int | None) -> None:
    if heads is None or num_heads is None:
        return
    if not heads or any(not 0 <= h < num_heads for h in heads):
        raise ConfigError(f"heads={heads}: expected indices in 0..{num_heads - 1} (the blocks have {num_heads}).")


def plot_attention(
    run_dir: str,
    out_dir: str | None = None,
    blocks: Sequence[int] | None = None,
    images: int = 4,
    heads: Sequence[int] | None = None,
    split: str = "TEST",
    weights: str | None = None,
    matrices: bool = True,
    upsample: str = "nearest",
    name: str = "attention",
    panel_px: int = PANEL_PX,
) -> list[str]:
    """Draw the attention pictures of a run folder; returns the paths written.

    Args:
        run_dir: the run folder (its train_config.yaml and weights; see :func:`vissl_vit.load_run`).
        out_dir: where the PNGs go; default ``run_dir/pictures``.
        blocks: 0-based block indices; default :func:`default_blocks` of the trunk's depth.
        images: how many of the split's first images (rows).
        heads: head indices, one panel each; None for the mean over the heads.
        split: "TEST" (the run's test data and transforms) or "TRAIN".
        weights: a weights file instead of the newest checkpoint (a name in the folder or a path).
        matrices: also write ``<name>_matrices.png``, the [L, L] matrices of the first image.
        upsample: "nearest" or "bilinear", from the patch grid to the image.
        name: file stem: ``<name>.png`` and ``<name>_matrices.png``.
        panel_px: side of each panel in pixels.

    Raises:
        ConfigError: a block or head out of range, no images, a trunk that cannot return attention.
    """
    from vissl_vit.load_run import load_run_model

    if upsample not in UPSAMPLING:
        raise ConfigError(f"upsample={upsample!r}: expected one of {', '.join(UPSAMPLING)}.")
    if images < 1:
        raise ConfigError(f"images={images}: expected at least 1.")
    model, cfg = load_run_model(run_dir, weights)
    trunk = _trunk_of(model, run_dir)
    depth = len(trunk.blocks)
    chosen = list(default_blocks(depth) if blocks is None else blocks)
    bad = [b for b in chosen if not 0 <= b < depth]
    if not chosen or bad:
        raise ConfigError(f"blocks={chosen}: expected indices in 0..{depth - 1} (the trunk has {depth} blocks).")
    heads = None if heads is None else list(heads)
    _check_heads(heads, _num_heads(trunk))  # before reading any data, when the trunk tells
    x, transforms = load_images(cfg, split, images)
    with torch.no_grad():
        maps = trunk.get_attention_maps(x, chosen)
    _check_heads(heads, min(a.shape[1] for a in maps.values()))
    p = trunk.patch_embed.patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    run_name = os.path.basename(os.path.normpath(run_dir))
    has_cls = {patch_maps(a[:1], grid, None)[1] for a in maps.values()}
    if has_cls == {True}:
        what = "class token's attention over the patches"
    elif has_cls == {False}:
        what = "no class token: the attention each patch receives (mean over queries)"
    else:
        what = "class token's attention (cls); without one, attention received (received)"
    out_dir = out_dir or os.path.join(run_dir, "pictures")
    written = []
    fig = draw_attention_grid(x, maps, grid, heads, transforms, f"{run_name} ({split}): {what}", upsample, panel_px)
    written.append(save_png(fig, os.path.join(out_dir, f"{name}.png")))
    if matrices:
        title = f"{run_name}: attention matrices, first {split} image (rows: queries, columns: keys)"
        fig = draw_attention_matrices(maps, heads, title, panel_px)
        written.append(save_png(fig, os.path.join(out_dir, f"{name}_matrices.png")))
    return written


def main(argv: list[str] | None = None) -> int:
    """The command line (``tools/plot_attention.py``); returns the exit status."""
    from vissl_vit.utils.cli import exit_status

    parser = argparse.ArgumentParser(
        prog="tools/plot_attention.py",
        description="Attention maps of a run (DINO's overlays; --matrices: RescaleViT's token-by-token matrices).",
    )
    parser.add_argument("run_dir", help="the run folder (CHECKPOINT.DIR), with train_config.yaml and weights")
    parser.add_argument(
        "--blocks", type=int, nargs="+", help="0-based blocks (default: each quarter of the depth, 0 3 6 9 of 12)"
    )
    parser.add_argument("--heads", type=int, nargs="+", help="heads, one panel each (default: their mean)")
    parser.add_argument("--images", type=int, default=4, help="the split's first N images (default 4)")
    parser.add_argument("--split", default="TEST", choices=["TEST", "TRAIN"], help="data and transforms to use")
    parser.add_argument("--out", help="the PNG to write (default RUN_DIR/pictures/attention.png)")
    parser.add_argument("--weights", help="a weights file instead of the newest checkpoint (model_final.safetensors)")
    parser.add_argument(
        "--matrices",
        action="store_true",
        help="also write <out>_matrices.png, the [L, L] matrices (the Python function and HOOKS.PICTURES always do)",
    )
    parser.add_argument("--upsample", default="nearest", choices=UPSAMPLING, help="patch grid to image (nearest)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out_dir, name = None, "attention"
    if args.out:
        if not args.out.endswith(".png"):
            parser.error(f"--out {args.out}: expected a .png file")
        out_dir, name = os.path.dirname(os.path.abspath(args.out)), os.path.basename(args.out)[: -len(".png")]
    with exit_status() as status:
        for path in plot_attention(
            args.run_dir, out_dir, args.blocks, args.images, args.heads, args.split, args.weights,
            args.matrices, args.upsample, name,
        ):  # fmt: skip
            print(path)
    return status.code
