"""big_vision's optimisation semantics (RECIPES.md 4.2, 4.10): decoupled weight decay scaled by the
schedule on kernels only, the warm-up from 0 in steps, Adam's first moment in bfloat16.

Expected values come from big_vision's formulas written out here (``optax.py::make``,
``utils.py::create_learning_rate_schedule``, optax ``scale_by_adam``), not from the implementation:
``theta <- theta - sched(t) (lr adam(g) + wd theta)`` with ``sched(t) = min(1, t / W) x 0.5 (1 +
cos(pi clip((t - W) / (T - W), 0, 1))))``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from vissl_vit import build_model, build_optimizer, compose_config, derive_run_values
from vissl_vit.engine.hooks import HookBase
from vissl_vit.engine.trainer import Trainer
from vissl_vit.errors import ConfigError
from vissl_vit.optim import build_lr_scheduler, build_wd_scheduler, get_param_groups, progress
from vissl_vit.optim.big_vision import BigVisionAdam
from vissl_vit.optim.build import to_torch_units, weight_decay_units

LR, WD, WARM, STEPS = 1e-3, 1e-4, 3, 8  # quick_vit: 64 images, batch 16 -> 4 steps/epoch, 2 epochs
B1, B2, EPS = 0.9, 0.999, 1e-8


def sched(t: int, warmup: int = WARM, total: int = STEPS) -> float:
    """big_vision's schedule factor at step t (its peak is 1)."""
    p = min(max((t - warmup) / (total - warmup), 0.0), 1.0)
    return min(1.0, t / warmup) * 0.5 * (1.0 + math.cos(math.pi * p))


def _cfg(*overrides: str):
    return compose_config(
        [
            "config=test/quick_vit",
            "config.MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.0",
            "config.MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.0",
            f"config.OPTIMIZER.weight_decay={WD}",
            "config.OPTIMIZER.param_schedulers.lr.name=big_vision",
            f"config.OPTIMIZER.param_schedulers.lr.value={LR}",
            f"config.OPTIMIZER.param_schedulers.lr.warmup_steps={WARM}",
            "config.OPTIMIZER.regularize_only_kernels=True",
            *overrides,
        ]
    ).config


# --------------------------------------------------------------------------------------------------
# the schedule
# --------------------------------------------------------------------------------------------------


def test_schedule_recipe_values_in_steps():
    """RECIPES.md 4.10 (T = 111,477 for 90 epochs of train[:99%], warm-up 10k, lr 1e-3), through
    the config, derive and the trainer's progress -> schedule path."""
    total = 111_477
    cfg = compose_config(
        [
            "config=test/quick_vit",
            "config.OPTIMIZER.param_schedulers.lr.name=big_vision",
            "config.OPTIMIZER.param_schedulers.lr.value=0.001",
            "config.OPTIMIZER.param_schedulers.lr.warmup_steps=10000",
            f"config.OPTIMIZER.num_train_steps={total}",
        ]
    ).config
    d = derive_run_values(cfg, 64)
    assert d.max_iterations == total
    lr = build_lr_scheduler(d)

    def at(t: int) -> float:
        return lr(progress(t, d.iterations_per_epoch, d.max_iterations, "step"))

    assert at(0) == 0.0  # the first update has lr exactly 0
    for t, expected in [(1, 1e-7), (5_000, 5e-4), (10_000, 1e-3)]:
        assert at(t) == pytest.approx(expected, rel=1e-12), t
    assert at(60_738) == pytest.approx(5.0e-4, abs=1e-8)
    assert at(111_476) == pytest.approx(2.4e-13, rel=0.01)
    for t in [0, 1, 2, 9_999, 10_000, 10_001, 60_738, 111_000, 111_476]:  # the whole formula
        assert at(t) == pytest.approx(1e-3 * sched(t, 10_000, total), rel=1e-12, abs=0.0), t
    # where = t / T recovers t exactly at every step of the run
    steps = np.arange(total)
    assert np.array_equal(np.rint((steps / total) * total), steps)


def test_schedule_is_monotone_and_linear_decay():
    cfg = _cfg("config.OPTIMIZER.param_schedulers.lr.decay_type=linear", "config.OPTIMIZER.num_train_steps=13")
    d = derive_run_values(cfg, 64)
    lr = build_lr_scheduler(d)
    vals = [lr(t / 13) for t in range(13)]
    assert vals[:4] == pytest.approx([0.0, LR / 3, 2 * LR / 3, LR], rel=1e-12)
    assert vals[3:] == pytest.approx([LR * (1 - (t - 3) / 10) for t in range(3, 13)], rel=1e-12)


