"""Shampoo (optim/shampoo.py): it preconditions, its grafted steps are torch's Adam, it resumes bit
for bit from a weights_only checkpoint, and OPTIMIZER.shampoo builds it."""

from __future__ import annotations

import io
import math

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting
from torch import nn

from vissl_vit import build_model, build_optimizer, compose_config
from vissl_vit.errors import ConfigError
from vissl_vit.optim.shampoo import AdamGraft, SeedPreConditioner, Shampoo, inverse_root

# the seed's settings (RECIPES.md 6.5) as the library's arguments, recomputing every 5 steps
SEED = dict(
    graft_type=LayerWiseGrafting.RMSPROP,
    moving_average_for_momentum=True,
    nesterov=False,
    diagonal_eps=1e-8,
    use_svd=True,
    matrix_eps=0.0,
    block_size=8192,
    shape_interpretation=False,
)


def _ill_conditioned(k: int, kappa: float, g: torch.Generator) -> torch.Tensor:
    """A random k x k matrix with singular values from 1 down to 1/kappa (rotated, so a diagonal
    preconditioner such as Adam's cannot undo it)."""
    q1, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(kappa), k, dtype=torch.float64)
    return ((q1 * s) @ q2.T).float()


def _steps_to_target(make_opt, a, b, c, target: float, max_steps: int = 300) -> int:
    """Full-batch steps on 0.5 ||A W B - C||^2 from W = 0 until the loss is below target."""
    w = nn.Parameter(torch.zeros(a.shape[1], b.shape[0]))
    opt = make_opt([w])
    for t in range(1, max_steps + 1):
        opt.zero_grad()
        (0.5 * ((a @ w @ b - c) ** 2).sum()).backward()
        opt.step()
        with torch.no_grad():
            if 0.5 * ((a @ w @ b - c) ** 2).sum().item() < target:
                return t
    return max_steps + 1


def test_fewer_steps_than_adam_on_an_ill_conditioned_least_squares_problem():
    # Kronecker-structured design: the Hessian (B B^T) x (A^T A) has condition number 30^4; Shampoo's
    # factors L ~ A^T A, R ~ B B^T are what undoes it
    g = torch.Generator().manual_seed(0)
    a, b = _ill_conditioned(12, 30.0, g), _ill_conditioned(12, 30.0, g)
    c = a @ torch.randn(12, 12, generator=g) @ b
    target = 1e-3 * 0.5 * (c**2).sum().item()
    adam = {
        lr: _steps_to_target(lambda p, lr=lr: torch.optim.Adam(p, lr=lr), a, b, c, target)
        for lr in (0.1, 0.3, 1.0, 3.0)
    }
    best_adam = min(adam.values())
    shampoo = _steps_to_target(
        lambda p: Shampoo(p, lr=0.3, start_preconditioning_step=5, preconditioning_compute_steps=5, **SEED),
        a,
        b,
        c,
        target,
    )
    assert best_adam < 300, adam  # Adam does get there (measured: 113 steps at lr 0.3)
    # measured: 54 steps; 116 with start_preconditioning_step=10**6 (the graft alone, Adam-like)
    assert shampoo < 0.7 * best_adam, (shampoo, adam)


