"""Sets distilled in stages (repblend_hf.stages): the plan, frozen pairs, growth, shortcut targets, the growing
window, staged evaluation and conditioned experts, each alone; then a staged trainer run."""

import pytest
import torch

from repblend_hf.configuration import RepBlendConfig
from repblend_hf.distillation import outer_iteration
from repblend_hf.encoders import load_image_encoder
from repblend_hf.evaluation import EvaluationProtocol, PairSet, StagePhase, train_heads
from repblend_hf.features import FeatureSplit
from repblend_hf.modeling import RetrievalHeads, branch_tensor_sizes, flatten_parameters, unflatten_parameters
from repblend_hf.stages import (
    Stage,
    as_first_stages,
    freeze_earlier_pairs,
    grow_synthetic_set,
    plan_stages,
    shortcut_trajectories,
    shortcut_trajectory,
    stage_config,
    stage_time_budgets,
    start_epoch_bound,
)
from repblend_hf.synthetic import SyntheticSet
from repblend_hf.trainers import DistillationTrainer, train_conditioned_experts, train_experts
from repblend_hf.training_args import DistillationArguments, ExpertTrainingArguments
from repblend_hf.trajectories import ExpertTrajectories

TEXT_DIM, EMBED, SIZE = 8, 8, 32


# ----- the plan ------------------------------------------------------------------------------------------------------


def test_one_stage_by_default_with_the_runs_window():
    (stage,) = plan_stages(99, None, max_steps=1000, max_start_epoch=2)
    assert stage == Stage(0, 99, 0, 1000, 0, 2, None) and stage.end == 99


def test_stages_take_one_value_per_stage_or_one_for_all():
    stages = plan_stages(499, [200, 299], max_steps=10, max_start_epoch=2, stage_steps=[5, 7],
                         stage_min_start_epoch=[0, 1], stage_max_start_epoch=[2, 3], shortcut_epoch=[6])
    assert [(s.offset, s.end, s.max_steps, s.min_start_epoch, s.max_start_epoch, s.shortcut_epoch)
            for s in stages] == [(0, 200, 5, 0, 2, 6), (200, 499, 7, 1, 3, 6)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(stage_pairs=[100, 100]), "add up to num_pairs=199"),
    (dict(stage_pairs=[199, 0]), "must be positive"),
    (dict(stage_pairs=[99, 100], stage_steps=[1, 2, 3]), "stage_steps has 3 values but the set has 2 stages"),
    (dict(stage_pairs=[99, 100], stage_min_start_epoch=[0, 2], stage_max_start_epoch=[1, 2]), "which is empty"),
    (dict(stage_pairs=[99, 100], shortcut_epoch=[0]), "shortcut_epoch must be >= 1"),
])
def test_a_bad_plan_says_what_to_set(kwargs, message):
    pairs = kwargs.pop("stage_pairs")
    with pytest.raises(ValueError, match=message):
        plan_stages(199, pairs, max_steps=10, max_start_epoch=1, **kwargs)


def test_a_time_budget_is_split_over_the_stages_a_run_distills_by_their_iterations():
    stages = plan_stages(499, [99, 100, 300], max_steps=10, max_start_epoch=2, stage_steps=[10, 10, 20])
    assert stage_time_budgets(stages, 10.0) == pytest.approx([2.5, 2.5, 5.0])
    # the first two stages come from --initial_stages: distilled elsewhere, no share of this run's budget
    assert stage_time_budgets(stages, 10.0, done_pairs=199) == [None, None, pytest.approx(10.0)]
    assert stage_time_budgets(stages, None) == [None, None, None]
    assert stage_time_budgets(stages, 10.0, done_pairs=499) == [None, None, None]  # nothing left to distill
    (one,) = plan_stages(99, None, max_steps=1000, max_start_epoch=2)
    assert stage_time_budgets([one], 10.0) == [10.0]  # a run of one stage keeps its whole budget