def test_schedule_bad_keys_are_config_errors():
    with pytest.raises(ConfigError, match="warmup_steps=8"):
        derive_run_values(_cfg("config.OPTIMIZER.param_schedulers.lr.warmup_steps=8"), 64)  # 8 steps in all
    with pytest.raises(ConfigError, match="decay_type='rsqrt'"):
        derive_run_values(_cfg("config.OPTIMIZER.param_schedulers.lr.decay_type=rsqrt"), 64)


def test_schedule_auto_lr_scaling_scales_value():
    cfg = _cfg(
        "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale=True",
        "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value=0.001",
        "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_lr_batch_size=8",
    )
    d = derive_run_values(cfg, 64)
    assert d.lr_schedule["value"] == pytest.approx(0.002)  # batch 16 / 8, linear


# --------------------------------------------------------------------------------------------------
# kernels-only decay
# --------------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 4))
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)
        self.ls_gamma = nn.Parameter(torch.ones(4))


def _decayed(groups, model) -> set[str]:
    ids = {id(p) for g in groups if g["wd_scale"] for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_kernels_only_rule():
    m = _Tiny()
    assert _decayed(get_param_groups(m, 0.1, True, True, [], regularize_only_kernels=True), m) == {
        "conv.weight",
        "fc.weight",
    }
    # without it, ndim <= 1 exemption leaves the 3-d position embedding decayed: the rule is needed
    assert "pos_embed" in _decayed(get_param_groups(m, 0.1, False, False, [], regularize_1d_params=False), m)


def test_quick_vit_kernels_are_exactly_the_linear_and_conv_weights():
    cfg = _cfg()
    model = build_model(cfg)
    groups = build_optimizer(cfg, model).param_groups
    kernels = {n for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}
    assert _decayed(groups, model) == {f"{k}.weight" for k in kernels}


# --------------------------------------------------------------------------------------------------
# the decay applied at step t (the Done-when), through the trainer
# --------------------------------------------------------------------------------------------------


class _Sampler:
    def set_epoch(self, epoch: int) -> None: ...

    def set_start_iteration(self, it: int) -> None: ...


class _Loader:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [
            {
                "data": torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64),
                "label": torch.randint(0, 4, (4,), generator=g),
            }
            for _ in range(4)
        ]
        self.sampler = _Sampler()

    def __iter__(self):
        return iter(self.batches)


class _Record(HookBase):
    """Each parameter and its gradient as the optimizer step sees them, and after it."""

    def __init__(self) -> None:
        self.before: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.after: list[dict[str, torch.Tensor]] = []

    def before_optimizer_step(self) -> None:
        named = self.trainer.model.named_parameters()
        self.before.append({n: (p.detach().clone(), p.grad.clone()) for n, p in named})

    def after_step(self) -> None:
        self.after.append({n: p.detach().clone() for n, p in self.trainer.model.named_parameters()})


def _train(cfg) -> tuple[nn.Module, _Record]:
    torch.manual_seed(0)
    model = build_model(cfg).double()
    optimizer = build_optimizer(cfg, model)
    derived = derive_run_values(cfg, 64)
    assert derived.max_iterations == STEPS
    trainer = Trainer(
        model,
        lambda outputs, target: torch.nn.functional.cross_entropy(outputs[0], target),
        optimizer,
        build_lr_scheduler(derived),
        _Loader(),
        iterations_per_epoch=derived.iterations_per_epoch,
        max_iterations=derived.max_iterations,
        update_interval="step",
        device=torch.device("cpu"),
        wd_scheduler=build_wd_scheduler(derived),
    )
    record = _Record()
    trainer.register_hooks([record])
    trainer.train()
    return model, record


