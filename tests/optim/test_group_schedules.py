"""Parameter groups with their own LR and weight decay, schedules per group, LAMB and coupled-L2 Adam.

Whole sequences at exact values (fvcore's scheduler tests): the expected numbers are computed here
from the formulas (BEiT's layer decay, VISSL's composite warm-up + cosine, fvcore's cosine), not
taken from the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from vissl_vit import build_model, build_optimizer, compose_config, derive_run_values
from vissl_vit.engine.hooks import HookBase
from vissl_vit.engine.trainer import Trainer
from vissl_vit.errors import ConfigError
from vissl_vit.optim import build_lr_scheduler, build_wd_scheduler, get_param_groups

LAYERS, DECAY, PEAK, WARM = 3, 0.65, 1e-3, 0.25
STEPS = 8  # 2 epochs x 4 iterations (64 images, batch 16)


class _Sampler:
    def set_epoch(self, epoch: int) -> None: ...

    def set_start_iteration(self, it: int) -> None: ...


class _Loader:
    """Four fixed batches of 16x16 images (what the Trainer needs of a DataLoader)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [
            {"data": torch.randn(2, 3, 16, 16, generator=g), "label": torch.randint(0, 4, (2,), generator=g)}
            for _ in range(4)
        ]
        self.sampler = _Sampler()

    def __iter__(self):
        return iter(self.batches)


class _Record(HookBase):
    """Each group's lr and weight decay as the optimizer step sees them."""

    def __init__(self) -> None:
        self.seen: list[list[tuple[float, float]]] = []

    def before_optimizer_step(self) -> None:
        self.seen.append([(g["lr"], g["weight_decay"]) for g in self.trainer.optimizer.param_groups])


def _cfg(*overrides: str):
    return compose_config(
        [
            "config=test/quick_vit",
            f"config.MODEL.TRUNK.VISION_TRANSFORMERS.NUM_LAYERS={LAYERS}",
            "config.MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE=0.0",
            "config.MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE=0.0",
            *overrides,
        ]
    ).config


def _layer_id(name: str) -> int:
    """BEiT's layer id of a TrunkHeadModel parameter (RECIPES.md 3.5), from the name alone."""
    parts = name.split(".")
    if parts[0] == "trunk" and parts[1] == "blocks":
        return int(parts[2]) + 1
    if parts[0] == "trunk" and parts[1] in ("patch_embed", "pos_embed", "cls_token"):
        return 0
    return LAYERS + 1  # final norm, heads


def _warmup_cosine(t: int, end: float = 0.0) -> float:
    """quick_vit's lr at step t: linear 0 -> PEAK over the first quarter, then cosine PEAK -> end
    (VISSL composite, rescaled; fvcore CosineParamScheduler)."""
    where = t / STEPS
    if where < WARM:
        return PEAK * where / WARM
    x = (where - WARM) / (1 - WARM)
    return end + 0.5 * (PEAK - end) * (1 + math.cos(math.pi * x))


