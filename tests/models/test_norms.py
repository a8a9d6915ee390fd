"""RescaleViT's norms (TokenBatchNorm, TokenGroupNorm), Bias1D and RescaleBlock against closed forms.

References: /work/shared/RECIPES.md section 5 and ChaofanTao/RescaleViT ``models/modeling.py``
(``MyBatchNorm1d``, ``MyGroupNorm``, ``RescaleBlock``) and ``models/rescale_mapping.py`` (``Bias1D``).
"""

from __future__ import annotations

import datetime
import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from torch import nn
from torch.utils.checkpoint import checkpoint

from vissl_vit.models.layers.block import Block
from vissl_vit.models.layers.norms import (
    Bias1D,
    RescaleBlock,
    TokenBatchNorm,
    TokenGroupNorm,
    build_norm_layer,
)

D, L = 8, 5  # L != D, so a BatchNorm fed [B, L, D] without the transpose would fail


def _tokens(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, L, D, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def _randomise_affine(m: nn.Module) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))


# ----------------------------------------------------------------------------- TokenBatchNorm


def test_token_batchnorm_equals_the_closed_form_over_batch_and_tokens():
    # BatchNorm1d on [B, D, L] (RescaleViT MyBatchNorm1d): per channel, mean and biased variance over B x L for
    # the output; running stats with momentum 0.1 and the unbiased variance (torch's BatchNorm convention)
    norm = TokenBatchNorm(D)
    _randomise_affine(norm)
    x = _tokens()
    y = norm(x)
    flat = x.reshape(-1, D).double()  # [B * L, D]
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    ref = (x.double() - mean) / torch.sqrt(var + 1e-6) * norm.bn.weight.double() + norm.bn.bias.double()
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.bn.running_mean.double(), 0.1 * mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        norm.bn.running_var.double(), 0.9 + 0.1 * flat.var(0, unbiased=True), atol=1e-6, rtol=1e-6
    )


def test_token_batchnorm_mixes_samples_and_layernorm_does_not():
    x = _tokens()
    x2 = x.clone()
    x2[1] += torch.randn(L, D)  # change another sample
    bn, ln = TokenBatchNorm(D), build_norm_layer("layernorm")(D)
    assert not torch.allclose(bn(x)[0, 2], bn(x2)[0, 2])  # token 2 of sample 0 moved
    torch.testing.assert_close(ln(x)[0], ln(x2)[0])  # the control: per-token statistics


def test_sync_bn_conversion_replaces_the_child_and_keeps_the_transpose():
    block = Block(D, 2, 16, norm_layer=build_norm_layer("batchnorm"))
    x = _tokens()
    ref = block(x)[0]
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(block)
    for norm in (converted.norm1, converted.norm2):
        assert type(norm) is TokenBatchNorm and type(norm.bn) is nn.SyncBatchNorm
    assert not any(type(m) is nn.BatchNorm1d for m in converted.modules())
    # one process: SyncBatchNorm falls back to batch_norm, so the output is the same (and [B, L, D] went in
    # as [B, D, L]: with L != D a lost transpose would be a channel-count error)
    torch.testing.assert_close(converted(x)[0], ref)


# ----------------------------------------------------------------------------- TokenGroupNorm