def _check_decay(record: _Record, kernels: set[str], wd_factor) -> None:
    """At each step: the change of each parameter minus Adam's own update (computed here, optax's
    formula in float64) is the decay; it equals -wd_factor(t) x theta on kernels, 0 elsewhere."""
    mu: dict[str, torch.Tensor] = {}
    nu: dict[str, torch.Tensor] = {}
    assert len(record.before) == STEPS
    for t in range(STEPS):
        k = t + 1
        for name, (theta, g) in record.before[t].items():
            mu[name] = (1 - B1) * g + B1 * mu.get(name, torch.zeros_like(g))
            nu[name] = (1 - B2) * g * g + B2 * nu.get(name, torch.zeros_like(g))
            adam = (mu[name] / (1 - B1**k)) / ((nu[name] / (1 - B2**k)).sqrt() + EPS)
            decay = record.after[t][name] - theta + LR * sched(t) * adam
            expected = -wd_factor(t) * theta if name in kernels else torch.zeros_like(theta)
            torch.testing.assert_close(decay, expected, rtol=1e-9, atol=1e-15, msg=f"{name} at step {t}")
        if t == 0:  # sched(0) = 0: the first update leaves every parameter as it was
            assert all(torch.equal(record.after[0][n], th) for n, (th, _) in record.before[0].items())


@pytest.mark.parametrize("name", ["big_vision_adam", "adamw"])
def test_decay_at_step_t_is_wd_times_schedule_on_kernels_only(name):
    cfg = _cfg(f"config.OPTIMIZER.name={name}", "config.OPTIMIZER.adamw.weight_decay_units=big_vision")
    model, record = _train(cfg)
    kernels = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}
    assert kernels and len(kernels) < len(dict(model.named_parameters()))
    _check_decay(record, kernels, lambda t: WD * sched(t))


def test_torch_units_decay_is_lr_times_wd():
    """The default (every VISSL config): torch's wd, multiplied by the scheduled lr."""
    model, record = _train(_cfg("config.OPTIMIZER.name=adamw"))
    kernels = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}
    _check_decay(record, kernels, lambda t: LR * sched(t) * WD)


def test_units_conversion_and_errors():
    groups = [
        {"params": [], "lr_scale": 1.0, "weight_decay": 1e-4, "wd_scale": 1.0},
        {"params": [], "lr_scale": 1.0, "weight_decay": 0.0, "wd_scale": 0.0},
        {"params": [], "lr_scale": 1.0, "weight_decay": 2e-4, "wd_scale": None},  # an override: fixed
    ]
    to_torch_units(groups, 1e-3, "key")
    assert [g["weight_decay"] for g in groups] == pytest.approx([0.1, 0.0, 0.2], rel=1e-15)
    assert [g["wd_scale"] for g in groups] == [pytest.approx(1000.0, rel=1e-15), 0.0, None]
    model = build_model(_cfg())
    with pytest.raises(ConfigError, match="weight_decay_units='bv'"):
        build_optimizer(_cfg("config.OPTIMIZER.adamw.weight_decay_units=bv"), model)
    with pytest.raises(ConfigError, match="only the decoupled optimizers"):  # a section without the key
        weight_decay_units(OmegaConf.create({"name": "sgd", "sgd": {"weight_decay_units": "big_vision"}}))
    with pytest.raises(ConfigError, match="mu_dtype='float16'"):
        build_optimizer(
            _cfg("config.OPTIMIZER.name=big_vision_adam", "config.OPTIMIZER.big_vision_adam.mu_dtype=float16"), model
        )


# --------------------------------------------------------------------------------------------------
# the optimizer itself: torch's AdamW, and the bfloat16 first moment
# --------------------------------------------------------------------------------------------------


def _run(opt_fn, grads: list[torch.Tensor], theta0: torch.Tensor, lr: float = 1e-2, wd: float = 0.1):
    p = nn.Parameter(theta0.clone())
    opt = opt_fn([{"params": [p], "weight_decay": wd}], lr)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out, opt


def test_fp32_mu_equals_torch_adamw():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(64, generator=gen, dtype=torch.float64) for _ in range(6)]
    theta0 = torch.randn(64, generator=gen, dtype=torch.float64)
    ours, _ = _run(lambda g, lr: BigVisionAdam(g, lr=lr, betas=(B1, B2), eps=EPS), grads, theta0)
    ref, _ = _run(lambda g, lr: torch.optim.AdamW(g, lr=lr, betas=(B1, B2), eps=EPS, foreach=False), grads, theta0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)  # bias correction's order only


def _bf16(lr_fn):
    return lambda g, lr: BigVisionAdam(g, lr=lr, betas=lr_fn, eps=EPS, mu_dtype=torch.bfloat16)


