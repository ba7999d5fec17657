"""The inputs of the protocols: a set of pairs as features (:class:`PairSet`) or as pixels (:class:`PixelPairSet`),
and a real split as images (:class:`ImageSplit`); each checks its tensors and learning rates when built."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.images import to_rgb
from ..features import FeatureSplit


def _check_lrs(owner: str, lr_img: float | None, lr_txt: float | None) -> tuple[float | None, float | None]:
    out = []
    for name, value in (("lr_img", lr_img), ("lr_txt", lr_txt)):
        if value is not None:
            value = float(value)
            if not value > 0:
                raise ValueError(f"{owner}.{name} must be > 0, got {value}; a learned η that is not positive "
                                 "cannot train the model")
            if not np.isfinite(value):
                raise ValueError(f"{owner}.{name} must be finite, got {value}")
        out.append(value)
    return out[0], out[1]


def _check_finite_tensors(owner: str, **tensors: torch.Tensor | None) -> None:
    for name, value in tensors.items():
        if value is not None and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{owner}.{name} holds {int((~torch.isfinite(value)).sum())} NaN/inf value(s); a "
                             "non-finite set cannot be evaluated. If it is a distilled set, it was damaged: use an "
                             "earlier checkpoint or distil again with lower learning rates")


@dataclass(frozen=True)
class StagePhase:
    """How evaluation trains on one stage of a set distilled in stages (:mod:`repblend_hf.stages`).

    The pairs ``[start, end)`` (``start`` 0: every pair so far, the union the stage's student trained on; the stage's
    own first pair when its student trained on its new pairs alone) at the stage's learned η. ``steps`` None: the
    protocol's recipe (``epochs`` epochs, momentum, weight decay, the decay halfway), what the first stage, distilled
    from randomly initialised experts, is trained with. ``steps`` = n: the way the stage's student moved, plain SGD at
    η for n steps (its ``syn_steps``), no momentum or weight decay: a later stage imitates a few epochs of the experts
    from where the earlier stages left the model, and the recipe's 100 epochs with momentum 0.9 overshoot that by
    about two orders of magnitude (measured: ``docs/results.md``, "Sizes").
    """

    start: int
    end: int
    lr_img: float
    lr_txt: float
    steps: int | None = None


@dataclass
class PairSet:
    """N image-text training pairs as features, with the optional learned soft similarity and lrs.

    A distilled set (RepBlend / LoRS: ``similarity`` = the learned S, ``lr_img`` / ``lr_txt`` = the
    learned inner learning rates η) or a coreset (S = None, i.e. identity targets). ``image_features``
    are image-*encoder* features ``[N, d_img]`` (synthetic images already passed through the frozen
    encoder), ``text_features`` are text embeddings ``[N, d_txt]``.

    A set distilled in stages (:mod:`repblend_hf.stages`) has ``stages``: one :class:`StagePhase` per stage, in
    order (tuples ``(start, end, lr_img, lr_txt, steps)`` are taken too); the last ends at N.
    :func:`~repblend_hf.evaluation.train_heads` then trains on them in order (:meth:`stage_sets`), and ``lr_img`` /
    ``lr_txt`` are the last stage's.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    similarity: torch.Tensor | None = None
    lr_img: float | None = None
    lr_txt: float | None = None
    stages: list[StagePhase] | None = None

    def __post_init__(self):
        # Detached: evaluation must not accumulate gradients into a SyntheticSet's parameters.
        self.image_features = torch.as_tensor(self.image_features).detach().float()
        self.text_features = torch.as_tensor(self.text_features).detach().float()
        n = self.image_features.shape[0]
        if self.image_features.ndim != 2 or self.text_features.ndim != 2 or self.text_features.shape[0] != n:
            raise ValueError(f"image_features and text_features must be [N, d] with the same N, got "
                             f"{tuple(self.image_features.shape)} and {tuple(self.text_features.shape)}")
        if self.similarity is not None:
            self.similarity = torch.as_tensor(self.similarity).detach().float()
            if tuple(self.similarity.shape) != (n, n):
                raise ValueError(f"similarity must be [N, N] = [{n}, {n}], got {tuple(self.similarity.shape)}")
        # A set with NaN / inf would train heads to NaN, and a result would be reported for it: refuse it here.
        for name in ("image_features", "text_features", "similarity"):
            value = getattr(self, name)
            if value is not None and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise ValueError(f"PairSet.{name} holds {bad} NaN/inf value(s); a non-finite set cannot be "
                                 "evaluated. If it is a distilled set, it was damaged: use an earlier checkpoint or "
                                 "distil again with lower learning rates")
        for name in ("lr_img", "lr_txt"):
            value = getattr(self, name)
            if value is not None:
                value = float(value)
                if not value > 0:
                    raise ValueError(f"{name} must be > 0, got {value}; a learned η that is not positive "
                                     "cannot train the heads")
                if not np.isfinite(value):
                    raise ValueError(f"{name} must be finite, got {value}; a learned η of inf cannot train the heads")
                setattr(self, name, value)
        if self.stages is not None:
            self._check_stages(n)

    def _check_stages(self, n: int) -> None:
        stages = [p if isinstance(p, StagePhase) else StagePhase(*p) for p in self.stages]
        ends = [p.end for p in stages]
        if not stages or ends[-1] != n or ends != sorted(set(ends)):
            raise ValueError(f"PairSet.stages must end at increasing pair counts, the last one N={n}, got ends {ends}")
        for k, p in enumerate(stages):
            if not 0 <= p.start < p.end:
                raise ValueError(f"PairSet.stages[{k}] trains on pairs {p.start}..{p.end - 1}: need 0 <= start < end")
            if p.steps is not None and p.steps < 1:
                raise ValueError(f"PairSet.stages[{k}].steps must be >= 1 (or None for the recipe), got {p.steps}")
            _check_lrs(f"PairSet.stages[{k}]", p.lr_img, p.lr_txt)
        self.stages = stages
        self.lr_img, self.lr_txt = stages[-1].lr_img, stages[-1].lr_txt

    def stage_sets(self) -> list[tuple[PairSet, StagePhase | None]]:
        """One ``(pairs, phase)`` per stage: the pairs it trains on (S's block of them) with its learned η, and how
        (:class:`StagePhase`); ``[(self, None)]`` when the set has no stages."""
        if self.stages is None:
            return [(self, None)]
        s = self.similarity
        return [(PairSet(self.image_features[p.start:p.end], self.text_features[p.start:p.end],
                         None if s is None else s[p.start:p.end, p.start:p.end], lr_img=p.lr_img, lr_txt=p.lr_txt),
                 p) for p in self.stages]

    def __len__(self) -> int:
        return self.image_features.shape[0]


