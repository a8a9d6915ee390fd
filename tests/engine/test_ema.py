"""The model EMA: the shared EMA routine (closed form, timm's ModelEma v1, MoCo's momentum update),
the hook's VISSL semantics (UPDATE_ITER, WARMUP) on a toy trainer, its state, and EMA test phases."""

from __future__ import annotations

import json

import pytest
import torch
from timm.utils.model_ema import ModelEma as TimmModelEma
from torch import nn

from tests.engine.toy import ToyLoader, toy_trainer
from vissl_vit import compose_config, run_train_engine
from vissl_vit.engine.hooks import EmaModelHook, HookBase, HookContext, TrainMeterHook, build_hooks
from vissl_vit.engine.hooks.phases import PhaseWriter
from vissl_vit.engine.trainer import Trainer
from vissl_vit.errors import ConfigError
from vissl_vit.models import build_model
from vissl_vit.models.ema import ModelEma, ema_update_

# --------------------------------------------------------------------------------------------------
# the routine and ModelEma
# --------------------------------------------------------------------------------------------------


def test_constant_source_gives_the_closed_form_exactly():
    # ema_N = d^N ema_0 + (1 - d^N) w; d = 3/4 and small integers keep every value exact in float32
    d, w0, e0 = 0.75, torch.tensor([1.0, -2.0, 4.0]), torch.tensor([2.0, 0.0, -8.0])
    ema = e0.clone()
    for n in range(1, 9):
        ema_update_([ema], [w0], d)
        assert torch.equal(ema, d**n * e0 + (1 - d**n) * w0), n


def test_the_update_is_the_loop_reference_bit_for_bit():
    torch.manual_seed(0)
    targets = [torch.randn(5, 3), torch.randn(7, dtype=torch.float64), torch.randint(0, 9, (4,))]
    sources = [[torch.randn_like(t.double()).to(t.dtype) for t in targets] for _ in range(5)]
    ref = [t.clone() for t in targets]
    for step in sources:
        ema_update_(targets, step, 0.9)
        for i, (r, s) in enumerate(zip(ref, step)):  # one tensor at a time: r * d, then + (1 - d) s
            ref[i] = r.mul(0.9).add(s, alpha=1 - 0.9) if r.is_floating_point() else s.clone()
    assert all(torch.equal(t, r) for t, r in zip(targets, ref))
    assert torch.equal(targets[2], sources[-1][2])  # the integer tensor is the last source's copy


