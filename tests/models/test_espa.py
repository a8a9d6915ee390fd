"""SimplEsT-ViT layers: TAT slope and TReLU, SUO init, E-SPA attention, the skip-free block, the stem init.

Known answers are RECIPES.md 6.2-6.3 (derived from richardcepka/SimplEsT-ViT ``models/simplEsT_vit.py``) and
the closed forms of TAT (arXiv:2203.08120 Eq. 9, Lemma 1), E-SPA (arXiv:2302.10322) and DKS's SUO.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vissl_vit.models.layers.espa import (
    ESPABlock,
    ESPAttention,
    espa_attention_matrix,
    espa_gamma,
    simplest_stem_init_,
)
from vissl_vit.models.layers.tat import (
    TATMlp,
    TReLU,
    scaled_uniform_orthogonal_,
    tat_leaky_relu_slope,
    trelu_output_scale,
)

# ---------------------------------------------------------------- TAT


@pytest.mark.parametrize(("depth", "expected", "tol"), [(12, 0.2385, 1e-4), (24, 0.421162, 1e-5), (64, 0.612513, 1e-5)])
def test_tat_slope_known_answers(depth: int, expected: float, tol: float) -> None:
    # RECIPES 6.3: the source's binary search re-run gives 0.238503 (L=12), 0.421162 (L=24), 0.612513 (L=64)
    assert tat_leaky_relu_slope(depth, eta=0.9) == pytest.approx(expected, abs=tol)


def test_trelu_output_scale_known_answer() -> None:
    # RECIPES 6.3: output scale sqrt(2 / (1 + a^2)) = 1.375629 at the L=12 slope
    assert trelu_output_scale(tat_leaky_relu_slope(12)) == pytest.approx(1.375629, abs=1e-6)
    assert TReLU(0.0).output_scale == pytest.approx(math.sqrt(2.0))


def test_tat_slope_no_solution_names_depth_and_eta() -> None:
    # RECIPES 6.3: L=6 has none (even ReLU reaches only 0.897 after 12 activations)
    with pytest.raises(ValueError, match=r"depth=6.*0\.897|eta=0\.9.*depth=6"):
        tat_leaky_relu_slope(6, eta=0.9)


def _eq9(c: float, a: float) -> float:
    """TAT Eq. 9, written here independently of the implementation."""
    return c + (1 - a) ** 2 / (math.pi * (1 + a**2)) * (math.sqrt(1 - c * c) - c * math.acos(c))


@pytest.mark.parametrize("depth", [12, 24])
def test_composed_cmap_at_solved_slope_is_eta(depth: int) -> None:
    a = tat_leaky_relu_slope(depth, eta=0.9)
    c = 0.0
    for _ in range(2 * depth):  # two TReLUs per block (RECIPES 6.3)
        c = _eq9(c, a)
    assert c == pytest.approx(0.9, abs=1e-6)


@pytest.mark.parametrize("c", [0.0, 0.5, 0.9])
def test_trelu_empirical_cmap_matches_eq9(c: float) -> None:
    # Monte Carlo of E[phi(u) phi(v)] for unit Gaussians of correlation c; 4e5 pairs -> noise ~ 2e-3
    a = tat_leaky_relu_slope(12)
    act = TReLU(a)
    g = torch.Generator().manual_seed(0)
    u, z = torch.randn(2, 400_000, generator=g, dtype=torch.float64)
    v = c * u + math.sqrt(1 - c * c) * z
    assert (act(u) ** 2).mean().item() == pytest.approx(1.0, abs=1e-2)  # Lemma 1: q preserved
    assert (act(u) * act(v)).mean().item() == pytest.approx(_eq9(c, a), abs=1e-2)


# ---------------------------------------------------------------- SUO


@pytest.mark.parametrize(
    ("shape", "layout", "gain2"),
    [
        ((64, 16), False, 4.0),  # expansion 16 -> 64: W^T W = (out/in) I
        ((16, 64), False, 1.0),  # contraction: W W^T = I
        ((32, 32), False, 1.0),
        ((64, 16), True, 1.0),  # DKS PyTorch port reads (in, out): the gain moves to the contraction
        ((16, 64), True, 4.0),
    ],
)
def test_suo_gram_matrix(shape: tuple[int, int], layout: bool, gain2: float) -> None:
    w = scaled_uniform_orthogonal_(torch.empty(shape), dks_torch_layout=layout)
    gram = w.T @ w if shape[0] >= shape[1] else w @ w.T
    torch.testing.assert_close(gram, gain2 * torch.eye(min(shape)), atol=1e-5, rtol=0)


def test_suo_rejects_conv_weight() -> None:
    with pytest.raises(ValueError, match=r"2-D.*\(8, 3, 3, 3\)"):
        scaled_uniform_orthogonal_(torch.empty(8, 3, 3, 3))


# ---------------------------------------------------------------- E-SPA


def test_gamma_schedule_known_answers() -> None:
    # RECIPES 6.2, L=12: gamma_1 = 0.5713, gamma_2 = 0.3116, gamma_6 = 0.0525, gamma_12 = 0.005
    for layer, expected in [(1, 0.5713), (2, 0.3116), (6, 0.0525), (12, 0.005)]:
        assert espa_gamma(layer, 12, 0.005) == pytest.approx(expected, abs=1e-4)
    assert espa_gamma(0, 12) == math.inf


def _sigma(n: int, gamma: float) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float64)
    return torch.exp(-gamma * (pos[:, None] - pos[None, :]).abs())


@pytest.mark.parametrize("layer", [1, 2, 12])
def test_attention_matrix_maps_kernel(layer: int) -> None:
    # E-SPA's defining property: A_l Sigma_{l-1} A_l^T = Sigma_l (Sigma_0 = I); N=16 needs no clamping
    n = 16
    a = espa_attention_matrix(n, layer, 12, 0.005)
    prev = torch.eye(n, dtype=torch.float64) if layer == 1 else _sigma(n, espa_gamma(layer - 1, 12))
    torch.testing.assert_close(a @ prev @ a.T, _sigma(n, espa_gamma(layer, 12)), atol=1e-8, rtol=0)
    assert (a > 0).all()


def test_attention_matrix_known_numbers_n64() -> None:
    # RECIPES 6.2 for N=64: A_1 diag mean 0.908, row sums 1.466-1.896; A_12 diag mean 0.828, row sums 1.023-1.032
    a1, a12 = espa_attention_matrix(64, 1, 12), espa_attention_matrix(64, 12, 12)
    assert (a1 > 0).all() and (a12 > 0).all()
    assert a1.diag().mean().item() == pytest.approx(0.908, abs=1e-3)
    assert (a1.sum(1).min().item(), a1.sum(1).max().item()) == pytest.approx((1.466, 1.896), abs=1e-3)
    assert a12.diag().mean().item() == pytest.approx(0.828, abs=1e-3)
    assert (a12.sum(1).min().item(), a12.sum(1).max().item()) == pytest.approx((1.023, 1.032), abs=1e-3)


@pytest.mark.parametrize("layer", [1, 5, 12])
def test_buffers_reconstruct_attention_matrix(layer: int) -> None:
    # RECIPES 6.7: softmax(B_l) * d_l == A_l to 1e-5
    attn = ESPAttention(32, 4, layer_index=layer, depth=12, num_tokens=64)
    assert attn.log_bias.shape == (1, 1, 64, 64) and attn.row_scale.shape == (1, 1, 64, 1)
    rebuilt = attn.log_bias.softmax(-1) * attn.row_scale
    torch.testing.assert_close(rebuilt[0, 0].double(), espa_attention_matrix(64, layer, 12), atol=1e-5, rtol=0)


def test_zero_query_output_is_a_times_v() -> None:
    # RECIPES 6.7: with W_q = 0 (the init) each head's output is A_l v_h, and the weights are A_l
    dim, heads, n = 32, 4, 16
    attn = ESPAttention(dim, heads, layer_index=3, depth=12, num_tokens=n)
    with torch.no_grad():  # a nonzero bias on q, k, v: q must still vanish only through W_q = 0 and b_q = 0
        attn.qkv.bias[dim:].normal_()
    assert attn.qkv.weight[:dim].abs().max() == 0
    x = torch.randn(2, n, dim)
    v = x @ attn.qkv.weight[2 * dim :].T + attn.qkv.bias[2 * dim :]  # [B, N, D]
    a = espa_attention_matrix(n, 3, 12).float()
    expected = torch.einsum("ij,bjd->bid", a, v)  # heads are column blocks of v; A_l is shared
    out, weights = attn(x, return_attention=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, a.expand(2, heads, n, n), atol=1e-6, rtol=0)
    out_sdpa, none = attn(x)
    assert none is None
    torch.testing.assert_close(out_sdpa, expected, atol=1e-5, rtol=1e-5)


def test_trained_query_paths_agree() -> None:
    # with W_q != 0 the SDPA path and the explicit-weights path compute d_l * softmax(qk^T/sqrt(d) + B_l) v
    attn = ESPAttention(32, 4, layer_index=2, depth=4, num_tokens=16)
    nn.init.normal_(attn.qkv.weight, std=0.3)
    x = torch.randn(2, 16, 32)
    out, weights = attn(x, return_attention=True)
    torch.testing.assert_close(attn(x)[0], out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1, keepdim=True), attn.row_scale.expand(2, 4, 16, 1), atol=1e-5, rtol=0)
    assert not torch.allclose(weights[:, 0], weights[:, 1])  # the heads now differ


def test_token_count_mismatch_names_both() -> None:
    attn = ESPAttention(32, 4, layer_index=1, depth=2, num_tokens=16)
    with pytest.raises(ValueError, match=r"num_tokens=16.*17 tokens"):
        attn(torch.randn(1, 17, 32))


def test_buffers_not_in_state_dict_and_survive_meta_init() -> None:
    with torch.device("meta"):
        attn = ESPAttention(32, 4, layer_index=1, depth=2, num_tokens=16)
    assert set(attn.state_dict()) == {"qkv.weight", "qkv.bias"}
    attn.to_empty(device="cpu")
    attn.reset_parameters()
    torch.testing.assert_close(
        (attn.log_bias.softmax(-1) * attn.row_scale)[0, 0].double(), espa_attention_matrix(16, 1, 2), atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------- block


def _block(**kwargs: object) -> ESPABlock:
    return ESPABlock(dim=32, num_heads=4, mlp_dim=64, layer_index=2, depth=12, num_tokens=16, **kwargs)


def test_block_is_attn_then_tat_mlp_without_skip_or_norm() -> None:
    # RECIPES 6.1: x = Attn(x); x = TReLU(W2 TReLU(W1 x + b1) + b2), written out from the parameters
    block = _block()
    assert not any(isinstance(m, nn.LayerNorm | nn.Dropout) for m in block.modules())
    with torch.no_grad():
        for p in (block.mlp.fc1.bias, block.mlp.fc2.bias):
            p.normal_()
    x = torch.randn(2, 16, 32)
    a = espa_attention_matrix(16, 2, 12).float()
    v = x @ block.attn.qkv.weight[64:].T
    phi = TReLU(tat_leaky_relu_slope(12))
    expected = phi(block.mlp.fc2(phi(block.mlp.fc1(a @ v))))
    out, attn = block(x)
    assert out.shape == x.shape and attn is None
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert block(x, return_attention=True)[1].shape == (2, 4, 16, 16)


def test_block_has_no_skip() -> None:
    # with a residual the output would keep x; without one a zero fc2 makes the output TReLU(0) = 0
    block = _block()
    nn.init.zeros_(block.mlp.fc2.weight)
    assert block(torch.randn(2, 16, 32))[0].abs().max() == 0


def test_block_init_biases_and_suo() -> None:
    block = _block()
    for b in (block.attn.qkv.bias, block.mlp.fc1.bias, block.mlp.fc2.bias):
        assert b.abs().max() == 0
    w1, w2 = block.mlp.fc1.weight, block.mlp.fc2.weight  # (64, 32) expansion, (32, 64) contraction
    torch.testing.assert_close(w1.T @ w1, 2.0 * torch.eye(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(w2 @ w2.T, torch.eye(32), atol=1e-5, rtol=0)


def test_block_parameters_are_timm_block_minus_norms_and_proj() -> None:
    # RECIPES 6.7: only the LayerNorms and the output projection are missing; ViT-S/16 has ~20 M parameters
    from timm.models.vision_transformer import Block as TimmBlock

    d, m = 384, 1536
    ref = sum(p.numel() for p in TimmBlock(d, 6, mlp_ratio=4.0, qkv_bias=True).parameters())
    ours = sum(p.numel() for p in ESPABlock(d, 6, m, layer_index=1, depth=12, num_tokens=4).parameters())
    assert ours == ref - 2 * 2 * d - (d * d + d)
    stem_and_head = 3 * 16 * 16 * d + d + d * 1000 + 1000
    assert 19e6 < 12 * ours + stem_and_head < 21e6


def test_block_output_uncorrelated_with_input_and_backward() -> None:
    # a residual x + f(x) would keep the output correlated with x; the skip-free block decorrelates it
    block = _block()
    x = torch.randn(4, 16, 32, requires_grad=True)
    y = block(x)[0]
    assert torch.corrcoef(torch.stack([y.flatten(), x.flatten()]))[0, 1].abs() < 0.1
    y.square().sum().backward()
    assert block.attn.qkv.weight.grad[:32].abs().sum() > 0  # W_q = 0 still receives gradient
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


def test_tat_mlp_dks_layout_matches_source_gains() -> None:
    # SimplEsT-ViT's SUO call (DKS PyTorch port) on nn.Linear: fc1 (D -> 4D) gain 1, fc2 (4D -> D) gain 2
    mlp = TATMlp(16, 64, 0.2, dks_torch_layout=True)
    torch.testing.assert_close(mlp.fc1.weight.T @ mlp.fc1.weight, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(mlp.fc2.weight @ mlp.fc2.weight.T, 4.0 * torch.eye(16), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- stem


def test_stem_init_fan_in_normal() -> None:
    # RECIPES 6.1: weight ~ N(0, 1/(C P^2)), bias 0; 64 * 48 = 3072 samples -> std error ~1.3 %
    conv = simplest_stem_init_(nn.Conv2d(3, 64, kernel_size=4, stride=4))
    assert conv.bias.abs().max() == 0
    assert conv.weight.std().item() == pytest.approx(48**-0.5, rel=0.05)
    assert abs(conv.weight.mean().item()) < 3 * 48**-0.5 / math.sqrt(3072)
