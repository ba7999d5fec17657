"""The inner loop and its meta-gradients (repblend_hf.distillation)."""

import pytest
import torch

from repblend_hf.distillation import matching_gradients, plan_inner_loop
from repblend_hf.modeling import RetrievalHeads, flatten_parameters
from repblend_hf.similarity import LowRankSimilarity

D_IMG, D_TXT, D, N = 12, 8, 6, 10


def _setup(seed=0, syn_steps=1, blend_beta=1.0):
    torch.manual_seed(seed)
    heads = RetrievalHeads(D_IMG, D_TXT, D)
    start = {b: flatten_parameters(h) for b, h in heads.branches().items()}
    target = {b: v + 0.05 * torch.randn_like(v) for b, v in start.items()}
    sim = LowRankSimilarity(N, rank=3, alpha=1.0)
    with torch.no_grad():
        sim.right.normal_(0, 0.1)
    plan = plan_inner_loop(N, syn_steps, 4, blend_beta, torch.Generator().manual_seed(seed))
    m = len(plan.touched)
    u = torch.randn(m, D_IMG, requires_grad=True)
    v = torch.randn(m, D_TXT, requires_grad=True)
    lrs = {"image": torch.tensor(0.5, requires_grad=True), "text": torch.tensor(0.3, requires_grad=True)}
    wrt = [u, v, lrs["image"], lrs["text"], *sim.parameters()]
    return heads, start, target, sim, plan, u, v, lrs, wrt


def _run(mode, syn_steps=1, normalization="separate", loss="wbce"):
    heads, start, target, sim, plan, u, v, lrs, wrt = _setup(syn_steps=syn_steps)
    return matching_gradients(heads, u, v, lambda pos: sim(plan.touched[pos]), plan, start, target, lrs, wrt,
                              temperature=0.07, distill_loss=loss, meta_gradient=mode,
                              branch_normalization=normalization)


@pytest.mark.parametrize("normalization", ["separate", "joint"])
@pytest.mark.parametrize("loss", ["wbce", "infonce"])
def test_tesla_equals_unrolled_for_one_inner_step(normalization, loss):
    l_t, g_t, _ = _run("tesla", 1, normalization, loss)
    l_u, g_u, _ = _run("unrolled", 1, normalization, loss)
    assert torch.allclose(l_t, l_u)
    for a, b in zip(g_t, g_u):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()
    assert any(g is not None and g.abs().sum() > 0 for g in g_t[:2])


def test_tesla_differs_from_unrolled_over_several_steps_but_same_loss():
    l_t, g_t, _ = _run("tesla", 4)
    l_u, g_u, _ = _run("unrolled", 4)
    assert torch.allclose(l_t, l_u)  # the forward is the same; only the gradient approximation differs
    assert not torch.allclose(g_t[0], g_u[0])


def test_unrolled_gradient_matches_finite_differences():
    heads, start, target, sim, plan, u, v, lrs, wrt = _setup(syn_steps=3)
    heads = heads.double()
    start = {b: x.double() for b, x in start.items()}
    target = {b: x.double() for b, x in target.items()}
    u64 = u.detach().double().requires_grad_(True)
    v64 = v.detach().double()
    lrs64 = {b: x.detach().double() for b, x in lrs.items()}
    sim = sim.double()

    def loss_at(uu):
        return matching_gradients(heads, uu, v64, lambda pos: sim(plan.touched[pos]), plan, start, target, lrs64,
                                  [uu], temperature=0.5, meta_gradient="unrolled")

    loss, (grad,), _ = loss_at(u64)
    direction = torch.randn_like(u64)
    eps = 1e-6
    plus = loss_at((u64 + eps * direction).detach().requires_grad_(True))[0]
    minus = loss_at((u64 - eps * direction).detach().requires_grad_(True))[0]
    assert torch.allclose((plus - minus) / (2 * eps), (grad * direction).sum(), rtol=1e-4)


def test_matching_loss_is_zero_when_student_lands_on_target():
    heads, start, _, sim, plan, u, v, lrs, wrt = _setup(syn_steps=1, blend_beta=0.0)
    # One inner step by hand: θ¹ = θ⁰ − η ∇ℓ(θ⁰); an expert whose target is θ¹ is matched exactly.
    from repblend_hf.losses import weighted_bce
    from repblend_hf.modeling import head_forward, similarity_logits

    heads.eval()
    theta = {b: s.clone().requires_grad_(True) for b, s in start.items()}
    pos = plan.batches[0]
    logits = similarity_logits(head_forward(heads.image_head, theta["image"], u[pos]),
                               head_forward(heads.text_head, theta["text"], v[pos]), 0.07)
    grads = torch.autograd.grad(weighted_bce(logits, sim(plan.touched[pos])), [theta["image"], theta["text"]])
    landed = {b: (theta[b] - lrs[b] * g).detach() for b, g in zip(["image", "text"], grads)}
    loss, _, _ = matching_gradients(heads, u, v, lambda p: sim(plan.touched[p]), plan, start, landed, lrs, [u],
                                    temperature=0.07)
    assert loss.item() < 1e-10
    far = {b: x + 1.0 for b, x in landed.items()}
    assert matching_gradients(heads, u, v, lambda p: sim(plan.touched[p]), plan, start, far, lrs, [u],
                              temperature=0.07)[0].item() > 0.5