def _train(cfg) -> tuple[torch.nn.Module, torch.optim.Optimizer, list]:
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    derived = derive_run_values(cfg, 64)
    assert derived.max_iterations == STEPS
    trainer = Trainer(
        model,
        lambda outputs, target: torch.nn.functional.cross_entropy(outputs[0], target),  # one head
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
    return model, optimizer, record.seen


def test_layer_decay_lr_of_every_group_at_every_step():
    cfg = _cfg(
        "config.OPTIMIZER.param_group_constructor=lr_decay",
        f"config.OPTIMIZER.layer_wise_lr_decay.decay={DECAY}",
        "config.OPTIMIZER.regularize_1d_params=False",
    )
    model, optimizer, seen = _train(cfg)
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    names = {n: group_of[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    assert len(seen) == STEPS and len(optimizer.param_groups) == 2 * (LAYERS + 2)  # (decay, no decay) x ids
    for t in range(STEPS):
        for name, g in names.items():
            # BEiT/timm: lr = sched(t) x decay ** (num_layers + 1 - layer_id)
            expected = _warmup_cosine(t) * DECAY ** (LAYERS + 1 - _layer_id(name))
            assert seen[t][g][0] == pytest.approx(expected, rel=1e-12, abs=1e-18), (t, name)
    # with cls_token exempt by name and 1-D parameters exempt, the wd is 0.05 on kernels only
    for name, g in names.items():
        p = dict(model.named_parameters())[name]
        decayed = p.ndim > 1 and not name.endswith(("pos_embed", "cls_token"))
        assert seen[0][g][1] == (0.05 if decayed else 0.0), name


def test_layer_decay_matches_timm_on_embeddings_blocks_and_head():
    """timm's param_groups_layer_decay on the same parameter names gives the same scales, except for
    the final norm, which timm merges into the last block (RECIPES.md 3.5)."""
    from timm.optim import param_groups_layer_decay

    timm_vit = pytest.importorskip("timm").create_model(
        "vit_tiny_patch16_224", depth=LAYERS, embed_dim=32, num_heads=2, img_size=16, patch_size=4, num_classes=4
    )
    ref = {}
    names = {id(p): n for n, p in timm_vit.named_parameters()}
    for g in param_groups_layer_decay(timm_vit, weight_decay=0.05, layer_decay=DECAY):
        ref.update({names[id(p)]: g["lr_scale"] for p in g["params"]})
    model = build_model(_cfg())
    ours = {}
    for g in get_param_groups(model, 0.05, True, True, [], layer_decay=DECAY):
        ids = {id(p) for p in g["params"]}
        ours.update({n: g["lr_scale"] for n, p in model.named_parameters() if id(p) in ids})
    for name in (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.2.mlp.fc2.bias",
    ):
        assert ours[f"trunk.{name}"] == pytest.approx(ref[name]), name
    head = next(n for n in ours if n.startswith("heads.") and n.endswith("weight"))
    assert ours[head] == ref["head.weight"] == 1.0
    assert ours["trunk.norm.weight"] == 1.0 and ref["norm.weight"] == pytest.approx(DECAY)  # the one difference


def test_weight_decay_schedule_values_per_step():
    cfg = _cfg(
        "config.OPTIMIZER.param_schedulers.weight_decay.name=cosine",
        "config.OPTIMIZER.param_schedulers.weight_decay.start_value=0.04",
        "config.OPTIMIZER.param_schedulers.weight_decay.end_value=0.4",
    )
    _, optimizer, seen = _train(cfg)
    decayed = [i for i, g in enumerate(optimizer.param_groups) if g["wd_scale"] == 1.0]
    exempt = [i for i, g in enumerate(optimizer.param_groups) if g["wd_scale"] == 0.0]
    assert decayed and exempt
    for t in range(STEPS):
        # DINO's cosine 0.04 -> 0.4: fvcore cosine end + (start - end) (1 + cos(pi t / T)) / 2
        expected = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * t / STEPS))
        assert all(seen[t][i][1] == pytest.approx(expected, rel=1e-12) for i in decayed), t
        assert all(seen[t][i][1] == 0.0 for i in exempt)


def test_default_weight_decay_is_constant_and_bit_identical():
    _, optimizer, seen = _train(_cfg())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert all([wd for _, wd in step] == [0.05, 0.0] for step in seen)
    assert [lr for lr, _ in seen[3]] == [_warmup_cosine(3)] * 2


def test_ndim1_exemption_covers_layerscale():
    model = build_model(_cfg("config.MODEL.TRUNK.VISION_TRANSFORMERS.LAYER_SCALE_INIT=1.0e-4"))
    params = dict(model.named_parameters())
    gammas = {n for n, p in params.items() if p.ndim == 1 and "ls" in n.split(".")[-2]}
    assert gammas  # LayerScale: neither a norm nor a bias
    plain = get_param_groups(model, 0.05, False, False, [])
    timm_rule = get_param_groups(model, 0.05, True, True, [], regularize_1d_params=False)

    def names(group):
        return {n for n, p in params.items() if any(p is q for q in group["params"])}

    # norms and biases alone leave the gammas decayed; timm/DINO's rule decays exactly ndim >= 2
    assert gammas <= names(plain[0])
    assert names(timm_rule[0]) == {n for n, p in params.items() if p.ndim >= 2}
    assert (timm_rule[0]["weight_decay"], timm_rule[1]["weight_decay"]) == (0.05, 0.0)


def test_per_name_override():
    model = build_model(_cfg())
    groups = get_param_groups(
        model,
        0.05,
        True,
        True,
        [],
        layer_decay=0.5,
        overrides=[["^heads\\.", {"lr_scale": 10.0, "weight_decay": 0.0}], ["blocks\\.0\\.", {"lr_scale": 0.1}]],
    )
    by_name = {}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        by_name.update({n: g for n, p in model.named_parameters() if id(p) in ids})
    head = next(n for n in by_name if n.startswith("heads."))
    assert (by_name[head]["lr_scale"], by_name[head]["weight_decay"], by_name[head]["wd_scale"]) == (10.0, 0.0, None)
    b0 = by_name["trunk.blocks.0.attn.qkv.weight"]
    assert (b0["lr_scale"], b0["weight_decay"], b0["wd_scale"]) == (0.1, 0.05, 1.0)  # replaces 0.5 ** 3
    assert by_name["trunk.blocks.1.attn.qkv.weight"]["lr_scale"] == 0.5 ** (LAYERS + 1 - 2)
    with pytest.raises(ConfigError, match=r"param_group_overrides: \['nothing_here'\] match no parameter"):
        get_param_groups(model, 0.05, True, True, [], overrides=[["nothing_here", {"lr_scale": 2.0}]])
    with pytest.raises(ConfigError, match=r"param_group_overrides\[0\]: keys \['lr'\]"):
        get_param_groups(model, 0.05, True, True, [], overrides=[["heads", {"lr": 2.0}]])


def test_optimizer_sections_are_checked():
    # a misspelled key of the section is refused when the config is composed, by its full name
    with pytest.raises(ConfigError, match=r"config\.OPTIMIZER\.lamb\.max_grad_nrom"):
        _cfg("config.OPTIMIZER.name=lamb", "config.OPTIMIZER.lamb.max_grad_nrom=2.0")
    # and against the optimizer's signature when built (a section that drifted from the code)
    cfg = _cfg("config.OPTIMIZER.name=lamb")
    model = build_model(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.OPTIMIZER.lamb.max_grad_nrom = 2.0
    with pytest.raises(ConfigError, match=r"config\.OPTIMIZER\.lamb: unknown argument 'max_grad_nrom'.*max_grad_norm"):
        build_optimizer(cfg, model)
    del cfg.OPTIMIZER.lamb["max_grad_nrom"]
    cfg.OPTIMIZER.lamb.eps = 1e-8
    with pytest.raises(ConfigError, match=r"config\.OPTIMIZER\.lamb\.eps: set it as config\.OPTIMIZER\.eps"):
        build_optimizer(cfg, model)


def _two_param_setup():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    grads = [(torch.randn(4, 3) * 3, torch.randn(4) * 3) for _ in range(3)]  # global norm > 1: clipped
    return w, b, grads


def _run(opt, w, b, grads):
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    return w.detach().clone(), b.detach().clone()


def test_lamb_equals_timm_lamb():
    from timm.optim import Lamb

    cfg = _cfg("config.OPTIMIZER.name=lamb", "config.OPTIMIZER.eps=1e-8")
    from vissl_vit.optim.build import optimizer_kwargs
    from vissl_vit.registry import OPTIMIZERS

    kwargs = optimizer_kwargs(cfg.OPTIMIZER)
    w, b, grads = _two_param_setup()
    ours = OPTIMIZERS.get("lamb")(
        [{"params": [w], "weight_decay": 0.05}, {"params": [b], "weight_decay": 0.0}], lr=3e-3, **kwargs
    )
    got = _run(ours, w, b, grads)
    w2, b2, _ = _two_param_setup()
    # DeiT-III's LAMB (RECIPES.md 3.4): timm's Lamb, eps 1e-8, max_grad_norm 1.0, trust ratio on wd != 0 only
    ref = Lamb(
        [{"params": [w2], "weight_decay": 0.05}, {"params": [b2], "weight_decay": 0.0}],
        lr=3e-3,
        eps=1e-8,
        max_grad_norm=1.0,
    )
    want = _run(ref, w2, b2, grads)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert type(ours) is Lamb and ours.defaults["max_grad_norm"] == 1.0 and ours.defaults["always_adapt"] is False


def test_adam_is_coupled_l2():
    cfg = _cfg("config.OPTIMIZER.name=adam", "config.OPTIMIZER.weight_decay=0.1")
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["weight_decay"] == 0.1
    from vissl_vit.registry import OPTIMIZERS

    w, b, grads = _two_param_setup()
    ours = OPTIMIZERS.get("adam")([{"params": [w, b], "weight_decay": 1e-2}], lr=1e-2, betas=[0.9, 0.999], eps=1e-8)
    got = _run(ours, w, b, grads)
    w2, b2, _ = _two_param_setup()
    # SimplEsT-ViT (RECIPES.md 6.5): torch.optim.Adam with weight_decay, i.e. g + wd * theta
    want = _run(torch.optim.Adam([w2, b2], lr=1e-2, weight_decay=1e-2), w2, b2, grads)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [
                "config.OPTIMIZER.param_schedulers.weight_decay.name=linear",
                "config.OPTIMIZER.param_schedulers.weight_decay.end_value=-0.1",
            ],
            r"weight_decay\.end_value=-0\.1: a weight decay is a finite number >= 0",
        ),
        (
            [
                "config.OPTIMIZER.param_schedulers.weight_decay.name=cosine",
                "config.OPTIMIZER.param_schedulers.weight_decay.update_interval=epoch",
            ],
            r"weight_decay\.update_interval='epoch' differs from param_schedulers\.lr\.update_interval='step'",
        ),
        (
            ["config.OPTIMIZER.param_schedulers.weight_decay.name=cosnie"],
            r"weight_decay\.name='cosnie': expected one of",
        ),
    ],
    ids=["negative", "two-clocks", "unknown-type"],
)
def test_weight_decay_schedule_is_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)
