"""
Tests (pytest, CPU): python -m pytest -q test_mhc.py

The math first (Sinkhorn, the maps, the gains), then the model, then the programs (prepare_data,
train, sample) run as a user runs them. Nothing here times anything; bench.py does that.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mhc
from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(HERE, "assets", "tinyshakespeare.txt")  # same text as ../shared/data's
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50304)


def plain_sinkhorn(logits, iters):
    """The paper's Sinkhorn written the obvious way (exp, divide by sums), in float64."""
    M = logits.double().exp()
    for _ in range(iters):
        M = M / M.sum(-2, keepdim=True)  # columns
        M = M / M.sum(-1, keepdim=True)  # rows
    return M


# ---------------------------------------------------------------------------------------------
# Sinkhorn

@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_sinkhorn_doubly_stochastic(n):
    torch.manual_seed(n)
    M = mhc.sinkhorn(0.5 * torch.randn(256, n, n))
    assert M.dtype == torch.float32 and M.shape == (256, n, n)
    assert (M >= 0).all()
    torch.testing.assert_close(M.sum(-1), torch.ones(256, n), atol=1e-6, rtol=0)  # rows: exact
    torch.testing.assert_close(M.sum(-2), torch.ones(256, n), atol=1e-5, rtol=0)  # columns: small logits


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_sinkhorn_large_logits_exact(n):
    # entries of +-100: exp overflows fp32 and whole columns underflow; the log domain must give
    # exactly what exact arithmetic gives (float64 handles exp(+-100) directly)
    torch.manual_seed(10 + n)
    logits = 100.0 * torch.randint(-1, 2, (64, n, n)).float()
    M = mhc.sinkhorn(logits)
    assert torch.isfinite(M).all() and (M >= 0).all()
    torch.testing.assert_close(M.sum(-1), torch.ones(64, n), atol=1e-6, rtol=0)
    torch.testing.assert_close(M.double(), plain_sinkhorn(logits, 20), atol=1e-6, rtol=0)


