"""The evaluation protocol: retrieval metrics, modality diagnostics, training fresh heads."""

import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch

from repblend_hf.evaluation import (
    METRIC_NAMES,
    EvaluationProtocol,
    PairSet,
    evaluate_pairs,
    modality_diagnostics,
    retrieval_metrics,
    score_split,
    train_heads,
)
from repblend_hf.features import FeatureSplit
from repblend_hf.modeling import flatten_parameters

# --------------------------------------------------------------------------------------------------
# retrieval_metrics
# --------------------------------------------------------------------------------------------------


def brute_force_metrics(scores: np.ndarray, caption_to_image: np.ndarray) -> dict[str, float]:
    """The released ``itm_eval``, one loop per image and caption (argsort ranks; fine without ties)."""
    num_images, num_captions = scores.shape
    tr_ranks = []
    for i in range(num_images):
        inds = np.argsort(scores[i])[::-1]
        tr_ranks.append(min(int(np.where(inds == c)[0][0]) for c in range(num_captions) if caption_to_image[c] == i))
    ir_ranks = []
    for c in range(num_captions):
        inds = np.argsort(scores[:, c])[::-1]
        ir_ranks.append(int(np.where(inds == caption_to_image[c])[0][0]))
    out = {}
    for name, ranks in (("IR", ir_ranks), ("TR", tr_ranks)):
        for k in (1, 5, 10):
            out[f"{name}@{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out["r_mean"] = sum(out.values()) / 6
    return out


@pytest.mark.parametrize("shuffle_captions", [False, True])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 37])
def test_retrieval_metrics_matches_brute_force_with_unequal_caption_counts(shuffle_captions, chunk_elements):
    rng = np.random.default_rng(3)
    num_images = 30
    counts = rng.integers(1, 8, size=num_images)  # 1..7 captions per image
    caption_to_image = np.repeat(np.arange(num_images), counts)
    if shuffle_captions:  # contiguity is not required
        caption_to_image = rng.permutation(caption_to_image)
    scores = rng.normal(size=(num_images, caption_to_image.size))
    scores[caption_to_image, np.arange(caption_to_image.size)] += 1.5  # positives score higher: recalls in (0, 100)
    expected = brute_force_metrics(scores, caption_to_image)
    got = retrieval_metrics(scores, caption_to_image, chunk_elements=chunk_elements)
    assert list(got) == list(METRIC_NAMES)
    assert got == pytest.approx(expected)
    assert 0 < got["TR@1"] < 100 and 0 < got["IR@1"] < 100
    # torch input (float32 on purpose) gives the same numbers
    got_torch = retrieval_metrics(torch.from_numpy(scores).float(), torch.from_numpy(caption_to_image))
    assert got_torch == pytest.approx(expected)


def test_retrieval_metrics_hand_made_case():
    # 3 images; image 0 has captions 0, 1; image 1 has caption 2; image 2 has captions 3, 4.
    caption_to_image = [0, 0, 1, 2, 2]
    scores = np.array(
        [
            [0.1, 0.9, 0.8, 0.2, 0.3],  # image 0: best caption 1 ranks first -> TR@1 hit
            [0.5, 0.1, 0.4, 0.6, 0.7],  # image 1: caption 2 has 3 captions above it (rank 3) -> TR@1 miss, TR@5 hit
            [0.0, 0.2, 0.3, 0.1, 0.9],  # image 2: caption 4 ranks first -> hit
        ]
    )
    # IR ranks (column-wise, images strictly above the positive):
    # c0: image 0 has 0.1, above it 0.5 (img 1) -> rank 1; c1: 0.9 top -> 0; c2: img1 0.4, above 0.8 (img 0)
    # and none else (0.3 < 0.4) -> 1; c3: img2 0.1, above 0.2 and 0.6 -> 2; c4: img2 0.9 top -> 0.
    got = retrieval_metrics(scores, caption_to_image)
    assert got["TR@1"] == pytest.approx(200 / 3)
    assert got["TR@5"] == got["TR@10"] == 100.0
    assert got["IR@1"] == pytest.approx(40.0)
    assert got["IR@5"] == got["IR@10"] == 100.0
    assert got["r_mean"] == pytest.approx((200 / 3 + 100 + 100 + 40 + 100 + 100) / 6)


