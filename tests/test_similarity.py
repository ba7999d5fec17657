"""Learned soft similarity: S = I at start, S_I is the block of S, gradients, row factors, registry."""

import pytest
import torch

from repblend_hf.similarity import (
    SIMILARITY_KINDS,
    FullSimilarity,
    IdentitySimilarity,
    LowRankSimilarity,
    build_similarity,
)

N = 7


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("kind", sorted(SIMILARITY_KINDS))
def test_identity_at_initialisation(kind):
    sim = build_similarity(kind, N, rank=3, alpha=2.0)
    assert sim.kind == kind and sim.num_pairs == N
    torch.testing.assert_close(sim(), torch.eye(N), rtol=0, atol=0)
    torch.testing.assert_close(sim(torch.tensor([4, 1, 6])), torch.eye(3), rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(SIMILARITY_KINDS))
def test_block_equals_block_of_full_matrix(kind):
    sim = build_similarity(kind, N, rank=3, alpha=2.0)
    _perturb(sim)
    idx = torch.randperm(N)[:4]
    torch.testing.assert_close(sim(idx), sim()[idx][:, idx])


def test_lowrank_formula():
    sim = LowRankSimilarity(N, rank=2, alpha=3.0)
    _perturb(sim)
    expected = torch.diag(sim.diag) + 1.5 * sim.left @ sim.right.t()
    torch.testing.assert_close(sim(), expected)
    assert sim.scale == 1.5
    assert [n for n, _ in sim.named_parameters()] == ["diag", "left", "right"]


def test_lowrank_gradients():
    sim = LowRankSimilarity(N, rank=2, alpha=1.0)
    idx = torch.tensor([0, 3, 5])
    sim(idx).pow(2).sum().backward()
    # R = 0 at start: dS/dL = R·(α/r) = 0, while a and R get gradients.
    assert sim.left.grad.abs().sum() == 0
    assert sim.diag.grad[idx].abs().min() > 0 and sim.right.grad[idx].abs().sum() > 0
    sim.zero_grad()
    _perturb(sim)
    sim(idx).pow(2).sum().backward()
    for p in sim.parameters():
        assert p.grad[idx].abs().sum() > 0
        # rows outside the mini-batch are untouched
        assert p.grad[torch.tensor([1, 2, 4, 6])].abs().sum() == 0


def test_full_gradients_and_identity_has_no_parameters():
    sim = FullSimilarity(N)
    sim(torch.tensor([1, 2])).sum().backward()
    assert sim.matrix.grad[1:3, 1:3].abs().min() > 0 and sim.matrix.grad.abs().sum() == 4
    assert list(IdentitySimilarity(N).parameters()) == []
    assert IdentitySimilarity(N).state_dict() == {}


@pytest.mark.parametrize("kind", sorted(SIMILARITY_KINDS))
def test_row_factors_round_trip(kind):
    sim = build_similarity(kind, N, rank=3, alpha=2.0)
    _perturb(sim)
    rows = [sim.row_factors(i) for i in range(N)]
    assert all(t.ndim == 1 for row in rows for t in row.values())
    fresh = build_similarity(kind, N, rank=3, alpha=2.0)
    fresh.load_row_factors(rows)
    torch.testing.assert_close(fresh(), sim(), rtol=0, atol=0)


def test_row_factors_shapes_and_errors():
    sim = LowRankSimilarity(N, rank=3, alpha=1.0)
    assert {k: tuple(v.shape) for k, v in sim.row_factors(2).items()} == {"diag": (1,), "left": (3,), "right": (3,)}
    assert tuple(FullSimilarity(N).row_factors(0)["matrix"].shape) == (N,)
    assert IdentitySimilarity(N).row_factors(0) == {}
    with pytest.raises(ValueError, match="num_pairs=7"):
        sim.load_row_factors([sim.row_factors(0)])
    with pytest.raises(ValueError, match="another similarity kind"):
        sim.load_row_factors([FullSimilarity(N).row_factors(i) for i in range(N)])
    other_rank = LowRankSimilarity(N, rank=2, alpha=1.0)
    with pytest.raises(ValueError, match="another sim_rank"):
        sim.load_row_factors([other_rank.row_factors(i) for i in range(N)])


def test_identity_follows_device_and_dtype():
    sim = IdentitySimilarity(3).to(torch.float64)
    assert sim(torch.tensor([0, 2])).dtype == torch.float64


def test_unknown_kind_lists_valid_ones():
    match = r"unknown similarity kind 'diag'; set it to one of \['full', 'lowrank', 'none'\]"
    with pytest.raises(ValueError, match=match):
        build_similarity("diag", N)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, r"sim_rank must be an int in \[1, num_pairs=7\], got 0"),
        ({"rank": 8}, r"sim_rank must be an int in \[1, num_pairs=7\], got 8"),
        ({"rank": 2.0}, r"sim_rank must be an int"),
        ({"alpha": 0}, "sim_alpha must be a finite number > 0, got 0"),
        ({"alpha": -1.0}, "sim_alpha must be a finite number > 0"),
        ({"alpha": float("inf")}, "sim_alpha must be a finite number > 0"),
    ],
)
def test_invalid_lowrank_options(kwargs, match):
    options = {"rank": 2, "alpha": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_similarity("lowrank", N, **options)


@pytest.mark.parametrize("kind", sorted(SIMILARITY_KINDS))
def test_invalid_num_pairs(kind):
    with pytest.raises(ValueError, match="num_pairs must be a positive int"):
        build_similarity(kind, 0, rank=1)


def test_invalid_indices():
    with pytest.raises(ValueError, match="1-D torch.long"):
        LowRankSimilarity(N, 2, 1.0)(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="1-D torch.long"):
        FullSimilarity(N)(torch.tensor([0.0, 1.0]))
