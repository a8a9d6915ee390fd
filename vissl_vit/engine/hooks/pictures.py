"""``pictures_hook``: the run's pictures (``HOOKS.PICTURES``), drawn at the end of training on rank 0
into ``<CHECKPOINT.DIR>/pictures/``.

Each picture is a function of the run folder (its train_config.yaml, weights, stdout.json and
metrics.json), the same one its command under ``tools/`` calls, so a picture drawn at the end of a
run and one drawn later from the folder are the same picture. The hook runs after the checkpoint
hook (it reads the final weights from the folder) and only when training reached its last step: a
run stopped by an error or a preemption draws nothing. A picture that fails to draw is a warning
naming it and the error; the training it illustrates has already succeeded and is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.errors import ConfigError
from vissl_vit.registry import HOOKS

logger = logging.getLogger(__name__)

PICTURES = ("attention", "curves", "augmentations", "retrieval")


def check_pictures(draw: Sequence[str], where: str = "config.HOOKS.PICTURES.DRAW") -> list[str]:
    """The picture names of ``draw``, each once; ConfigError naming an unknown one."""
    out: list[str] = []
    for name in draw:
        if name not in PICTURES:
            raise ConfigError(f"{where}: unknown picture {name!r}; expected any of {', '.join(PICTURES)}.")
        if name not in out:
            out.append(name)
    return out


def check_pictures_config(node: Any, depth: int | None) -> None:
    """HOOKS.PICTURES, checked on every rank when the config is composed (a rank-0-only error at the
    end would leave the other ranks waiting): known names, NUM_IMAGES >= 1, ATTENTION_BLOCKS whole
    numbers in 0 .. depth - 1 (``depth``: the trunk's blocks, None when unknown)."""
    check_pictures(list(node.DRAW))
    n = node.NUM_IMAGES
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"config.HOOKS.PICTURES.NUM_IMAGES={n!r}: expected a whole number >= 1.")
    for b in node.ATTENTION_BLOCKS:
        if isinstance(b, bool) or not isinstance(b, int) or b < 0 or (depth is not None and b >= depth):
            span = f"0 .. {depth - 1} (the trunk's {depth} blocks)" if depth is not None else "a block index >= 0"
            raise ConfigError(f"config.HOOKS.PICTURES.ATTENTION_BLOCKS: {b!r} is not a block; expected {span}.")


@HOOKS.register("pictures_hook")
class PicturesHook(HookBase):
    """Draw the pictures named in ``draw`` when training ends at its last step.

    Args:
        run_dir: the run folder.
        cfg: the run's config (the ``config`` node): the augmentation grid rebuilds its training data.
        draw: picture names, any of ``PICTURES``.
        attention_blocks: the attention maps' blocks (0-based); empty: the quarters of the depth.
        num_images: images of the attention maps; queries of the retrieval.
    """

    def __init__(
        self, run_dir: str, cfg: Any, draw: Sequence[str], attention_blocks: Sequence[int] = (), num_images: int = 4
    ) -> None:
        self.run_dir, self.cfg = run_dir, cfg
        self.draw = check_pictures(draw)
        self.blocks = list(attention_blocks) or None
        self.num_images = num_images
        self.written: list[str] = []

    def _one(self, name: str) -> list[str]:
        if name == "attention":
            from vissl_vit.visualize.attention import plot_attention

            return plot_attention(self.run_dir, blocks=self.blocks, images=self.num_images)
        if name == "curves":
            from vissl_vit.visualize.curves import plot_curves

            return [plot_curves([self.run_dir])]
        if name == "augmentations":
            import os

            from vissl_vit.visualize.augmentations import plot_augmentations

            return [plot_augmentations(self.cfg, out=os.path.join(self.run_dir, "pictures", "augmentations.png"))]
        from vissl_vit.visualize.retrieval import plot_retrieval

        return [plot_retrieval(self.run_dir, queries=self.num_images)]

    def after_train(self) -> None:
        if not getattr(self.trainer, "completed", False):
            return  # stopped by an error or a preemption, even at the last step: no pictures
        for name in self.draw:
            try:
                paths = self._one(name)
            except Exception as e:  # noqa: BLE001 - a picture must not undo a finished run
                logger.warning("HOOKS.PICTURES: the %s picture was not drawn: %s: %s", name, type(e).__name__, e)
                continue
            self.written += paths
            for p in paths:
                logger.info("Picture: %s", p)