def test_the_window_grows_over_the_warmup_share_of_the_iterations():
    assert [start_epoch_bound(s, 100, 0, 4, 0.0) for s in (0, 50, 99)] == [4, 4, 4]
    bounds = [start_epoch_bound(s, 100, 0, 4, 0.2) for s in range(0, 101, 5)]
    assert bounds[0] == 1 and bounds[4:] == [4] * (len(bounds) - 4)  # full from 20 % of the iterations on
    assert bounds == sorted(bounds) and set(bounds) == {1, 2, 3, 4}
    assert start_epoch_bound(0, 100, 2, 5, 0.5) == 3  # from min + 1


# ----- shortcut targets ----------------------------------------------------------------------------------------------


def _wiggly(epochs=5, sizes=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(epochs + 1, sum(sizes), generator=g).cumsum(0)


def test_shortcut_is_the_straight_line_placed_by_each_tensors_path_length():
    snapshots, sizes = _wiggly(), [3, 2]
    line = shortcut_trajectory(snapshots, sizes, end=4)
    assert line.shape == (5, 5)
    torch.testing.assert_close(line[0], snapshots[0])
    torch.testing.assert_close(line[4], snapshots[4])
    for piece, path in zip(line.split(sizes, 1), snapshots[:5].split(sizes, 1)):
        steps = (path[1:] - path[:-1]).norm(dim=1)
        beta = torch.cat([torch.zeros(1), steps.cumsum(0) / steps.sum()])
        expected = path[0] + beta[:, None] * (path[-1] - path[0])
        torch.testing.assert_close(piece, expected)
    # The two tensors walk their paths at their own pace: one β per tensor, not one for the whole vector.
    whole = shortcut_trajectory(snapshots, [5], end=4)
    assert not torch.allclose(whole, line)


def test_shortcut_of_a_tensor_that_never_moves_stays_put_and_a_bad_end_is_refused():
    snapshots = torch.ones(4, 3)
    torch.testing.assert_close(shortcut_trajectory(snapshots, [3], end=3), snapshots)
    with pytest.raises(ValueError, match="shortcut_epoch must be in 1..3"):
        shortcut_trajectory(snapshots, [3], end=4)
    with pytest.raises(ValueError, match="sum"):
        shortcut_trajectory(snapshots, [2], end=2)


def test_shortcut_trajectories_replace_every_expert():
    meta = {"branch_sizes": {"image": 5, "text": 2}, "num_epochs": 5}
    trajectories = ExpertTrajectories(meta)
    for e in range(2):
        trajectories.add_expert({"image": _wiggly(seed=e), "text": _wiggly(sizes=(2,), seed=e + 5)})
    lines = shortcut_trajectories(trajectories, 3, {"image": [3, 2], "text": [2]})
    assert lines.num_epochs == 3 and lines.metadata["shortcut_epoch"] == 3 and lines.expert_indices == [0, 1]
    torch.testing.assert_close(lines.snapshot(1, 2)["image"],
                               shortcut_trajectory(_wiggly(seed=1), [3, 2], 3)[2])


# ----- frozen and grown pairs ----------------------------------------------------------------------------------------


def _feature_set(n, similarity="lowrank", seed=0, stages=None, **config):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    config = {"embed_dim": EMBED, **config}
    cfg = RepBlendConfig(image_encoder="test_efficientnet", image_size=SIZE, image_dim=12, text_dim=TEXT_DIM,
                         num_pairs=n, sim_rank=2, similarity=similarity, synthetic_space="features", stages=stages,
                         **config)
    syn = SyntheticSet(cfg, torch.randn(n, 12, generator=g), torch.randn(n, TEXT_DIM, generator=g))
    with torch.no_grad():
        for p in syn.similarity.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return syn


@pytest.mark.parametrize("similarity", ["lowrank", "full"])
def test_freezing_zeroes_what_belongs_to_the_earlier_pairs_alone(similarity):
    syn = _feature_set(6, similarity)
    gradients = [(p, torch.ones_like(p)) for p in syn.parameters()]
    frozen = dict((id(p), g) for p, g in freeze_earlier_pairs(gradients, syn, 4))
    assert frozen[id(syn.images)][:4].abs().sum() == 0 and bool((frozen[id(syn.images)][4:] == 1).all())
    assert frozen[id(syn.text_embeddings)][:4].abs().sum() == 0
    assert bool(frozen[id(syn.log_lr_img)] == 1) and bool(frozen[id(syn.log_lr_txt)] == 1)  # the stage's own η
    if similarity == "lowrank":
        for p in syn.similarity.parameters():
            assert frozen[id(p)][:4].abs().sum() == 0 and bool((frozen[id(p)][4:] == 1).all())
    else:
        g = frozen[id(syn.similarity.matrix)]
        assert g[:4, :4].abs().sum() == 0 and bool((g[4:] == 1).all()) and bool((g[:, 4:] == 1).all())
    assert all(a is b for (_, a), (_, b) in zip(freeze_earlier_pairs(gradients, syn, 0), gradients))


@pytest.mark.parametrize("similarity", ["lowrank", "full"])
def test_a_grown_set_keeps_the_earlier_pairs_and_their_similarity(similarity):
    small, big = _feature_set(4, similarity, seed=1), _feature_set(7, similarity, seed=2)
    fresh_rows = big.images[4:].detach().clone()
    grow_synthetic_set(small, big)
    assert torch.equal(big.images[:4], small.images) and torch.equal(big.images[4:], fresh_rows)
    assert torch.equal(big.text_embeddings[:4], small.text_embeddings)
    torch.testing.assert_close(big.similarity()[:4, :4], small.similarity())
    with pytest.raises(ValueError, match="adds pairs"):
        grow_synthetic_set(big, small)
    with pytest.raises(ValueError, match="share similarity"):
        grow_synthetic_set(small, _feature_set(7, "full" if similarity == "lowrank" else "lowrank"))


def test_a_stage_config_records_the_stages_so_far():
    args = DistillationArguments(output_dir="unused", stage_targets="conditioned", lr_init=0.1)
    whole = _feature_set(9).config
    first = stage_config(whole, Stage(0, 4, 0, 10, 0, 1), args, None)
    assert first.num_pairs == 4 and first.stages[0]["targets"] == "experts"  # the first stage matches the experts
    grown = _feature_set(4, stages=first.stages)
    second = stage_config(whole, Stage(1, 5, 4, 10, 1, 3, 6), args, grown)
    assert second.num_pairs == 9 and [st["num_pairs"] for st in second.stages] == [4, 5]
    assert second.stages[1]["targets"] == "conditioned" and second.stages[1]["shortcut_epoch"] == 6
    with pytest.raises(ValueError, match="starts after 5 pairs"):
        stage_config(whole, Stage(1, 4, 5, 10, 0, 1), args, grown)


def test_a_saved_set_of_one_stage_becomes_the_first_stage_of_a_larger_run(tmp_path):
    small = _feature_set(4)
    small.config.inner_lr_img = 0.3
    run = _feature_set(9).config
    stages = plan_stages(9, [4, 5], max_steps=3, max_start_epoch=1)
    grown = as_first_stages(small, run, stages, "saved")
    assert grown.config.stages[0]["num_pairs"] == 4 and grown.config.stages[0]["inner_lr_img"] == 0.3
    with pytest.raises(ValueError, match="no stage before the last ends there"):
        as_first_stages(_feature_set(5), run, stages, "saved")
    with pytest.raises(ValueError, match="embed_dim"):
        as_first_stages(_feature_set(4, embed_dim=16), run, stages, "saved")


# ----- staged sets and their evaluation ------------------------------------------------------------------------------


def test_config_stages_are_checked_and_give_the_evaluation_schedule(tmp_path):
    stages = [{"num_pairs": 4, "inner_lr_img": 0.2, "inner_lr_txt": 0.3},
              {"num_pairs": 3, "inner_lr_img": 0.1, "inner_lr_txt": 0.1, "steps": 8, "inner_pairs": "stage"}]
    syn = _feature_set(7, stages=stages)
    with torch.no_grad():
        syn.log_lr_img.fill_(torch.log(torch.tensor(0.5)))
    first, second = syn.stage_schedule()
    assert first == StagePhase(0, 4, 0.2, 0.3, None)  # the first stage: the recipe
    assert (second.start, second.end, second.steps) == (4, 7, 8)  # its own pairs, its student's steps
    assert second.lr_img == pytest.approx(0.5)  # the live η of the stage being distilled
    syn.save_pretrained(tmp_path / "set")
    back = SyntheticSet.from_pretrained(tmp_path / "set")
    assert back.config.stages[1]["inner_lr_img"] == pytest.approx(0.5)  # synced when saved
    assert back.pair_set().stages[1].lr_img == pytest.approx(0.5) and back.pair_set().stages[0] == first
    with pytest.raises(ValueError, match="add up to num_pairs=8"):
        RepBlendConfig(num_pairs=8, sim_rank=2, stages=stages)
    with pytest.raises(ValueError, match="stage 2's inner_lr_img"):
        RepBlendConfig(num_pairs=7, sim_rank=2, stages=[stages[0], {**stages[1], "inner_lr_img": -1.0}])


def _pairs(n=12, seed=0, stages=None):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 12, generator=g)
    text = image[:, :TEXT_DIM] + 0.1 * torch.randn(n, TEXT_DIM, generator=g)
    return PairSet(image, text, torch.eye(n), lr_img=0.1, lr_txt=0.1, stages=stages)


