"""Learned soft similarity between synthetic images and texts (LoRS), as small modules.

METHOD.md, "Learned soft similarity" (LoRS, Xu et al. 2024; reused by RepBlend): the target of the
weighted BCE loss is not the identity but a learned N×N matrix ``S`` whose entry ``S_ij`` says how
much synthetic image ``i`` should match synthetic text ``j``. Three kinds share one interface,
:class:`SoftSimilarity`:

- ``"lowrank"`` (:class:`LowRankSimilarity`): ``S = diag(a) + (α/r) · L Rᵀ`` (LoRS, RepBlend);
- ``"full"`` (:class:`FullSimilarity`): a free N×N matrix;
- ``"none"`` (:class:`IdentitySimilarity`): the fixed identity (MTT-VL, coresets).

``forward(indices)`` returns the block ``S_I`` of a mini-batch; ``row_factors(i)`` returns the
parameters that belong to synthetic pair ``i`` as 1-D tensors keyed by parameter name (that is how a
distilled set stores ``S`` row by row on the Hub), and ``load_row_factors(rows)`` restores them
exactly. Nothing here imports the rest of the package (see DESIGN.md, "Layout").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

__all__ = [
    "SoftSimilarity",
    "LowRankSimilarity",
    "FullSimilarity",
    "IdentitySimilarity",
    "SIMILARITY_KINDS",
    "build_similarity",
]


def _check_num_pairs(num_pairs: int) -> None:
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}; set it to the number of "
                         "synthetic pairs N")


def _square(matrix: torch.Tensor, n: int) -> torch.Tensor:
    if tuple(matrix.shape) != (n, n) or not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"an initial similarity must be a finite [{n}, {n}] matrix, got shape {tuple(matrix.shape)}")
    return matrix


class SoftSimilarity(nn.Module):
    """Common interface of the soft similarity kinds: ``S_I`` for a mini-batch, per-row factors.

    METHOD.md, "Learned soft similarity" (LoRS). Subclasses set :attr:`kind` and implement
    :meth:`forward` and :meth:`row_factors`.
    """

    kind: str = ""

    def __init__(self, num_pairs: int):
        super().__init__()
        _check_num_pairs(num_pairs)
        self.num_pairs = num_pairs

    def _check_indices(self, indices: torch.Tensor) -> None:
        # No range check here: it would synchronise the device every inner step, and out-of-range
        # indices already fail in the indexing below.
        if indices.ndim != 1 or indices.dtype != torch.long:
            raise ValueError(f"indices must be a 1-D torch.long tensor of synthetic pair indices, got shape "
                             f"{tuple(indices.shape)} and dtype {indices.dtype}")

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The block ``S_I`` (``|I|×|I|``, rows: images, columns: texts); ``None`` gives the full N×N ``S``."""
        raise NotImplementedError

    def row_factors(self, i: int) -> dict[str, torch.Tensor]:
        """The parameters that belong to synthetic pair ``i`` as detached 1-D tensors, keyed by name."""
        raise NotImplementedError

    @torch.no_grad()
    def initialise_(self, matrix: torch.Tensor) -> SoftSimilarity:
        """Set the parameters so that ``S`` is (the kind's best approximation of) ``matrix`` [N, N]; returns self.

        A starting S other than the identity (DATM initialises its soft labels from a late expert:
        :func:`repblend_hf.stages.similarity_from_expert`).
        """
        raise ValueError(f"the {self.kind!r} similarity has no parameters to initialise; use the 'lowrank' or "
                         "'full' similarity")

    def earlier_pairs(self, name: str, n: int) -> tuple[slice, ...]:
        """The index of parameter ``name``'s entries that are functions of the first ``n`` pairs alone.

        What a set distilled in stages freezes of its earlier stages' pairs, and copies when it grows
        (:mod:`repblend_hf.stages`): per-pair factors are rows (the default), a full matrix its top-left block.
        """
        return (slice(0, n),)

    def load_row_factors(self, rows: Sequence[dict[str, torch.Tensor]]) -> None:
        """Restore the parameters from the per-pair factors of :meth:`row_factors`, one dict per pair.

        METHOD.md, "Learned soft similarity": the inverse of ``[m.row_factors(i) for i in range(N)]``,
        used to rebuild ``S`` exactly from a distilled set's rows.
        """
        if len(rows) != self.num_pairs:
            raise ValueError(f"got factors for {len(rows)} rows but this similarity has num_pairs={self.num_pairs}; "
                             "build it with the distilled set's number of pairs")
        state = {}
        for name, param in self.named_parameters():
            if any(name not in row for row in rows):
                raise ValueError(f"row factors lack {name!r} (they have {sorted(rows[0]) if rows else []}); were they "
                                 f"saved from another similarity kind than {self.kind!r}?")
            stacked = torch.stack([row[name].reshape(-1) for row in rows])
            if stacked.numel() != param.numel():
                raise ValueError(f"row factors {name!r} hold {stacked.numel()} values but the parameter has shape "
                                 f"{tuple(param.shape)}; were they saved with another sim_rank?")
            state[name] = stacked.reshape(param.shape)
        self.load_state_dict(state, strict=True)

    def extra_repr(self) -> str:
        return f"num_pairs={self.num_pairs}"