class _Net(nn.Module):
    """Parameters, a float buffer (BatchNorm's running statistics) and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def _dyadic_(model: nn.Module, step: int) -> None:
    """Set every float tensor to multiples of 1/8 (exact arithmetic below), another per step."""
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randint(-32, 32, t.shape, generator=g).to(t.dtype) / 8)
            else:
                t.fill_(step)


def test_model_ema_equals_timm_model_ema_v1_over_the_whole_state_dict():
    model = _Net()
    _dyadic_(model, 0)
    ours, timm_ema = ModelEma(model), TimmModelEma(model, decay=0.75)
    for step in range(1, 6):
        _dyadic_(model, step)
        ours.update(model, 0.75)
        timm_ema.update(model)
    mine, theirs = ours.module.state_dict(), timm_ema.ema.state_dict()
    floats = [k for k, v in theirs.items() if v.is_floating_point()]
    assert "bn.running_mean" in floats and "bn.running_var" in floats  # buffers are averaged too
    assert [k for k in floats if not torch.equal(mine[k], theirs[k])] == []
    assert not torch.equal(mine["fc.weight"], model.fc.weight)  # an average, not a copy
    # integer buffers: copied (timm v1 averages and truncates them)
    assert mine["bn.num_batches_tracked"].item() == 5 and theirs["bn.num_batches_tracked"].item() != 5


def test_model_ema_copy_is_frozen_in_eval_mode_and_set_copies():
    model = _Net().train()
    wrapper = nn.Module()  # a stand-in for DDP's wrapper: the model under .module is copied
    wrapper.module = model
    ema = ModelEma(wrapper)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    assert set(ema.module.state_dict()) == set(model.state_dict())  # no "module." prefix
    _dyadic_(model, 3)
    ema.set(wrapper)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(), model.state_dict().values()))


def test_model_ema_state_round_trip_and_cpu_copies():
    model = _Net()
    ema = ModelEma(model)
    _dyadic_(model, 1)
    ema.update(model, 0.5)
    state = ema.state_dict()
    ema.update(model, 0.5)  # the saved state does not follow later updates
    assert not torch.equal(state["fc.weight"], ema.module.fc.weight)
    other = ModelEma(_Net())
    other.load_state_dict(state)
    assert all(torch.equal(other.module.state_dict()[k], v) for k, v in state.items())
    ema.load_state_dict(state)
    assert torch.equal(ema.module.fc.weight, state["fc.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a GPU model with a CPU EMA)")
def test_a_cpu_ema_of_a_gpu_model_equals_the_gpu_ema():
    model = _Net().cuda()
    _dyadic_(model, 0)
    on_gpu, on_cpu = ModelEma(model), ModelEma(model, torch.device("cpu"))
    assert on_gpu.device.type == "cuda" and on_cpu.device.type == "cpu"
    for step in range(1, 4):
        _dyadic_(model, step)
        on_gpu.update(model, 0.75)
        on_cpu.update(model, 0.75)
    a, b = on_gpu.state_dict(), on_cpu.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_moco_momentum_update_is_unchanged_bit_for_bit():
    cfg = compose_config(["config=test/quick_moco"]).config
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    online = list(model.trunk.parameters()) + [
        p for h in list(model.heads)[: model.num_key_heads] for p in h.parameters()
    ]
    target = [p.detach().clone() for p in model.momentum_encoder.parameters()]
    m = model.update_momentum_encoder(0.3)
    torch._foreach_mul_(target, m)  # the update as MoCoModel wrote it before the shared routine
    torch._foreach_add_(target, online, alpha=1.0 - m)
    assert len(target) == len(online)
    assert all(torch.equal(a, b) for a, b in zip(model.momentum_encoder.parameters(), target))
    pairs = model.ema_pairs()
    assert pairs[0] == (model.trunk, model.momentum_encoder.trunk) and len(pairs) == 1 + model.num_key_heads


# --------------------------------------------------------------------------------------------------
# the hook on a toy trainer
# --------------------------------------------------------------------------------------------------


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Net()
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _trainer(max_iterations: int, iterations_per_epoch: int = 4) -> Trainer:
    return toy_trainer(
        ToyLoader(iterations_per_epoch), _Toy, iterations_per_epoch=iterations_per_epoch, max_iterations=max_iterations
    )


class _Snapshots(HookBase):
    """The model's state dict after each optimizer step (registered before the EMA hook)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def before_train(self) -> None:
        self.states[self.trainer.iteration] = {k: v.clone() for k, v in self.trainer.model.state_dict().items()}

    after_step = before_train


def test_update_iter_and_warmup_choose_the_iterations_exactly():
    hook = EmaModelHook(_Toy(), decay=0.9, update_iter=3, warmup=0.25, ema_device="gpu")
    actions = {k: hook.action(k, 20) for k in range(1, 21)}
    # k % 3 == 0 acts; (k - 1) / 20 < 0.25, i.e. k <= 5, overwrites; later ones average
    assert {k for k, a in actions.items() if a == "set"} == {3}
    assert {k for k, a in actions.items() if a == "update"} == {6, 9, 12, 15, 18}
    every = EmaModelHook(_Toy(), decay=0.9, update_iter=1, warmup=0.05, ema_device="cpu")
    assert [every.action(k, 40) for k in (1, 2, 3)] == ["set", "set", "update"]  # (k-1)/40 < 0.05: k <= 2
    assert EmaModelHook(_Toy(), 0.9, 1, 0.0, "gpu").action(1, 40) == "update"  # no warm-up: from step 1