def test_token_groupnorm_equals_the_closed_form_per_sample_and_group():
    # GroupNorm(4) on [B, D, L] (RescaleViT MyGroupNorm): per sample, statistics over D/4 channels x L tokens
    norm = TokenGroupNorm(D, num_groups=4)
    _randomise_affine(norm)
    x = _tokens()
    g = x.double().reshape(3, L, 4, D // 4)  # [B, L, groups, channels per group]
    mean = g.mean(dim=(1, 3), keepdim=True)
    var = g.var(dim=(1, 3), unbiased=False, keepdim=True)
    ref = ((g - mean) / torch.sqrt(var + 1e-6)).reshape(3, L, D) * norm.gn.weight.double() + norm.gn.bias.double()
    torch.testing.assert_close(norm(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_token_groupnorm_mixes_tokens_of_a_sample_and_not_samples():
    norm = TokenGroupNorm(D)
    x = _tokens()
    same, other = x.clone(), x.clone()
    same[0, 4] += torch.randn(D)  # another token of sample 0
    other[1] += torch.randn(L, D)  # another sample
    assert not torch.allclose(norm(x)[0, 2], norm(same)[0, 2])
    torch.testing.assert_close(norm(x)[0], norm(other)[0])
    ln = build_norm_layer("layernorm")(D)  # the control: LayerNorm does not see the other token
    torch.testing.assert_close(ln(x)[0, 2], ln(same)[0, 2])


def test_token_groupnorm_rejects_a_width_not_divisible_by_the_groups():
    with pytest.raises(ValueError, match="num_groups=4"):
        TokenGroupNorm(10)


# ----------------------------------------------------------------------------- Bias1D


def test_bias1d_mean_is_the_average_of_the_first_8_batch_means_then_frozen():
    m = Bias1D(D)
    with torch.no_grad():
        m.bias.fill_(0.5)
    batches = [_tokens(b=1 + i % 3, seed=i) for i in range(11)]
    for i, x in enumerate(batches):
        if i == 3:
            m.eval()  # calls in eval mode count too (no self.training check in the source)
        y = m(x)
        # reference: mu = average of the per-call means over batch x tokens of the calls so far (at most 8)
        mu = torch.stack([b.double().mean(dim=(0, 1)) for b in batches[: min(i + 1, 8)]]).mean(0)
        torch.testing.assert_close(m.mean.double().view(D), mu, atol=1e-6, rtol=1e-6)
        b = 0.01 * 0.5 if i < 8 else 0.5  # the 0.01 factor on b during the warm-up calls
        torch.testing.assert_close(y.double(), x.double() + b - mu, atol=1e-5, rtol=1e-5)
    assert int(m.count) == 8


def test_bias1d_gradient_of_b_is_scaled_by_001_during_warm_up():
    m = Bias1D(D, threshold=1)
    m(_tokens()).sum().backward()
    torch.testing.assert_close(m.bias.grad, torch.full((1, 1, D), 0.01 * 3 * L))
    m.bias.grad = None
    m(_tokens()).sum().backward()
    torch.testing.assert_close(m.bias.grad, torch.full((1, 1, D), 1.0 * 3 * L))


def test_bias1d_state_dict_carries_mean_and_count_and_a_resume_continues():
    batches = [_tokens(seed=i) for i in range(8)]
    full = Bias1D(D)
    for x in batches:
        full(x)
    part = Bias1D(D)
    for x in batches[:3]:
        part(x)
    state = part.state_dict()
    assert set(state) == {"bias", "mean", "count"} and int(state["count"]) == 3
    resumed = Bias1D(D)
    for x in batches + batches[:1]:  # 9 calls: a module that has seen itself frozen; loading must re-open the warm-up
        resumed(x)
    resumed.load_state_dict(state)
    for x in batches[3:]:
        resumed(x)
    torch.testing.assert_close(resumed.mean, full.mean)
    assert int(resumed.count) == 8
    before = resumed.mean.clone()
    resumed(_tokens(seed=99))
    torch.testing.assert_close(resumed.mean, before)


def test_bias1d_is_not_updated_twice_by_a_checkpoint_recomputation():
    # the trunk's checkpoint_block recomputes whole blocks in backward: that must neither count nor move mu
    m, ref = Bias1D(D), Bias1D(D)
    batches = [_tokens(seed=i) for i in range(8)]
    for x in batches[:7]:
        checkpoint(lambda t: m(t).exp(), x, use_reentrant=False).sum().backward()
        ref(x)
    m.bias.grad = None
    with torch.no_grad():
        m.bias.fill_(1.0)
    # the 8th call is the last warm one: its recomputation (count now 8) must repeat the warm branch (0.01 b),
    # whose value exp(x + 0.01 b - mu) the backward of exp reads back
    checkpoint(lambda t: m(t).exp(), batches[7], use_reentrant=False).sum().backward()
    ref(batches[7])
    assert int(m.count) == 8
    torch.testing.assert_close(m.mean, ref.mean)
    y = batches[7] + 0.01 * 1.0 - ref.mean  # d/db of sum(exp(x + 0.01 b - mu)) = 0.01 sum(exp(...))
    torch.testing.assert_close(m.bias.grad, 0.01 * y.exp().sum(dim=(0, 1), keepdim=True))


# ----------------------------------------------------------------------------- RescaleBlock


class _Scale(nn.Module):
    """A stand-in branch with a known function: attention-like (returns a pair) or MLP-like."""

    def __init__(self, factor: float, pair: bool) -> None:
        super().__init__()
        self.factor, self.pair, self.seen = factor, pair, None

    def forward(self, x: torch.Tensor, return_attention: bool = False):  # noqa: ANN201
        self.seen = x.clone()
        return (x * self.factor, None) if self.pair else x * self.factor


@pytest.mark.parametrize(("i", "spec"), [(1, 0.7071), (12, 0.9608)])
def test_rescale_block_scales_the_mlp_branch_by_s_over_sqrt_l_and_the_identity_by_sqrt_i_over_i_plus_1(i, spec):
    # RECIPES 5: x = Attn(Bias1D_a(x)) + x; x = MLP(Bias1D_m(x)) * s / sqrt(L) + sqrt(i / (i + 1)) * x; the values
    # 0.7071 (i = 1) and 0.9608 (i = 12) for L = 12 are the spec's
    blk = RescaleBlock(D, 2, 16, layer_index=i, depth=12, bias_threshold=0)  # Bias1D frozen at once: known mu
    assert blk.skip_scale == pytest.approx(spec, abs=5e-5)
    blk.attn, blk.mlp = _Scale(3.0, pair=True), _Scale(-2.0, pair=False)
    b1, mu1, b2, mu2 = (torch.randn(1, 1, D) for _ in range(4))
    with torch.no_grad():
        blk.bias1.bias.copy_(b1), blk.bias1.mean.copy_(mu1), blk.bias2.bias.copy_(b2), blk.bias2.mean.copy_(mu2)
        blk.mlp_scale.fill_(1.5)
    x = _tokens()
    y, attn = blk(x)
    h = x + 3.0 * (x + b1 - mu1)  # attention residual, not rescaled
    ref = -2.0 * (h + b2 - mu2) * 1.5 / math.sqrt(12) + math.sqrt(i / (i + 1)) * h
    torch.testing.assert_close(blk.attn.seen, x + b1 - mu1)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    assert attn is None


def test_rescale_block_has_no_norm_and_block_names_for_attn_and_mlp():
    blk = RescaleBlock(D, 2, 16, layer_index=1, depth=2, qkv_bias=True)
    assert not any(isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) for m in blk.modules())
    ours = {k for k in blk.state_dict() if k.startswith(("attn.", "mlp."))}
    theirs = {k for k in Block(D, 2, 16, qkv_bias=True).state_dict() if k.startswith(("attn.", "mlp."))}
    assert ours == theirs
    assert {"bias1.bias", "bias1.mean", "bias1.count", "bias2.mean", "mlp_scale"} <= set(blk.state_dict())


def test_rescale_block_forward_backward_and_attention_map():
    torch.manual_seed(0)
    blk = RescaleBlock(D, 2, 16, layer_index=2, depth=2, drop_path=0.1, checkpoint_mlp=True)
    x = _tokens().requires_grad_()
    y, attn = blk(x, return_attention=True)
    assert y.shape == x.shape and attn.shape == (3, 2, L, L)
    y.sum().backward()
    assert blk.mlp_scale.grad is not None and x.grad is not None
    assert int(blk.bias2.count) == 1  # checkpoint_mlp recomputes the MLP only, not its Bias1D


def test_rescale_block_rejects_an_index_outside_1_to_depth():
    for i in (0, 13):
        with pytest.raises(ValueError, match="layer_index"):
            RescaleBlock(D, 2, 16, layer_index=i, depth=12)


# ----------------------------------------------------------------------------- build_norm_layer


def test_build_norm_layer_kinds_and_an_unknown_kind():
    ln = build_norm_layer("layernorm")(D)
    assert type(ln) is nn.LayerNorm and ln.eps == 1e-6
    assert type(build_norm_layer("batchnorm")(D)) is TokenBatchNorm
    gn = build_norm_layer("groupnorm")(D)
    assert type(gn) is TokenGroupNorm and gn.gn.num_groups == 4 and gn.gn.eps == 1e-6
    assert type(build_norm_layer("none")(D)) is nn.Identity
    with pytest.raises(ValueError, match="layernorm, batchnorm, groupnorm, none"):
        build_norm_layer("rmsnorm")


# ----------------------------------------------------------------------------- 2 processes on gloo


def _rank_batch(rank: int, call: int) -> torch.Tensor:
    return _tokens(b=2 + rank, seed=100 * rank + call)  # unequal batches: rank 0 has 2 samples, rank 1 has 3


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        m = Bias1D(D)
        for call in range(9):
            m(_rank_batch(rank, call))
        means = [torch.empty_like(m.mean) for _ in range(2)]
        dist.all_gather(means, m.mean)
        bn = nn.SyncBatchNorm.convert_sync_batchnorm(TokenBatchNorm(D))
        try:
            syncbn = bn(_rank_batch(rank, 0)).tolist()
        except ValueError as e:  # torch's SyncBatchNorm syncs CUDA/XPU/privateuse1 tensors only
            syncbn = str(e)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"means": [t.view(-1).tolist() for t in means], "syncbn": syncbn}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_one_bias1d_mean_and_syncbn_on_cpu(tmp_path):
    out = tmp_path / "out.json"
    # fork, not spawn: a spawned child re-imports torch and vissl_vit (~30 s on a loaded CPU); nothing here has
    # started threads that a fork could leave locked (conftest sets one torch thread)
    torch.multiprocessing.start_processes(
        _worker, args=(_free_port(), str(out)), nprocs=2, join=True, start_method="fork"
    )
    got = json.loads(out.read_text())
    # reference: each call's mean over the global batch x tokens (both ranks' tokens), averaged over 8 calls
    calls = [torch.cat([_rank_batch(r, c) for r in range(2)]).double().mean(dim=(0, 1)) for c in range(8)]
    ref = torch.stack(calls).mean(0)
    for mean in got["means"]:
        torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), ref, atol=1e-6, rtol=1e-6)
    assert got["means"][0] == got["means"][1]
    if isinstance(got["syncbn"], str):  # torch 2.x: SyncBatchNorm refuses CPU tensors in a process group
        assert "expected input tensor to be on GPU" in got["syncbn"]
    else:  # a torch that syncs CPU tensors: rank 0's tokens normalised with both ranks' statistics
        flat = torch.cat([_rank_batch(r, 0) for r in range(2)]).double().reshape(-1, D)
        ref_bn = (_rank_batch(0, 0).double() - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-6)
        torch.testing.assert_close(torch.tensor(got["syncbn"], dtype=torch.float64), ref_bn, atol=1e-5, rtol=1e-5)