def test_grafted_steps_are_torch_adam_with_l2():
    # before start_preconditioning_step the update is the graft's: with beta1 = 0 and bias correction it
    # is torch's Adam with coupled L2 weight decay (the seed's optimizer), to float rounding; the library's
    # uncorrected RMSProp graft would be 31x larger at step 1
    torch.manual_seed(0)
    w0 = torch.randn(6, 5)
    x, y = torch.randn(16, 5), torch.randn(16, 6)
    ws = [nn.Parameter(w0.clone()) for _ in range(2)]
    ref = torch.optim.Adam([ws[0]], lr=0.01, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.1)
    opt = Shampoo([ws[1]], lr=0.01, betas=(0.0, 0.999), weight_decay=0.1, start_preconditioning_step=10**6, **SEED)
    for _ in range(5):
        for w, o in zip(ws, (ref, opt)):
            o.zero_grad()
            ((x @ w.T - y) ** 2).mean().backward()
            o.step()
        torch.testing.assert_close(ws[1], ws[0], rtol=1e-6, atol=1e-7)
    # with beta1 = 0.9 the first step is Adam's too (m_hat = g): the first moment's bias correction
    ws = [nn.Parameter(w0.clone()) for _ in range(2)]
    ref = torch.optim.Adam([ws[0]], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    opt = Shampoo([ws[1]], lr=0.01, betas=(0.9, 0.999), start_preconditioning_step=10**6, **SEED)
    for w, o in zip(ws, (ref, opt)):
        ((x @ w.T - y) ** 2).mean().backward()
        o.step()
    torch.testing.assert_close(ws[1], ws[0], rtol=1e-6, atol=1e-7)


def test_inverse_root_is_the_seeds_bias_corrected_epsilon_root():
    # (L / (1 - beta2^k) + eps I)^(-1/4) for each factor of a matrix, against float64 eigh
    torch.manual_seed(0)
    w = torch.zeros(5, 3)
    pc = SeedPreConditioner(w, 0.9, 0, 8192, 1, 8192, False, 0, 0.0, True, root_inverse_eps=1e-3, bias_correction=True)
    grads = [torch.randn(5, 3) for _ in range(3)]
    for g in grads:
        pc.add_statistics(g)
    pc.compute_pre_conditioners()
    for i, gram in enumerate((lambda g: g @ g.T, lambda g: g.T @ g)):
        stat = sum(0.1 * 0.9 ** (2 - k) * gram(g.double()) for k, g in enumerate(grads)) / (1 - 0.9**3)
        lam, q = torch.linalg.eigh(stat + 1e-3 * torch.eye(stat.shape[0], dtype=torch.float64))
        expected = (q * lam.pow(-0.25)) @ q.T
        torch.testing.assert_close(pc.pre_conditioners[i].double(), expected, rtol=2e-5, atol=1e-5)


def test_inverse_root_of_a_near_singular_factor_stays_positive_definite():
    """A factor of low rank (a layer's first steps: 3 gradients of a 64-wide input) has eigenvalues
    that round-off makes slightly negative. Meta's root shifts them to >= 0 before adding epsilon;
    an SVD would flip their sign into eigenvalues of about -eps^(-1/4) and step uphill."""
    torch.manual_seed(0)
    a = torch.randn(64, 3)
    factor = a @ a.T  # float32, rank 3
    root = inverse_root(factor, 4, 1e-12)
    lam = torch.linalg.eigvalsh(root.double())
    assert lam.min() > 0  # positive definite
    assert lam.max() > 100  # the null space gets the large eps^(-1/4)-sized weight, as in Meta's


class _Net(nn.Module):
    """Parameters of every kind of Shampoo state: a square matrix (stacked factors), a blocked
    matrix (a list of factors of several shapes), a vector (graft only), and a late one."""

    def __init__(self):
        super().__init__()
        self.square = nn.Linear(4, 4)  # weight: factors 4x4, 4x4 -> stacked
        self.blocked = nn.Linear(4, 11, bias=False)  # (11, 4) with block_size 4: blocks 4/4/3 x 4
        self.late = nn.Linear(4, 11, bias=False)  # no gradient for its first steps

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        h = torch.tanh(self.square(x))
        out = self.blocked(h)
        return out + self.late(h) if t >= 6 else out


def _train(model: _Net, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for t in steps:
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 11, generator=g)
        opt.zero_grad(set_to_none=True)
        loss = ((model(x, t) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _shampoo(model: nn.Module) -> Shampoo:
    decay = [model.square.weight, model.blocked.weight, model.late.weight]
    groups = [{"params": decay, "weight_decay": 1e-3}, {"params": [model.square.bias], "weight_decay": 0.0}]
    return Shampoo(
        groups, lr=0.01, start_preconditioning_step=3, preconditioning_compute_steps=3, **{**SEED, "block_size": 4}
    )


def test_state_dict_is_plain_and_resumes_bit_for_bit():
    torch.manual_seed(0)
    model, copy = _Net(), _Net()
    opt = _shampoo(model)
    _train(model, opt, range(1, 5))  # the late layer has no state yet; preconditioners computed at step 3
    pcs = {n: opt.state[p]["pre_conditioner"] for n, p in model.named_parameters() if p in opt.state}
    assert isinstance(pcs["square.weight"], SeedPreConditioner) and isinstance(
        opt.state[model.square.bias]["graft"], AdamGraft
    )
    assert pcs["square.weight"].is_same_shapes and not pcs["blocked.weight"].is_same_shapes  # both layouts
    assert len(pcs["blocked.weight"].statistics) == 3 * 2  # 3 blocks, a factor per axis each
    assert model.late.weight not in opt.state

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # plain tensors only, or this raises
    copy.load_state_dict(model.state_dict())  # the model as checkpointed with the optimizer
    opt2 = _shampoo(copy)
    opt2.load_state_dict(loaded)
    assert copy.late.weight not in opt2.state

    # steps 5..12 span the recomputes at 6, 9 and 12 and the late layer's first steps
    expected = _train(model, opt, range(5, 13))
    got = _train(copy, opt2, range(5, 13))
    assert got == expected
    for (name, p), q in zip(model.named_parameters(), copy.parameters()):
        assert torch.equal(p, q), name
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k


def _cfg(*overrides: str):
    return compose_config(["config=test/quick_vit", "config.OPTIMIZER.name=shampoo", *overrides]).config


def test_built_from_the_config_with_the_seed_settings():
    cfg = _cfg("config.OPTIMIZER.regularize_bias=False", "config.OPTIMIZER.weight_decay=1e-5")
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, Shampoo)
    # the seed's Shampoo@25 (RECIPES.md 6.5) on the library's attributes
    assert (opt.start_preconditioning_step, opt.preconditioning_compute_steps, opt.statistics_compute_steps) == (
        25,
        25,
        1,
    )
    assert opt.block_size == 8192 and opt.no_preconditioning_for_layers_with_dim_gt > 10**9
    assert opt.graft_type == LayerWiseGrafting.RMSPROP and opt.diagonal_eps == 1e-8
    assert opt.use_svd and opt.matrix_eps == 0.0 and opt.root_inverse_eps == 1e-12 and opt.bias_correction
    assert opt.inverse_exponent_override == 0 and not opt.shape_interpretation and opt.weight_decay_type == "l2"
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.999) and g["moving_average_for_momentum"] and not g["nesterov"]
        assert not g["decoupled_weight_decay"] and g["decoupled_learning_rate"]
    # the parameter-group machinery unchanged: biases and the exempt tokens without decay
    decays = {
        n: g["weight_decay"]
        for g in opt.param_groups
        for n, p in model.named_parameters()
        for q in g["params"]
        if p is q
    }
    assert decays["trunk.blocks.0.attn.qkv.bias"] == 0.0 and decays["trunk.blocks.0.attn.qkv.weight"] == 1e-5
    assert decays["trunk.pos_embed"] == 0.0
    # the overlay's settings and a section value reach the optimizer
    cfg = _cfg(
        "+config/test/overlays=shampoo", "config.OPTIMIZER.shampoo.graft_type=adagrad", "config.OPTIMIZER.eps=1e-6"
    )
    opt = build_optimizer(cfg, build_model(cfg))
    assert (opt.start_preconditioning_step, opt.preconditioning_compute_steps) == (4, 4)
    assert opt.graft_type == LayerWiseGrafting.ADAGRAD and opt.diagonal_eps == 1e-6


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("config.OPTIMIZER.shampoo.precondition_frequency=25", r"config\.OPTIMIZER\.shampoo\.precondition_frequency"),
        (
            "config.OPTIMIZER.shampoo.graft_type=adam",
            r"config\.OPTIMIZER\.shampoo\.graft_type='adam': expected one of none, sgd",
        ),
        (
            "config.OPTIMIZER.shampoo.preconditioning_compute_steps=0",
            r"shampoo\.preconditioning_compute_steps=0: expected an integer >= 1",
        ),
        ("config.OPTIMIZER.shampoo.weight_decay_type=adamw", r"shampoo\.weight_decay_type='adamw': expected one of l2"),
        ("config.OPTIMIZER.shampoo.use_svd=False", r"shampoo\.matrix_eps=0\.0: expected > 0 with use_svd False"),
        (
            "config.OPTIMIZER.shampoo.no_preconditioning_for_layers_with_dim_gt=0",
            r"dim_gt=0: expected null \(never skip\)",
        ),
        ("config.OPTIMIZER.shampoo.root_inverse_eps=-1.0", r"shampoo\.root_inverse_eps=-1\.0: expected a number >= 0"),
    ],
)
def test_bad_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        cfg = _cfg(override)
        build_optimizer(cfg, build_model(cfg))
    assert "\n" not in str(err.value)


