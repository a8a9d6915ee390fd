"""kill -9 a 2-process Shampoo run after its first preconditioner recompute, rerun the same command:
the losses equal an uninterrupted run's, bit for bit (optimizer state through the weights_only
checkpoint: factor matrices, inverse roots, grafts, momenta)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import read_losses
from tests.engine.resume_utils import assert_same_losses, kill_at_iteration, run_to_end, start_run

# a minute on 2 idle cores: outside the README's test command (-m long runs it); the Shampoo state
# through the checkpoint hook's path is covered faster by tests/optim/test_shampoo.py, the kill -9
# mechanics by tests/engine/test_resume*.py
pytestmark = [pytest.mark.slow, pytest.mark.long]

# the overlay starts and recomputes the preconditioners every 4 steps; 2 epochs of 10 steps, a
# checkpoint every 3: the kill at >= 9 comes after the recomputes at 4 and 8, resumes from 9
SHAMPOO = ["+config/test/overlays=shampoo", "config.OPTIMIZER.num_epochs=2"]


def test_kill_dash_nine_and_rerun_gives_the_same_losses(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_to_end(ref, *SHAMPOO)
    expected = read_losses(ref)
    assert sorted(expected) == list(range(1, 21))

    last = kill_at_iteration(run, start_run(run, *SHAMPOO), 10)
    assert last < 20, "the run ended before it could be killed"
    proc = run_to_end(run, *SHAMPOO)
    assert "Resuming from" in proc.stdout
    assert_same_losses(read_losses(run), expected)

    state = torch.load(run / "checkpoint.torch", map_location="cpu", weights_only=True)
    qkv = state["classy_state_dict"]["optimizer"]["state"]["trunk.blocks.0.attn.qkv.weight"]
    assert {"momentum", "statistics_0", "pre_conditioners_1", "graft_statistics", "graft_count"} <= set(qkv)
    assert not torch.equal(qkv["pre_conditioners_0"], torch.eye(qkv["pre_conditioners_0"].shape[0]))  # recomputed
