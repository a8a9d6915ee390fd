"""TensorBoard: the step scalars (``step/``) and the phases' means (``train/``, ``test/``) under
separate tags, the hyper-parameters written once per run (issue 16), read back with tensorboard's
own event reader.

tensorboard without TensorFlow: tensorboard imports TensorFlow for its file I/O when it is
installed, and that import slows torch's CPU training (2.6x on the quickstart's SimpleViT overlay,
2 cores). The engine switches tensorboard to its TensorFlow stub; the event files are the same."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types

import numpy as np
import pytest

from tests.conftest import REPO
from vissl_vit import compose_config, run_train_engine
from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.engine.hooks.logging_hooks import LogHook

SCRIPT = """
import sys
from vissl_vit import compose_config, run_train_engine
run_train_engine(compose_config([
    "config=test/quick_vit", "config.TEST_MODEL=False", "config.OPTIMIZER.num_epochs=1",
    "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=True", "config.CHECKPOINT.DIR=" + sys.argv[1],
]))
print("tensorflow imported:", "tensorflow" in sys.modules)
"""


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed")
def test_a_run_with_tensorboard_does_not_import_tensorflow(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tensorflow imported: False" in out.stdout
    events = list((tmp_path / "run" / "tb_logs").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100  # the scalars were written, by the stub


def _events(run) -> list:
    """Every event of every event file in ``run``/tb_logs, file by file (tensorboard's own reader)."""
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted((run / "tb_logs").glob("events.out.tfevents.*"))
    return [e for f in files for e in EventFileLoader(str(f)).Load()]


def _scalars(run) -> dict[str, dict[int, float]]:
    """tag -> step -> value of every scalar (a step written twice keeps its last value)."""
    out: dict[str, dict[int, float]] = {}
    for e in _events(run):
        for v in e.summary.value:
            if v.metadata.plugin_data.plugin_name == "scalars" or v.HasField("simple_value"):
                value = v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0]
                out.setdefault(v.tag, {})[e.step] = value
    return out


def _hparams_written(run) -> int:
    """How many times the HParams tab's experiment summary was written."""
    return sum(v.tag == "_hparams_/experiment" for e in _events(run) for v in e.summary.value)


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_step_loss_and_phase_means_have_their_own_tags(quick_overrides, tmp_path):
    run_train_engine(compose_config(quick_overrides + ["config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=True"]))
    run = tmp_path / "run"
    scalars = _scalars(run)
    steps, phases = _jsonl(run / "stdout.json"), _jsonl(run / "metrics.json")
    # every step's loss and lr under step/, as float32 (what an event file stores), exactly
    assert scalars["step/loss"] == {r["iteration"]: float(np.float32(r["loss"])) for r in steps}
    assert scalars["step/lr"] == {r["iteration"]: float(np.float32(r["lr"])) for r in steps}
    assert set(scalars["step/images_per_sec"]) == set(range(1, 9))
    # the epochs' means under train/ and test/, one point per phase
    train = [p for p in phases if "train_loss" in p]
    test = [p for p in phases if "test_loss" in p]
    assert scalars["train/loss"] == {p["iteration"]: float(np.float32(p["train_loss"])) for p in train}
    assert scalars["test/loss"] == {p["iteration"]: float(np.float32(p["test_loss"])) for p in test}
    top1 = {p["iteration"]: float(np.float32(p["test_accuracy_list_meter"]["top_1"]["0"])) for p in test}
    assert scalars["test/top_1/0"] == top1 and set(top1) == {4, 8}
    # no tag of the step scalars is a phase's, nor the reverse: no section holds both
    assert not {"train/lr", "train/images_per_sec", "test/lr"} & set(scalars)
    assert set(scalars["train/loss"]) == {4, 8} and set(scalars["step/loss"]) == set(range(1, 9))
    assert set(scalars) - {t for t in scalars if t.startswith(("step/", "train/", "test/"))} == set()


class _StopAt(HookBase):
    """Stops the run (an error) before step ``n``: the next run resumes from the last checkpoint."""

    def __init__(self, n: int) -> None:
        self.n = n

    def before_step(self) -> None:
        if self.trainer.iteration + 1 == self.n:
            raise RuntimeError(f"stopped before step {self.n}")


def test_hparams_are_written_once_and_not_again_on_resume(quick_overrides, tmp_path):
    cfg = compose_config(quick_overrides + ["config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=True"])
    with pytest.raises(RuntimeError, match="stopped before step 6"):
        run_train_engine(cfg, extra_hooks=[_StopAt(6)])  # the epoch 0 checkpoint is written
    trainer = run_train_engine(cfg)  # resumes at iteration 4, with a second event file
    run = tmp_path / "run"
    log_hook = next(h for h in trainer.hooks if isinstance(h, LogHook))
    assert log_hook.hparams, "build_hooks passes the LogHook its hparams (run_hparams)"
    assert trainer.iteration == 8 and len(list((run / "tb_logs").glob("events.out.tfevents.*"))) == 2
    assert _hparams_written(run) == 1
    texts = [v for e in _events(run) for v in e.summary.value if v.tag.startswith("hparams")]
    assert len(texts) == 1 and "| trunk.num_layers | 2 |" in texts[0].tensor.string_val[0].decode()


def test_hparams_values_and_a_fresh_writer_on_resume(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from tests.engine.toy import toy_trainer

    run = tmp_path / "run"
    hparams = {"trunk": "toy", "lr": 0.1, "layers": 2, "flag": True, "shape": [1, 2]}

    def train(start: int) -> None:
        tb = SummaryWriter(str(run / "tb_logs"))
        t = toy_trainer(max_iterations=8)
        t.iteration = start  # what a resume sets before train()
        t.register_hooks([LogHook(4, None, tb, 1, lambda x: x, hparams=hparams)])
        t.train()
        tb.close()

    train(0)
    assert _hparams_written(run) == 1
    train(4)  # a resume into the same tb_logs: not again
    assert _hparams_written(run) == 1
    (run / "tb_logs").rename(tmp_path / "old_tb_logs")
    train(4)  # a resume with a fresh tb_logs (tensorboard newly on): written there
    assert _hparams_written(run) == 1
    from tensorboard.plugins.hparams import plugin_data_pb2

    exp = next(v for e in _events(run) for v in e.summary.value if v.tag == "_hparams_/session_start_info")
    info = plugin_data_pb2.HParamsPluginData.FromString(exp.metadata.plugin_data.content).session_start_info
    got = {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    assert got == {"trunk": "toy", "lr": 0.1, "layers": 2.0, "flag": True, "shape": "[1, 2]", "lr_peak": 0.1}
