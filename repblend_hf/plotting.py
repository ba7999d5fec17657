"""Figures of a distillation run: the synthetic pairs, the learned similarity, training curves, results.

Each function takes plain tensors / lists / dicts, writes one PNG and returns its path; nothing here
reads a run folder or a trainer. Figures are built as ``matplotlib.figure.Figure`` objects drawn by the
Agg canvas, never through ``pyplot``: that is headless-safe like ``matplotlib.use("Agg")``, but it
does not switch the backend of the importing process (a notebook keeps its inline backend), and a
figure is never registered in pyplot's global list, so none can leak open when a save fails
(matplotlib's "embedding in a web application server" recipe).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

__all__ = [
    "denormalize",
    "plot_synthetic_grid",
    "plot_similarity",
    "plot_training_curves",
    "plot_results_vs_pairs",
]

DPI = 100  # pixels per inch of every PNG written here
CAPTION_CHARS = 40  # a caption under a grid cell is cut to this many characters
_CELL_INCHES = 1.2  # side of one synthetic image in the grid
_CAPTION_INCHES = 0.3  # room for two short caption lines under a cell


def _save(fig: Figure, path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly (no pyplot, no global backend)
    fig.savefig(path, dpi=DPI, format="png", **kwargs)
    return path


def denormalize(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the encoder's input normalisation: ``x * std + mean`` clamped to [0, 1], as uint8 ``N×H×W×C``.

    ``pixel_values`` is ``N×C×H×W`` (or one ``C×H×W`` image) in normalised units, as the synthetic
    images are stored; ``mean`` / ``std`` are the per-channel values of the image encoder's transform.
    Values are rounded to the nearest of 0..255 (0.5 → 128).
    """
    x = torch.as_tensor(pixel_values).detach().to("cpu", torch.float32)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"pixel_values must be N×C×H×W (or C×H×W), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x * std_t + mean_t).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _short_caption(caption: str, chars: int = CAPTION_CHARS, width: int = 22) -> str:
    caption = " ".join(str(caption).split())
    if len(caption) > chars:
        caption = caption[: chars - 1].rstrip() + "…"
    return textwrap.fill(caption, width=width, max_lines=2, placeholder="…")


def plot_synthetic_grid(
    pixel_values: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    path: str | Path,
    captions: Sequence[str] | None = None,
    max_images: int = 100,
    ncols: int = 10,
    title: str | None = None,
) -> Path:
    """Grid of the first ``max_images`` synthetic images, de-normalised, optionally captioned and titled.

    ``pixel_values`` is ``N×C×H×W`` in the encoder's normalised units (see :func:`denormalize`);
    ``captions``, if given, has one string per image (e.g. the nearest real caption of each synthetic
    text embedding) and is shown under each cell, cut to ``CAPTION_CHARS`` characters.
    """
    if max_images < 1 or ncols < 1:
        raise ValueError(f"max_images and ncols must be >= 1, got {max_images} and {ncols}")
    images = denormalize(pixel_values, mean, std)
    if len(images) == 0:
        raise ValueError("pixel_values holds no images")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"captions has {len(captions)} entries for {len(images)} images; pass one per image")
    images = images[:max_images]
    n = len(images)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    caption_h = _CAPTION_INCHES if captions is not None else 0.0
    title_h = 0.3 if title else 0.0
    width, height = ncols * _CELL_INCHES, nrows * (_CELL_INCHES + caption_h) + title_h

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.05 / height, va="top")
    # Cells fill the figure; each row keeps `caption_h` below its image for the caption.
    fig.subplots_adjust(left=0, right=1, top=1 - title_h / height, bottom=caption_h / height, wspace=0.04,
                        hspace=caption_h / _CELL_INCHES + 0.04 * bool(nrows > 1))
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        image = images[i]
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image, interpolation="nearest")
        if captions is not None:
            ax.text(0.5, -0.02, _short_caption(captions[i]), transform=ax.transAxes, ha="center", va="top",
                    fontsize=5.5, linespacing=1.1)
    return _save(fig, path)


