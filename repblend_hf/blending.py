"""Representation blending, RepBlend's first component, as pure functions.

METHOD.md, "Representation blending" (RepBlend, arXiv 2505.14705, Sec. 4.1): inside the
distillation inner loop only, each step draws one ``λ ~ Beta(β, β)`` and one permutation ``π`` of
the mini-batch, and mixes the image-encoder features ``u`` and the text embeddings ``v`` of the
synthetic pairs *before* the projection heads::

    ũ = λ u + (1 − λ) u_π        ṽ = λ v + (1 − λ) v_π

with the same ``λ`` and ``π`` for both modalities, so a blended image stays paired with the blended
caption made of the same two pairs. The soft targets ``S_I`` are *not* blended: the blended pair
keeps the original pair's row of the similarity matrix (the released code does the same).

Drawing (:func:`sample_blend`) and mixing (:func:`blend_representations`) are separate so that a
recomputation of inner step ``k`` (TESLA-style meta-gradient) can reuse that step's
:class:`BlendParams` instead of drawing new ones. Nothing here imports the rest of the package
(see DESIGN.md, "Layout").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["BlendParams", "sample_blend", "blend_representations"]


@dataclass(frozen=True, eq=False)
class BlendParams:
    """The mixing coefficient and permutation of one inner step, shared by both modalities.

    METHOD.md, "Representation blending": ``lam`` is ``λ ~ Beta(β, β)`` (1.0 means no blending) and
    ``perm`` is the permutation ``π`` of the mini-batch rows (a 1-D ``torch.long`` tensor). Keep the
    object to recompute a step with exactly the same blend.
    """

    lam: float
    perm: torch.Tensor

    @property
    def batch_size(self) -> int:
        """Number of rows the permutation applies to."""
        return int(self.perm.numel())

    @property
    def is_identity(self) -> bool:
        """Whether blending with these parameters returns its inputs unchanged (``λ = 1``)."""
        return self.lam == 1.0


def sample_blend(
    batch_size: int,
    beta: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> BlendParams:
    """Draw one step's blending parameters: ``λ ~ Beta(β, β)`` and a random permutation ``π``.

    METHOD.md, "Representation blending" (RepBlend Sec. 4.1; β = 1, i.e. uniform λ, in all
    released runs). ``beta = 0`` turns blending off: ``λ = 1`` and ``π`` is the identity, so
    :func:`blend_representations` is an exact no-op and the caller keeps a single code path; the
    generator is then not consumed. Randomness comes only from ``generator`` (torch's default
    generator when ``None``), so restoring its state reproduces the draw. ``λ`` and ``π`` are
    drawn on the generator's device; ``perm`` is then moved to ``device`` (default: CPU).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}; "
                         "set mini_batch_size to at least 1")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(f"blend_beta must be a finite number, got {beta!r}; use 0 to disable blending "
                         "or 1 (the paper's value) for a uniform λ")
    if beta < 0:
        raise ValueError(f"blend_beta must be >= 0, got {beta}; use 0 to disable blending "
                         "or 1 (the paper's value) for a uniform λ")
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    if beta == 0:
        return BlendParams(lam=1.0, perm=torch.arange(batch_size, device=target_device))
    draw_device = generator.device if generator is not None else torch.device("cpu")
    # Beta(β, β) = X / (X + Y) with X, Y ~ Gamma(β, 1). torch.distributions.Beta.sample takes no
    # generator, so the two gammas are drawn directly with the one that does.
    gammas = torch._standard_gamma(torch.full((2,), float(beta), dtype=torch.float64, device=draw_device),
                                   generator=generator)
    total = gammas.sum()
    # For tiny β both gammas can underflow to 0; the limit of Beta(β, β) as β → 0 is {0, 1} w.p. ½.
    lam = float(gammas[0] / total) if total > 0 else float(gammas[0] >= gammas[1])
    perm = torch.randperm(batch_size, generator=generator, device=draw_device).to(target_device)
    return BlendParams(lam=lam, perm=perm)


def blend_representations(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    params: BlendParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend paired image features and text embeddings with one shared ``λ`` and ``π``.

    METHOD.md, "Representation blending" (RepBlend Sec. 4.1): returns
    ``(λ u + (1 − λ) u_π, λ v + (1 − λ) v_π)`` for ``u = image_features`` and ``v = text_features``
    (row ``i`` of both inputs is pair ``i``; any trailing shape). Differentiable with respect to
    both inputs. The soft targets ``S_I`` are not blended: use the un-permuted block as before.
    """
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image_features has {image_features.shape[0]} rows but text_features has "
                         f"{text_features.shape[0]}; blending needs the same mini-batch of pairs in both")
    if params.perm.ndim != 1 or params.perm.numel() != image_features.shape[0]:
        raise ValueError(f"BlendParams permutes {params.perm.numel()} rows but the mini-batch has "
                         f"{image_features.shape[0]}; call sample_blend with batch_size equal to the mini-batch size")
    if not 0.0 <= params.lam <= 1.0:
        raise ValueError(f"BlendParams.lam must lie in [0, 1], got {params.lam}; draw it with sample_blend")
    lam = params.lam
    image_perm = params.perm.to(image_features.device)
    text_perm = params.perm.to(text_features.device)
    blended_image = lam * image_features + (1.0 - lam) * image_features[image_perm]
    blended_text = lam * text_features + (1.0 - lam) * text_features[text_perm]
    return blended_image, blended_text