def test_flat_key_in_the_section_is_refused():
    cfg = _cfg()
    OmegaConf.set_struct(cfg, False)
    cfg.OPTIMIZER.shampoo.nesterov = True
    with pytest.raises(
        ConfigError, match=r"config\.OPTIMIZER\.shampoo\.nesterov: set it as config\.OPTIMIZER\.nesterov"
    ):
        build_optimizer(cfg, build_model(cfg))


def test_resume_through_the_checkpoint_hooks_state_dicts():
    # the checkpoint hook saves and loads through torch.distributed.checkpoint's full state dicts,
    # whose load first runs a zero-gradient step on the fresh optimizer (its state then replaced)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    torch.manual_seed(0)
    model, copy = _Net(), _Net()
    opt = _shampoo(model)
    _train(model, opt, range(1, 5))
    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert sorted(optim_sd["state"]) == ["blocked.weight", "square.bias", "square.weight"]
    buf = io.BytesIO()
    torch.save({"model": model_sd, "optimizer": optim_sd}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2 = _shampoo(copy)
    set_state_dict(
        copy,
        opt2,
        model_state_dict=saved["model"],
        optim_state_dict=saved["optimizer"],
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    for name, p in copy.named_parameters():  # as engine/hooks/checkpoint_hook.py::restore_trainer
        if name not in saved["optimizer"]["state"]:
            opt2.state.pop(p, None)
    assert opt2.param_groups[0]["step"] == 4
    assert _train(copy, opt2, range(5, 13)) == _train(model, opt, range(5, 13))