def plot_similarity(
    similarity: torch.Tensor,
    path: str | Path,
    title: str = "Learned soft similarity S",
) -> Path:
    """Heatmap of the learned soft similarity ``S`` (N×N), coloured diverging around 0.5.

    LoRS / RepBlend (METHOD.md, "Losses"): in the weighted BCE a pair ``(i, j)`` is a positive when
    ``S_ij > 0.5`` and a negative otherwise, so 0.5 is the centre of the colour map (red: positive,
    blue: negative). ``S = I`` at initialisation; the subtitle counts the off-diagonal positives the
    distillation has learned.
    """
    s = torch.as_tensor(similarity).detach().to("cpu", torch.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"similarity must be a square N×N matrix, got shape {tuple(s.shape)}")
    values = s.numpy()
    finite = values[np.isfinite(values)]
    low = min(float(finite.min()) if finite.size else 0.0, 0.0)
    high = max(float(finite.max()) if finite.size else 1.0, 1.0)
    n = s.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    positives_off = int((s[off_diagonal] > 0.5).sum())
    negatives_diag = int((torch.diagonal(s) <= 0.5).sum())

    fig = Figure(figsize=(6.0, 5.2))
    ax = fig.subplots()
    mesh = ax.imshow(values, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=0.5, vmin=low, vmax=high),
                     interpolation="nearest")
    fig.colorbar(mesh, ax=ax, label="$S_{ij}$ (centre 0.5)")
    ax.set_xlabel("text j")
    ax.set_ylabel("image i")
    fig.suptitle(title, fontsize=12)
    ax.set_title(f"$S_{{ij}} > 0.5$ counts as a positive in wBCE (red), $\\leq 0.5$ as a negative (blue)\n"
                 f"N = {n}; off-diagonal positives: {positives_off}; diagonal negatives: {negatives_diag}",
                 fontsize=8)
    return _save(fig, path, bbox_inches="tight")


