"""Cross-architecture evaluation (repblend_hf.cross_architecture, repblend-evaluate --image_encoder)."""

import json

import pytest
import torch

from repblend_hf import RepBlendConfig, SyntheticSet
from repblend_hf.commands import evaluate
from repblend_hf.cross_architecture import (
    check_transfer,
    encode_set_images,
    encoder_input_error,
    normalization_of,
    transfer_pixels,
)
from repblend_hf.encoders import load_image_encoder
from repblend_hf.pipeline import DataArguments, prepare_features

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_pixels_are_renormalised_for_the_new_encoder():
    raw = torch.rand(4, 3, 8, 8)
    source = (raw - torch.tensor(HALF[0]).view(1, 3, 1, 1)) / torch.tensor(HALF[1]).view(1, 3, 1, 1)
    moved = transfer_pixels(source, HALF, IMAGENET)
    want = (raw - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    torch.testing.assert_close(moved, want)
    assert transfer_pixels(source, HALF, HALF) is source  # the same normalisation: untouched
    assert normalization_of("test_efficientnet") == IMAGENET and normalization_of("test_convnext") == HALF


def test_encoders_that_cannot_take_the_size_are_named():
    assert encoder_input_error("test_convnext", 32) is None
    assert "divisible by window" in encoder_input_error("test_maxvit", 32)  # its attention windows need larger inputs
    assert "not a timm model" in encoder_input_error("no_such_model", 32)


def _config(**kw):
    return RepBlendConfig(**{"image_encoder": "test_convnext", "image_size": 32, "image_dim": 64, "text_dim": 16,
                             "embed_dim": 8, "num_pairs": 4, "similarity": "none", **kw})


def test_a_feature_space_set_stays_on_its_encoder():
    config = _config(synthetic_space="features")
    check_transfer(config, "test_convnext", 32)  # its own encoder and size: fine
    with pytest.raises(ValueError, match=r"feature-space set.*not pixels.*--image_encoder test_convnext --image_size "
                                         r"32.*--synthetic_space pixels"):
        check_transfer(config, "test_resnet", 32)


def test_a_pixel_set_needs_its_size_and_an_encoder_that_takes_it():
    config = _config()
    check_transfer(config, "test_resnet", 32)
    with pytest.raises(ValueError, match=r"holds 32 px images but .* 64 px.*--image_size 32"):
        check_transfer(config, "test_resnet", 64)
    with pytest.raises(ValueError, match=r"test_maxvit cannot take it|cannot take \(AssertionError"):
        check_transfer(config, "test_maxvit", 32)


def test_set_images_under_another_encoder_are_its_features_of_the_renormalised_pixels():
    torch.manual_seed(0)
    encoder = load_image_encoder("test_efficientnet", pretrained=False, image_size=32)  # ImageNet normalisation
    pixels = torch.randn(5, 3, 32, 32)  # normalised for test_convnext (0.5 / 0.5)
    feats = encode_set_images(pixels, "test_convnext", encoder, batch_size=2)
    with torch.no_grad():
        want = encoder(transfer_pixels(pixels, HALF, IMAGENET))
    torch.testing.assert_close(feats, want)
    with torch.no_grad():
        assert not torch.allclose(feats, encoder(pixels), atol=1e-4)  # without re-normalising it would differ


def save_tiny_pixel_set(karpathy_dir, text_dir, out, num_pairs: int = 12, **config):
    """Real training pairs of the tiny fixtures as a pixel set made with test_convnext, saved as a distilled set is
    (``config``: RepBlendConfig fields over the tiny ones, e.g. a learned similarity)."""
    args = DataArguments(dataset=str(karpathy_dir), image_encoder="test_convnext", pretrained_image_encoder=False,
                         text_encoder=str(text_dir), text_pooling="mean", image_size=32, num_views=1,
                         encode_batch_size=16)
    prepared = prepare_features(args)
    train = prepared.features["train"]
    config = _config(image_dim=prepared.image_encoder.feature_dim, text_dim=prepared.text_encoder.feature_dim,
                     num_pairs=num_pairs, **config)
    synthetic = SyntheticSet.from_real(config, prepared.dataset["train"]["image"], train.caption_features,
                                       train.caption_offsets(), prepared.image_encoder, seed=0)
    synthetic.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_set_dir(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path_factory):
    return save_tiny_pixel_set(tiny_karpathy_dir, tiny_text_encoder_dir,
                               tmp_path_factory.mktemp("cross-architecture") / "set")


def _argv(karpathy, text, *extra):
    return ["--dataset", str(karpathy), "--text_encoder", str(text), "--text_pooling", "mean",
            "--pretrained_image_encoder", "false", "--image_size", "32", "--num_views", "1", "--encode_batch_size",
            "16", "--seeds", "2", "--epochs", "5", *extra]


def test_repblend_evaluate_takes_a_pixel_set_to_another_encoder(tiny_set_dir, tiny_karpathy_dir,
                                                                tiny_text_encoder_dir, tmp_path):
    record = evaluate.main(_argv(tiny_karpathy_dir, tiny_text_encoder_dir, "--method", "distilled", "--distilled_set",
                                 str(tiny_set_dir), "--image_encoder", "test_efficientnet", "--output_dir",
                                 str(tmp_path / "lite")))
    assert record["settings"]["image_encoder"] == "test_efficientnet"
    assert record["settings"]["distilled_with"] == "test_convnext"
    assert record["seeds"] == 2 and record["pairs"] == 12
    saved = json.loads((tmp_path / "lite" / "results.json").read_text())
    assert saved["settings"]["distilled_with"] == "test_convnext"
    # A coreset under the same encoder, for the comparison: its record names the encoder too.
    coreset = evaluate.main(_argv(tiny_karpathy_dir, tiny_text_encoder_dir, "--method", "herding", "--pairs", "12",
                                  "--image_encoder", "test_efficientnet", "--output_dir", str(tmp_path / "herding")))
    assert coreset["settings"]["image_encoder"] == "test_efficientnet" and "distilled_with" not in coreset["settings"]


def test_repblend_evaluate_refuses_before_encoding(tiny_set_dir, tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path,
                                                   monkeypatch):
    import repblend_hf.pipeline as pipeline

    monkeypatch.setattr(pipeline, "encode_dataset", lambda *a, **k: pytest.fail("encoded before the check"))
    with pytest.raises(ValueError, match=r"test_maxvit cannot take"):
        evaluate.main(_argv(tiny_karpathy_dir, tiny_text_encoder_dir, "--method", "distilled", "--distilled_set",
                            str(tiny_set_dir), "--image_encoder", "test_maxvit", "--output_dir", str(tmp_path / "a")))
    with pytest.raises(ValueError, match=r"--image_size 32"):
        evaluate.main(_argv(tiny_karpathy_dir, tiny_text_encoder_dir, "--method", "distilled", "--distilled_set",
                            str(tiny_set_dir), "--image_encoder", "test_resnet", "--image_size", "48", "--output_dir",
                            str(tmp_path / "b")))