@pytest.mark.parametrize("iters", [1, 2, 5, 20])
def test_sinkhorn_iteration_count_and_order(iters):
    # exactly `iters` iterations, each columns-then-rows (no "iteration zero" off-by-one)
    torch.manual_seed(iters)
    logits = 2.0 * torch.randn(32, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(mhc.sinkhorn(logits, iters), plain_sinkhorn(logits, iters), atol=1e-12, rtol=0)
    if iters < 20:  # a different count is a different function at these logits
        assert (mhc.sinkhorn(logits, iters) - plain_sinkhorn(logits, iters + 1)).abs().max() > 1e-6


def test_sinkhorn_rejects_zero_iterations():
    with pytest.raises(ValueError, match="iters"):
        mhc.sinkhorn(torch.zeros(4, 4), iters=0)


@pytest.mark.parametrize("n,scale", [(2, 1.0), (3, 1.0), (4, 3.0)])
def test_sinkhorn_gradient_matches_finite_differences(n, scale):
    torch.manual_seed(n)
    logits = (scale * torch.randn(2, n, n, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda L: mhc.sinkhorn(L, 20), (logits,))
    assert torch.autograd.gradcheck(lambda L: mhc.sinkhorn(L, 3), (logits,))


# ---------------------------------------------------------------------------------------------
# the connections

def test_hc_starts_as_plain_residual():
    conn = mhc.HyperConnection(4, 16, layer_id=5)
    x = torch.randn(2, 3, 4, 16)
    H_pre, H_post, H_res = conn.maps(x)
    torch.testing.assert_close(H_pre, torch.tensor([0.0, 1.0, 0.0, 0.0]).expand(2, 3, 4))  # 5 mod 4 = 1
    torch.testing.assert_close(H_post, torch.ones(2, 3, 4))
    torch.testing.assert_close(H_res, torch.eye(4).expand(2, 3, 4, 4))
    y = conn(x, lambda h: 2 * h)  # x + F(stream 1) on every stream
    torch.testing.assert_close(y, x + 2 * x[..., 1:2, :])


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_mhc_maps_at_init(n):
    conn = mhc.ManifoldHyperConnection(n, 16, layer_id=3, res_init=6.0)
    H_pre, H_post, H_res = conn.maps(torch.randn(5, 7, n, 16))
    one_hot = torch.nn.functional.one_hot(torch.tensor(3 % n), n).float()
    # documented init: H_pre = sigmoid(+-1), H_post = 2 sigmoid(0) = 1, H_res = Sinkhorn(6 I),
    # each perturbed by the 1% token-dependent term alpha * h
    torch.testing.assert_close(H_pre, torch.sigmoid(2 * one_hot - 1).expand_as(H_pre), atol=0.03, rtol=0)
    torch.testing.assert_close(H_post, torch.ones_like(H_post), atol=0.06, rtol=0)
    diag = math.exp(6) / (math.exp(6) + n - 1)
    expected = diag * torch.eye(n) + (1 - diag) / max(n - 1, 1) * (1 - torch.eye(n))
    torch.testing.assert_close(H_res, expected.expand_as(H_res), atol=2e-3, rtol=0)
    torch.testing.assert_close(H_res.sum(-1), torch.ones(5, 7, n), atol=1e-6, rtol=0)
    assert conn.alpha.tolist() == pytest.approx([0.01] * 3)


def test_mhc_map_ranges_and_post_factor_two():
    conn = mhc.ManifoldHyperConnection(4, 8, layer_id=0)
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        conn.b[:8] = 50.0  # saturate H_pre and H_post from above
    H_pre, H_post, _ = conn.maps(x)
    torch.testing.assert_close(H_pre, torch.ones_like(H_pre))
    torch.testing.assert_close(H_post, 2 * torch.ones_like(H_post))  # the factor 2 is there
    with torch.no_grad():
        conn.b[:8] = -50.0
    H_pre, H_post, _ = conn.maps(x)
    assert H_pre.max() < 1e-15 and H_post.max() < 1e-15


def test_mhc_maps_match_the_equations():
    # an independent float64 computation of Eqs. (2)-(4) from random parameters
    torch.manual_seed(0)
    n, C = 3, 5
    conn = mhc.ManifoldHyperConnection(n, C, layer_id=1, sinkhorn_iters=7).double()
    with torch.no_grad():
        conn.alpha.copy_(torch.tensor([0.3, -0.7, 1.1]))
        conn.b.normal_()
    x = torch.randn(4, n, C, dtype=torch.float64)
    v = x.reshape(4, n * C)
    h = (v / v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) @ conn.phi
    b = conn.b
    H_pre = torch.sigmoid(0.3 * h[:, :n] + b[:n])
    H_post = 2 * torch.sigmoid(-0.7 * h[:, n:2 * n] + b[n:2 * n])
    H_res = plain_sinkhorn((1.1 * h[:, 2 * n:] + b[2 * n:]).reshape(4, n, n), 7)
    got = conn.maps(x)
    for a, e in zip(got, (H_pre, H_post, H_res)):
        torch.testing.assert_close(a.double(), e, atol=1e-6, rtol=1e-6)
    # and the wiring of Eq. (1) around a sublayer
    F = torch.nn.Linear(C, C).double()
    y = conn(x, F)
    expected = H_res @ x + H_post[..., None] * F((H_pre[..., None] * x).sum(-2))[..., None, :]
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_changing_h_res_changes_the_output(residual):
    # a public HC library computed H_res and then returned the unmixed streams
    torch.manual_seed(0)
    conn = mhc.make_connection(residual, 4, 8, layer_id=0)
    x = torch.randn(2, 4, 8)
    F = torch.nn.Linear(8, 8)
    y0 = conn(x, F)
    with torch.no_grad():
        conn.b[8:] = torch.randn(16)  # a different H_res bias
    assert (conn(x, F) - y0).abs().max() > 1e-3


def test_connection_gradients_in_float64():
    torch.manual_seed(0)
    for residual in ("hc", "mhc"):
        conn = mhc.make_connection(residual, 3, 4, layer_id=2, sinkhorn_iters=5).double()
        with torch.no_grad():
            for p in conn.parameters():
                p.add_(0.3 * torch.randn_like(p))
        F = torch.nn.Linear(4, 4).double()
        x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        params = tuple(conn.parameters())
        assert torch.autograd.gradcheck(lambda x, *p: torch.func.functional_call(
            conn, dict(zip([k for k, _ in conn.named_parameters()], p)), (x, F)), (x, *params))


# ---------------------------------------------------------------------------------------------
# diagnostics

def test_gain_magnitude_and_distances_on_known_inputs():
    A = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    B = torch.tensor([[1.0, 0.0], [3.0, 1.0]])
    P = B @ A  # depth order: A first
    fwd, bwd = mhc.gain_magnitude([A, B])
    assert fwd == pytest.approx(P.abs().sum(1).max().item())
    assert bwd == pytest.approx(P.abs().sum(0).max().item())
    assert mhc.gain_magnitude([torch.eye(4)] * 10) == (1.0, 1.0)
    to_id, to_unif = mhc.composite_distance([torch.eye(4)] * 5)
    assert to_id == 0.0 and to_unif == pytest.approx(math.sqrt(4 * 0.75 ** 2 + 12 * 0.25 ** 2))
    to_id, to_unif = mhc.composite_distance([torch.full((4, 4), 0.25)] * 3)
    assert to_unif == pytest.approx(0.0, abs=1e-12) and to_id == pytest.approx(math.sqrt(3))


def test_mhc_gain_bounded_where_unconstrained_maps_explode():
    torch.manual_seed(0)
    logits = 2.0 * torch.randn(48, 4, 4)
    fwd, bwd = mhc.gain_magnitude(list(mhc.sinkhorn(logits)))
    assert fwd == pytest.approx(1.0, abs=1e-5)  # rows sum to 1: products keep them so
    assert 1.0 - 1e-5 <= bwd < 1.5
    # HC-like maps: identity plus unconstrained learned perturbations of the same scale
    hc_maps = list(torch.eye(4) + 0.3 * torch.randn(48, 4, 4))
    fwd, bwd = mhc.gain_magnitude(hc_maps)
    assert fwd > 100 and bwd > 100


# ---------------------------------------------------------------------------------------------
# the model

def test_config_errors_name_the_field():
    cases = [(dict(residual="mhcc"), "residual.*residual, hc, mhc"), (dict(n_streams=0), "n_streams"),
             (dict(sinkhorn_iters=0), "sinkhorn_iters"), (dict(n_embd=100, n_head=3), "n_embd.*n_head")]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            GPTConfig(**kwargs)


def test_gpt2_small_parameter_counts():
    counts = {r: GPT(GPTConfig(residual=r)) for r in ("residual", "hc", "mhc")}
    assert counts["residual"].get_num_params() == 123_689_472  # nanoGPT's "123.69M"
    assert counts["residual"].num_connection_params() == 0
    # per sublayer: HC  W (768 x 6) + b (24) + s (3); mHC  phi (3072 x 24) + b (24) + alpha (3)
    assert counts["hc"].num_connection_params() == 24 * (768 * 6 + 24 + 3) == 111_240
    assert counts["mhc"].num_connection_params() == 24 * (3072 * 24 + 24 + 3) == 1_770_120
    for r in ("hc", "mhc"):
        assert counts[r].get_num_params() == 123_689_472 + counts[r].num_connection_params()


def test_hc_and_mhc_models_start_as_the_residual_model():
    torch.manual_seed(0)
    base = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 50257, (2, 32))
    _, loss_res = base(idx, idx)
    for residual in ("hc", "mhc"):
        m = GPT(GPTConfig(residual=residual, **TINY))
        missing, unexpected = m.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all(".conn_" in k for k in missing)
        _, loss = m(idx, idx)
        # HC is exactly the residual net at init; mHC up to its 1% token-dependent term
        assert loss.item() == pytest.approx(loss_res.item(), abs=1e-6 if residual == "hc" else 1e-3)


def test_mixing_matrices():
    torch.manual_seed(0)
    idx = torch.randint(0, 50257, (2, 16))
    assert GPT(GPTConfig(**TINY)).mixing_matrices(idx) == []
    mats = GPT(GPTConfig(residual="mhc", n_streams=3, **TINY)).mixing_matrices(idx)
    assert len(mats) == 4 and all(m.shape == (3, 3) for m in mats)
    for m in mats:
        torch.testing.assert_close(m.sum(-1), torch.ones(3), atol=1e-6, rtol=0)
        assert m.diagonal().min() > 0.98  # res_init = 6: close to identity at init


def shakespeare_tokens(n):
    from prepare_data import get_tokenizer
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return get_tokenizer().encode_ordinary(f.read(20_000))[:n]


@pytest.mark.parametrize("residual", ["residual", "hc", "mhc"])
def test_each_mode_learns_real_text(residual):
    torch.manual_seed(0)
    tokens = torch.tensor(shakespeare_tokens(4 * 33)).view(4, 33)
    x, y = tokens[:, :-1], tokens[:, 1:]
    model = GPT(GPTConfig(residual=residual, **TINY))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        loss.backward()
        for p in model.parameters():  # every parameter takes part in the loss
            assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(50304), abs=0.3)
    assert losses[-1] < losses[0] - 3.0


def test_generate_returns_requested_tokens():
    torch.manual_seed(0)
    for residual in ("residual", "mhc"):
        model = GPT(GPTConfig(residual=residual, **TINY)).eval()
        idx = torch.randint(0, 50257, (2, 5))
        out = model.generate(idx, 40, temperature=0.9, top_k=10)  # runs past block_size (32)
        assert out.shape == (2, 45) and torch.equal(out[:, :5], idx)
