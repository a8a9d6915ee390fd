"""The guards: non-finite loss or gradients stop the run before the optimizer step; unreadable
images are counted once each (training over the run, test phases, feature extraction)."""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import read_losses
from tests.data.test_datasets import make_folder
from tests.engine.toy import toy_trainer
from vissl_vit import compose_config, run_train_engine
from vissl_vit.engine import train_engine
from vissl_vit.engine.checkpoint import LATEST
from vissl_vit.engine.extract_engine import run_extract_features_engine
from vissl_vit.engine.hooks import BadImageHook, HookBase, NanLossHook
from vissl_vit.engine.trainer import Trainer
from vissl_vit.errors import DataError, TrainingError

# --------------------------------------------------------------------------------------------------
# NaN guard on a toy trainer
# --------------------------------------------------------------------------------------------------


class _PoisonGrad(HookBase):
    """Sets one gradient to +inf at step ``at`` (1-based): the loss of that step stays finite."""

    def __init__(self, at: int, value: float = float("inf")) -> None:
        self.at, self.value = at, value

    def after_backward(self) -> None:
        if self.trainer.iteration + 1 == self.at:
            next(self.trainer.model.parameters()).grad.view(-1)[0] = self.value


class _SaveWeights(HookBase):
    """A stand-in for the checkpoint hook (registered after the guard): the weights after each step."""

    def __init__(self) -> None:
        self.saved: dict[int, dict[str, torch.Tensor]] = {}

    def after_step(self) -> None:
        self.saved[self.trainer.iteration] = copy.deepcopy(self.trainer.model.state_dict())


def _toy_trainer(grad_clip=None, amp_dtype=None) -> Trainer:
    return toy_trainer(model=lambda: torch.nn.Linear(3, 1), grad_clip=grad_clip, amp_dtype=amp_dtype)


@pytest.mark.parametrize("clip", [None, (1.0, 2.0)], ids=["no-clip", "clip"])
def test_inf_gradients_with_a_finite_loss_stop_before_the_step(clip, monkeypatch):
    trainer = _toy_trainer(grad_clip=clip)
    saved = _SaveWeights()
    trainer.register_hooks([NanLossHook(), _PoisonGrad(at=4), saved])
    if clip is not None:  # the norm clipping computed is reused, not computed again
        monkeypatch.setattr(trainer, "total_grad_norm", lambda: pytest.fail("grad norm computed twice"))
    with pytest.raises(TrainingError) as e:
        trainer.train()
    msg = str(e.value)
    assert msg.startswith("The gradients are not finite (total norm inf) at iteration 4 (epoch 0, lr 0.1)")
    assert "although the loss is finite" in msg and "Usual fixes: a lower learning rate" in msg
    assert sorted(saved.saved) == [1, 2, 3]  # the rejected step never reached the "checkpoint"
    assert all(torch.isfinite(w).all() for w in trainer.model.state_dict().values())
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in saved.saved[3].items())
    assert trainer.last.grad_norm is not None and not torch.isfinite(trainer.last.grad_norm)


def test_nan_loss_stops_before_the_step():
    trainer = _toy_trainer()
    trainer.train_loader.batches[2]["label"][0] = float("nan")  # the loss of step 3 is NaN
    saved = _SaveWeights()
    trainer.register_hooks([NanLossHook(), saved])
    with pytest.raises(TrainingError, match=r"^The loss is nan at iteration 3 \(epoch 0"):
        trainer.train()
    assert sorted(saved.saved) == [1, 2]
    assert all(torch.isfinite(w).all() for w in trainer.model.state_dict().values())


def test_float16_amp_lets_the_grad_scaler_skip_inf_gradients():
    trainer = _toy_trainer(amp_dtype=torch.float16)
    assert trainer.scaler.is_enabled()
    saved = _SaveWeights()
    trainer.register_hooks([NanLossHook(), _PoisonGrad(at=4), saved])
    trainer.train()  # no error: GradScaler skips the step and lowers its scale, by design
    assert sorted(saved.saved) == list(range(1, 9))
    assert all(torch.equal(saved.saved[3][k], v) for k, v in saved.saved[4].items())  # step 4 skipped
    assert trainer.scaler.get_scale() < 65536.0


def test_other_rank_verdict_stops_every_rank():
    trainer = _toy_trainer()
    # a rank whose own loss and gradients are finite stops too when another rank's are not
    trainer.register_hooks([NanLossHook(all_reduce=lambda t: t + torch.tensor([1.0, 0.0], dtype=t.dtype))])
    with pytest.raises(TrainingError, match="The loss is not finite on another process at iteration 1"):
        trainer.train()


# --------------------------------------------------------------------------------------------------
# NaN guard end to end: the newest checkpoint holds finite weights, and resuming from it works
# --------------------------------------------------------------------------------------------------


