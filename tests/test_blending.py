"""Representation blending: one shared λ and π, exact mixing, no-op when off, reproducible."""

import pytest
import torch

from repblend_hf.blending import BlendParams, blend_representations, sample_blend


def test_mixing_formula_exact():
    u, v = torch.randn(5, 7), torch.randn(5, 3)
    params = BlendParams(lam=0.3, perm=torch.tensor([2, 0, 4, 1, 3]))
    bu, bv = blend_representations(u, v, params)
    torch.testing.assert_close(bu, 0.3 * u + 0.7 * u[params.perm], rtol=0, atol=0)
    torch.testing.assert_close(bv, 0.3 * v + 0.7 * v[params.perm], rtol=0, atol=0)


def test_same_lambda_and_permutation_for_both_modalities():
    # Image row i is e_i scaled by 1, text row i by 10: recover (λ, π) from each output and compare.
    n = 6
    params = sample_blend(n, beta=1.0, generator=torch.Generator().manual_seed(3))
    assert 0.0 < params.lam < 1.0 and not torch.equal(params.perm, torch.arange(n))
    bu, bv = blend_representations(torch.eye(n), 10 * torch.eye(n), params)
    lam = params.lam
    for i in range(n):
        j = int(params.perm[i])
        expected = torch.zeros(n)
        expected[i] += lam
        expected[j] += 1 - lam
        torch.testing.assert_close(bu[i], expected)
        torch.testing.assert_close(bv[i], 10 * expected)


def test_lambda_one_is_identity():
    u, v = torch.randn(4, 5), torch.randn(4, 2)
    bu, bv = blend_representations(u, v, BlendParams(lam=1.0, perm=torch.tensor([3, 2, 1, 0])))
    assert torch.equal(bu, u) and torch.equal(bv, v)


def test_beta_zero_is_noop_and_leaves_generator_alone():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    params = sample_blend(5, beta=0, generator=g)
    assert params.lam == 1.0 and params.is_identity
    assert torch.equal(params.perm, torch.arange(5))
    assert torch.equal(g.get_state(), state)
    u, v = torch.randn(5, 3), torch.randn(5, 4)
    bu, bv = blend_representations(u, v, params)
    assert torch.equal(bu, u) and torch.equal(bv, v)


@pytest.mark.parametrize("beta, match", [(-1.0, "blend_beta must be >= 0, got -1.0; use 0 to disable"),
                                         (float("nan"), "blend_beta must be a finite number"),
                                         (True, "blend_beta must be a finite number")])
def test_invalid_beta(beta, match):
    with pytest.raises(ValueError, match=match):
        sample_blend(4, beta=beta)


def test_invalid_batch_and_shapes():
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        sample_blend(0, beta=1.0)
    params = sample_blend(4, beta=1.0)
    with pytest.raises(ValueError, match="same mini-batch"):
        blend_representations(torch.randn(4, 2), torch.randn(3, 2), params)
    with pytest.raises(ValueError, match="call sample_blend with batch_size"):
        blend_representations(torch.randn(5, 2), torch.randn(5, 2), params)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        blend_representations(torch.randn(4, 2), torch.randn(4, 2), BlendParams(1.5, torch.arange(4)))


def test_reproducible_with_seeded_generator():
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    first = sample_blend(8, beta=1.0, generator=g)
    g.set_state(state)
    again = sample_blend(8, beta=1.0, generator=g)
    other = sample_blend(8, beta=1.0, generator=torch.Generator().manual_seed(12))
    assert first.lam == again.lam and torch.equal(first.perm, again.perm)
    assert first.lam != other.lam
    assert sorted(first.perm.tolist()) == list(range(8))


def test_beta_shapes_the_lambda_distribution():
    g = torch.Generator().manual_seed(0)
    lams = torch.tensor([sample_blend(2, beta=1.0, generator=g).lam for _ in range(400)])
    assert lams.min() >= 0 and lams.max() <= 1 and abs(lams.mean() - 0.5) < 0.05
    peaked = torch.tensor([sample_blend(2, beta=50.0, generator=g).lam for _ in range(200)])
    assert peaked.std() < lams.std() / 3


def test_gradient_reaches_both_inputs():
    u = torch.randn(4, 3, requires_grad=True)
    v = torch.randn(4, 2, requires_grad=True)
    params = BlendParams(lam=0.25, perm=torch.tensor([1, 2, 3, 0]))
    bu, bv = blend_representations(u, v, params)
    (bu.sum() + 2 * bv.sum()).backward()
    # Each row appears once with weight λ and once (permuted) with weight 1 − λ: total 1 per entry.
    torch.testing.assert_close(u.grad, torch.ones_like(u))
    torch.testing.assert_close(v.grad, 2 * torch.ones_like(v))