@dataclass
class PixelPairSet:
    """N image-text training pairs with the images as *pixels*, for :func:`evaluate_finetuned`.

    ``pixel_values`` ``[N, 3, H, W]`` are normalised pixels, the image encoder's input (a distilled set's
    ``SyntheticSet.images``); ``text_features`` ``[N, d_txt]`` its text embeddings; ``similarity`` the learned
    soft similarity S (None: identity targets) and ``lr_img`` / ``lr_txt`` the learned inner learning rates η,
    as in :class:`PairSet`.
    """

    pixel_values: torch.Tensor
    text_features: torch.Tensor
    similarity: torch.Tensor | None = None
    lr_img: float | None = None
    lr_txt: float | None = None

    def __post_init__(self):
        self.pixel_values = torch.as_tensor(self.pixel_values).detach().float()
        self.text_features = torch.as_tensor(self.text_features).detach().float()
        n = self.pixel_values.shape[0]
        if self.pixel_values.ndim != 4 or self.text_features.ndim != 2 or self.text_features.shape[0] != n:
            raise ValueError(f"pixel_values must be [N, 3, H, W] and text_features [N, d] with the same N, got "
                             f"{tuple(self.pixel_values.shape)} and {tuple(self.text_features.shape)}")
        if self.similarity is not None:
            self.similarity = torch.as_tensor(self.similarity).detach().float()
            if tuple(self.similarity.shape) != (n, n):
                raise ValueError(f"similarity must be [N, N] = [{n}, {n}], got {tuple(self.similarity.shape)}")
        _check_finite_tensors("PixelPairSet", pixel_values=self.pixel_values, text_features=self.text_features,
                              similarity=self.similarity)
        self.lr_img, self.lr_txt = _check_lrs("PixelPairSet", self.lr_img, self.lr_txt)

    def __len__(self) -> int:
        return self.pixel_values.shape[0]


@dataclass
class ImageSplit:
    """A real split for a protocol that trains the image encoder: its images and its cached caption features.

    ``images[i]`` is image ``i`` of ``features`` (e.g. ``dataset["test"]["image"]``, the PIL images in the order
    :func:`~repblend_hf.features.encode_dataset` encoded them); ``transform`` maps one to the encoder's input
    (the frozen encoder's ``eval_transform``). With ``transform=None``, ``images`` is already a pixel tensor
    ``[M, 3, H, W]``. Only ``features.caption_features`` and ``caption_to_image`` are used: the image side is
    re-encoded by the encoder being trained. The transformed pixels are kept after their first use
    (:meth:`pixels`: ``4 · 3 · H · W`` bytes per image, 49 KB at 64 px), so a split is transformed once for every
    seed and evaluation epoch.
    """

    images: Sequence[Any] | torch.Tensor
    transform: Callable[[Any], torch.Tensor] | None
    features: FeatureSplit
    _pixels: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.transform is None and not (torch.is_tensor(self.images) and self.images.ndim == 4):
            raise ValueError("ImageSplit without a transform needs images as a [M, 3, H, W] pixel tensor; pass the "
                             "image encoder's eval_transform to use PIL images")
        if len(self.images) != self.features.num_images:
            raise ValueError(f"ImageSplit has {len(self.images)} images but its features {self.features.num_images}; "
                             "pass the split's image column in the order it was encoded")

    @property
    def num_images(self) -> int:
        return self.features.num_images

    def pixels(self) -> torch.Tensor:
        """The split's images as encoder input ``[M, 3, H, W]`` (float32, CPU), transformed once."""
        if self._pixels is None:
            if self.transform is None:
                self._pixels = self.images.detach().float().cpu()
            else:
                self._pixels = torch.stack([self.transform(to_rgb(img)) for img in self.images]).float()
        return self._pixels