def test_hook_ema_after_n_steps_equals_the_reference_sequence():
    trainer = _trainer(max_iterations=12)
    snaps, ema = _Snapshots(), EmaModelHook(trainer.model, decay=0.75, update_iter=2, warmup=0.25, ema_device="gpu")
    trainer.register_hooks([snaps, ema])
    trainer.train()
    ref = {k: v.clone() for k, v in snaps.states[0].items()}  # before_train: the EMA is the model
    for k in range(1, 13):
        if k % 2:
            continue
        model = snaps.states[k]
        if (k - 1) / 12 < 0.25:  # k = 2: overwrite
            ref = {n: v.clone() for n, v in model.items()}
        else:
            ref = {
                n: v.mul(0.75).add(model[n], alpha=0.25) if v.is_floating_point() else model[n] for n, v in ref.items()
            }
    got = ema.ema.module.state_dict()
    assert [n for n in ref if not torch.equal(ref[n], got[n])] == []
    assert got["trunk.bn.num_batches_tracked"].item() == 12  # copied at the last update (k = 12)
    assert not torch.equal(got["head.weight"], trainer.model.head.weight)


def test_hook_state_round_trip_resumes_exactly():
    full = _trainer(max_iterations=8)
    full_ema = EmaModelHook(full.model, decay=0.5, update_iter=1, warmup=0.0, ema_device="gpu")
    full.register_hooks([full_ema])
    full.train()

    first = _trainer(max_iterations=4)  # the first epoch of the same run (no warm-up: progress-free)
    first_ema = EmaModelHook(first.model, decay=0.5, update_iter=1, warmup=0.0, ema_device="gpu")
    first.register_hooks([first_ema])
    first.train()
    saved, model_sd = first.state_dict(), first.model.state_dict()
    assert set(saved["hooks"]) == {"EmaModelHook"} and set(saved["hooks"]["EmaModelHook"]) == {"ema"}

    resumed = _trainer(max_iterations=8)
    resumed.model.load_state_dict(model_sd)
    resumed_ema = EmaModelHook(resumed.model, decay=0.5, update_iter=1, warmup=0.0, ema_device="gpu")
    resumed.register_hooks([resumed_ema])
    resumed.load_state_dict(saved)
    resumed.train()
    a, b = full_ema.ema.module.state_dict(), resumed_ema.ema.module.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_checkpoint_without_an_ema_starts_it_from_the_resumed_weights(caplog):
    first = _trainer(max_iterations=4)
    first.train()  # no EMA hook: the checkpoint holds none
    resumed = _trainer(max_iterations=8)
    # built before the resume loads the weights, as build_hooks is; DECAY 1: the EMA never moves
    hook = EmaModelHook(resumed.model, decay=1.0, update_iter=1, warmup=0.0, ema_device="gpu")
    resumed.model.load_state_dict(first.model.state_dict())
    resumed.register_hooks([hook])
    resumed.load_state_dict(first.state_dict())
    resumed.train()
    got = hook.ema.module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in first.model.state_dict().items() if v.is_floating_point())
    assert "holds no model EMA" in caplog.text


def test_train_meter_loss_stays_on_the_device_and_saves_floats():
    trainer = _trainer(max_iterations=8)
    meter = TrainMeterHook(None, PhaseWriter(None, None, "meter"), all_reduce=lambda t: t)
    losses, seen = [], {}

    class _Probe(HookBase):
        def after_step(self) -> None:
            losses.append(self.trainer.last.loss.item())
            if self.trainer.iteration == 6:  # mid-epoch 1: two steps summed
                seen["sum"], seen["state"] = meter.loss_sum, meter.state_dict()

    trainer.register_hooks([meter, _Probe()])
    trainer.train()
    assert isinstance(seen["sum"], torch.Tensor) and seen["sum"].dtype == torch.float64
    state = seen["state"]
    assert type(state["loss_sum"]) is float and state["loss_sum"] == losses[4] + losses[5]  # Python's sum
    assert state["steps"] == 2
    resumed = TrainMeterHook(None, PhaseWriter(None, None, "meter"), all_reduce=lambda t: t)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state


