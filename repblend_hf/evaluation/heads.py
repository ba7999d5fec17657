"""Fresh projection heads trained on a set of pairs (:func:`train_heads`), and a real split scored under them.

METHOD.md, "Evaluation protocol": SGD with the learned η per head, momentum 0.9, weight decay 5e-4, ×0.1
halfway, batch 128, wBCE against the learned soft similarity S (InfoNCE for the coresets).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..features import FeatureSplit
from ..losses import info_nce, weighted_bce
from ..metrics import METRIC_NAMES, retrieval_metrics
from ..modeling import RetrievalHeads, similarity_logits
from .pairs import PairSet, PixelPairSet
from .recipe import EvaluationProtocol, resolve_protocol


@dataclass
class TrainedHeads:
    """What :func:`train_heads` returns.

    ``heads`` holds the best-by-validation state when a validation split was given (else the final
    state) and is in eval mode; ``best_epoch`` is that state's epoch (``epochs`` without validation).
    ``history`` has one entry per evaluated epoch:
    ``{"epoch": e, "stage": k, "validation": metrics or None, **callback_output}`` (k: the stage of a set distilled
    in stages that was being trained, else 0). ``train_loss`` is the mean
    training loss of each epoch. ``diverged_epoch`` is the first epoch whose loss was not finite
    (training stopped there; later evaluations see the diverged heads and score 0). ``final_state`` is the
    heads' state dict after the last epoch (what a run without validation returns as ``heads``).
    """

    heads: RetrievalHeads
    best_epoch: int
    history: list[dict[str, Any]]
    train_loss: list[float]
    diverged_epoch: int | None = None
    final_state: dict[str, torch.Tensor] | None = None


def _default_eval_epochs(epochs: int) -> tuple[int, ...]:
    # Six evenly spaced evaluations, as the released LoRS/RepBlend evaluation (every epochs // 5).
    return tuple(sorted({round(i * epochs / 5) for i in range(6)}))


def _resolve_schedule(train, protocol: EvaluationProtocol) -> tuple[float, float, int, tuple[int, ...]]:
    """``(lr_img, lr_txt, decay_epoch, eval_epochs)`` of ``protocol`` for ``train``, the defaults filled in."""
    lr_img, lr_txt = _resolve_lrs(train, protocol.lr, protocol.lr_img, protocol.lr_txt)
    epochs, eval_epochs = protocol.epochs, protocol.eval_epochs
    decay_epoch = epochs // 2 + 1 if protocol.decay_epoch is None else protocol.decay_epoch
    eval_epochs = _default_eval_epochs(epochs) if eval_epochs is None else tuple(sorted(set(eval_epochs)))
    if any(e < 0 or e > epochs for e in eval_epochs):
        raise ValueError(f"eval_epochs must lie in 0..{epochs}, got {list(eval_epochs)}")
    return lr_img, lr_txt, decay_epoch, eval_epochs


def _resolve_lrs(train, lr, lr_img, lr_txt) -> tuple[float, float]:
    resolved = []
    for name, explicit in (("lr_img", lr_img), ("lr_txt", lr_txt)):
        value = explicit if explicit is not None else lr
        if value is None and isinstance(train, (PairSet, PixelPairSet)):
            value = getattr(train, name)
        if value is None:
            owner = type(train).__name__ if isinstance(train, PixelPairSet) else "PairSet"
            raise ValueError(f"no learning rate for {name}: pass lr= (both heads) or {name}=, or set "
                             f"{owner}.{name} (a distilled set's learned η)")
        value = float(value)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        resolved.append(value)
    return resolved[0], resolved[1]


class _PairSampler:
    """Yields (image feats, text feats, targets or None) mini-batches for one epoch."""

    def __init__(self, train: PairSet | FeatureSplit, device: torch.device, use_augmented_views: bool):
        self.is_split = isinstance(train, FeatureSplit)
        if self.is_split:
            counts = torch.bincount(train.caption_to_image, minlength=train.num_images)
            if bool((counts == 0).any()):
                raise ValueError("every training image needs at least one caption")
            # Captions of image i are order[offsets[i] : offsets[i] + counts[i]] (no contiguity assumed).
            self.order = torch.argsort(train.caption_to_image, stable=True)
            self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
            self.counts = counts
            views = train.augmented_image_features if use_augmented_views else None
            self.images = (views if views is not None else train.image_features).float().to(device)
            self.texts = train.caption_features.float().to(device)
            self.similarity = None
            self.num = train.num_images
        else:
            self.images = train.image_features.to(device)
            self.texts = train.text_features.to(device)
            self.similarity = None if train.similarity is None else train.similarity.to(device)
            self.num = len(train)
        self.device = device

    def epoch(self, batch_size: int, generator: torch.Generator):
        order = torch.randperm(self.num, generator=generator)
        if self.is_split:
            # One random caption per image (and one random augmented view) per epoch.
            pick = (torch.rand(self.num, generator=generator) * self.counts).long().clamp_max(self.counts - 1)
            caption = self.order[self.offsets + pick].to(self.device)
            view = None
            if self.images.ndim == 3:
                view = torch.randint(self.images.shape[1], (self.num,), generator=generator).to(self.device)
        order = order.to(self.device)
        for start in range(0, self.num, batch_size):
            idx = order[start : start + batch_size]
            if self.is_split:
                image = self.images[idx, view[idx]] if view is not None else self.images[idx]
                yield image, self.texts[caption[idx]], None
            else:
                targets = None if self.similarity is None else self.similarity[idx][:, idx]
                yield self.images[idx], self.texts[idx], targets


def _batch_loss(loss: str, logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    if loss == "infonce":
        return info_nce(logits)
    if targets is None:  # wBCE without a learned S: identity targets (a coreset's pairs)
        targets = torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
    return weighted_bce(logits, targets)


_LOSSES = ("wbce", "infonce")


def train_heads(
    train: PairSet | FeatureSplit,
    protocol: EvaluationProtocol | None = None,
    *,
    embed_dim: int,
    validation: FeatureSplit | None = None,
    callback: Callable[[int, RetrievalHeads], dict[str, Any] | None] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    **overrides: Any,
) -> TrainedHeads:
    """Train fresh retrieval heads on frozen-encoder features and keep the best-by-validation state.

    METHOD.md, "Evaluation protocol" (LoRS Algorithm 2, ``evaluate_synset_with_similarity`` in the
    released code): the recipe is ``protocol`` (default :class:`EvaluationProtocol`: SGD with momentum 0.9
    and weight decay 5e-4, a separate lr per head, batch 128, τ = 0.07, the heads' dropout active while
    training), changed by any ``overrides`` given as its field names (``loss="infonce", lr=0.1``).

    ``train`` is either

    - a :class:`PairSet` (a distilled set or a coreset): each mini-batch ``I`` is trained with
      ``loss="wbce"`` against ``S[I][:, I]`` (identity targets when ``S`` is None), or with
      ``loss="infonce"`` (identity targets, no S allowed); or
    - a :class:`~repblend_hf.features.FeatureSplit` (full-data training): each epoch uses one random
      caption per image and, if the split has ``augmented_image_features`` and
      ``use_augmented_views``, one random augmented view per image.

    Learning rates: ``lr_img`` / ``lr_txt`` if given, else ``lr`` for both heads, else the PairSet's
    learned ``lr_img`` / ``lr_txt``. They are multiplied by 0.1 from epoch ``decay_epoch`` on
    (default ``epochs // 2 + 1``, epoch 51 of 100; larger than ``epochs`` disables the decay).

    A :class:`PairSet` with ``stages`` (a set distilled in stages) is trained on each stage in order (its
    :class:`~repblend_hf.evaluation.StagePhase`: its pairs at its η), the optimiser carried over as PDD's evaluation
    does: a stage without ``steps`` for ``epochs`` epochs of the recipe above (the decay and the evaluations repeat
    within it); a stage with ``steps`` as its student moved, plain SGD (no momentum, no weight decay) for that many
    steps, rounded up to whole epochs and evaluated about five times. Epochs are counted through the stages (after a
    100-epoch first stage, the second stage's epoch 2 is epoch 102).

    Epochs are counted from 1; "evaluation at epoch e" is after e completed epochs, 0 being the
    freshly initialised heads (default ``eval_epochs``: 0, 20, …, 100 — six evenly spaced). The
    released code trains ``epochs + 1`` epochs numbered from 0 and evaluates after its epoch
    ``0, 20, …``; to reproduce it exactly use ``epochs=101, decay_epoch=52, eval_epochs=(1, 21, …,
    101)``. Each epoch walks a random permutation in batches (the last one smaller); for N ≤ 128 that
    is one full batch per epoch, as in the released code.

    At each evaluation epoch the heads (in eval mode) are scored on ``validation`` (the returned
    ``heads`` keep the state with the best validation ``r_mean``, the earliest on ties) and then
    passed to ``callback(epoch, heads)``, whose returned dict is merged into that ``history`` entry.
    Randomness (init, dropout, batches, captions, views) comes from ``seed`` only; the global RNG
    state is restored afterwards.
    """
    protocol = resolve_protocol(protocol, overrides)
    loss, epochs, batch_size, temperature = protocol.loss, protocol.epochs, protocol.batch_size, protocol.temperature
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {list(_LOSSES)}, got {loss!r}")
    if isinstance(train, PairSet) and train.similarity is not None and loss == "infonce":
        raise ValueError("the PairSet has a soft similarity S but loss='infonce' ignores it; use loss='wbce' "
                         "or drop the similarity")
    if not isinstance(train, (PairSet, FeatureSplit)):
        raise TypeError(f"train must be a PairSet or a FeatureSplit, got {type(train).__name__}")
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    lr_img, lr_txt, decay_epoch, eval_epochs = _resolve_schedule(train, protocol)
    device = torch.device(train.image_features.device if device is None else device)

    # One phase per stage of a set distilled in stages (each on its pairs at its own η, in order, the optimiser carried
    # over as PDD's evaluate_mtt.py does); one phase otherwise. A phase is (sampler, lr_img, lr_txt, its epochs, the
    # epochs it evaluates at, and whether it follows the recipe or the student's plain SGD).
    phases = []
    for part, stage in (train.stage_sets() if isinstance(train, PairSet) else [(train, None)]):
        lrs = _resolve_lrs(part, protocol.lr, protocol.lr_img, protocol.lr_txt)
        if stage is None or stage.steps is None:
            phases.append((_PairSampler(part, device, protocol.use_augmented_views), *lrs, epochs, eval_epochs, True))
        else:  # the student's steps, as whole epochs of min(batch_size, n) pairs; evaluated ~5 times and at the end
            n_epochs = -(-stage.steps // -(-len(part) // batch_size))
            at = tuple(sorted({*range(max(1, n_epochs // 5), n_epochs + 1, max(1, n_epochs // 5)), n_epochs}))
            phases.append((_PairSampler(part, device, protocol.use_augmented_views), *lrs, n_epochs, at, False))
    sampler = phases[-1][0]
    image_dim = sampler.images.shape[-1]
    text_dim = sampler.texts.shape[-1]
    generator = torch.Generator().manual_seed(seed)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        heads = RetrievalHeads(image_dim, text_dim, embed_dim, dropout=protocol.dropout).to(device)
        optimizer = torch.optim.SGD(
            [{"params": heads.image_head.parameters(), "lr": lr_img},
             {"params": heads.text_head.parameters(), "lr": lr_txt}],
            lr=lr_img, momentum=protocol.momentum, weight_decay=protocol.weight_decay,
        )

        history: list[dict[str, Any]] = []
        train_loss: list[float] = []
        total_epochs = sum(phase[3] for phase in phases)
        best_score, best_epoch, best_state = float("-inf"), total_epochs, None
        diverged_epoch = None

        def evaluate(epoch: int, stage: int = 0) -> None:
            nonlocal best_score, best_epoch, best_state
            heads.eval()
            entry: dict[str, Any] = {"epoch": epoch, "stage": stage, "validation": None}
            if validation is not None:
                entry["validation"] = _split_metrics(heads, validation, temperature)[0]
                if entry["validation"]["r_mean"] > best_score:
                    best_score, best_epoch = entry["validation"]["r_mean"], epoch
                    best_state = copy.deepcopy(heads.state_dict())
            if callback is not None:
                entry.update(callback(epoch, heads) or {})
            history.append(entry)

        if 0 in eval_epochs:
            evaluate(0)
        schedule = [(stage, local) for stage in range(len(phases)) for local in range(1, phases[stage][3] + 1)]
        for epoch, (stage, local) in enumerate(tqdm(schedule, desc="train heads", leave=False,
                                                     disable=not progress), start=1):
            sampler, *base_lrs, _, at, recipe = phases[stage]
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * (0.1 if recipe and local >= decay_epoch else 1.0)
                group["momentum"] = protocol.momentum if recipe else 0.0
                group["weight_decay"] = protocol.weight_decay if recipe else 0.0
            if diverged_epoch is None:
                heads.train()
                total, count = 0.0, 0
                for image, text, targets in sampler.epoch(batch_size, generator):
                    logits = similarity_logits(*heads(image, text), temperature)
                    batch_loss = _batch_loss(loss, logits, targets)
                    optimizer.zero_grad(set_to_none=True)
                    batch_loss.backward()
                    optimizer.step()
                    total += float(batch_loss.detach()) * image.shape[0]
                    count += image.shape[0]
                train_loss.append(total / max(count, 1))
                if not np.isfinite(train_loss[-1]):
                    diverged_epoch = epoch
                    warnings.warn(f"head training diverged at epoch {epoch} (loss {train_loss[-1]}); lr_img="
                                  f"{base_lrs[0]}, lr_txt={base_lrs[1]} are too large. Training stops; later "
                                  "evaluations score 0.", RuntimeWarning, stacklevel=2)
            if local in at:
                evaluate(epoch, stage)

    final_state = {k: v.detach().clone() for k, v in heads.state_dict().items()}
    if best_state is not None:
        heads.load_state_dict(best_state)
    heads.eval()
    return TrainedHeads(heads=heads, best_epoch=best_epoch if validation is not None else total_epochs,
                        history=history, train_loss=train_loss, diverged_epoch=diverged_epoch,
                        final_state=final_state)


@torch.no_grad()
def embed_split(
    heads: RetrievalHeads, split: FeatureSplit, *, chunk_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head outputs (not normalised) of all images and all captions of ``split``, in eval mode.

    Returns ``(image_embeds [num_images, d], text_embeds [num_captions, d])`` on the heads' device;
    the heads' training mode is restored afterwards.
    """
    was_training = heads.training
    heads.eval()
    device = next(heads.parameters()).device
    try:
        def run(head, x):
            chunks = range(0, x.shape[0], chunk_size)
            return torch.cat([head(x[i : i + chunk_size].to(device).float()) for i in chunks])
        return run(heads.image_head, split.image_features), run(heads.text_head, split.caption_features)
    finally:
        heads.train(was_training)


@torch.no_grad()
def score_split(heads: RetrievalHeads, split: FeatureSplit, temperature: float = 0.07) -> torch.Tensor:
    """The ``[num_images, num_captions]`` logit matrix of ``split`` (cosine similarity / temperature)."""
    return similarity_logits(*embed_split(heads, split), temperature)


def _split_metrics(
    heads: RetrievalHeads, split: FeatureSplit, temperature: float
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Retrieval metrics of ``split`` plus the embeddings; diverged (non-finite) heads score 0."""
    image_embeds, text_embeds = embed_split(heads, split)
    if not (bool(torch.isfinite(image_embeds).all()) and bool(torch.isfinite(text_embeds).all())):
        return dict.fromkeys(METRIC_NAMES, 0.0), image_embeds, text_embeds
    scores = similarity_logits(image_embeds, text_embeds, temperature)
    return retrieval_metrics(scores, split.caption_to_image), image_embeds, text_embeds