def _split(seed=1, n=20):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 12, generator=g)
    return FeatureSplit(image, image[:, :TEXT_DIM].repeat_interleave(2, 0), torch.arange(n).repeat_interleave(2))


def _first(n):
    whole = _pairs()
    return whole.image_features[:n], whole.text_features[:n], whole.similarity[:n, :n]


def test_staged_evaluation_trains_the_first_stage_by_the_recipe_and_then_on_the_pairs_so_far():
    protocol = EvaluationProtocol(epochs=5, batch_size=4)
    staged = train_heads(_pairs(stages=[(0, 5, 0.2, 0.3), (0, 12, 0.1, 0.1)]), protocol, embed_dim=EMBED,
                         validation=_split(), seed=3)
    first = train_heads(PairSet(*_first(5), lr_img=0.2, lr_txt=0.3), protocol, embed_dim=EMBED, seed=3)
    assert len(staged.train_loss) == 10
    assert staged.train_loss[:5] == first.train_loss  # stage 1: the first 5 pairs alone, at stage 1's η
    assert [h["epoch"] for h in staged.history] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    # One stage of all the pairs is the set without stages.
    single = train_heads(_pairs(stages=[(0, 12, 0.1, 0.1)]), protocol, embed_dim=EMBED, seed=3)
    plain = train_heads(_pairs(), protocol, embed_dim=EMBED, seed=3)
    assert single.train_loss == plain.train_loss


