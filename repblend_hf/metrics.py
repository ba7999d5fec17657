"""Retrieval metrics and modality diagnostics: pure functions of scores and embeddings, and their names.

METHOD.md, "Evaluation protocol" and "Diagnostics of modality collapse". Nothing of the package is imported
here, so the artefact layer (:mod:`repblend_hf.hub`) can name the metrics without depending on the protocol
(:mod:`repblend_hf.evaluation`) that trains heads to produce them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["RECALL_KS", "METRIC_NAMES", "DIAGNOSTIC_NAMES", "retrieval_metrics", "modality_diagnostics"]

#: The ranks at which recall is reported.
RECALL_KS = (1, 5, 10)
#: Every retrieval metric, in the order of the tables: IR@K (text → image), TR@K (image → text), their mean.
METRIC_NAMES = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")
#: The modality diagnostics of :func:`modality_diagnostics` (RepBlend §3).
DIAGNOSTIC_NAMES = ("sim_image", "sim_text", "gap")


def retrieval_metrics(
    scores: np.ndarray | torch.Tensor,
    caption_to_image: np.ndarray | torch.Tensor | Sequence[int],
    *,
    chunk_elements: int = 1 << 24,
) -> dict[str, float]:
    """Recall@K for image→text (TR) and text→image (IR) retrieval, in percent.

    METHOD.md, "Evaluation protocol" (the BLIP ``itm_eval`` used by MTT-VL, LoRS and RepBlend):

    - ``TR@K``: an image counts if *any* of its captions is among its K highest-scoring captions.
    - ``IR@K``: a caption counts if its one image is among its K highest-scoring images.
    - ``r_mean``: the mean of the six recalls.

    ``scores[i, c]`` is the similarity of image ``i`` and caption ``c`` (numpy or torch, any float
    dtype; it is not copied). ``caption_to_image[c]`` is the image of caption ``c``; images may have
    different numbers of captions and captions need not be contiguous, but every image needs at
    least one caption. The rank of a positive is the number of *negatives* (captions of other
    images for TR, other images for IR) whose score is *greater than or equal to* the positive's
    (for TR: the image's best-scoring caption's), so **ties count against the positive**: a
    collapsed model whose scores are all equal ranks every positive last and scores at chance or
    below, never 100. The argsort of the released code resolves ties by sort order instead, which
    only matters for exactly equal float scores (it agrees everywhere else). Scores are compared in
    row chunks of about ``chunk_elements`` entries, so a 5,000 × 25,000 matrix needs only small
    temporaries. NaN and infinite scores raise: they have no rank.
    """
    scores = torch.as_tensor(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D num_images × num_captions array, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        scores = scores.double()
    num_images, num_captions = scores.shape
    caption_to_image = torch.as_tensor(caption_to_image, device=scores.device).long().reshape(-1)
    if caption_to_image.numel() != num_captions:
        raise ValueError(f"caption_to_image has {caption_to_image.numel()} entries but scores has {num_captions} "
                         "caption columns; scores must be num_images × num_captions (rows are images)")
    if num_captions == 0:
        raise ValueError("scores has no caption columns")
    if int(caption_to_image.min()) < 0 or int(caption_to_image.max()) >= num_images:
        raise ValueError(f"caption_to_image must index images 0..{num_images - 1}, got values in "
                         f"[{int(caption_to_image.min())}, {int(caption_to_image.max())}]")
    counts = torch.bincount(caption_to_image, minlength=num_images)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).reshape(-1)
        raise ValueError(f"{missing.numel()} image(s) have no caption (first: image {int(missing[0])}); "
                         "TR@K needs at least one caption per image, drop those images from the scores")

    # The positive score of each caption, and each image's best positive, read from `scores` itself
    # so that the comparisons below are exact.
    positive = scores[caption_to_image, torch.arange(num_captions, device=scores.device)]
    best_positive = torch.full((num_images,), float("-inf"), dtype=scores.dtype, device=scores.device)
    best_positive = best_positive.scatter_reduce(0, caption_to_image, positive, reduce="amax", include_self=False)

    ir_rank = torch.zeros(num_captions, dtype=torch.long, device=scores.device)
    tr_rank = torch.zeros(num_images, dtype=torch.long, device=scores.device)
    rows = max(1, chunk_elements // num_captions)
    for start in range(0, num_images, rows):
        block = scores[start : start + rows]
        if not bool(torch.isfinite(block).all()):
            raise ValueError("scores contain NaN or inf; the heads diverged (check the learning rates) or the "
                             "embeddings are degenerate")
        image = torch.arange(start, start + block.shape[0], device=scores.device)
        negative = caption_to_image[None, :] != image[:, None]  # (image, caption) pairs that do not belong together
        ir_rank += ((block >= positive) & negative).sum(0)
        tr_rank[start : start + rows] = ((block >= best_positive[start : start + rows, None]) & negative).sum(1)

    metrics = {}
    for k in RECALL_KS:
        metrics[f"IR@{k}"] = 100.0 * float((ir_rank < k).double().mean())
    for k in RECALL_KS:
        metrics[f"TR@{k}"] = 100.0 * float((tr_rank < k).double().mean())
    metrics["r_mean"] = float(np.mean([metrics[name] for name in METRIC_NAMES[:-1]]))
    return metrics


def modality_diagnostics(
    image_embeds: np.ndarray | torch.Tensor, text_embeds: np.ndarray | torch.Tensor
) -> dict[str, float]:
    """Intra-modal similarity of each modality and the modality gap, on L2-normalised embeddings.

    METHOD.md, "Diagnostics of modality collapse" (RepBlend §3): ``sim_image`` / ``sim_text`` are the
    mean pairwise cosine similarity over pairs ``i ≠ j`` of one modality; ``gap`` is
    ``‖mean(x̂) − mean(ŷ)‖₂`` where ``x̂``, ``ŷ`` are the image / text embeddings *after* L2
    normalisation (as in the modality-gap literature, Liang et al. 2022), so it lies in [0, 2].
    Computed in float64 in O(n·d): ``Σ_{i≠j} x̂_i·x̂_j = ‖Σ_i x̂_i‖² − Σ_i ‖x̂_i‖²``.
    """
    out: dict[str, float] = {}
    means = []
    for name, embeds in (("image", image_embeds), ("text", text_embeds)):
        x = torch.as_tensor(embeds).double()
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"{name} embeddings must be 2-D with at least 2 rows, got shape {tuple(x.shape)}")
        x = F.normalize(x, dim=-1)
        n = x.shape[0]
        total = x.sum(0)
        off_diagonal = total.dot(total) - x.pow(2).sum()
        out[f"sim_{name}"] = float(off_diagonal / (n * (n - 1)))
        means.append(total / n)
    if means[0].shape != means[1].shape:
        raise ValueError(f"image and text embeddings must have the same width, got {means[0].numel()} "
                         f"and {means[1].numel()}")
    out["gap"] = float(torch.linalg.vector_norm(means[0] - means[1]))
    return out
