"""The path from the command line to the ViT's forward (issue 13): at most 6 calls, through at most 4
files of the engine, so that a reader can follow a run from ``main`` to the model in one sitting.

Counted as the frames of vissl_vit's own code on the stack when the trunk's forward starts, from
``main`` (the command line: tools/run_distributed_engines.py and the ``vissl-vit-train`` script
both call it) to the trunk's forward; torch's frames (``nn.Module.__call__``) are not counted.
Before this change: main -> cli_main -> <lambda> -> launch -> run_worker -> run_train_engine ->
Trainer.train -> Trainer.step -> TrunkHeadModel.forward -> VisionTransformer.forward, 9 calls
through 6 files (launch, cli, train_engine, trainer, model, vision_transformer).
"""

from __future__ import annotations

import os
import traceback

from vissl_vit.engine.launch import main
from vissl_vit.models.trunks.vision_transformer import VisionTransformer

PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep + "vissl_vit"


def test_the_command_line_reaches_the_vit_forward_in_six_calls_through_four_files(tmp_path, monkeypatch):
    seen: list[traceback.FrameSummary] = []
    original = VisionTransformer.forward

    def recorded(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not seen:
            seen.extend(f for f in traceback.extract_stack()[:-1] if f.filename.startswith(PACKAGE + os.sep))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VisionTransformer, "forward", recorded)
    status = main(
        [
            "config=test/quick_vit",
            "config.TEST_MODEL=False",
            "config.OPTIMIZER.num_epochs=1",
            "config.DATA.TRAIN.DATA_LIMIT=16",
            f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
        ]
    )
    assert status == 0
    path = [(os.path.relpath(f.filename, PACKAGE), f.name) for f in seen] + [
        ("models/trunks/vision_transformer.py", "forward")
    ]
    names = [name for _, name in path]
    assert names[0] == "main" and path[-1][0] == "models/trunks/vision_transformer.py", path
    assert len(path) - 1 <= 6, path  # calls: the edges from main to the trunk's forward
    files = {file for file, _ in path[:-1]}  # the engine's files the path runs through
    assert len(files) <= 4, path
    assert names == ["main", "launch", "run_train_engine", "train", "step", "forward", "forward"], path
