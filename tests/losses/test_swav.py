"""SwAV: Sinkhorn marginals, the loss's closed form, the minimum at identical views, the queue."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vissl_vit.losses.swav import SwAVLoss, sinkhorn_knopp
from vissl_vit.models.heads.swav_head import SwAVOutput


def _scores(n=12, k=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, d, generator=g), dim=1)
    protos = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return emb, protos


def test_sinkhorn_marginals():
    emb, protos = _scores(n=12, k=4)
    q = sinkhorn_knopp(emb @ protos.T, epsilon=0.05, num_iters=3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))  # each sample: a distribution
    q = sinkhorn_knopp(emb @ protos.T, epsilon=0.05, num_iters=200)
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 3.0), atol=1e-3, rtol=0)  # equipartition B/K


def test_sinkhorn_is_exp_scores_with_row_and_column_scaling():
    emb, protos = _scores(n=6, k=3)
    s = emb @ protos.T
    q = sinkhorn_knopp(s, epsilon=0.5, num_iters=3)
    # Q = diag(a) exp(S / eps) diag(b): the ratio to exp(S / eps) has rank one
    ratio = q / torch.exp(s / 0.5)
    torch.testing.assert_close(ratio / ratio[:1], (ratio / ratio[:1])[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-6)


def _loss(views, protos, **kw):
    emb = torch.cat(views)
    out = SwAVOutput(emb, [emb @ protos.T], [protos])
    return SwAVLoss(embedding_dim=emb.shape[1], num_prototypes=[protos.shape[0]], num_crops=len(views), **kw)([out])


def test_loss_equals_closed_form():
    emb, protos = _scores(n=5, k=4)
    other = F.normalize(emb + 0.3 * torch.randn_like(emb), dim=1)
    with torch.no_grad():
        loss = _loss([emb, other], protos)
    s0, s1 = emb @ protos.T, other @ protos.T
    q0, q1 = sinkhorn_knopp(s0, 0.05, 3), sinkhorn_knopp(s1, 0.05, 3)
    expected = (-(q0 * F.log_softmax(s1 / 0.1, 1)).sum(1).mean() - (q1 * F.log_softmax(s0 / 0.1, 1)).sum(1).mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_identical_views_give_the_minimum():
    emb, protos = _scores(n=16, k=4)
    with torch.no_grad():
        same = _loss([emb, emb], protos)
        swapped = _loss([emb, emb[torch.randperm(16, generator=torch.Generator().manual_seed(1))]], protos)
    # with identical views the loss is the cross-entropy of the codes with their own crop's
    # predictions; any mismatch between views only adds to it
    s = emb @ protos.T
    expected = -(sinkhorn_knopp(s, 0.05, 3) * F.log_softmax(s / 0.1, 1)).sum(1).mean()
    assert same.item() == pytest.approx(expected.item(), rel=1e-5)
    assert swapped.item() > same.item() + 0.1


def _out(emb, protos):
    return SwAVOutput(emb.clone().requires_grad_(), [emb @ protos.T], [protos])


def test_queue_fills_from_start_iter_and_joins_sinkhorn_only_when_full():
    # Official SwAV (facebookresearch/swav main_swav.py, train(): ``use_the_queue`` turns on once
    # ``queue[i, -1, :]`` is non-zero, i.e. the queue is full; it is filled from epoch_queue_starts on)
    embs = [_scores(n=8, k=4, seed=s)[0] for s in range(4)]
    _, protos = _scores(n=8, k=4)

    def make():
        return SwAVLoss(embedding_dim=8, num_prototypes=[4], num_crops=2, queue={"queue_length": 8, "start_iter": 1})

    loss_fn = make()
    loss_fn([_out(embs[0], protos)])  # iteration 0: before start_iter, nothing is queued
    assert int(loss_fn.queue_filled) == 0 and not loss_fn.queue.any()
    for it in (1, 2):  # iterations 1 and 2: the queue fills (4 per step), and is not used until full
        loss = loss_fn([_out(embs[it], protos)])
        assert loss.item() == pytest.approx(make()([_out(embs[it], protos)]).item(), rel=1e-6), it
        assert int(loss_fn.queue_filled) == 4 * it
    # FIFO: the newest batch at the end
    assert torch.equal(loss_fn.queue[0, -4:], embs[2][:4]) and torch.equal(loss_fn.queue[0, :4], embs[1][:4])
    assert torch.equal(loss_fn.queue[1, -4:], embs[2][4:])
    queue = loss_fn.queue.clone()
    with torch.no_grad():
        used = loss_fn([_out(embs[3], protos)])  # iteration 3: full, joins Sinkhorn
    # written down from the formula: codes of crop c from Sinkhorn over [batch; the whole queue]
    e = embs[3]
    s0, s1 = e[:4] @ protos.T, e[4:] @ protos.T
    q0 = sinkhorn_knopp(torch.cat([s0, queue[0] @ protos.T]), 0.05, 3)[:4]
    q1 = sinkhorn_knopp(torch.cat([s1, queue[1] @ protos.T]), 0.05, 3)[:4]
    expected = (-(q0 * F.log_softmax(s1 / 0.1, 1)).sum(1).mean() - (q1 * F.log_softmax(s0 / 0.1, 1)).sum(1).mean()) / 2
    assert used.item() == pytest.approx(expected.item(), rel=1e-5)
    assert used.item() != pytest.approx(make()([_out(embs[3], protos)]).item(), rel=1e-4)


def _swav_cfg(*overrides: str):
    from vissl_vit.config import compose_config

    return compose_config(["config=test/quick_swav", *overrides]).config


def test_sizes_are_inferred_from_the_head_and_multicrop_as_vissl_does(caplog):
    # VISSL vissl/utils/hydra_config.py, infer_losses_config (swav_loss): num_prototypes =
    # HEAD.PARAMS[0][1]["num_clusters"], embedding_dim = dims[-1], num_crops = total_num_crops or
    # the configured value; the inferred values overwrite LOSS.swav_loss's
    from vissl_vit.losses.build import build_loss

    cfg = _swav_cfg(
        "config.MODEL.HEAD.PARAMS=[[swav_head,{dims:[32,64,24],num_clusters:[7,5]}]]",
        "config.LOSS.swav_loss.embedding_dim=128",
        "config.LOSS.swav_loss.num_prototypes=[3000]",
        "config.LOSS.swav_loss.num_crops=2",
    )
    with caplog.at_level("INFO", logger="vissl_vit.losses.build"):
        loss = build_loss(cfg)
    assert (loss.embedding_dim, loss.num_prototypes, loss.num_crops) == (24, [7, 5], 4)
    assert "embedding_dim=24" in caplog.text and "embedding_dim=128 overridden" in caplog.text
    # without a multi-crop transform, num_crops is the configured one
    cfg = _swav_cfg(
        "config.DATA.TRAIN.TRANSFORMS=[{name:ImgReplicatePil,num_times:3},{name:ToTensor}]",
        "config.LOSS.swav_loss.num_crops=3",
    )
    assert build_loss(cfg).num_crops == 3


def test_swav_loss_refuses_a_head_that_is_not_one_swav_head():
    # VISSL infer_losses_config asserts len(MODEL.HEAD.PARAMS) == 1 for swav_loss
    from vissl_vit.errors import ConfigError

    with pytest.raises(ConfigError, match="exactly one head, a swav_head"):
        _swav_cfg("config.MODEL.HEAD.PARAMS=[[mlp,{dims:[32,32]}],[swav_head,{dims:[32,16],num_clusters:[10]}]]")


def test_frozen_params_accept_vissl_ddp_prefixed_names():
    # VISSL's SwAV configs write TEMP_FROZEN_PARAMS_ITER_MAP with DDP's prefix, e.g.
    # configs/config/pretrain/swav/swav_8node_resnet.yaml: [['module.heads.0.prototypes0.weight', 5005]]
    from types import SimpleNamespace

    from vissl_vit.engine.hooks.algorithms import FreezeParamsHook
    from vissl_vit.models.heads.swav_head import SwAVPrototypesHead

    hook = FreezeParamsHook([["module.heads.0.prototypes0.weight", 2], ["heads.0.projection_head.0.weight", 1]])
    assert hook.iter_map == {"heads.0.prototypes0.weight": 2, "heads.0.projection_head.0.weight": 1}
    model = torch.nn.Module()
    model.heads = torch.nn.ModuleList([SwAVPrototypesHead(dims=[8, 4], num_clusters=[3])])
    hook.iter_map = {"heads.0.prototypes0.weight": 2}
    hook.trainer = SimpleNamespace(model=model, iteration=0)
    hook.before_train()  # the stripped name is found
    model.heads[0].prototypes0.weight.grad = torch.ones(3, 4)
    hook.after_backward()
    assert model.heads[0].prototypes0.weight.grad is None