def test_plan_walks_a_permutation_and_reuses_blends():
    # The released code's batching: a fresh permutation when fewer than a batch of pairs is left.
    plan = plan_inner_loop(10, 8, 4, 1.0, torch.Generator().manual_seed(0))
    batches = plan.batch_indices
    assert len(batches) == 8 and all(len(b) == 4 for b in batches)
    for first in range(0, 8, 2):  # 10 pairs, batches of 4: two batches per permutation, 2 pairs skipped
        pair = torch.cat(batches[first:first + 2])
        assert len(torch.unique(pair)) == 8, pair
    again = plan_inner_loop(10, 8, 4, 1.0, torch.Generator().manual_seed(0))
    assert [b.lam for b in plan.blends] == [b.lam for b in again.blends]
    assert plan.dropout_seeds == again.dropout_seeds and len(set(plan.dropout_seeds)) == 8
    small = plan_inner_loop(100, 2, 5, 0.0, torch.Generator().manual_seed(0))
    assert len(small.touched) == 10 and all(b.lam == 1.0 for b in small.blends)


def test_plan_can_straddle_permutations():
    plan = plan_inner_loop(10, 8, 4, 1.0, torch.Generator().manual_seed(0), straddle=True)
    idx = torch.cat(plan.batch_indices)
    assert torch.equal(torch.sort(idx[:10]).values, torch.arange(10))  # the first 10 are one permutation
    assert torch.equal(plan.touched, torch.arange(10))


@pytest.mark.parametrize("recompute", [True, False])
def test_inner_dropout_masks_are_reused_when_tesla_recomputes(recompute):
    # With one inner step TESLA is exact, so it equals the unrolled gradient only if the recomputed step
    # draws the same dropout masks as the forward step (or, without recomputation, keeps the forward's graph).
    results = {}
    for mode in ("tesla", "unrolled"):
        heads, start, target, sim, plan, u, v, lrs, wrt = _setup(syn_steps=1)
        targets = lambda pos, sim=sim, plan=plan: sim(plan.touched[pos])  # noqa: E731
        results[mode] = matching_gradients(heads, u, v, targets, plan, start, target, lrs, wrt, temperature=0.07,
                                           meta_gradient=mode, inner_dropout=0.5, tesla_recompute=recompute)
    for a, b in zip(results["tesla"][1], results["unrolled"][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    plain = _run("tesla", 1)
    assert not torch.allclose(results["tesla"][0], plain[0])  # the masks do change the student


def test_per_tensor_student_equals_the_flat_head_forward():
    # The student's functional head (explicit F.linear / layer_norm) is the module's own forward in eval mode.
    from repblend_hf.modeling import head_apply, split_parameters

    heads = RetrievalHeads(D_IMG, D_TXT, D).eval()
    x = torch.randn(5, D_IMG)
    params = split_parameters(heads.image_head, flatten_parameters(heads.image_head))
    assert torch.allclose(head_apply(heads.image_head, params, x), heads.image_head(x), atol=1e-6)


@pytest.mark.parametrize("loss", ["wbce", "infonce"])
@pytest.mark.parametrize("normalization", ["separate", "joint"])
def test_tesla_keeping_each_steps_graph_equals_recomputing_it(loss, normalization):
    # The heads-only student keeps each inner step's gradient with its graph instead of recomputing the step from
    # its snapshot (the released code's memory saving): the same loss and meta-gradients, over several steps, with
    # blending and inner dropout.
    results = {}
    for recompute in (True, False):
        heads, start, target, sim, plan, u, v, lrs, wrt = _setup(syn_steps=4)
        targets = lambda pos, sim=sim, plan=plan: sim(plan.touched[pos])  # noqa: E731
        results[recompute] = matching_gradients(heads, u, v, targets, plan, start, target, lrs, wrt,
                                                temperature=0.07, distill_loss=loss,
                                                branch_normalization=normalization, inner_dropout=0.1,
                                                tesla_recompute=recompute)
    (loss_a, grads_a, _), (loss_b, grads_b, _) = results[True], results[False]
    assert torch.allclose(loss_a, loss_b)
    assert [g is None for g in grads_a] == [g is None for g in grads_b]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads_a) >= 4  # data, η and S all get gradients
    for a, b in zip(grads_a, grads_b):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