def _series(log_history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the log entries that have both ``step`` and ``key``."""
    steps, values = [], []
    for entry in log_history:
        if key in entry and "step" in entry and entry[key] is not None:
            steps.append(float(entry["step"]))
            values.append(float(entry[key]))
    return steps, values


def _not_logged(ax: Axes, title: str, keys: Sequence[str]) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "not logged\n(" + ", ".join(keys) + ")", transform=ax.transAxes, ha="center",
            va="center", color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_keys(ax: Axes, log_history, keys: Sequence[str], labels: Sequence[str], **kwargs) -> list:
    lines = []
    for key, label in zip(keys, labels):
        steps, values = _series(log_history, key)
        if steps:
            lines += ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label, **kwargs)
    return lines


def plot_training_curves(log_history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Distillation curves from a Trainer's ``state.log_history``: matching loss, validation, collapse.

    Panels: the trajectory matching loss (``matching_loss``); the validation ``eval_r_mean`` of
    fresh heads trained on the current set; the modality-collapse diagnostics (RepBlend §3) of the
    synthetic pairs themselves under the fixed reference model, ``eval_set_sim_image`` /
    ``eval_set_sim_text`` with ``eval_set_gap`` on a second axis, dotted beside those of a random real
    subset of the same size (``eval_real_subset_*``); and, when logged, the learned inner learning rates
    ``lr_img`` / ``lr_txt`` on a log scale. A panel whose keys never appear says "not logged" instead of
    failing.
    """
    has_lrs = any(_series(log_history, key)[0] for key in ("lr_img", "lr_txt"))
    npanels = 4 if has_lrs else 3
    fig = Figure(figsize=(4.2 * npanels, 3.4))
    axes = fig.subplots(1, npanels, squeeze=False)[0]

    ax = axes[0]
    if _plot_keys(ax, log_history, ["matching_loss"], ["matching loss"]):
        ax.set_title("Trajectory matching loss")
        ax.set_ylabel("matching loss")
    else:
        _not_logged(ax, "Trajectory matching loss", ["matching_loss"])

    ax = axes[1]
    if _plot_keys(ax, log_history, ["eval_r_mean"], ["validation r_mean"], color="C2"):
        ax.set_title("Validation retrieval")
        ax.set_ylabel("r_mean (%)")
    else:
        _not_logged(ax, "Validation retrieval", ["eval_r_mean"])

    ax = axes[2]
    # The synthetic pairs' own Sim / Gap under the fixed reference model, beside a random real subset.
    set_keys = ["eval_set_sim_image", "eval_set_sim_text", "eval_real_subset_sim_image", "eval_real_subset_sim_text"]
    labels = ["Sim_img (set)", "Sim_txt (set)", "Sim_img (random real)", "Sim_txt (random real)"]
    sims = []
    for i, (key, label) in enumerate(zip(set_keys, labels)):
        sims += _plot_keys(ax, log_history, [key], [label], color=f"C{i % 2}", linestyle=":" if i >= 2 else "-")
    has_gap = _series(log_history, "eval_set_gap")[0]
    twin = ax.twinx() if has_gap else None
    gap = []
    if twin is not None:
        gap = _plot_keys(twin, log_history, ["eval_set_gap"], ["Gap (set)"], color="C3", linestyle="--")
        gap += _plot_keys(twin, log_history, ["eval_real_subset_gap"], ["Gap (random real)"], color="C3",
                          linestyle=":")
    if sims or gap:
        ax.set_title("Modality collapse on the set (reference model)")
        ax.set_ylabel("intra-modal cosine similarity")
        if twin is not None:
            twin.set_ylabel("modality gap")
        ax.legend(sims + gap, [line.get_label() for line in sims + gap], fontsize=7, loc="best")
    else:
        _not_logged(ax, "Modality collapse on the set", set_keys[:2] + ["eval_set_gap"])

    if has_lrs:
        ax = axes[3]
        lines = _plot_keys(ax, log_history, ["lr_img", "lr_txt"], ["η_img", "η_txt"])
        if all(v > 0 for key in ("lr_img", "lr_txt") for v in _series(log_history, key)[1]):
            ax.set_yscale("log")
        ax.set_title("Learned inner learning rates")
        ax.set_ylabel("η")
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8)

    for ax in axes:
        if ax.has_data():
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_results_vs_pairs(
    results: Mapping[str, Mapping[int, tuple[float, float]]],
    path: str | Path,
    full_data: tuple[float, float] | None = None,
) -> Path:
    """Test ``r_mean`` (mean ± std over seeds) against the number of synthetic pairs, one line per method.

    ``results`` maps a method name to ``{num_pairs: (mean, std)}`` (keys may be strings, as after a
    JSON round trip); ``full_data``, if given, is the ``(mean, std)`` of heads trained on the whole real
    training set, drawn as a horizontal line with a ± std band (the paper's upper bound).
    """
    if not results and full_data is None:
        raise ValueError("results is empty and full_data is None; nothing to plot")
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.subplots()
    all_pairs: set[int] = set()
    for i, (method, by_pairs) in enumerate(results.items()):
        rows = []
        for pairs, value in by_pairs.items():
            if len(value) != 2:
                raise ValueError(f"results[{method!r}][{pairs!r}] must be (mean, std), got {value!r}")
            rows.append((int(pairs), float(value[0]), float(value[1])))
        if not rows:
            continue
        rows.sort()
        x, y, err = zip(*rows)
        all_pairs.update(x)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method, color=f"C{i % 10}")
    if full_data is not None:
        mean, std = float(full_data[0]), float(full_data[1])
        ax.axhline(mean, color="k", linestyle="--", linewidth=1, label=f"full data ({mean:.1f})")
        if std > 0:
            ax.axhspan(mean - std, mean + std, color="k", alpha=0.08, linewidth=0)
    if all_pairs:
        ax.set_xticks(sorted(all_pairs))
    ax.set_xlabel("number of synthetic pairs")
    ax.set_ylabel("test r_mean (%)")
    ax.set_title("Retrieval vs. budget (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
