"""SyntheticSet: the learnable set, its initialisation and its exact round trip through a Dataset."""

import pytest
import torch

from repblend_hf import RepBlendConfig, SyntheticSet


def test_feature_space_set_round_trips_exactly_and_load_dataset_reads_it(tmp_path):
    from datasets import load_dataset
    from PIL import Image as PILImage

    config = RepBlendConfig(num_pairs=4, image_dim=12, text_dim=6, embed_dim=8, sim_rank=2,
                            synthetic_space="features")
    synthetic = SyntheticSet(config, torch.randn(4, 12), torch.randn(4, 6))
    previews = [PILImage.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    folder = synthetic.save_pretrained(tmp_path / "set", previews=previews)
    loaded = SyntheticSet.from_pretrained(folder)
    assert loaded.config.synthetic_space == "features"
    for name, value in synthetic.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    rows = load_dataset("parquet", data_files=str(folder / "data" / "*.parquet"), split="train")
    assert "image_features" in rows.column_names and "pixel_values" not in rows.column_names
    assert rows[2]["image"].getpixel((0, 0)) == (80, 0, 0)
    with pytest.raises(ValueError, match="image_features must have shape"):
        SyntheticSet(config, torch.randn(4, 3, 8, 8), torch.randn(4, 6))


def test_init_through_the_train_transform_is_a_function_of_the_seed():
    import random

    from PIL import Image as PILImage

    from repblend_hf.encoders import load_image_encoder

    encoder = load_image_encoder("test_efficientnet", pretrained=False, image_size=16)
    g = torch.Generator().manual_seed(0)
    images = [PILImage.fromarray((torch.rand(24, 24, 3, generator=g) * 255).byte().numpy()) for _ in range(8)]
    captions = torch.randn(16, 6)
    offsets = torch.arange(0, 17, 2)
    config = RepBlendConfig(num_pairs=4, image_size=16, image_dim=encoder.feature_dim, text_dim=6, sim_rank=2)

    def build(transform, seed=0):
        random.seed(123)  # whatever the caller did with the global generators must not matter
        torch.manual_seed(123)
        return SyntheticSet.from_real(config, images, captions, offsets, encoder, seed=seed, init_transform=transform)

    a, b, c, plain = build("train"), build("train"), build("train", seed=1), build("eval")
    assert torch.equal(a.pixel_values, b.pixel_values)
    assert not torch.equal(a.pixel_values, c.pixel_values)
    assert torch.equal(a.init_indices, plain.init_indices) and not torch.equal(a.pixel_values, plain.pixel_values)
    expected = torch.stack([encoder.eval_transform(images[i]) for i in plain.init_indices.tolist()])
    assert torch.equal(plain.pixel_values, expected)
    with pytest.raises(ValueError, match="init_transform must be"):
        build("random")


def test_forward_returns_the_loss_and_backward_puts_exactly_the_given_gradients_on_the_set():
    # The DistillationTrainer's backward: each tensor's .grad is its meta-gradient (scaled by the incoming scalar,
    # e.g. a loss scaler or 1 / gradient_accumulation_steps), and the value is the matching loss.
    config = RepBlendConfig(num_pairs=4, image_dim=12, text_dim=6, embed_dim=8, sim_rank=2,
                            synthetic_space="features")
    synthetic = SyntheticSet(config, torch.randn(4, 12), torch.randn(4, 6))
    params = [synthetic.image_features, synthetic.text_embeddings]
    grads = [torch.randn_like(p) for p in params]
    out = synthetic(surrogate_grads=list(zip(params, grads)), loss=torch.tensor(2.5))
    assert out.item() == 2.5
    out.backward()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)
    synthetic.zero_grad(set_to_none=True)
    (synthetic(surrogate_grads=list(zip(params, grads)), loss=torch.tensor(2.5)) * 0.5).backward()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g * 0.5)
    assert synthetic.log_lr_img.grad is None  # a tensor without a given gradient gets none
