"""Projection heads on top of frozen encoders, and a functional forward over flat parameters.

METHOD.md, "Model": both branches use the same block,
``p = Linear(d_in, d)(x); h = LayerNorm(p + Dropout(0.1)(Linear(d, d)(GELU(p))))``, and scores are
the cosine similarity of the L2-normalised outputs divided by a fixed temperature τ.
The distillation inner loop trains the heads as flat parameter vectors (so a trajectory snapshot is
one tensor per branch); :func:`head_forward` runs a head from such a vector with
``torch.func.functional_call``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

__all__ = [
    "ProjectionHead",
    "RetrievalHeads",
    "flatten_parameters",
    "unflatten_parameters",
    "head_forward",
    "head_apply",
    "split_parameters",
    "branch_sizes",
    "branch_tensor_sizes",
    "similarity_logits",
]


class ProjectionHead(nn.Module):
    """One projection head: ``LayerNorm(p + Dropout(Linear(GELU(p))))`` with ``p = Linear(x)``."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.projection(x)
        return self.layer_norm(p + self.dropout(self.fc(F.gelu(p))))


class RetrievalHeads(nn.Module):
    """The two trainable heads of the retrieval model (image: d_img → d, text: d_txt → d).

    ``image_head=False`` is the student of the asymmetric methods as their authors build it (LoRS / MTT-VL:
    ``use_image_project = False`` in ``CLIPModel_full.forward``): the image embedding is the image encoder's
    pooled feature itself (``image_head`` is an ``nn.Identity`` without parameters), so the text head must
    output that width, ``embed_dim == image_dim``.
    """

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, dropout: float = 0.1, image_head: bool = True):
        super().__init__()
        if not image_head and embed_dim != image_dim:
            raise ValueError(f"without an image head the image embedding is the image encoder's {image_dim}-d "
                             f"feature, so the text head must output {image_dim} values too: set embed_dim="
                             f"{image_dim} (got {embed_dim}), or keep an image head (asymmetric_image_head=True)")
        self.image_head = ProjectionHead(image_dim, embed_dim, dropout) if image_head else nn.Identity()
        self.text_head = ProjectionHead(text_dim, embed_dim, dropout)

    @property
    def has_image_head(self) -> bool:
        """Whether the image embedding goes through a trained head (False: it is the encoder's feature)."""
        return isinstance(self.image_head, ProjectionHead)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_head(image_features), self.text_head(text_features)

    def branches(self) -> dict[str, ProjectionHead]:
        """The heads by branch name, as used by trajectories and matching (``"image"``, ``"text"``)."""
        return {"image": self.image_head, "text": self.text_head}


def flatten_parameters(module: nn.Module) -> torch.Tensor:
    """All parameters of ``module`` concatenated into one flat vector, in ``named_parameters`` order.

    A module without parameters (the ``nn.Identity`` image head of an asymmetric student) gives an empty vector.
    """
    params = [p.detach().reshape(-1) for p in module.parameters()]
    return torch.cat(params) if params else torch.zeros(0)


def unflatten_parameters(module: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a flat vector into ``{name: tensor}`` views shaped like ``module``'s parameters."""
    out, offset = {}, 0
    for name, p in module.named_parameters():
        n = p.numel()
        out[name] = flat[offset : offset + n].view_as(p)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat parameter vector has {flat.numel()} values but the head has {offset}; "
                         "were the trajectories made with another head dimension or encoder?")
    return out


def branch_sizes(heads: RetrievalHeads, image_encoder: nn.Module | None = None) -> dict[str, int]:
    """Parameters per matched branch: the heads, with the image encoder leading ``image`` when it is trained.

    For the asymmetric student as the released code builds it (``heads`` without an image head) the ``image``
    branch is the image encoder's parameters alone.
    """
    sizes = {b: sum(p.numel() for p in h.parameters()) for b, h in heads.branches().items()}
    if image_encoder is not None:
        sizes["image"] += sum(p.numel() for p in image_encoder.parameters())
    return sizes


def branch_tensor_sizes(heads: RetrievalHeads, image_encoder: nn.Module | None = None) -> dict[str, list[int]]:
    """The sizes of each matched branch's parameter tensors in the order of its flat vector (:func:`branch_sizes`
    split per tensor): what per-layer trajectory operations such as PTM-ST's shortcut targets need."""
    sizes = {b: [p.numel() for p in h.parameters()] for b, h in heads.branches().items()}
    if image_encoder is not None:
        sizes["image"] = [p.numel() for p in image_encoder.parameters()] + sizes["image"]
    return sizes


def head_forward(module: nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Run ``module`` with its parameters taken from the flat vector ``flat`` (differentiable in both)."""
    return functional_call(module, unflatten_parameters(module, flat), (x,))


def split_parameters(module: nn.Module, flat: torch.Tensor) -> list[torch.Tensor]:
    """``flat`` as one view per parameter of ``module`` (``named_parameters`` order), shaped like them.

    The distillation inner loop keeps its student as these per-tensor leaves: slicing one flat leaf
    per step would give every slice's backward a full-size zero-filled gradient (issue #14's profile).
    """
    return list(unflatten_parameters(module, flat).values())


def head_apply(module: nn.Module, params: list[torch.Tensor], x: torch.Tensor,
               dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run a head with explicit parameters (``split_parameters`` order) and an optional fixed dropout mask.

    For :class:`ProjectionHead` this is the block written out with ``torch.nn.functional`` (the mask,
    already scaled by ``1 / (1 - p)``, multiplies the dropout's input, as ``nn.Dropout`` in train mode
    would), so that a recomputed inner step reuses the same mask. Other modules go through
    ``functional_call`` in their current mode (``dropout_mask`` must then be None).
    """
    if isinstance(module, ProjectionHead):
        w1, b1, w2, b2, ln_w, ln_b = params
        p = F.linear(x, w1, b1)
        h = F.linear(F.gelu(p), w2, b2)
        if dropout_mask is not None:
            h = h * dropout_mask
        return F.layer_norm(p + h, (p.shape[-1],), ln_w, ln_b, module.layer_norm.eps)
    if dropout_mask is not None:
        raise ValueError(f"a fixed dropout mask needs a ProjectionHead, got {type(module).__name__}")
    names = [n for n, _ in module.named_parameters()]
    return functional_call(module, dict(zip(names, params)), (x,))


def similarity_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine similarity of L2-normalised embeddings divided by ``temperature`` (rows: images)."""
    return F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t() / temperature
