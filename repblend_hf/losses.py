"""Losses of RepBlend and its baselines, as pure functions of logits and targets.

Nothing here imports the rest of the package (see DESIGN.md, "Layout").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["info_nce", "weighted_bce", "trajectory_matching_loss"]


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a B×B image-text logit matrix with the diagonal as targets.

    METHOD.md, "Losses": cross-entropy over rows (image→text) and over columns (text→image),
    averaged. Used by the expert trajectories and the MTT-VL baseline.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"info_nce expects a square B×B logit matrix, got shape {tuple(logits.shape)}")
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Weighted binary cross-entropy against a soft similarity matrix (LoRS / RepBlend).

    METHOD.md, "Losses": ``p = sigmoid(logits)``,
    ``l_ij = -S_ij log(p_ij + eps) - (1 - S_ij) log(1 - p_ij + eps)``; positives P = {S_ij > 0.5}
    (the mask is not differentiated), negatives N = the rest;
    ``L = ½ (mean over P of l + mean over N of l)``. An empty P or N contributes 0.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape")
    p = torch.sigmoid(logits)
    loss = -targets * torch.log(p + eps) - (1 - targets) * torch.log(1 - p + eps)
    positive = (targets > 0.5).detach()
    negative = ~positive
    pos_term = loss[positive].mean() if positive.any() else loss.new_zeros(())
    neg_term = loss[negative].mean() if negative.any() else loss.new_zeros(())
    return 0.5 * (pos_term + neg_term)


def trajectory_matching_loss(
    student: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    branch_normalization: str = "separate",
) -> torch.Tensor:
    """Normalised parameter-matching loss between a student and an expert (MTT, RepBlend Eq. 6).

    Each dict maps a branch name (``"image"``, ``"text"``) to a flat parameter vector: ``student`` is
    θᴺ after the inner loop, ``start`` is θ⁰ (the expert at ``start_epoch``) and ``target`` is θ*
    (the expert ``expert_epochs`` later). With ``"separate"`` (Flickr settings) the loss is
    ``Σ_b ‖θᴺ_b − θ*_b‖² / ‖θ⁰_b − θ*_b‖²``; with ``"joint"`` (COCO settings) it is
    ``Σ_b ‖θᴺ_b − θ*_b‖² / Σ_b ‖θ⁰_b − θ*_b‖²``.
    """
    if branch_normalization not in ("separate", "joint"):
        raise ValueError(f"branch_normalization must be 'separate' or 'joint', got {branch_normalization!r}")
    if set(student) != set(target) or set(start) != set(target):
        raise ValueError(f"student, start and target must name the same branches, got {sorted(student)}, "
                         f"{sorted(start)} and {sorted(target)}")
    num = {b: (student[b] - target[b]).pow(2).sum() for b in target}
    den = {b: (start[b] - target[b]).pow(2).sum() for b in target}
    if branch_normalization == "joint":
        return sum(num.values()) / sum(den.values()).clamp_min(1e-12)
    return sum(num[b] / den[b].clamp_min(1e-12) for b in target)