# --------------------------------------------------------------------------------------------------
# build_hooks and the engine
# --------------------------------------------------------------------------------------------------


def _context(tmp_path, test_loader=None) -> HookContext:
    return HookContext(
        run_dir=str(tmp_path),
        primary=True,
        world_size=1,
        train_size=0,
        test_loader=test_loader,
        stdout_json=None,
        tb=None,
        phase_writer=PhaseWriter(None, None, "accuracy_list_meter"),
        config_yaml="",
    )


@pytest.mark.parametrize("save, meters", [(True, False), (False, True), (False, False)])
def test_the_hook_is_on_when_either_key_is(tmp_path, save, meters):
    cfg = compose_config(
        [
            "config=test/quick_moco",
            "config.METERS.name=accuracy_list_meter",  # built only (MoCo's outputs are not classes)
            f"config.HOOKS.EMA_MODEL.SAVE_EMA_MODEL={save}",
            f"config.HOOKS.EMA_MODEL.ENABLE_EMA_METERS={meters}",
        ]
    ).config
    hooks = build_hooks(cfg, _context(tmp_path, test_loader=ToyLoader(1)), build_model(cfg))
    kinds = [type(h).__name__ for h in hooks]
    if not (save or meters):
        assert "EmaModelHook" not in kinds
        return
    # after the method's upkeep (the momentum encoder), before the meters, test phase and checkpoint
    assert kinds.index("MomentumEncoderHook") + 1 == kinds.index("EmaModelHook") < kinds.index("TrainMeterHook")
    assert kinds.index("EmaModelHook") < kinds.index("TestHook") < kinds.index("CheckpointHook")
    ema, test = hooks[kinds.index("EmaModelHook")], hooks[kinds.index("TestHook")]
    assert (test.ema is ema.ema) == meters and (test.ema_meter is not None) == meters
    assert test.ema_meter is not test.meter
    assert ema.state_dict()["ema"]  # kept for the checkpoint whichever key turned it on


@pytest.mark.parametrize(
    "override, match",
    [
        ("DECAY=1.5", r"config\.HOOKS\.EMA_MODEL\.DECAY=1\.5: expected a number in \[0, 1\]"),
        ("UPDATE_ITER=0", r"config\.HOOKS\.EMA_MODEL\.UPDATE_ITER=0: expected an integer >= 1"),
        ("WARMUP=2.0", r"config\.HOOKS\.EMA_MODEL\.WARMUP=2\.0: expected a fraction"),
        ("EMA_DEVICE=tpu", r"config\.HOOKS\.EMA_MODEL\.EMA_DEVICE='tpu': expected one of \['gpu', 'cpu'\]"),
    ],
)
def test_bad_ema_values_are_one_line_config_errors(tmp_path, override, match):
    cfg = compose_config(
        ["config=test/quick_vit", "config.HOOKS.EMA_MODEL.SAVE_EMA_MODEL=True", f"config.HOOKS.EMA_MODEL.{override}"]
    ).config
    with pytest.raises(ConfigError, match=match):
        build_hooks(cfg, _context(tmp_path), build_model(cfg))


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# 32 images / 16 per step, 1 epoch: 2 iterations, one test phase
_TWO_STEPS = ["config=test/quick_vit", "config.DATA.SYNTHETIC.NUM_IMAGES=32", "config.OPTIMIZER.num_epochs=1"]


