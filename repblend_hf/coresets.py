"""Coreset baselines: select N real image-text pairs from a training split.

METHOD.md, "Baselines": random, herding and k-center select N real pairs, which are then evaluated
like a distilled set with S = I (``PairSet(*selection.pairs(split))`` in :mod:`repblend_hf.evaluation`).
A pair is (image index, caption index) with N distinct images.

Herding and k-center work on one vector per image: the L2-normalised image feature concatenated with
the L2-normalised mean of its caption features, so both modalities weigh equally whatever their
widths and scales. They are deterministic and take each chosen image's first caption; random takes
one random caption per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .features import FeatureSplit

__all__ = ["CoresetSelection", "CORESET_METHODS", "select_coreset", "pair_representations"]


@dataclass
class CoresetSelection:
    """The selected pairs: ``image_indices[k]`` and ``caption_indices[k]`` (rows of the split) form pair k."""

    method: str
    image_indices: torch.Tensor
    caption_indices: torch.Tensor

    def __len__(self) -> int:
        return self.image_indices.numel()

    def pairs(self, split: FeatureSplit) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_features [N, d_img], text_features [N, d_txt])`` of the selected pairs in ``split``."""
        return split.image_features[self.image_indices], split.caption_features[self.caption_indices]


def _captions_by_image(split: FeatureSplit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, offsets, counts)``: the captions of image i are ``order[offsets[i] : offsets[i] + counts[i]]``,
    in increasing caption index (captions need not be contiguous)."""
    caption_to_image = split.caption_to_image.cpu()
    counts = torch.bincount(caption_to_image, minlength=split.num_images)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).reshape(-1)
        raise ValueError(f"{missing.numel()} image(s) have no caption (first: image {int(missing[0])}); "
                         "a coreset pair needs one")
    order = torch.argsort(caption_to_image, stable=True)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    return order, offsets, counts


def pair_representations(split: FeatureSplit) -> torch.Tensor:
    """One vector per image: ``[normalise(image feature), normalise(mean caption feature)]`` (float32)."""
    _captions_by_image(split)  # every image has a caption
    image = F.normalize(split.image_features.detach().cpu().float(), dim=-1)
    caption_sum = torch.zeros(split.num_images, split.caption_features.shape[-1], dtype=torch.float32)
    caption_sum.index_add_(0, split.caption_to_image.cpu(), split.caption_features.detach().cpu().float())
    # The mean's norm is irrelevant after normalising, so the sum is normalised directly.
    return torch.cat([image, F.normalize(caption_sum, dim=-1)], dim=-1)


def _first_captions(split: FeatureSplit, images: torch.Tensor) -> torch.Tensor:
    order, offsets, _ = _captions_by_image(split)
    return order[offsets[images]]


def _random(split: FeatureSplit, num_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N distinct images uniformly at random, one random caption of each (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    order, offsets, counts = _captions_by_image(split)
    images = torch.randperm(split.num_images, generator=generator)[:num_pairs]
    pick = torch.randint(0, 1 << 62, (num_pairs,), generator=generator) % counts[images]
    return images, order[offsets[images] + pick]


def _herding(split: FeatureSplit, num_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy mean matching (herding, Welling 2009), without replacement; ``seed`` is unused.

    The form used by the dataset-distillation coreset baselines (iCaRL, DC-bench): step k adds the
    point that brings the mean of the selection closest to the mean μ of all points,
    ``argmin_x ‖(k+1)μ − s_k − x‖²`` with ``s_k`` the sum of the points chosen so far. Expanded,
    that is ``argmin_x ‖x‖² − 2⟨(k+1)μ − s_k, x⟩``: one matrix-vector product per step.
    """
    x = pair_representations(split)
    mean = x.mean(0)
    sq_norm = x.pow(2).sum(1)
    # ⟨(k+1)μ − s_k, x⟩ = (k+1)⟨μ, x⟩ − Σ_j ⟨x_j, x⟩, kept up to date with one product per step.
    dot_mean = x @ mean
    dot_chosen = torch.zeros_like(dot_mean)
    chosen = torch.zeros(split.num_images, dtype=torch.bool)
    selected = []
    for k in range(num_pairs):
        cost = sq_norm - 2 * ((k + 1) * dot_mean - dot_chosen)
        cost[chosen] = float("inf")
        i = int(torch.argmin(cost))
        selected.append(i)
        chosen[i] = True
        dot_chosen += x @ x[i]
    images = torch.tensor(selected, dtype=torch.long)
    return images, _first_captions(split, images)


def _kcenter(split: FeatureSplit, num_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-center (farthest-point traversal, Sener & Savarese 2018); ``seed`` is unused.

    Starts from the point closest to the mean (deterministic, unlike a random start), then
    repeatedly adds the point whose distance to its nearest selected point is largest.
    """
    x = pair_representations(split)
    sq_norm = x.pow(2).sum(1)
    first = int(torch.argmin((x - x.mean(0)).pow(2).sum(1)))
    min_dist = torch.full((split.num_images,), float("inf"))
    chosen = torch.zeros(split.num_images, dtype=torch.bool)
    selected = [first]
    for k in range(num_pairs):
        i = selected[-1]
        chosen[i] = True
        min_dist = torch.minimum(min_dist, (sq_norm + sq_norm[i] - 2 * (x @ x[i])).clamp_min(0))
        if k + 1 < num_pairs:
            candidate = min_dist.masked_fill(chosen, -1.0)  # never re-pick, even exact duplicates
            selected.append(int(torch.argmax(candidate)))
    images = torch.tensor(selected, dtype=torch.long)
    return images, _first_captions(split, images)


# name → selector(split, num_pairs, seed) -> (image_indices, caption_indices)
CORESET_METHODS: dict[str, Callable[[FeatureSplit, int, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "random": _random,
    "herding": _herding,
    "kcenter": _kcenter,
}


def select_coreset(method: str, split: FeatureSplit, num_pairs: int, seed: int = 0) -> CoresetSelection:
    """Select ``num_pairs`` real pairs (distinct images) from ``split`` with a coreset method.

    METHOD.md, "Baselines" (the coreset rows of the RepBlend / LoRS tables). ``method`` is one of
    :data:`CORESET_METHODS`: ``"random"`` (seeded), ``"herding"`` and ``"kcenter"`` (deterministic;
    ``seed`` is ignored). Use the result with ``PairSet(*selection.pairs(split))``.

    Indices are CPU long tensors; herding and k-center run on the CPU (one matrix-vector product per
    selected pair over all images).
    """
    if method not in CORESET_METHODS:
        valid = ", ".join(repr(name) for name in CORESET_METHODS)
        raise ValueError(f"unknown coreset method {method!r}; valid methods: {valid}")
    if not 1 <= num_pairs <= split.num_images:
        raise ValueError(f"num_pairs must be between 1 and the number of images ({split.num_images}), "
                         f"got {num_pairs}")
    images, captions = CORESET_METHODS[method](split, num_pairs, seed)
    return CoresetSelection(method=method, image_indices=images, caption_indices=captions)