def test_a_later_stage_is_trained_as_its_student_moved_plain_sgd_for_its_steps():
    protocol = EvaluationProtocol(epochs=4, batch_size=4, dropout=0.0)  # no dropout: the by-hand run draws no masks
    pairs = _pairs(stages=[(0, 5, 0.2, 0.3), StagePhase(5, 12, 0.5, 0.4, steps=5)])
    staged = train_heads(pairs, protocol, embed_dim=EMBED, validation=_split(), seed=3)
    assert len(staged.train_loss) == 4 + 3  # 5 steps of batches of 4 over its 7 own pairs: 3 epochs of 2 batches
    assert [h["epoch"] for h in staged.history][-3:] == [5, 6, 7]  # evaluated along the short phase too

    # By hand: stage 1 by the recipe, then plain SGD (no momentum, no weight decay) at stage 2's η on pairs 5..11.
    heads = RetrievalHeads(12, TEXT_DIM, EMBED, dropout=0.0)
    first = train_heads(PairSet(*_first(5), lr_img=0.2, lr_txt=0.3), protocol, embed_dim=EMBED, seed=3)
    heads.load_state_dict(first.final_state)
    later = PairSet(*(t[5:] for t in _first(12)[:2]), _first(12)[2][5:, 5:])
    from repblend_hf.evaluation.heads import _batch_loss, _PairSampler
    from repblend_hf.modeling import similarity_logits

    generator = torch.Generator().manual_seed(3)
    for _ in range(4):  # the generator's draws of stage 1's four epochs, then stage 2's
        torch.randperm(5, generator=generator)
    sampler = _PairSampler(later, torch.device("cpu"), True)
    params = {"image": list(heads.image_head.parameters()), "text": list(heads.text_head.parameters())}
    losses = []
    for _ in range(3):
        total = 0.0
        heads.train()
        for image, text, targets in sampler.epoch(4, generator):
            loss = _batch_loss("wbce", similarity_logits(*heads(image, text), 0.07), targets)
            grads = torch.autograd.grad(loss, params["image"] + params["text"])
            with torch.no_grad():
                for p_, g_ in zip(params["image"] + params["text"], grads):
                    p_ -= (0.5 if any(p_ is q for q in params["image"]) else 0.4) * g_
            total += float(loss.detach()) * image.shape[0]
        losses.append(total / 7)
    assert staged.train_loss[4:] == pytest.approx(losses, rel=1e-4)


