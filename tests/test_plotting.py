"""Figures: every plot writes a readable PNG of a plausible size; de-normalisation is exact; missing logs are shown."""

import numpy as np
import pytest
import torch
from PIL import Image

from repblend_hf.plotting import (
    DPI,
    denormalize,
    plot_results_vs_pairs,
    plot_similarity,
    plot_synthetic_grid,
    plot_training_curves,
)

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as the timm encoders use
STD = (0.229, 0.224, 0.225)


def _constant_images(levels: list[float], size: int = 8) -> torch.Tensor:
    """Images whose de-normalised pixels are all `level` (in [0, 1]), in normalised units."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return torch.stack([(torch.full((3, size, size), level) - mean) / std for level in levels])


def _read_png(path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _log_history(steps: int = 20) -> list[dict]:
    history = []
    for step in range(10, 10 * steps + 1, 10):
        history.append({"step": step, "epoch": step / 10, "loss": 0.5, "matching_loss": 1 / (1 + step / 50),
                        "lr_img": 0.1 * (1 + step / 100), "lr_txt": 0.1 / (1 + step / 100)})
        if step % 50 == 0:
            history.append({"step": step, "eval_r_mean": 10 + step / 20, "eval_set_sim_image": 0.5 - step / 1000,
                            "eval_set_sim_text": 0.6 - step / 800, "eval_set_gap": 0.8 - step / 1000,
                            "eval_real_subset_sim_image": 0.5, "eval_real_subset_sim_text": 0.6,
                            "eval_real_subset_gap": 0.8, "eval_val_gap": 0.7, "eval_runtime": 1.0})
    history.append({"step": 10 * steps, "train_runtime": 3.0, "train_loss": 0.5})  # Trainer's final summary entry
    return history


# ----- denormalize ---------------------------------------------------------------------------------------


def test_denormalize_mid_grey_and_layout():
    out = denormalize(_constant_images([0.5, 0.0, 1.0]), MEAN, STD)
    assert out.dtype == np.uint8 and out.shape == (3, 8, 8, 3)  # N×H×W×C
    assert np.abs(out[0].astype(int) - 128).max() <= 1
    assert out[1].max() <= 1 and out[2].min() >= 254


def test_denormalize_clamps_and_accepts_one_image():
    x = torch.tensor([-100.0, 100.0]).view(1, 2, 1).expand(3, 2, 1)  # one C×H×W image, far outside [0, 1]
    out = denormalize(x, MEAN, STD)
    assert out.shape == (1, 2, 1, 3)
    assert (out[0, 0] == 0).all() and (out[0, 1] == 255).all()


def test_denormalize_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="one value per channel"):
        denormalize(torch.zeros(2, 3, 4, 4), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="N×C×H×W"):
        denormalize(torch.zeros(4, 4), MEAN, STD)


# ----- plot_synthetic_grid -------------------------------------------------------------------------------


def test_grid_single_image_centre_is_mid_grey(tmp_path):
    path = plot_synthetic_grid(_constant_images([0.5]), MEAN, STD, tmp_path / "one.png")
    pixels = _read_png(path)
    h, w, _ = pixels.shape
    assert np.abs(pixels[h // 2, w // 2].astype(int) - 128).max() <= 1


def test_grid_cells_are_row_major(tmp_path):
    levels = [0.1, 0.4, 0.7, 0.9]
    path = plot_synthetic_grid(_constant_images(levels), MEAN, STD, tmp_path / "grid.png", ncols=2)
    pixels = _read_png(path).astype(int)
    h, w, _ = pixels.shape
    centres = [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]
    for level, (row, col) in zip(levels, centres):
        assert np.abs(pixels[row, col] - round(level * 255)).max() <= 1


def test_grid_with_captions_and_max_images(tmp_path):
    images = torch.randn(30, 3, 16, 16)
    captions = [f"caption {i}: " + "a very long description of a dog on a beach " * 3 for i in range(30)]
    with_captions = _read_png(plot_synthetic_grid(images, MEAN, STD, tmp_path / "a.png", captions=captions,
                                                  max_images=12, ncols=4))
    without = _read_png(plot_synthetic_grid(images, MEAN, STD, tmp_path / "nested" / "b.png", max_images=12,
                                            ncols=4))
    assert without.shape[:2] == (3 * 120, 4 * 120)  # 3 rows × 4 columns of 1.2-inch cells at DPI 100
    assert with_captions.shape[1] == without.shape[1] and with_captions.shape[0] > without.shape[0]
    assert DPI == 100


def test_grid_rejects_wrong_number_of_captions(tmp_path):
    with pytest.raises(ValueError, match="captions has 2 entries for 3 images"):
        plot_synthetic_grid(torch.zeros(3, 3, 4, 4), MEAN, STD, tmp_path / "x.png", captions=["a", "b"])


# ----- plot_similarity -----------------------------------------------------------------------------------


def test_similarity_heatmap(tmp_path):
    s = torch.eye(12) + 0.3 * torch.randn(12, 12)
    pixels = _read_png(plot_similarity(s, tmp_path / "s.png", title="S after 100 iterations"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # a coloured map, not a blank canvas


def test_similarity_identity_and_non_square(tmp_path):
    _read_png(plot_similarity(torch.eye(5), tmp_path / "eye.png"))  # S = I at initialisation
    with pytest.raises(ValueError, match="square"):
        plot_similarity(torch.zeros(3, 4), tmp_path / "bad.png")


# ----- plot_training_curves ------------------------------------------------------------------------------


def test_training_curves_full_log_has_four_panels(tmp_path):
    full = _read_png(plot_training_curves(_log_history(), tmp_path / "full.png"))
    no_lrs = [{k: v for k, v in entry.items() if k not in ("lr_img", "lr_txt")} for entry in _log_history()]
    three = _read_png(plot_training_curves(no_lrs, tmp_path / "three.png"))
    assert full.shape[0] == three.shape[0] and full.shape[1] > three.shape[1]  # the η panel is the 4th


@pytest.mark.parametrize("drop", [
    ("matching_loss",),
    ("eval_r_mean",),
    ("eval_set_sim_image", "eval_set_sim_text", "eval_set_gap", "eval_real_subset_sim_image",
     "eval_real_subset_sim_text", "eval_real_subset_gap"),
    ("eval_set_gap", "eval_real_subset_gap"),
    ("eval_set_sim_image", "eval_set_sim_text"),
])
def test_training_curves_missing_keys(tmp_path, drop):
    history = [{k: v for k, v in entry.items() if k not in drop} for entry in _log_history()]
    _read_png(plot_training_curves(history, tmp_path / "curves.png"))


def test_training_curves_empty_history(tmp_path):
    pixels = _read_png(plot_training_curves([], tmp_path / "empty.png"))
    assert pixels.shape[1] > pixels.shape[0]  # three "not logged" panels side by side


# ----- plot_results_vs_pairs -----------------------------------------------------------------------------


def test_results_vs_pairs(tmp_path):
    results = {
        "RepBlend": {100: (30.1, 0.5), 200: (35.2, 0.4), 500: (40.0, 0.3)},
        "LoRS": {"500": (30.0, 0.2), "100": (20.0, 0.6)},  # string keys, as after a JSON round trip
    }
    pixels = _read_png(plot_results_vs_pairs(results, tmp_path / "r.png", full_data=(60.0, 0.5)))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    _read_png(plot_results_vs_pairs({"random": {100: (5.0, 0.0)}}, tmp_path / "one.png"))


def test_results_vs_pairs_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="must be \\(mean, std\\)"):
        plot_results_vs_pairs({"x": {100: (1.0, 2.0, 3.0)}}, tmp_path / "r.png")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_results_vs_pairs({}, tmp_path / "r.png")
