"""Every registered component: a tiny forward (and backward where it learns) with typical kwargs.

A name registered without an entry here fails the test, so new components get covered.
"""

from __future__ import annotations

import functools

import pytest
import torch

from vissl_vit.registry import COLLATORS, HEADS, LOSSES, TRUNKS

TRUNK_KWARGS = {
    "vision_transformer": dict(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32),
    "convit": dict(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, n_gpsa_layers=1),
}
HEAD_KWARGS = {
    "mlp": dict(dims=[16, 8, 4], use_bn=True, use_relu=True),
    "swav_head": dict(dims=[16, 8, 4], num_clusters=[4, 3]),
    "vision_transformer_head": dict(in_plane=16, num_classes=4, hidden_dim=8),
    "eval_mlp": dict(in_channels=16, dims=[16, 4]),
}


def _swav_output(logits):
    from vissl_vit.models.heads.swav_head import SwAVOutput

    emb = torch.nn.functional.normalize(logits, dim=1)
    protos = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    return [SwAVOutput(emb, [emb @ protos.T], [protos])]


# name -> (kwargs, outputs made from a [4, 4] leaf tensor, target)
LOSS_CASES = {
    "cross_entropy_multiple_output_single_target": (
        dict(label_smoothing=0.1),
        lambda x: [x],
        torch.tensor([0, 1, 2, 3]),
    ),
    "bce_logits_multiple_output_single_target": (dict(target_threshold=0.0), lambda x: [x], torch.tensor([0, 1, 2, 3])),
    "moco_loss": (dict(embedding_dim=4, queue_size=8), lambda x: [x[:2], x[2:]], None),
    "swav_loss": (dict(embedding_dim=4, num_prototypes=[5]), _swav_output, None),
    "simclr_info_nce_loss": (dict(buffer_params={"embedding_dim": 4}), lambda x: [x], None),
}


@pytest.mark.parametrize("name", TRUNKS.names())
def test_trunk_forward_backward(name):
    trunk = TRUNKS.get(name)(**TRUNK_KWARGS[name])
    out = trunk(torch.randn(2, 3, 16, 16))
    out[0].sum().backward()
    assert all(p.grad is not None for p in trunk.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", HEADS.names())
def test_head_forward_backward(name):
    head = HEADS.get(name)(**HEAD_KWARGS[name])
    out = head(torch.randn(4, 16))
    if name == "swav_head":
        assert out.embeddings.shape == (4, 4) and [s.shape for s in out.scores] == [(4, 4), (4, 3)]
        out = out.scores[0]
    assert out.shape == (4, 4)
    out.sum().backward()


@pytest.mark.parametrize("name", LOSSES.names())
def test_loss_forward_backward(name):
    kwargs, make_outputs, target = LOSS_CASES[name]
    logits = torch.randn(4, 4, requires_grad=True)
    loss = LOSSES.get(name)(**kwargs)(make_outputs(logits), target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None


@pytest.mark.parametrize("name", COLLATORS.names())
def test_collator_stacks_samples(name):
    def image(i, size=4):
        return torch.full((3, size, size), float(i))

    def sample(i, data):
        return {"data": data, "label": i, "index": i, "seed": i, "bad": 0, "bad_path": ""}

    if name == "default_collate":
        batch = COLLATORS.get(name)([sample(i, image(i)) for i in range(3)])
        assert batch["data"].shape == (3, 3, 4, 4) and batch["label"].tolist() == [0, 1, 2]
        return
    collate = COLLATORS.get(name)
    if name == "cutmixup_collator":  # with mixing off, it must stack like the others
        collate = functools.partial(collate, ssl_method="swav", prob=0.0)
    for n in (1, 3):  # per-replica batch 1 included (VISSL's moco_collator failed there)
        batch = collate([sample(i, [image(i), image(-i, 2)]) for i in range(n)])
        assert [d.shape for d in batch["data"]] == [(n, 3, 4, 4), (n, 3, 2, 2)]
        assert batch["data"][1][n - 1, 0, 0, 0] == -(n - 1) and batch["label"].tolist() == list(range(n))


# --------------------------------------------------------------------------------------------------
# the Registry type itself: fvcore's three call forms (fvcore/common/registry.py's docstring)
# --------------------------------------------------------------------------------------------------


def test_register_keeps_fvcores_call_forms():
    from vissl_vit.registry import Registry

    reg = Registry("widget")

    @reg.register()
    class Plain: ...

    @reg.register("named")
    class Renamed: ...

    class Direct: ...

    assert reg.register(Direct) is Direct  # the call form registers at once and returns the object
    assert reg.names() == ["Direct", "Plain", "named"]
    assert reg.get("Plain") is Plain and reg.get("named") is Renamed and reg.get("Direct") is Direct


def test_duplicate_name_raises_naming_both_objects():
    from vissl_vit.registry import Registry

    reg = Registry("widget")

    @reg.register("w")
    class First: ...

    class Second: ...

    with pytest.raises(ValueError, match=r"'w'.*test_registries\.test_\w+\.<locals>\.First.*<locals>\.Second"):
        reg.register("w")(Second)
    reg.register("w")(First)  # the same object again (a module imported twice) is no conflict
    assert reg.get("w") is First


def test_failed_lookup_lists_the_known_names():
    from vissl_vit.errors import ConfigError
    from vissl_vit.registry import HOOKS

    with pytest.raises(ConfigError, match=r"Unknown hook 'log_hok'.*Known hook names:.*checkpoint_hook.*log_hook"):
        HOOKS.get("log_hok")