def test_pair_set_stages_must_end_at_n():
    with pytest.raises(ValueError, match="the last one N=12"):
        _pairs(stages=[(0, 5, 0.1, 0.1), (0, 10, 0.1, 0.1)])
    with pytest.raises(ValueError, match=r"stages\[1\].lr_img must be > 0"):
        _pairs(stages=[(0, 5, 0.1, 0.1), (0, 12, 0.0, 0.1)])
    with pytest.raises(ValueError, match=r"stages\[1\].steps must be >= 1"):
        _pairs(stages=[(0, 5, 0.1, 0.1), (5, 12, 0.1, 0.1, 0)])


# ----- the stage's iteration and trainer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return load_image_encoder("test_efficientnet", pretrained=False, image_size=SIZE)


@pytest.fixture(scope="module")
def real(encoder):
    g = torch.Generator().manual_seed(1)
    m, d = 60, encoder.feature_dim
    image = torch.randn(m, d, generator=g)
    text = (image @ (torch.randn(d, TEXT_DIM, generator=g) / d**0.5)).repeat_interleave(2, 0)
    return FeatureSplit(image, text + 0.1 * torch.randn(2 * m, TEXT_DIM, generator=g),
                        torch.arange(m).repeat_interleave(2))


@pytest.fixture(scope="module")
def experts(real, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage-experts")
    args = ExpertTrainingArguments(output_dir=str(out / "run"), num_experts=2, num_train_epochs=4, embed_dim=EMBED,
                                   disable_tqdm=True, logging_steps=1000)
    return train_experts(real, args, str(out / "trajectories"))


def _set(encoder, n, seed=0, stages=None):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = RepBlendConfig(image_encoder="test_efficientnet", image_size=SIZE, image_dim=encoder.feature_dim,
                         text_dim=TEXT_DIM, embed_dim=EMBED, num_pairs=n, sim_rank=2, synthetic_space="features",
                         stages=stages)
    return SyntheticSet(cfg, torch.randn(n, encoder.feature_dim, generator=g), torch.randn(n, TEXT_DIM, generator=g))


def _stage_args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "run"), max_steps=3, mini_batch_size=4, syn_steps=3, logging_steps=1,
                    save_strategy="no", disable_tqdm=True, max_start_epoch=1, expert_epochs=1, lr_img=1.0,
                    lr_txt=1.0, lr_sim=0.1, lr_lr=1e-3, seed=3, segments_per_iteration=4)
    return DistillationArguments(**{**defaults, **kw})


