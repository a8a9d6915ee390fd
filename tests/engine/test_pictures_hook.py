"""HOOKS.PICTURES: the end-of-run pictures are drawn into the run folder when training reaches its
last step, not when it stops early; a picture that fails is a warning, not a failed run; an unknown
picture name is a config error before anything runs."""

from __future__ import annotations

import pytest
from PIL import Image

from vissl_vit import compose_config, run_train_engine
from vissl_vit.errors import ConfigError

SHORT = [
    "config.DATA.SYNTHETIC.NUM_IMAGES=32",
    "config.DATA.TEST.BATCHSIZE_PER_REPLICA=16",
    "config.OPTIMIZER.num_epochs=1",
]


def _cfg(run_dir, *extra):
    return compose_config(["config=test/quick_vit", f"config.CHECKPOINT.DIR={run_dir}", *SHORT, *extra])


def test_pictures_are_drawn_at_the_end_of_a_finished_run(tmp_path, monkeypatch):
    import vissl_vit.visualize.augmentations as aug

    def broken(*args, **kwargs):
        raise RuntimeError("no batch")

    monkeypatch.setattr(aug, "plot_augmentations", broken)
    run = tmp_path / "run"
    run_train_engine(_cfg(run, "config.HOOKS.PICTURES.DRAW=[attention,curves,augmentations]"))
    pictures = run / "pictures"
    assert sorted(p.name for p in pictures.iterdir()) == ["attention.png", "attention_matrices.png", "curves.png"]
    for p in pictures.iterdir():
        w, h = Image.open(p).size
        assert w >= 100 and h >= 100
    assert "the augmentations picture was not drawn: RuntimeError: no batch" in (run / "log.txt").read_text()


def test_no_pictures_without_draw_or_when_the_run_stops_early(tmp_path, monkeypatch):
    import vissl_vit.engine.hooks.checkpoint_hook as ck
    import vissl_vit.visualize.curves as curves

    drawn = []
    monkeypatch.setattr(curves, "plot_curves", lambda run_dirs, **kw: drawn.append(run_dirs) or "curves.png")
    run_train_engine(_cfg(tmp_path / "plain"))
    assert drawn == [] and not (tmp_path / "plain" / "pictures").exists()
    run_train_engine(_cfg(tmp_path / "finished", "config.HOOKS.PICTURES.DRAW=[curves]"))
    assert drawn == [[str(tmp_path / "finished")]]

    def boom(self):  # the epoch's checkpoint fails after the last step (iteration 2 of 2)
        raise RuntimeError(f"stopped at iteration {self.trainer.iteration}")

    monkeypatch.setattr(ck.CheckpointHook, "after_epoch", boom)
    with pytest.raises(RuntimeError, match="stopped at iteration 2"):
        run_train_engine(_cfg(tmp_path / "early", "config.HOOKS.PICTURES.DRAW=[curves]"))
    assert len(drawn) == 1  # not drawn for the run whose last epoch failed


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("config.HOOKS.PICTURES.DRAW=[atention]", "HOOKS.PICTURES.DRAW: unknown picture 'atention'"),
        ("config.HOOKS.PICTURES.NUM_IMAGES=0", "NUM_IMAGES=0: expected a whole number >= 1"),
        ("config.HOOKS.PICTURES.ATTENTION_BLOCKS=[0,2]", r"ATTENTION_BLOCKS: 2 is not a block; expected 0 \.\. 1"),
    ],
)
def test_bad_picture_settings_are_config_errors_when_composed(override, match):
    """Checked on every rank when the config is composed, not on rank 0 at the end (quick_vit: 2 blocks)."""
    with pytest.raises(ConfigError, match=match):
        compose_config(["config=test/quick_vit", override])