class LowRankSimilarity(SoftSimilarity):
    """Low-rank learned similarity ``S = diag(a) + (α/r) · L Rᵀ``, the identity at initialisation.

    METHOD.md, "Learned soft similarity" (LoRS Sec. 3.3; RepBlend keeps it): ``a ∈ R^N`` (``diag``,
    init 1), ``L ∈ R^{N×r}`` (``left``, init N(0, 1)), ``R ∈ R^{N×r}`` (``right``, init 0). ``alpha``
    is a LoRA-style scale, not the blending parameter. ``S_I`` is computed from ``a_I``, ``L_I`` and
    ``R_I`` without building the N×N matrix. Because ``R`` starts at 0, the first gradient reaches
    ``a`` and ``R`` but not ``L``.
    """

    kind = "lowrank"

    def __init__(self, num_pairs: int, rank: int, alpha: float):
        super().__init__(num_pairs)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= num_pairs:
            raise ValueError(f"sim_rank must be an int in [1, num_pairs={num_pairs}], got {rank!r}; the paper "
                             "uses 5-40, or set the similarity kind to 'full' for an unconstrained S")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"sim_alpha must be a finite number > 0, got {alpha!r}; the paper uses 0.01-3 "
                             "(1 in most settings)")
        self.rank = rank
        self.alpha = float(alpha)
        self.diag = nn.Parameter(torch.ones(num_pairs))
        self.left = nn.Parameter(torch.randn(num_pairs, rank))
        self.right = nn.Parameter(torch.zeros(num_pairs, rank))

    @property
    def scale(self) -> float:
        """The factor ``α / r`` in front of ``L Rᵀ``."""
        return self.alpha / self.rank

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """``S_I = diag(a_I) + (α/r) L_I R_Iᵀ``; ``indices=None`` gives the full N×N ``S``."""
        if indices is None:
            diag, left, right = self.diag, self.left, self.right
        else:
            self._check_indices(indices)
            diag, left, right = self.diag[indices], self.left[indices], self.right[indices]
        return torch.diag(diag) + self.scale * (left @ right.t())

    @torch.no_grad()
    def initialise_(self, matrix: torch.Tensor) -> LowRankSimilarity:
        """``a`` = the diagonal and ``(α/r) L Rᵀ`` = the best rank-r approximation of the off-diagonal part of
        ``matrix`` (truncated SVD, split evenly between L and R), ``a`` then corrected so that S's diagonal is
        ``matrix``'s exactly."""
        matrix = _square(matrix, self.num_pairs).to(self.diag)
        off = matrix - torch.diag(torch.diagonal(matrix))
        u, sigma, vh = torch.linalg.svd(off)
        root = (sigma[: self.rank] / self.scale).sqrt()
        self.left.copy_(u[:, : self.rank] * root)
        self.right.copy_(vh[: self.rank].t() * root)
        self.diag.copy_(torch.diagonal(matrix) - self.scale * (self.left * self.right).sum(1))
        return self

    def row_factors(self, i: int) -> dict[str, torch.Tensor]:
        """``{"diag": a_i (shape [1]), "left": L_i (shape [r]), "right": R_i (shape [r])}``, detached."""
        return {
            "diag": self.diag.detach()[i : i + 1].clone(),
            "left": self.left.detach()[i].clone(),
            "right": self.right.detach()[i].clone(),
        }

    def extra_repr(self) -> str:
        return f"num_pairs={self.num_pairs}, rank={self.rank}, alpha={self.alpha}"


