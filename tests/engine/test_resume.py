"""kill -9 a run mid-way, rerun the same command: the losses equal an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO, read_losses, run_cli

# runs long enough (60 steps) to be killed in the middle, with every source of randomness on:
# dropout, drop-path, random augmentations in a worker process, shuffling; and the algorithms'
# state: MoCo's momentum encoder and queue, SwAV's queue and temporarily frozen prototypes
LONGER = [
    "config.DATA.NUM_DATALOADER_WORKERS=1",
    "config.DATA.SYNTHETIC.NUM_IMAGES=160",
    "config.OPTIMIZER.num_epochs=6",
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=3",
    "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3",
]
RUNS = {
    "supervised": [
        "config=test/quick_vit",
        "config.DATA.SYNTHETIC.IMAGE_SIZE=32",
        "config.MODEL.TRUNK.VISION_TRANSFORMERS.IMAGE_SIZE=32",
        "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 32}, {name: RandomHorizontalFlip}, {name: ToTensor}]",
    ],
    "moco_v3": ["config=test/quick_moco"],
    "moco_v2": ["config=test/quick_moco", "+config/test/overlays=moco_v2", "config.LOSS.moco_loss.queue_size=48"],
    "swav": [
        "config=test/quick_swav",
        "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[[heads.0.prototypes0.weight,20]]",
        "config.LOSS.swav_loss.queue.start_iter=10",
    ],
}
# a DeiT-like recipe (issue 13): the model EMA (updated every 2nd step, overwritten during the first
# 5% of training, evaluated in the test phases, kept in checkpoints though SAVE_EMA_MODEL is off),
# layer-wise LR decay, LAMB and repeated augmentation, all at once
RUNS["deit_recipe"] = RUNS["supervised"] + [
    "config.HOOKS.EMA_MODEL.ENABLE_EMA_METERS=True",
    "config.HOOKS.EMA_MODEL.UPDATE_ITER=2",
    "config.HOOKS.EMA_MODEL.DECAY=0.9",
    "config.OPTIMIZER.param_group_constructor=lr_decay",
    "config.OPTIMIZER.layer_wise_lr_decay.decay=0.75",
    "config.OPTIMIZER.name=lamb",
    "config.DATA.TRAIN.REPEATED_AUGMENTATIONS=3",
]
# long (outside CI): swav, whose queue resume a faster test covers (tests/losses/test_swav_state.py);
# supervised, whose path deit_recipe runs with EMA, layer decay, LAMB and repeated augmentation on
# top; and moco_v3, whose state (the momentum encoder; its momentum is a function of the iteration)
# moco_v2 saves and restores too, with the queue on top
LONG_CASES = ("swav", "supervised", "moco_v3")
CASES = [pytest.param(name, marks=pytest.mark.long) if name in LONG_CASES else name for name in RUNS]


def _final_state(run_dir) -> dict[str, torch.Tensor]:
    """Every tensor of the final model (trunk, heads, momentum encoder), loss (queues) and model EMA."""
    state = torch.load(os.path.join(run_dir, "checkpoint.torch"), map_location="cpu", weights_only=False)
    csd = state["classy_state_dict"]
    flat = {f"model.{g}.{k}": v for g, group in csd["base_model"]["model"].items() for k, v in group.items()}
    flat.update({f"loss.{k}": v for k, v in csd["loss"].items()})
    flat.update({f"ema.{k}": v for k, v in state["hooks"].get("EmaModelHook", {}).get("ema", {}).items()})
    return flat


@pytest.mark.parametrize("name", CASES)
def test_kill_dash_nine_and_rerun_gives_the_same_losses(tmp_path, name):
    ARGS = RUNS[name] + LONGER
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = run_cli(*ARGS, f"config.CHECKPOINT.DIR={ref_dir}")
    assert ref.returncode == 0, ref.stderr
    expected = read_losses(ref_dir)
    assert sorted(expected) == list(range(1, 61))

    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "run_distributed_engines.py"), *ARGS, f"config.CHECKPOINT.DIR={run_dir}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    killed_after = None
    while time.monotonic() < deadline and proc.poll() is None:
        stdout_json = run_dir / "stdout.json"
        if stdout_json.exists():
            done = read_losses(run_dir)
            if done and max(done) >= 17:  # past several checkpoints, mid-epoch 2
                os.killpg(proc.pid, signal.SIGKILL)
                killed_after = max(done)
                break
        time.sleep(0.01)
    proc.wait()
    assert killed_after is not None and killed_after < 60, "the run ended before it could be killed"

    rerun = run_cli(*ARGS, f"config.CHECKPOINT.DIR={run_dir}")
    assert rerun.returncode == 0, rerun.stderr
    assert "Resuming from" in rerun.stdout
    assert read_losses(run_dir) == expected  # bit-for-bit, every iteration
    ref_state, run_state = _final_state(ref_dir), _final_state(run_dir)
    assert ref_state.keys() == run_state.keys()
    assert [k for k in ref_state if not torch.equal(ref_state[k], run_state[k])] == []
    if name == "deit_recipe":  # the EMA is in the final checkpoint, and differs from the model
        ema = {k.removeprefix("ema."): v for k, v in ref_state.items() if k.startswith("ema.")}
        assert ema and not torch.equal(ema["trunk.cls_token"], ref_state["model.trunk.cls_token"])
