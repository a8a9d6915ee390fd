"""Fine-tuning end to end: a tiny ViT trained at 16 px is fine-tuned at 24 px with a new head of
another class count through benchmark/fulltune/vit_fulltune; the mismatched-head error."""

from __future__ import annotations

import pytest
import torch

from vissl_vit import compose_config, run_train_engine
from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.errors import UserError
from vissl_vit.models import apply_weights_init, build_model
from vissl_vit.models.weights import read_weights_file, select_state_dict

timm_layers = pytest.importorskip("timm.layers")

DIM, PRE_CLASSES, NEW_CLASSES = 32, 4, 7
# the tiny trunk of test/quick_vit, at 24 px (a 6x6 grid of patches instead of 4x4)
TINY = [
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.IMAGE_SIZE=24",
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.PATCH_SIZE=4",
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS=2",
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_HEADS=2",
    f"config.MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM={DIM}",
    "config.MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=64",
    f'config.MODEL.HEAD.PARAMS=[["vision_transformer_head", {{"in_plane": {DIM}, "num_classes": {NEW_CLASSES}}}]]',
]
RUN = [  # one epoch of 2 iterations on synthetic 24 px images, on the CPU
    "config.MACHINE.DEVICE=cpu",
    "config.MACHINE.CPU_THREADS=1",
    "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
    "config.MODEL.AMP_PARAMS.USE_AMP=False",
    "config.TEST_MODEL=False",
    "config.LOG_FREQUENCY=1",
    "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
    "config.OPTIMIZER.num_epochs=1",
    "config.DATA.NUM_DATALOADER_WORKERS=0",
    "config.DATA.SYNTHETIC.NUM_IMAGES=32",
    "config.DATA.SYNTHETIC.IMAGE_SIZE=24",
    f"config.DATA.SYNTHETIC.NUM_CLASSES={NEW_CLASSES}",
    "config.DATA.TRAIN.DATA_SOURCES=[synthetic]",
    "config.DATA.TRAIN.DATASET_NAMES=[]",
    "config.DATA.TRAIN.DATA_PATHS=[]",
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
    "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 24, interpolation: bicubic}, "
    "{name: RandAugment, magnitude: 9, magnitude_std: 0.5, increasing_severity: True, interpolation: bicubic}, "
    "{name: ToTensor}]",
    "config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS={mixup_alpha: 0.8, cutmix_alpha: 1.0, label_smoothing: 0.1, "
    f"num_classes: {NEW_CLASSES}}}",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A run folder of test/quick_vit (16 px, 4 classes) after 2 iterations."""
    run = tmp_path_factory.mktemp("pretrain") / "run"
    run_train_engine(
        compose_config(
            [
                "config=test/quick_vit",
                f"config.CHECKPOINT.DIR={run}",
                "config.OPTIMIZER.num_epochs=1",
                "config.DATA.SYNTHETIC.NUM_IMAGES=32",
                "config.TEST_MODEL=False",
            ]
        )
    )
    return str(run)


def _file_state(run: str) -> dict[str, torch.Tensor]:
    return select_state_dict(read_weights_file(run), "classy_state_dict")[0]


def _fulltune(pretrained: str, tmp_path, *extra: str):
    return compose_config(
        [
            "config=benchmark/fulltune/vit_fulltune",
            f"config.CHECKPOINT.DIR={tmp_path / 'ft'}",
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pretrained}",
            *TINY,
            *RUN,
            *extra,
        ]
    )


class _FirstState(HookBase):
    """The model's state and the optimizer's groups as training starts (after MODEL.WEIGHTS_INIT)."""

    def before_train(self) -> None:
        self.state = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
        self.lr_scales = sorted({round(g["lr_scale"], 6) for g in self.trainer.optimizer.param_groups})


def test_fine_tuning_loads_the_trunk_resamples_pos_embed_and_trains_a_new_head(pretrained, tmp_path):
    first = _FirstState()
    trainer = run_train_engine(_fulltune(pretrained, tmp_path), extra_hooks=[first])
    assert trainer.iteration == 2
    file = _file_state(pretrained)
    state = first.state
    trunk = [k for k in file if k.startswith("trunk.")]
    assert len(trunk) > 20
    for key in trunk:
        if key == "trunk.pos_embed":
            continue
        assert torch.equal(state[key], file[key]), key  # loaded as they are, before the first step
    # the 4x4 grid of 16 px resampled to the 6x6 grid of 24 px as timm resamples it (bicubic, antialiased)
    assert file["trunk.pos_embed"].shape == (1, 1 + 16, DIM) and state["trunk.pos_embed"].shape == (1, 1 + 36, DIM)
    ref = timm_layers.resample_abs_pos_embed(file["trunk.pos_embed"], new_size=(6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(state["trunk.pos_embed"], ref, rtol=0, atol=0)
    # the head is new: another class count, not read from the file
    head = [k for k in state if k.startswith("heads.")]
    assert head and all(k in file for k in head)
    assert state["heads.0.layers.head.weight"].shape == (NEW_CLASSES, DIM)
    assert file["heads.0.layers.head.weight"].shape == (PRE_CLASSES, DIM)
    # layer-wise LR decay 0.65 over 2 blocks: embeddings 0.65^3, block 0 0.65^2, block 1 0.65, head and norm 1
    assert first.lr_scales == [round(0.65**i, 6) for i in (3, 2, 1, 0)]


def test_a_head_that_does_not_fit_suggests_scope_trunk(pretrained, tmp_path):
    cfg = _fulltune(pretrained, tmp_path, "config.MODEL.WEIGHTS_INIT.SCOPE=model").config
    with pytest.raises(UserError) as err:
        apply_weights_init(build_model(cfg), cfg)
    msg = str(err.value)
    assert f"heads.0.layers.head.weight: file ({PRE_CLASSES}, {DIM}), model ({NEW_CLASSES}, {DIM})" in msg
    hint = [line for line in msg.splitlines() if "SCOPE=trunk" in line]
    assert len(hint) == 1 and "config.MODEL.WEIGHTS_INIT.SCOPE=trunk" in hint[0]
    assert "REMOVE_PREFIX" not in msg  # the names are right: the generic name fixes would mislead
    # a file without any head (a bare trunk) gets the same advice
    trunk_only = {k: v for k, v in _file_state(pretrained).items() if k.startswith("trunk.")}
    torch.save(trunk_only, tmp_path / "trunk.pth")
    cfg = _fulltune(str(tmp_path / "trunk.pth"), tmp_path, "config.MODEL.WEIGHTS_INIT.SCOPE=model").config
    with pytest.raises(UserError, match=r"config\.MODEL\.WEIGHTS_INIT\.SCOPE=trunk"):
        apply_weights_init(build_model(cfg), cfg)


def test_a_trunk_that_does_not_fit_gets_no_new_head_advice(pretrained, tmp_path):
    cfg = _fulltune(
        pretrained,
        tmp_path,
        "config.MODEL.WEIGHTS_INIT.SCOPE=model",
        "config.MODEL.TRUNK.VISION_TRANSFORMERS.MLP_DIM=128",
        f'config.MODEL.HEAD.PARAMS=[["vision_transformer_head", {{"in_plane": {DIM}, "num_classes": {PRE_CLASSES}}}]]',
    ).config
    with pytest.raises(UserError) as err:
        apply_weights_init(build_model(cfg), cfg)
    assert "mlp.fc1.weight" in str(err.value) and "SCOPE=trunk" not in str(err.value)