class FullSimilarity(SoftSimilarity):
    """A free learnable N×N similarity matrix, initialised to the identity.

    METHOD.md, "Learned soft similarity" (the full variant of LoRS). ``N²`` parameters: affordable
    for the paper's N ≤ 499, but the low-rank kind is what the released settings use.
    """

    kind = "full"

    def __init__(self, num_pairs: int):
        super().__init__(num_pairs)
        self.matrix = nn.Parameter(torch.eye(num_pairs))

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """``S_I = S[I][:, I]``; ``indices=None`` gives ``S`` itself."""
        if indices is None:
            return self.matrix
        self._check_indices(indices)
        return self.matrix[indices][:, indices]

    def row_factors(self, i: int) -> dict[str, torch.Tensor]:
        """``{"matrix": S_i}``: row ``i`` of ``S`` (shape [N]), detached."""
        return {"matrix": self.matrix.detach()[i].clone()}

    @torch.no_grad()
    def initialise_(self, matrix: torch.Tensor) -> FullSimilarity:
        """``S = matrix``."""
        self.matrix.copy_(_square(matrix, self.num_pairs))
        return self

    def earlier_pairs(self, name: str, n: int) -> tuple[slice, ...]:
        """``S[:n, :n]``: the entries between two of the first ``n`` pairs (S between an earlier and a later pair
        belongs to the later one's stage)."""
        return (slice(0, n), slice(0, n))


class IdentitySimilarity(SoftSimilarity):
    """The fixed identity ``S = I``: hard one-to-one targets, no parameters.

    METHOD.md, "Baselines": what MTT-VL and the coresets use (no learned ``S``).
    """

    kind = "none"

    def __init__(self, num_pairs: int):
        super().__init__(num_pairs)
        # Not saved; only here so that ``.to(device)`` moves the output like any other module.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The ``|I|×|I|`` identity (N×N when ``indices`` is ``None``)."""
        if indices is None:
            size = self.num_pairs
        else:
            self._check_indices(indices)
            size = indices.numel()
        return torch.eye(size, dtype=self._anchor.dtype, device=self._anchor.device)

    def row_factors(self, i: int) -> dict[str, torch.Tensor]:
        """An empty dict: the identity has nothing to store per row."""
        if not -self.num_pairs <= i < self.num_pairs:
            raise IndexError(f"row {i} is out of range for {self.num_pairs} synthetic pairs")
        return {}


#: Similarity kinds by name (the ``sim_kind`` option), each a factory ``(num_pairs, rank, alpha)``.
SIMILARITY_KINDS: dict[str, Callable[[int, int, float], SoftSimilarity]] = {
    "lowrank": lambda num_pairs, rank, alpha: LowRankSimilarity(num_pairs, rank, alpha),
    "full": lambda num_pairs, rank, alpha: FullSimilarity(num_pairs),
    "none": lambda num_pairs, rank, alpha: IdentitySimilarity(num_pairs),
}


def build_similarity(kind: str, num_pairs: int, rank: int = 10, alpha: float = 1.0) -> SoftSimilarity:
    """Build a soft similarity module by kind name: ``"lowrank"``, ``"full"`` or ``"none"``.

    METHOD.md, "Learned soft similarity" (LoRS) and "Baselines" (``"none"`` for MTT-VL / coresets).
    ``rank`` (``r``) and ``alpha`` (``α``) are used, and validated, by ``"lowrank"`` only. Defaults:
    ``rank=10`` (Flickr/COCO 100 settings) and ``alpha=1.0`` (most released settings).
    """
    if kind not in SIMILARITY_KINDS:
        raise ValueError(f"unknown similarity kind {kind!r}; set it to one of {sorted(SIMILARITY_KINDS)}")
    return SIMILARITY_KINDS[kind](num_pairs, rank, alpha)