@pytest.mark.parametrize("inner_pairs", ["union", "stage"])
def test_a_later_stage_draws_its_window_and_leaves_the_earlier_pairs(encoder, experts, tmp_path, inner_pairs):
    from repblend_hf.distillation import encoder_pass_for, student_heads

    syn = _set(encoder, 10, stages=[{"num_pairs": 4, "inner_lr_img": 0.1, "inner_lr_txt": 0.1},
                                    {"num_pairs": 6, "inner_lr_img": 0.1, "inner_lr_txt": 0.1}])
    args = _stage_args(tmp_path, stage_inner_pairs=inner_pairs)
    stage = Stage(1, 6, 4, 3, 2, 4)
    for step in range(3):
        result = outer_iteration(syn, student_heads(syn.config), experts, encoder_pass_for(encoder, syn.config, args),
                                 args, torch.Generator().manual_seed(step), temperature=0.07, stage=stage, step=step)
        assert {s.start_epoch for s in result.segments} <= {2, 3}
        grads = dict((id(p), g) for p, g in result.gradients)
        assert grads[id(syn.images)][:4].abs().sum() == 0 and grads[id(syn.images)][4:].abs().sum() > 0
        touched = set(result.plans[0].touched.tolist())
        assert touched <= set(range(4, 10)) if inner_pairs == "stage" else touched & set(range(4))


def test_a_staged_trainer_evaluates_every_stage_so_far(encoder, experts, real, tmp_path):
    earlier = _set(encoder, 4, seed=1, stages=[{"num_pairs": 4, "inner_lr_img": 0.2, "inner_lr_txt": 0.3}])
    args = _stage_args(tmp_path, eval_strategy="steps", eval_steps=3, eval_head_epochs=2, stage_targets="experts")
    stage = Stage(1, 6, 4, 3, 1, 3)
    syn = grow_synthetic_set(earlier, _set(encoder, 10, seed=2, stages=stage_config(
        _set(encoder, 10).config, stage, args, earlier).stages))
    before = syn.images.detach().clone()
    trainer = DistillationTrainer(syn, args, experts, encoder, validation=real, stage=stage)
    trainer.train()
    assert torch.equal(syn.images[:4], before[:4]) and not torch.equal(syn.images[4:], before[4:])
    assert torch.equal(syn.images[:4], earlier.images)
    pairs = trainer.synthetic_pairs()
    assert [p.end for p in pairs.stages] == [4, 10] and (pairs.stages[0].lr_img, pairs.stages[0].lr_txt) == (0.2, 0.3)
    assert pairs.stages[1].steps == args.syn_steps  # the later stage is trained as its student moved
    logged = next(h for h in trainer.state.log_history if "eval_r_mean" in h)
    assert logged["eval_stage_r_mean"] <= logged["eval_r_mean"]  # the stage's own best, and the best over both


def test_conditioned_experts_start_where_evaluation_on_the_earlier_stages_ends(real, tmp_path):
    pairs = PairSet(real.image_features[:6], real.caption_features[:12:2], torch.eye(6), lr_img=0.1, lr_txt=0.1,
                    stages=[(0, 3, 0.2, 0.2), (0, 6, 0.1, 0.1, 4)])
    protocol = EvaluationProtocol(epochs=2)
    args = ExpertTrainingArguments(output_dir=str(tmp_path / "run"), num_experts=2, num_train_epochs=2,
                                   embed_dim=EMBED, disable_tqdm=True, logging_steps=1000, seed=5)
    conditioned = train_conditioned_experts(real, pairs, protocol, args, str(tmp_path / "experts"),
                                            metadata={"conditioned_on": "a set"})
    assert conditioned.num_epochs == 2 and conditioned.metadata["conditioned"] is True
    for e in (0, 1):
        heads = RetrievalHeads(real.image_features.shape[1], TEXT_DIM, EMBED)
        heads.load_state_dict(train_heads(pairs, protocol, embed_dim=EMBED, seed=5 + e).final_state)
        start = conditioned.snapshot(e, 0)
        torch.testing.assert_close(start["image"], flatten_parameters(heads.image_head))
        torch.testing.assert_close(start["text"], flatten_parameters(heads.text_head))
        assert not torch.equal(conditioned.snapshot(e, 2)["image"], start["image"])  # then trained on real data
    sizes = branch_tensor_sizes(RetrievalHeads(real.image_features.shape[1], TEXT_DIM, EMBED))
    assert sum(sizes["image"]) == conditioned.branch_sizes["image"]