def test_bf16_mu_equals_fp32_when_mu_is_representable():
    """b1 = 0.5 and gradients in {+-1, +-0.5, +-0.25}: every first moment of 4 steps has at most 6
    significant bits, exact in bfloat16 (8): the two runs are bit-identical."""
    gen = torch.Generator().manual_seed(2)
    grads = [(torch.randint(-2, 3, (64,), generator=gen) * 0.25).float() for _ in range(4)]
    theta0 = torch.randn(64, generator=gen)
    betas = (0.5, B2)
    fp32, _ = _run(lambda g, lr: BigVisionAdam(g, lr=lr, betas=betas, eps=EPS), grads, theta0)
    bf16, opt = _run(_bf16(betas), grads, theta0)
    assert all(torch.equal(a, b) for a, b in zip(fp32, bf16))
    assert next(iter(opt.state.values()))["mu"].dtype == torch.bfloat16


def test_bf16_mu_within_bfloat16_rounding():
    """General gradients: the stored moment is the float32 one rounded to bfloat16 after step 1
    (the update of step 1 used it unrounded: same parameters), and stays within n x 2^-8 of the
    float32 run's moment (relative to its largest value) after n steps; the parameters follow."""
    gen = torch.Generator().manual_seed(3)
    n = 6
    grads = [torch.randn(256, generator=gen) for _ in range(n)]
    theta0 = torch.randn(256, generator=gen)
    p32, p16 = nn.Parameter(theta0.clone()), nn.Parameter(theta0.clone())
    o32 = BigVisionAdam([p32], lr=1e-2, betas=(B1, B2), eps=EPS, weight_decay=0.1)
    o16 = BigVisionAdam([p16], lr=1e-2, betas=(B1, B2), eps=EPS, weight_decay=0.1, mu_dtype=torch.bfloat16)
    for k, g in enumerate(grads, start=1):
        p32.grad, p16.grad = g.clone(), g.clone()
        o32.step()
        o16.step()
        m32, m16 = o32.state[p32]["mu"], o16.state[p16]["mu"]
        if k == 1:
            assert torch.equal(m16, m32.to(torch.bfloat16)) and torch.equal(p16, p32)
        err = (m16.float() - m32).abs().max() / m32.abs().max()
        assert 0 < err <= k * 2**-8, (k, err)
        assert (p16 - p32).abs().max() <= 1e-2 * k * 2**-6  # lr x (relative moment error x |update| <= ~1)


def test_bf16_mu_survives_a_state_dict_round_trip():
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(32, generator=gen) for _ in range(4)]
    theta0 = torch.randn(32, generator=gen)
    full, _ = _run(_bf16((B1, B2)), grads, theta0)
    half, opt = _run(_bf16((B1, B2)), grads[:2], theta0)
    p = nn.Parameter(half[-1].clone())
    resumed = BigVisionAdam([{"params": [p], "weight_decay": 0.1}], lr=1e-2, eps=EPS, mu_dtype=torch.bfloat16)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.state[p]["mu"].dtype == torch.bfloat16
    for g in grads[2:]:
        p.grad = g.clone()
        resumed.step()
    assert torch.equal(p.detach(), full[-1])


def test_bf16_mu_through_the_checkpoint_state_dict():
    """The engine saves optimizers with torch.distributed.checkpoint's state dict (a torch.dtype in
    a param group would stop it); a resumed optimizer keeps bfloat16 moments and steps identically."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def make():
        torch.manual_seed(0)
        m = nn.Linear(4, 3)
        return m, BigVisionAdam(m.parameters(), lr=1e-2, eps=EPS, weight_decay=0.1, mu_dtype="bfloat16")

    def step(m, o, k):
        m(torch.full((2, 4), float(k))).square().sum().backward()
        o.step()
        o.zero_grad()

    m1, o1 = make()
    for k in range(3):
        step(m1, o1, k)
    m2, o2 = make()
    for k in range(2):
        step(m2, o2, k)
    saved = get_optimizer_state_dict(m2, o2)
    m3, o3 = make()
    m3.load_state_dict(m2.state_dict())
    set_optimizer_state_dict(m3, o3, saved)
    assert all(s["mu"].dtype == torch.bfloat16 for s in o3.state.values())
    step(m3, o3, 2)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))