class _InfGrad(torch.autograd.Function):
    """Identity forward, Inf backward: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def test_inf_gradients_leave_the_newest_checkpoint_finite_and_resumable(quick_overrides, tmp_path, monkeypatch):
    overrides = quick_overrides + ["config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1", "config.TEST_MODEL=False"]
    real_build_loss = train_engine.build_loss

    class InfGradAt6(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.inner, self.calls = real_build_loss(cfg), 0

        def forward(self, out, target):
            self.calls += torch.is_grad_enabled()
            loss = self.inner(out, target)
            return _InfGrad.apply(loss) if self.calls == 6 else loss

    monkeypatch.setattr(train_engine, "build_loss", InfGradAt6)
    with pytest.raises(TrainingError, match=r"The gradients are not finite \(total norm .*\) at iteration 6 \(epoch 1"):
        run_train_engine(compose_config(overrides))
    run = tmp_path / "run"
    assert os.readlink(run / LATEST) == "model_iteration5.torch"
    state = torch.load(run / LATEST, map_location="cpu", weights_only=False)
    weights = list(_tensors(state["classy_state_dict"]["base_model"]))
    assert weights and all(torch.isfinite(w).all() for w in weights if w.is_floating_point())
    monkeypatch.setattr(train_engine, "build_loss", real_build_loss)
    trainer = run_train_engine(compose_config(overrides))  # resumes at iteration 5, no NaN
    assert trainer.iteration == 8
    losses = read_losses(run)
    assert sorted(losses) == list(range(1, 9)) and all(np.isfinite(v) for v in losses.values())


# --------------------------------------------------------------------------------------------------
# Unreadable images: distinct, united over ranks, epochs and resumes
# --------------------------------------------------------------------------------------------------


def _batch(indices, bad_paths):
    """A loader batch: ``bad_paths`` maps an index of the batch to its unreadable file."""
    return {
        "index": torch.tensor(indices),
        "bad": torch.tensor([int(i in bad_paths) for i in indices]),
        "bad_path": [bad_paths.get(i, "") for i in indices],
    }


def _feed(hook, batches):
    hook.trainer = SimpleNamespace(last=SimpleNamespace(micro=[SimpleNamespace(batch=b) for b in batches]))
    hook.trainer.device = torch.device("cpu")
    hook.after_step()


def test_bad_image_hook_counts_each_image_once_over_epochs_and_resumes():
    hook = BadImageHook(73, 0.05, all_reduce=lambda t: t)
    bad = {3: "/d/a.jpg", 40: "/d/b.jpg", 70: "/d/c.jpg"}
    for _epoch in range(2):  # 3 bad of 73 (4.1%) stays under 5% however many epochs read them
        for start in range(0, 73, 10):
            _feed(hook, [_batch(list(range(start, min(start + 10, 73))), bad)])
    assert hook.count == 3
    resumed = BadImageHook(73, 0.05, all_reduce=lambda t: t)
    resumed.load_state_dict(hook.state_dict())
    _feed(resumed, [_batch([3, 4], bad)])
    assert resumed.count == 3
    with pytest.raises(DataError) as e:  # a 4th: 5.5% > 5%
        _feed(resumed, [_batch([3, 5], {3: "/d/a.jpg", 5: "/d/d.jpg"})])
    msg = str(e.value)
    assert msg.startswith("4 training images could not be read, more than config.DATA.MAX_BAD_IMAGE_FRACTION=0.05")
    assert msg.endswith("Some of them: /d/a.jpg, /d/d.jpg, /d/b.jpg, /d/c.jpg.")  # each once, in data set order


def test_bad_image_hook_unites_ranks():
    # two ranks met the same bad image (a padded share) and one each of their own
    other_rank = {7: "/d/x.jpg", 9: "/d/y.jpg"}
    hook = BadImageHook(100, 0.5, all_reduce=lambda t: t * 2, gather=lambda mine: [mine, other_rank])
    _feed(hook, [_batch([7, 8], {7: "/d/x.jpg", 8: "/d/z.jpg"})])
    assert hook.count == 3 and set(hook.bad.paths) == {7, 8, 9}


def _bad_folder(root, n_bad):
    paths = make_folder(root, per_class=8, size=16)
    for p in paths[:n_bad]:
        with open(p, "wb") as f:
            f.write(b"\x89PNG broken")
    return paths


def test_unreadable_test_images_are_counted_and_stop_past_the_limit(quick_overrides, tmp_path):
    paths = _bad_folder(tmp_path / "test_imgs", 1)
    overrides = quick_overrides + [
        "config.DATA.TEST.DATA_SOURCES=[disk_folder]",
        f"config.DATA.TEST.DATA_PATHS=[{tmp_path / 'test_imgs'}]",
        "+config/test/overlays=one_epoch",
    ]
    run_train_engine(compose_config(overrides + ["config.DATA.MAX_BAD_IMAGE_FRACTION=0.1"]))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert (
        f"1 of the 16 TEST images could not be read in the test phase after epoch 0 (each replaced by another image): {paths[0]}\n"
        in log
    )
    with pytest.raises(DataError, match=r"^1 TEST images could not be read in the test phase after epoch 0, more"):
        run_train_engine(
            compose_config(
                overrides + ["config.DATA.MAX_BAD_IMAGE_FRACTION=0.05", f"config.CHECKPOINT.DIR={tmp_path / 'run2'}"]
            )
        )


def test_unreadable_images_in_feature_extraction_are_counted(tmp_path):
    _bad_folder(tmp_path / "imgs", 2)
    Image.new("RGB", (16, 16)).save(tmp_path / "imgs" / "dog" / "extra.png")
    overrides = [
        "config=test/quick_vit",
        "+config/test/overlays=knn",
        "config.ENGINE_NAME=extract_features",
        "config.EXTRACT_FEATURES.SPLITS=[TEST]",
        "config.DATA.TEST.DATA_SOURCES=[disk_folder]",
        f"config.DATA.TEST.DATA_PATHS=[{tmp_path / 'imgs'}]",
        "config.DATA.MAX_BAD_IMAGE_FRACTION=0.1",
        "config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True",
        f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
    ]
    with pytest.raises(DataError, match=r"^2 TEST images could not be read during feature extraction, more than"):
        run_extract_features_engine(compose_config(overrides))