# ----- the similarity from a late expert -----------------------------------------------------------------------------


def test_relative_similarity_is_one_for_the_true_pair_and_for_an_indistinguishable_one():
    from repblend_hf.stages import relative_similarity

    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 look the same
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    s = relative_similarity(image, text, temperature=0.07)
    torch.testing.assert_close(torch.diagonal(s), torch.ones(3))
    assert s[0, 1] == pytest.approx(1.0) and s[0, 2] < 1e-5 and bool((s <= 1).all())


@pytest.mark.parametrize("kind", ["lowrank", "full"])
def test_a_similarity_starts_from_a_given_matrix(kind):
    from repblend_hf.similarity import build_similarity

    g = torch.Generator().manual_seed(0)
    target = torch.eye(6) + 0.3 * torch.rand(6, 6, generator=g) @ torch.rand(6, 6, generator=g) / 6
    sim = build_similarity(kind, 6, rank=6, alpha=2.0).initialise_(target)
    torch.testing.assert_close(sim(), target, rtol=1e-4, atol=1e-5)  # rank 6 of 6: exact
    low = build_similarity("lowrank", 6, rank=1, alpha=1.0).initialise_(target)
    torch.testing.assert_close(torch.diagonal(low()), torch.diagonal(target))  # the diagonal is kept exactly
    with pytest.raises(ValueError, match="no parameters to initialise"):
        build_similarity("none", 6).initialise_(target)


def test_similarity_from_expert_reads_every_expert_at_the_epoch(encoder, experts, real):
    from repblend_hf.stages import relative_similarity, similarity_from_expert

    syn = _set(encoder, 5)
    pairs = syn.pair_set()
    s = similarity_from_expert(pairs, experts, 4, syn.config)
    heads = RetrievalHeads(encoder.feature_dim, TEXT_DIM, EMBED).eval()
    expected = 0
    for e in experts.expert_indices:
        for branch, head in heads.branches().items():
            head.load_state_dict(unflatten_parameters(head, experts.snapshot(e, 4)[branch]))
        with torch.no_grad():
            expected = expected + relative_similarity(*heads(pairs.image_features, pairs.text_features), 0.07)
    torch.testing.assert_close(s, expected / 2)
    assert not torch.allclose(s, torch.eye(5))  # trained experts see some pairs as alike


def test_the_card_of_a_set_in_stages_lists_each_stage():
    from repblend_hf.hub import SyntheticSetCardData, render_synthetic_set_card

    stages = [{"num_pairs": 4, "inner_lr_img": 0.2, "inner_lr_txt": 0.3, "min_start_epoch": 0, "max_start_epoch": 1,
               "targets": "experts", "shortcut_epoch": None, "iterations": 10, "steps": None},
              {"num_pairs": 3, "inner_lr_img": 0.5, "inner_lr_txt": 0.1, "min_start_epoch": 1, "max_start_epoch": 3,
               "targets": "conditioned", "shortcut_epoch": 6, "iterations": 12, "steps": 20}]
    config = _feature_set(7, stages=stages).config.to_dict()
    card = str(render_synthetic_set_card(SyntheticSetCardData("me/set", config)))
    assert "distilled in **2 stages**" in card
    assert "| 1 | 0–3 | 0.2 | 0.3 | 0–0 | experts | 10 | the recipe |" in card
    assert "| 2 | 4–6 | 0.5 | 0.1 | 1–2 | conditioned, shortcut to epoch 6 | 12 | 20 SGD steps |" in card
    single = str(render_synthetic_set_card(SyntheticSetCardData("me/set", _feature_set(7).config.to_dict())))
    assert "stages**" not in single
