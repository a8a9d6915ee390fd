"""tensorboard without TensorFlow: tensorboard imports TensorFlow for its file I/O when it is
installed, and that import slows torch's CPU training (2.6x on the quickstart's SimpleViT overlay,
2 cores). The engine switches tensorboard to its TensorFlow stub; the event files are the same."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO

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
