"""Training curves (issue 16): a real tiny run folder, read back exactly, drawn to a PNG of the
asked size whose pixels change with the run; resumed runs' repeated lines; the one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from vissl_vit import compose_config, run_train_engine
from vissl_vit.errors import ConfigError
from vissl_vit.visualize.curves import SIZE, main, plot_curves, read_run, smooth


def _train(folder, seed: int):
    run_train_engine(
        compose_config(["config=test/quick_vit", f"config.CHECKPOINT.DIR={folder}", f"config.SEED_VALUE={seed}"])
    )
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real run folders of test/quick_vit (8 steps, 2 epochs, test phases), other seeds."""
    root = tmp_path_factory.mktemp("curves")
    return _train(root / "seed0", 0), _train(root / "seed1", 1)


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_series_are_the_files_numbers(runs):
    run = runs[0]
    curves = read_run(str(run))
    steps, phases = _jsonl(run / "stdout.json"), _jsonl(run / "metrics.json")
    assert curves.label == "seed0"
    assert curves.loss == [(r["iteration"], r["loss"]) for r in steps] and len(curves.loss) == 8
    assert curves.lr == [(r["iteration"], r["lr"]) for r in steps]
    train = [p for p in phases if "train_loss" in p]
    test = [p for p in phases if "test_loss" in p]
    assert curves.phase_loss["train"] == [(p["train_phase_idx"] + 1, p["train_loss"]) for p in train]
    assert curves.phase_loss["test"] == [(p["train_phase_idx"] + 1, p["test_loss"]) for p in test]
    top1 = [(p["train_phase_idx"] + 1, p["test_accuracy_list_meter"]["top_1"]["0"]) for p in test]
    assert curves.top1["test"] == top1 and [e for e, _ in top1] == [1, 2]


def test_a_resumed_runs_repeated_lines_keep_the_last(runs, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(runs[0], run)
    steps = _jsonl(run / "stdout.json")
    with open(run / "stdout.json", "a") as f:  # the resumed process logs iterations 5.. again
        for r in steps[4:]:
            f.write(json.dumps(dict(r, loss=r["loss"] + 1.0)) + "\n")
    phases = _jsonl(run / "metrics.json")
    with open(run / "metrics.json", "a") as f:
        f.write(json.dumps(dict(phases[-1], test_loss=9.0)) + "\n")
    curves = read_run(str(run))
    assert [it for it, _ in curves.loss] == list(range(1, 9))
    assert curves.loss[4:] == [(r["iteration"], r["loss"] + 1.0) for r in steps[4:]]
    assert curves.phase_loss["test"][-1] == (2, 9.0) and len(curves.phase_loss["test"]) == 2


def test_smoothing_is_tensorboards_debiased_moving_average():
    # s1 = 0.4 * 1 / (1 - 0.6) = 1; s2 = (0.6 * 0.4 + 0.4 * 2) / (1 - 0.36) = 1.04 / 0.64 = 1.625
    assert smooth([1.0, 2.0], 0.6) == pytest.approx([1.0, 1.625], abs=1e-15)
    assert smooth([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0], abs=1e-12)  # no pull towards 0
    assert smooth([1.0, 5.0], 0.0) == [1.0, 5.0]


def test_one_run_picture_its_size_and_default_place(runs):
    path = plot_curves([str(runs[0])])
    assert path == str(runs[0] / "pictures" / "curves.png")
    img = Image.open(path)
    assert img.format == "PNG" and img.size == SIZE


def test_the_picture_changes_with_the_runs(runs, tmp_path):
    def draw(name, dirs, **kw):
        return _pixels(plot_curves([str(r) for r in dirs], out=str(tmp_path / name), size=(480, 320), **kw))

    a, a_again, b = draw("a.png", runs[:1]), draw("a2.png", runs[:1]), draw("b.png", runs[1:])
    both = draw("ab.png", runs, labels=["LN", "BN"])
    assert a.shape == (320, 480, 3)
    assert (a == a_again).all()  # the same run draws the same picture
    assert (a != b).any(axis=-1).mean() > 0.001  # another seed: other curves
    assert (both != a).any(axis=-1).mean() > 0.001
    # the second run is drawn in its own colour (matplotlib's C1, orange: 255, 127, 14)
    orange = (255, 127, 14)
    assert (both == orange).all(axis=-1).sum() > 50 and not (a == orange).all(axis=-1).any()


def test_missing_or_empty_files_and_bad_arguments_are_one_line_errors(runs, tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere/stdout.json: no such file"):
        read_run(str(tmp_path / "nowhere"))
    run = tmp_path / "empty"
    shutil.copytree(runs[0], run)
    (run / "metrics.json").write_text("")
    with pytest.raises(ConfigError, match=r"empty/metrics.json: the file has no complete line"):
        read_run(str(run))
    with pytest.raises(ConfigError, match="2 runs and no out"):
        plot_curves([str(r) for r in runs])
    with pytest.raises(ConfigError, match="1 labels for 2 runs"):
        plot_curves([str(r) for r in runs], out=str(tmp_path / "x.png"), labels=["a"])


def test_the_command_line(runs, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main([str(runs[0]), str(runs[1]), "--labels", "a", "b", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and Image.open(out).size == SIZE
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vissl_vit: error:") and "stdout.json: no such file" in err and "\n" not in err
