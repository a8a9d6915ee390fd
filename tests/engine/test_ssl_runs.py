"""Self-supervised runs end to end: prototypes frozen then trained, kept unit-norm; momentum logged."""

from __future__ import annotations

import torch

from vissl_vit import compose_config, run_train_engine


def _protos(run, it):
    state = torch.load(run / f"model_iteration{it}.torch", weights_only=False)
    return state["classy_state_dict"]["base_model"]["model"]["heads"]["0.prototypes0.weight"]


def test_swav_prototypes_frozen_for_n_iterations_and_normalised(tmp_path):
    run = tmp_path / "run"
    trainer = run_train_engine(
        compose_config(
            [
                "config=test/quick_swav",
                f"config.CHECKPOINT.DIR={run}",
                "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1",
                "config.CHECKPOINT.KEEP_LAST=-1",  # reads model_iteration1-3 of 12
                "config.OPTIMIZER.num_epochs=3",
            ]
        )
    )
    assert trainer.iteration == 12
    p1, p2, p3 = _protos(run, 1), _protos(run, 2), _protos(run, 3)
    # frozen for iterations 0 and 1 (TEMP_FROZEN_PARAMS_ITER_MAP: 2): only re-normalisation's rounding
    torch.testing.assert_close(p1, p2, atol=1e-6, rtol=0)
    assert (p2 - p3).abs().max() > 1e-4  # trained from iteration 2 on
    torch.testing.assert_close(p3.norm(dim=1), torch.ones(10))  # normalised after each step
    head = trainer.model.heads[0]
    torch.testing.assert_close(head.prototypes0.weight.norm(dim=1), torch.ones(10))


def test_moco_momentum_encoder_moves_towards_online(tmp_path):
    trainer = run_train_engine(compose_config(["config=test/quick_moco", f"config.CHECKPOINT.DIR={tmp_path / 'run'}"]))
    online = dict(trainer.model.trunk.named_parameters())
    momentum = dict(trainer.model.momentum_encoder.trunk.named_parameters())
    moved = [n for n in online if online[n].requires_grad and not torch.equal(online[n], momentum[n])]
    assert moved, "the momentum encoder should lag behind the trained online network"
    assert trainer.last.extra["momentum"] == 1.0 - (1.0 - 0.99) * (1 + torch.cos(torch.tensor(torch.pi)).item()) / 2
