"""Our BigVisionRandAugment against big_vision's own ``pp/archive/autoaugment.py`` (issue 15),
through tools/parity/big_vision_randaug_check.py.

big_vision's code is not part of this repository: the upstream test runs only when the
environment variable BIG_VISION_DIR names a folder holding its ``autoaugment.py`` (plus a
``tensorflow_addons`` shim on TensorFlow >= 2.16, see the tool's docstring) and TensorFlow is
installed. TensorFlow runs in a subprocess (importing triton after TensorFlow segfaults).
About 50 s."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data.test_big_vision_randaug import spectrum_z as file_spectrum_z

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "parity" / "big_vision_randaug_check.py"


def _tool():
    spec = importlib.util.spec_from_file_location("big_vision_randaug_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tool_uses_the_test_files_statistic_and_gradient():
    tool = _tool()
    rng = np.random.default_rng(0)
    a, b = rng.dirichlet(np.ones(256), 40), rng.dirichlet(np.ones(256) * 2, 30)
    assert tool.spectrum_z(a, b) == file_spectrum_z(a, b)
    from tests.data.test_big_vision_randaug import GRADIENT

    np.testing.assert_array_equal(tool.gradient(), GRADIENT)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> dict:
    folder = os.environ.get("BIG_VISION_DIR")
    if not folder or not os.path.isfile(os.path.join(folder, "autoaugment.py")):
        pytest.skip("BIG_VISION_DIR does not name a folder with big_vision's autoaugment.py")
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (pip install tensorflow-cpu)")
    out = tmp_path_factory.mktemp("bv") / "check.json"
    cmd = [sys.executable, str(TOOL), "--big-vision-dir", folder, "--n", "100", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_each_op_equals_big_vision_at_magnitudes_10_and_3(upstream):
    rows = upstream["ops"]
    # 16 ops x 2 magnitudes: 11 unsigned single, 5 signed x 2 signs, Cutout x 5 centres; x 2 images
    assert len(rows) == 2 * 2 * (10 + 5 * 2 + 5)
    assert {r["op"] for r in rows} == set(_tool().bv.OP_NAMES)

    def same_arg(r: dict) -> bool:  # big_vision's signed arguments are float32 tensors
        if r["arg_theirs"] is None or r["arg_ours"] is None:
            return r["arg_theirs"] is r["arg_ours"]
        return r["arg_theirs"] == pytest.approx(r["arg_ours"], rel=1e-6)

    bad = [r for r in rows if r["max_abs"] or not same_arg(r)]
    assert not bad, bad


def test_replayed_randaugment_equals_big_vision_image_for_image(upstream):
    assert upstream["replay_n"] == 100 and upstream["replay_differ"] == 0, upstream["notes"]


def test_spectrum_matches_big_vision_and_fill_0_does_not(upstream):
    assert upstream["z_big_vision_vs_ours"] < 5.0
    assert upstream["z_big_vision_eager_vs_ours"] < 5.0
    assert upstream["z_fill0_vs_big_vision"] > 5.0
