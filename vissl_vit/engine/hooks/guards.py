"""Guards that stop a run that cannot go on: a non-finite loss or gradient, too many unreadable images."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.errors import DataError, TrainingError
from vissl_vit.registry import HOOKS
from vissl_vit.utils.distributed import all_reduce_sum, get_world_size, is_initialized

logger = logging.getLogger(__name__)

_SHOWN = 10  # paths named in a message or a warning


@HOOKS.register("nan_loss_hook")
class NanLossHook(HookBase):
    """Raise TrainingError before the optimizer step when the step's loss or gradients are NaN or
    infinite, so that the weights never take a non-finite update and no checkpoint holds one: the
    newest checkpoint is the last good one, and resuming from it does not hit the NaN at once.

    A finite loss can still give Inf/NaN gradients (an overflow in backward), so the total gradient
    norm is checked too: the one gradient clipping computed, else computed here once. Under float16
    AMP the GradScaler skips steps with Inf/NaN gradients by design (and lowers the scale), so only
    the loss is checked then. The verdict is summed over ranks, so every rank stops at the same step.

    Args:
        all_reduce: sums a tensor over ranks.
    """

    def __init__(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum) -> None:
        self.all_reduce = all_reduce

    def before_optimizer_step(self) -> None:
        t = self.trainer
        last = t.last
        loss = last.loss
        check_grads = not t.scaler.is_enabled()
        if check_grads and last.grad_norm is None:
            last.grad_norm = t.total_grad_norm()
        bad = [~torch.isfinite(loss).all()]
        bad.append(~torch.isfinite(last.grad_norm).all() if check_grads else torch.zeros((), dtype=torch.bool))
        flags = self.all_reduce(torch.stack([b.to(loss.device) for b in bad]).to(torch.float64))
        loss_bad, grads_bad = (bool(f > 0) for f in flags.tolist())
        if not (loss_bad or grads_bad):
            return
        where = f"at iteration {t.iteration + 1} (epoch {t.epoch}, lr {last.lr:.4g})"
        end = "Training stopped before the optimizer step; the newest checkpoint holds the last good weights."
        if loss_bad:
            value = loss.item()
            what = (
                f"The loss is {value}"
                if not torch.isfinite(loss).all()
                else "The loss is not finite on another process"
            )
            raise TrainingError(
                f"{what} {where}. {end} Usual fixes: a lower learning rate or a longer warm-up, "
                "config.MODEL.GRAD_CLIP.USE_GRAD_CLIP=True, or checking the data for bad values."
            )
        raise TrainingError(
            f"The gradients are not finite (total norm {last.grad_norm.item()}) {where} although the loss is finite "
            f"({loss.item():.4g}). {end} Usual fixes: a lower learning rate or a longer warm-up, gradient clipping "
            "(config.MODEL.GRAD_CLIP.USE_GRAD_CLIP=True) to keep the gradients from growing, or checking the data "
            "and the loss for extreme values."
        )


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def bad_in_batches(batches: Iterable[dict[str, Any]]) -> dict[int, str]:
    """The unreadable images met in loader batches: data set index -> path (VisslDataset marks the
    sample whose own image failed with ``bad=1`` and that image's path)."""
    found: dict[int, str] = {}
    for b in batches:
        if not int(b["bad"].sum()):
            continue
        for flag, index, path in zip(b["bad"].tolist(), b["index"].tolist(), b["bad_path"]):
            if flag:
                found[int(index)] = path
    return found


class BadImages:
    """The distinct unreadable images of one split, by data set index (a file read in several
    epochs, by several ranks, or before and after a resume counts once).

    Args:
        what: the split, for messages ("training", "TEST").
        dataset_len: images in the split.
        max_fraction: DATA.MAX_BAD_IMAGE_FRACTION; more distinct failures than this fraction stop the run.
    """

    def __init__(self, what: str, dataset_len: int, max_fraction: float) -> None:
        self.what, self.dataset_len, self.max_fraction = what, dataset_len, max_fraction
        self.paths: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def update(self, found: dict[int, str]) -> None:
        self.paths.update(found)

    def shown(self) -> str:
        """Up to 10 of the paths, each once, in data set order."""
        names = [self.paths[i] for i in sorted(self.paths)[:_SHOWN]]
        more = len(self.paths) - len(names)
        return ", ".join(names) + (f" and {more} more" if more > 0 else "")

    def check(self, context: str = "") -> None:
        """Raise DataError when more than the allowed fraction of the split is unreadable.

        Args:
            context: appended to the count in the message (e.g. " in the test phase after epoch 2").
        """
        if len(self.paths) > self.max_fraction * self.dataset_len:
            raise DataError(
                f"{len(self.paths)} {self.what} images could not be read{context}, more than "
                f"config.DATA.MAX_BAD_IMAGE_FRACTION={self.max_fraction} of the {self.dataset_len} images. "
                f"Some of them: {self.shown()}."
            )

    def report_and_check(self, found_per_rank: list[dict[str, Any]], context: str) -> None:
        """Unite the ranks' findings of one pass over the split, log them, and check the limit."""
        for found in found_per_rank:
            self.update(found)
        if self.paths:
            logger.warning(
                "%d of the %d %s images could not be read%s (each replaced by another image): %s",
                len(self.paths),
                self.dataset_len,
                self.what,
                context,
                self.shown(),
            )
        self.check(context)


@HOOKS.register("bad_image_hook")
class BadImageHook(HookBase):
    """Count the distinct unreadable training images (replaced by others in the dataset) over the
    whole run, resumes included (the set is in the checkpoint), and stop past a fraction.

    Args:
        dataset_len: images in the training set.
        max_fraction: the run stops when more than this fraction of them has failed.
        all_reduce: sums a tensor over ranks.
        gather: every rank's object, in rank order (the ranks' sets of bad images are united).
    """

    def __init__(
        self,
        dataset_len: int,
        max_fraction: float,
        all_reduce: Callable[[torch.Tensor], torch.Tensor],
        gather: Callable[[Any], list[Any]] = gather_objects,
    ) -> None:
        self.bad = BadImages("training", dataset_len, max_fraction)
        self.all_reduce, self.gather = all_reduce, gather

    @property
    def count(self) -> int:
        """Distinct unreadable training images so far."""
        return len(self.bad)

    def after_step(self) -> None:
        found = bad_in_batches(m.batch for m in self.trainer.last.micro)
        # one number per step tells whether any rank met a bad image; only then are the paths gathered
        total = self.all_reduce(torch.tensor([float(len(found))], dtype=torch.float64, device=self.trainer.device))
        if not total.item():
            return
        for part in self.gather(found):
            self.bad.update(part)
        self.bad.check()

    def after_epoch(self) -> None:
        if self.count:
            logger.warning(
                "%d distinct unreadable training images so far (each replaced by another image): %s",
                self.count,
                self.bad.shown(),
            )

    def state_dict(self) -> dict[str, Any]:
        return {"paths": dict(self.bad.paths)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "paths" not in state:  # a checkpoint from before distinct counting: its count has no indices
            logger.warning("The checkpoint's bad-image count has no image indices; counting from zero again.")
            return
        self.bad.paths = {int(i): str(p) for i, p in state["paths"].items()}