def test_retrieval_metrics_ties_count_against_the_positive():
    # A tie with a negative pushes the positive down, so constant scores (a collapsed model) rank every positive
    # last: at chance or below, never 100.
    scores = np.zeros((3, 3))
    got = retrieval_metrics(scores, [0, 1, 2])
    assert got["IR@1"] == got["TR@1"] == 0.0
    assert got["IR@5"] == got["TR@5"] == 100.0  # K >= 3 candidates: every method scores 100, chance included
    scores = np.array([[1.0, 1.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    got = retrieval_metrics(scores, [0, 1, 2])
    assert got["TR@1"] == 0.0  # image 0: caption 2 above, caption 1 tied; images 1, 2: tied with the others
    assert got["IR@1"] == pytest.approx(100 / 3)  # c0: image 0 strictly first; c1, c2: image 0 above
    # Ties among an image's own captions do not count against it (any of them is a hit).
    got = retrieval_metrics(np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), [0, 0, 1])
    assert got["TR@1"] == got["IR@1"] == 100.0


@pytest.mark.parametrize("num_images", [10, 50])
def test_constant_scores_score_at_chance_or_below(num_images):
    """A constant score matrix must never look better than random scores (it used to give r_mean 100)."""
    rng = np.random.default_rng(0)
    caption_to_image = np.repeat(np.arange(num_images), 3)
    constant = retrieval_metrics(np.ones((num_images, 3 * num_images)), caption_to_image)
    chance = np.mean([retrieval_metrics(rng.random((num_images, 3 * num_images)), caption_to_image)["r_mean"]
                      for _ in range(20)])
    assert constant["r_mean"] <= chance
    assert constant["IR@1"] == constant["TR@1"] == 0.0


def test_retrieval_metrics_errors():
    with pytest.raises(ValueError, match=r"1 image\(s\) have no caption \(first: image 1\)"):
        retrieval_metrics(np.zeros((3, 2)), [0, 2])
    with pytest.raises(ValueError, match="caption_to_image has 3 entries but scores has 2 caption columns"):
        retrieval_metrics(np.zeros((2, 2)), [0, 1, 1])
    with pytest.raises(ValueError, match=r"caption_to_image must index images 0\.\.1"):
        retrieval_metrics(np.zeros((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="scores contain NaN or inf"):
        retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]), [0, 1])
    with pytest.raises(ValueError, match="scores contain NaN or inf"):
        retrieval_metrics(np.array([[np.inf, 0.0], [0.0, 1.0]]), [0, 1])


# --------------------------------------------------------------------------------------------------
# modality_diagnostics
# --------------------------------------------------------------------------------------------------


def test_modality_diagnostics_matches_the_formula():
    torch.manual_seed(1)
    image = torch.randn(5, 4) * 3 + 1
    text = torch.randn(7, 4)

    def mean_pairwise_cosine(x):
        values = [torch.nn.functional.cosine_similarity(x[i], x[j], dim=0).item()
                  for i in range(len(x)) for j in range(len(x)) if i != j]
        return sum(values) / len(values)

    expected_gap = (image / image.norm(dim=1, keepdim=True)).mean(0) - (text / text.norm(dim=1, keepdim=True)).mean(0)
    got = modality_diagnostics(image, text.numpy())
    assert got["sim_image"] == pytest.approx(mean_pairwise_cosine(image), abs=1e-6)
    assert got["sim_text"] == pytest.approx(mean_pairwise_cosine(text), abs=1e-6)
    assert got["gap"] == pytest.approx(expected_gap.norm().item(), abs=1e-6)
    # identical, collapsed embeddings: similarity 1, no gap
    same = torch.ones(3, 4)
    assert modality_diagnostics(same, 2 * same) == pytest.approx({"sim_image": 1.0, "sim_text": 1.0, "gap": 0.0})


# --------------------------------------------------------------------------------------------------
# train_heads / evaluate_pairs on a tiny synthetic problem: text = image @ W + noise
# --------------------------------------------------------------------------------------------------

D_IMG, D_TXT, EMBED = 24, 16, 32


def make_problem(seed=0, num_train=64, num_eval_images=40, captions_per_image=2, views=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_IMG, D_TXT, generator=torch.Generator().manual_seed(1234)) / math.sqrt(D_IMG)

    def split(num_images):
        image = torch.randn(num_images, D_IMG, generator=g)
        c2i = torch.arange(num_images).repeat_interleave(captions_per_image)
        text = image[c2i] @ w + 0.3 * torch.randn(c2i.numel(), D_TXT, generator=g)
        augmented = None
        if views:
            augmented = image[:, None] + 0.1 * torch.randn(num_images, views, D_IMG, generator=g)
        return FeatureSplit(image, text, c2i, augmented)

    image = torch.randn(num_train, D_IMG, generator=g)
    pairs = PairSet(image, image @ w + 0.3 * torch.randn(num_train, D_TXT, generator=g))
    return pairs, split(num_eval_images), split(num_eval_images)


def test_train_heads_learns_the_tiny_problem():
    pairs, validation, test = make_problem()
    trained = train_heads(pairs, embed_dim=EMBED, loss="infonce", lr=0.1, epochs=30, validation=validation, seed=0)
    untrained = train_heads(pairs, embed_dim=EMBED, loss="infonce", lr=0.1, epochs=0, seed=0).heads
    assert not torch.equal(flatten_parameters(trained.heads), flatten_parameters(untrained))
    assert trained.train_loss[-1] < 0.5 * trained.train_loss[0]
    assert [h["epoch"] for h in trained.history] == [0, 6, 12, 18, 24, 30]
    chance = retrieval_metrics(torch.randn(40, 80), test.caption_to_image)["r_mean"]
    metrics = retrieval_metrics(score_split(trained.heads, test), test.caption_to_image)
    assert metrics["r_mean"] > chance + 30
    # the kept state is the best-by-validation one
    best = max(trained.history, key=lambda h: h["validation"]["r_mean"])
    assert trained.best_epoch == best["epoch"]
    assert retrieval_metrics(score_split(trained.heads, validation), validation.caption_to_image) == best["validation"]


def test_wbce_without_similarity_equals_identity_similarity():
    pairs, _, _ = make_problem(num_train=50)
    with_identity = PairSet(pairs.image_features, pairs.text_features, torch.eye(50))
    kwargs = dict(embed_dim=EMBED, loss="wbce", lr=0.5, epochs=5, batch_size=16, seed=3)
    a = train_heads(pairs, **kwargs)
    b = train_heads(with_identity, **kwargs)
    assert torch.equal(flatten_parameters(a.heads), flatten_parameters(b.heads))
    assert a.train_loss == b.train_loss


def test_train_heads_is_reproducible_and_leaves_the_global_rng_alone():
    pairs, validation, _ = make_problem()
    kwargs = dict(embed_dim=EMBED, loss="infonce", lr=0.1, epochs=4, batch_size=16, validation=validation)
    state = torch.get_rng_state()
    a, b = train_heads(pairs, seed=7, **kwargs), train_heads(pairs, seed=7, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(flatten_parameters(a.heads), flatten_parameters(b.heads))
    assert a.history == b.history
    c = train_heads(pairs, seed=8, **kwargs)
    assert not torch.equal(flatten_parameters(a.heads), flatten_parameters(c.heads))


def test_learned_lrs_and_the_decay_epoch():
    pairs, _, _ = make_problem()
    base = dict(embed_dim=EMBED, loss="infonce", epochs=3, seed=0)
    learned = PairSet(pairs.image_features, pairs.text_features, lr_img=0.2, lr_txt=0.05)
    explicit = train_heads(pairs, lr_img=0.2, lr_txt=0.05, **base)
    assert torch.equal(flatten_parameters(train_heads(learned, **base).heads), flatten_parameters(explicit.heads))
    # decaying from epoch 1 on is training at 0.1 × lr throughout
    decayed = train_heads(pairs, lr=0.2, decay_epoch=1, **base)
    small = train_heads(pairs, lr=0.02, decay_epoch=99, **base)
    assert torch.allclose(flatten_parameters(decayed.heads), flatten_parameters(small.heads), atol=1e-6)
    with pytest.raises(ValueError, match="no learning rate for lr_img"):
        train_heads(pairs, **base)
    with pytest.raises(ValueError, match="loss='infonce' ignores it"):
        train_heads(PairSet(pairs.image_features, pairs.text_features, torch.eye(64)), lr=0.1, **base)
    with pytest.raises(ValueError, match=r"loss must be one of \['wbce', 'infonce'\], got 'mse'"):
        train_heads(pairs, lr=0.1, **{**base, "loss": "mse"})
    with pytest.raises(ValueError, match="lr_txt must be > 0, got -0.1"):
        PairSet(pairs.image_features, pairs.text_features, lr_txt=-0.1)


def test_full_split_training_with_several_captions_and_views():
    _, validation, test = make_problem()
    _, train, _ = make_problem(seed=5, num_eval_images=200, captions_per_image=3, views=2)
    trained = train_heads(train, embed_dim=EMBED, loss="infonce", lr=0.1, epochs=8, batch_size=32, seed=0,
                          validation=validation)
    assert trained.train_loss[-1] < trained.train_loss[0]
    assert trained.history[-1]["validation"]["r_mean"] > trained.history[0]["validation"]["r_mean"] + 20


def test_diverged_training_scores_zero_and_warns():
    pairs, validation, _ = make_problem()
    with pytest.warns(RuntimeWarning, match="diverged at epoch"):
        trained = train_heads(pairs, embed_dim=EMBED, loss="wbce", lr=1e30, epochs=5, eval_epochs=(0, 5),
                              validation=validation)
    assert trained.diverged_epoch is not None
    assert trained.history[-1]["validation"]["r_mean"] == 0.0
    assert trained.best_epoch == 0  # the untrained heads stay the selection


def test_evaluate_pairs_selects_on_validation_and_summarises():
    pairs, validation, test = make_problem()
    result = evaluate_pairs(pairs, validation, test, seeds=(0, 1), embed_dim=EMBED, loss="infonce", lr=0.1,
                            epochs=10, eval_epochs=(0, 5, 10))
    assert [s.seed for s in result.seeds] == [0, 1]
    for seed in result.seeds:
        by_epoch = {h["epoch"]: h for h in seed.history}
        assert seed.selected_epoch == max(by_epoch, key=lambda e: (by_epoch[e]["validation"]["r_mean"], -e))
        assert seed.test == by_epoch[seed.selected_epoch]["test"]
        assert seed.test_selected_on_test["r_mean"] >= seed.test["r_mean"]
        assert set(seed.diagnostics) == {"sim_image", "sim_text", "gap"}
    summary = result.summary()
    assert set(summary) == {"validation", "test", "test_selected_on_test", "diagnostics"}
    values = [s.test["r_mean"] for s in result.seeds]
    assert summary["test"]["r_mean"] == pytest.approx({"mean": np.mean(values), "std": np.std(values)})
    assert set(summary["test"]) == set(METRIC_NAMES)
    assert result.settings["loss"] == "infonce" and result.to_dict()["summary"] == summary


def test_evaluate_pairs_and_train_heads_share_defaults():
    train_params = inspect.signature(train_heads).parameters
    for name, param in inspect.signature(evaluate_pairs).parameters.items():
        if name in train_params and name not in ("train", "validation"):
            assert param.default == train_params[name].default, name
    # The recipe is written once, in EvaluationProtocol: no function repeats its settings as keywords.
    fields = {f.name for f in dataclasses.fields(EvaluationProtocol)}
    for function in (train_heads, evaluate_pairs):
        assert not fields & set(inspect.signature(function).parameters), function.__name__


def test_evaluation_protocol_is_the_keywords_and_records_the_same_settings():
    pairs, validation, test = make_problem()
    protocol = EvaluationProtocol(loss="infonce", lr=0.1, epochs=4, eval_epochs=[4, 0], batch_size=16)
    by_value = evaluate_pairs(pairs, validation, test, protocol, seeds=(0,), embed_dim=EMBED)
    by_keywords = evaluate_pairs(pairs, validation, test, seeds=(0,), embed_dim=EMBED, loss="infonce", lr=0.1,
                                 epochs=4, eval_epochs=[4, 0], batch_size=16)
    assert by_value.to_dict() == by_keywords.to_dict()
    # results.json's settings: the keys (in this order) and values they had before the protocol was one value
    assert list(by_value.settings) == [
        "embed_dim", "loss", "lr", "lr_img", "lr_txt", "epochs", "decay_epoch", "momentum", "weight_decay",
        "batch_size", "temperature", "dropout", "eval_epochs", "use_augmented_views", "seeds", "num_train_pairs",
        "train_kind", "protocol"]
    assert by_value.settings["eval_epochs"] == [4, 0] and by_value.settings["decay_epoch"] is None
    assert [h["epoch"] for h in by_value.seeds[0].history] == [0, 4]
    # keywords change the value they are given with
    changed = train_heads(pairs, protocol, embed_dim=EMBED, lr=0.2, eval_epochs=())
    assert changed.history == [] and len(changed.train_loss) == 4
    with pytest.raises(TypeError, match=r"\['epoch'\] are not settings of the evaluation protocol"):
        train_heads(pairs, protocol, embed_dim=EMBED, epoch=3)
    with pytest.raises(TypeError, match="protocol must be an EvaluationProtocol, got dict"):
        evaluate_pairs(pairs, validation, test, {"lr": 0.1}, embed_dim=EMBED)


# --------------------------------------------------------------------------------------------------
# The asymmetric methods' own protocol: the image encoder fine-tuned on the set's pixels
# --------------------------------------------------------------------------------------------------

SIZE, TEXT_DIM = 32, 8


@pytest.fixture(scope="module")
def tiny_encoder():
    from repblend_hf.encoders import load_image_encoder

    return load_image_encoder("test_efficientnet", pretrained=False, image_size=SIZE)


def pixel_problem(seed=0, n=10, m=12):
    """A pixel set (N pairs, S = I + noise, learned η) and two pixel splits of M images with 2 captions each."""
    from repblend_hf.evaluation import ImageSplit, PixelPairSet

    g = torch.Generator().manual_seed(seed)
    similarity = torch.eye(n) + 0.05 * torch.rand(n, n, generator=g)
    pairs = PixelPairSet(torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randn(n, TEXT_DIM, generator=g),
                         similarity, lr_img=0.002, lr_txt=0.1)

    def split():
        caption_to_image = torch.arange(m).repeat_interleave(2)
        features = FeatureSplit(torch.zeros(m, 1), torch.randn(2 * m, TEXT_DIM, generator=g), caption_to_image)
        return ImageSplit(torch.randn(m, 3, SIZE, SIZE, generator=g), None, features)

    return pairs, split(), split()


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_finetune_trains_a_copy_of_the_encoder_and_a_text_head(tiny_encoder):
    from repblend_hf.evaluation import finetune_image_encoder

    pairs, validation, _ = pixel_problem()
    original = _state(tiny_encoder.model)
    trained = finetune_image_encoder(pairs, tiny_encoder, epochs=4, validation=validation, eval_epochs=(4,))
    after = trained.image_encoder.state_dict()
    weights = [k for k, _ in tiny_encoder.model.named_parameters()]
    assert all(not torch.equal(after[k], original[k]) for k in weights)  # every encoder tensor was trained
    # BatchNorm in eval mode: the pretrained running statistics are kept (its affine weights are trained above).
    stats = [k for k in original if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(after[k], original[k]) for k in stats)
    # The frozen original is untouched and still frozen.
    assert all(torch.equal(v, original[k]) for k, v in tiny_encoder.model.state_dict().items())
    assert not any(p.requires_grad for p in tiny_encoder.model.parameters())
    # Released layout: no image head, the text head outputs the encoder's width and was trained.
    assert not trained.heads.has_image_head and trained.heads.text_head.fc.out_features == tiny_encoder.feature_dim
    assert trained.train_loss[-1] < trained.train_loss[0]
    assert [h["epoch"] for h in trained.history] == [4] and trained.best_epoch == 4
    assert set(trained.history[0]["validation"]) == set(METRIC_NAMES)
    with_head = finetune_image_encoder(pairs, tiny_encoder, epochs=1, image_head=True, embed_dim=16, eval_epochs=())
    assert with_head.heads.has_image_head and with_head.heads.text_head.fc.out_features == 16
    with pytest.raises(ValueError, match=f"set embed_dim={tiny_encoder.feature_dim} \\(got 16\\)"):
        finetune_image_encoder(pairs, tiny_encoder, epochs=1, embed_dim=16)


def _one_step_deltas(encoder, pairs, **lrs):
    from repblend_hf.evaluation import finetune_image_encoder

    torch.manual_seed(0)
    start = _state(encoder.model)
    trained = finetune_image_encoder(pairs, encoder, epochs=1, momentum=0.0, weight_decay=0.0, eval_epochs=(),
                                     seed=3, **lrs)
    enc = torch.cat([(trained.image_encoder.state_dict()[k] - start[k]).reshape(-1)
                     for k, _ in encoder.model.named_parameters()])
    # The text head starts from the seed's initialisation: rebuild it the same way to get its step.
    with torch.random.fork_rng():
        torch.manual_seed(3)
        from repblend_hf.modeling import RetrievalHeads

        fresh = RetrievalHeads(encoder.feature_dim, TEXT_DIM, encoder.feature_dim, image_head=False)
    text = flatten_parameters(trained.heads.text_head) - flatten_parameters(fresh.text_head)
    return enc, text


def test_finetune_steps_the_encoder_at_eta_img_and_the_text_head_at_eta_txt(tiny_encoder):
    pairs, _, _ = pixel_problem()
    enc, text = _one_step_deltas(tiny_encoder, pairs)  # the set's learned η: 0.002 and 0.1
    assert enc.abs().sum() > 0 and text.abs().sum() > 0
    enc_2, text_same = _one_step_deltas(tiny_encoder, pairs, lr_img=0.004, lr_txt=0.1)
    # One SGD step is Δθ = -η g (up to the float rounding of θ - η g, ~1e-7 for weights of order 1).
    def same(a, b):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
        assert float(a.norm() / b.norm()) == pytest.approx(1.0, rel=1e-3)

    same(enc_2, 2 * enc)
    same(text_same, text)
    enc_same, text_3 = _one_step_deltas(tiny_encoder, pairs, lr_img=0.002, lr_txt=0.3)
    same(enc_same, enc)
    same(text_3, 3 * text)


def test_image_split_and_its_embeddings(tiny_encoder):
    from PIL import Image

    from repblend_hf.evaluation import ImageSplit, embed_image_split
    from repblend_hf.modeling import RetrievalHeads

    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype("uint8")) for _ in range(3)]
    features = FeatureSplit(torch.zeros(3, 1), torch.randn(6, TEXT_DIM), torch.arange(3).repeat_interleave(2))
    split = ImageSplit(images, tiny_encoder.eval_transform, features)
    pixels = split.pixels()
    assert torch.equal(pixels, torch.stack([tiny_encoder.eval_transform(img) for img in images]))
    assert split.pixels() is pixels  # transformed once
    heads = RetrievalHeads(tiny_encoder.feature_dim, TEXT_DIM, tiny_encoder.feature_dim, image_head=False).train()
    image, text = embed_image_split(tiny_encoder.model, heads, split, batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(image, tiny_encoder.model(pixels))  # the encoder's features are the embeddings
        torch.testing.assert_close(text, heads.eval().text_head(features.caption_features))
    with pytest.raises(ValueError, match="has 2 images but its features 3"):
        ImageSplit(images[:2], tiny_encoder.eval_transform, features)
    with pytest.raises(ValueError, match="needs images as a \\[M, 3, H, W\\] pixel tensor"):
        ImageSplit(images, None, features)


def test_evaluate_finetuned_selects_on_validation_and_records_the_protocol(tiny_encoder):
    from repblend_hf.evaluation import FINETUNE_ENCODER, evaluate_finetuned
    from repblend_hf.pipeline import results_record

    pairs, validation, test = pixel_problem()
    result = evaluate_finetuned(pairs, tiny_encoder, validation, test, seeds=(0, 1), epochs=4, eval_epochs=(0, 2, 4))
    assert result.settings["protocol"] == FINETUNE_ENCODER and result.settings["image_head"] is False
    assert (result.settings["encoder_lr"], result.settings["text_head_lr"]) == (0.002, 0.1)  # the learned η
    assert result.settings["embed_dim"] == tiny_encoder.feature_dim
    for seed in result.seeds:
        by_epoch = {h["epoch"]: h for h in seed.history}
        assert set(by_epoch) == {0, 2, 4}
        assert seed.selected_epoch == max(by_epoch, key=lambda e: (by_epoch[e]["validation"]["r_mean"], -e))
        assert seed.test == by_epoch[seed.selected_epoch]["test"]
    assert not torch.equal(torch.tensor(result.seeds[0].train_loss), torch.tensor(result.seeds[1].train_loss))
    summary = result.summary()
    assert set(summary) == {"validation", "test", "test_selected_on_test", "diagnostics"}
    assert set(summary["test"]) == set(METRIC_NAMES)
    record = results_record(result, dataset="d", method="lors", pairs=len(pairs))
    assert record["protocol"] == FINETUNE_ENCODER and record["settings"]["protocol"] == FINETUNE_ENCODER
    frozen = evaluate_pairs(PairSet(torch.randn(10, 4), pairs.text_features, lr_img=0.1, lr_txt=0.1),
                            FeatureSplit(torch.randn(12, 4), validation.features.caption_features,
                                         validation.features.caption_to_image),
                            FeatureSplit(torch.randn(12, 4), test.features.caption_features,
                                         test.features.caption_to_image), seeds=(0,), embed_dim=8, epochs=1)
    assert results_record(frozen, dataset="d", method="lors", pairs=10)["protocol"] == "frozen_encoder"


def test_evaluate_finetuned_and_finetune_share_defaults():
    from repblend_hf.evaluation import evaluate_finetuned, finetune_image_encoder

    params = inspect.signature(finetune_image_encoder).parameters
    for name, param in inspect.signature(evaluate_finetuned).parameters.items():
        if name in params and name not in ("train", "validation", "image_encoder"):
            assert param.default == params[name].default, name
    assert "protocol" in params and not {f.name for f in dataclasses.fields(EvaluationProtocol)} & set(params)
    # The released protocol's optimiser: momentum 0.9, weight decay 5e-4, decay at half, batch 128, 100 epochs.
    default = EvaluationProtocol()
    assert (default.momentum, default.weight_decay, default.batch_size, default.epochs, default.decay_epoch,
            default.temperature, default.dropout) == (0.9, 5e-4, 128, 100, None, 0.07, 0.1)