def test_test_phase_writes_the_ema_meter_beside_the_model_s(tmp_path):
    ema_on = ["config.HOOKS.EMA_MODEL.ENABLE_EMA_METERS=True", "config.HOOKS.EMA_MODEL.WARMUP=0.0"]
    # DECAY=1: the EMA stays the initial model; its test values are those of the untrained model
    run_train_engine(
        compose_config(
            [*_TWO_STEPS, *ema_on, "config.HOOKS.EMA_MODEL.DECAY=1.0", f"config.CHECKPOINT.DIR={tmp_path / 'a'}"]
        )
    )
    test = [m for m in _read(tmp_path / "a" / "metrics.json") if "test_loss" in m]
    assert len(test) == 1
    line = test[0]
    assert {"test_loss", "test_accuracy_list_meter", "test_loss_ema", "test_accuracy_list_meter_ema"} <= set(line)
    assert set(line["test_accuracy_list_meter_ema"]) == {"top_1", "top_2"}
    run_train_engine(
        compose_config([*_TWO_STEPS, "config.TEST_ONLY=True", f"config.CHECKPOINT.DIR={tmp_path / 'init'}"])
    )
    untrained = _read(tmp_path / "init" / "metrics.json")[-1]
    assert line["test_loss_ema"] == untrained["test_loss"] != line["test_loss"]
    assert line["test_accuracy_list_meter_ema"] == untrained["test_accuracy_list_meter"]
    ckpt = torch.load(tmp_path / "a" / "checkpoint.torch", map_location="cpu", weights_only=False)
    assert "trunk.cls_token" in ckpt["hooks"]["EmaModelHook"]["ema"]

    # DECAY=0: the EMA is the trained model after each update: the same values as the model's
    run_train_engine(
        compose_config(
            [*_TWO_STEPS, *ema_on, "config.HOOKS.EMA_MODEL.DECAY=0.0", f"config.CHECKPOINT.DIR={tmp_path / 'b'}"]
        )
    )
    line = [m for m in _read(tmp_path / "b" / "metrics.json") if "test_loss" in m][0]
    assert line["test_loss_ema"] == line["test_loss"]
    assert line["test_accuracy_list_meter_ema"] == line["test_accuracy_list_meter"]


def test_checkpoints_hold_each_step_s_ema_and_no_ema_keys_without_meters(tmp_path):
    # SAVE_EMA_MODEL only: an EMA in every checkpoint, of its own step; no EMA test values
    run_train_engine(
        compose_config(
            [
                *_TWO_STEPS,
                "config.DATA.SYNTHETIC.NUM_IMAGES=48",  # 3 steps: the first one's LR is 0
                "config.HOOKS.EMA_MODEL.SAVE_EMA_MODEL=True",
                "config.HOOKS.EMA_MODEL.WARMUP=0.0",
                "config.HOOKS.EMA_MODEL.DECAY=0.5",
                "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1",
                f"config.CHECKPOINT.DIR={tmp_path}",
            ]
        )
    )
    line = [m for m in _read(tmp_path / "metrics.json") if "test_loss" in m][0]
    assert not [k for k in line if k.endswith("_ema")]

    def load(name):
        state = torch.load(tmp_path / name, map_location="cpu", weights_only=False)
        groups = state["classy_state_dict"]["base_model"]["model"]
        model = {f"{g}.{k}": v for g, group in groups.items() for k, v in group.items()}
        return model, state["hooks"]["EmaModelHook"]["ema"]

    m1, e1 = load("model_iteration2.torch")
    m2, e2 = load("model_phase0.torch")
    assert e1.keys() == m1.keys() and any(not torch.equal(e1[k], m1[k]) for k in e1)  # an average, not a copy
    names = list(e1)
    expected = [e1[k].clone() for k in names]
    ema_update_(expected, [m2[k] for k in names], 0.5)  # step 3's update of step 2's EMA
    assert [k for k, v in zip(names, expected) if not torch.equal(v, e2[k])] == []
