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
    """Stop the run with a TrainingError when a step's loss or gradients are NaN or infinite; the
    weights never take that step, and no checkpoint holds it: the newest checkpoint is the last
    good one, and resuming from it does not hit the NaN at once.

    A finite loss can still give Inf/NaN gradients (an overflow in backward), so the total gradient
    norm is checked too: the one gradient clipping computed, else computed here once. Under float16
    AMP the GradScaler skips steps with Inf/NaN gradients by design (and lowers the scale), so only
    the loss is checked then.

    No host sync per step: before the optimizer step the verdict is computed on the device, the
    trainer skips the update on the device where it is set (and every later step until the
    verdict is read: :meth:`Trainer.skip_optimizer_step`), and the verdict goes with the step's
    other scalars (:class:`StepScalars`), summed over ranks, to the next sync point (LOG_FREQUENCY
    steps at most, or a checkpoint), where every rank raises, naming the first flagged step.
    Each rank skips on its own verdict until then (DDP and FSDP give every rank the same gradients,
    so their verdict on the gradients agrees; a loss non-finite on one rank only stops its own
    updates): the ranks may differ until the sync, which comes before any checkpoint is written.

    Args:
        all_reduce: sums a tensor over ranks.
    """

    def __init__(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum) -> None:
        self.all_reduce = all_reduce
        # the steps since the last read: step -> (loss, total grad norm or None, lr), for the message
        self._steps: dict[int, tuple[torch.Tensor, torch.Tensor | None, float]] = {}

    def before_optimizer_step(self) -> None:
        t = self.trainer
        last = t.last
        check_grads = not t.scaler.is_enabled()
        if check_grads and last.grad_norm is None:
            last.grad_norm = t.total_grad_norm()
        loss = last.loss
        grads_bad = ~torch.isfinite(last.grad_norm).all() if check_grads else torch.zeros((), dtype=torch.bool)
        flags = torch.stack([~torch.isfinite(loss).all(), grads_bad.to(loss.device)])
        t.skip_optimizer_step(flags.any())
        t.scalars.add("nonfinite", flags, reducer=self.all_reduce, check=self._check)
        self._steps[t.iteration + 1] = (loss, last.grad_norm if check_grads else None, last.lr)

    def _check(self, rows: list[tuple[int, list[float]]]) -> None:
        """At a sync point: raise for the first step whose loss or gradients were not finite on some rank."""
        steps, self._steps = self._steps, {}
        flagged = [(step, flags) for step, flags in rows if flags[0] > 0 or flags[1] > 0]
        if not flagged:
            return
        step, (loss_bad, _) = flagged[0]
        loss, grad_norm, lr = steps[step]
        epoch = (step - 1) // self.trainer.iterations_per_epoch
        where = f"at iteration {step} (epoch {epoch}, lr {lr:.4g})"
        end = "Training stopped before the optimizer step; the newest checkpoint holds the last good weights."
        if loss_bad > 0:
            what = (
                f"The loss is {loss.item()}"
                if not torch.isfinite(loss).all()
                else "The loss is not finite on another process"
            )
            raise TrainingError(
                f"{what} {where}. {end} Usual fixes: a lower learning rate or a longer warm-up, "
                "config.MODEL.GRAD_CLIP.USE_GRAD_CLIP=True, or checking the data for bad values."
            )
        raise TrainingError(
            f"The gradients are not finite (total norm {grad_norm.item()}) {where} although the loss is finite "
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

    Each step's count goes with the step scalars (:class:`StepScalars`), summed over ranks; the
    paths are gathered and the limit checked at the sync point that reads it, when a rank met one.

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
        self._unread: list[dict[str, Any]] = []  # the steps' flags since the last read

    @property
    def count(self) -> int:
        """Distinct unreadable training images so far."""
        return len(self.bad)

    def after_step(self) -> None:
        """File this step's count of unreadable images with the step scalars (no host read; the
        paths are looked up at the next sync point, and only when some rank met one). A trainer
        without step scalars (a bare stand-in) is checked at once."""
        t = self.trainer
        # the loader's flags and indices only: the images themselves are not kept until the read
        self._unread.extend({k: m.batch[k] for k in ("bad", "index", "bad_path")} for m in t.last.micro)
        count = torch.stack([m.batch["bad"].sum() for m in t.last.micro]).sum()
        scalars = getattr(t, "scalars", None)
        if scalars is None:
            self._check([(0, [float(self.all_reduce(count.double().reshape(1)).sum())])])
        else:
            scalars.add("bad_images", count, reducer=self.all_reduce, check=self._check)

    def _check(self, rows: list[tuple[int, list[float]]]) -> None:
        """At a sync point: when any rank met unreadable images, unite the ranks' paths and check the limit."""
        batches, self._unread = self._unread, []
        if not any(values[0] for _, values in rows):
            return
        for part in self.gather(bad_in_batches(batches)):
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
