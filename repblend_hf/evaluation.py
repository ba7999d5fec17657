"""The evaluation protocol: train fresh heads on a small set of pairs, then retrieve on a real split.

METHOD.md, "Evaluation protocol": fresh projection heads (encoders frozen, features given) are trained
on the synthetic or coreset pairs with SGD (lr = the learned η per head, momentum 0.9, weight decay
5e-4, ×0.1 halfway, batch 128, wBCE against the learned soft similarity S), and scored by image→text
and text→image recall@K on the real test split. The released code reports the best of several test
evaluations; here the epoch is selected on the validation split and the test-selected number is kept
only for comparison (:meth:`EvaluationResult.summary`).

The pieces compose: :func:`retrieval_metrics` and :func:`modality_diagnostics` are pure functions of
scores / embeddings; :func:`train_heads` trains one seed; :func:`evaluate_pairs` runs the protocol
over seeds and aggregates (``settings["protocol"] = "frozen_encoder"``, the protocol shared by every set).

The asymmetric methods (LoRS, MTT-VL) are evaluated by their authors another way: the image encoder is
fine-tuned with a fresh text head on the set's *pixels* (their ``epoch.py``).
:func:`finetune_image_encoder` / :func:`evaluate_finetuned` are that protocol (``"finetune_encoder"``); its
inputs are the set as a :class:`PixelPairSet` and the real splits as :class:`ImageSplit` (images plus the
encoder's eval transform, and the cached caption features).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.images import to_rgb
from .features import FeatureSplit
from .losses import info_nce, weighted_bce
from .metrics import METRIC_NAMES, RECALL_KS, modality_diagnostics, retrieval_metrics
from .modeling import RetrievalHeads, similarity_logits

__all__ = [
    "RECALL_KS",
    "METRIC_NAMES",
    "retrieval_metrics",
    "modality_diagnostics",
    "PairSet",
    "TrainedHeads",
    "train_heads",
    "embed_split",
    "score_split",
    "SeedResult",
    "EvaluationResult",
    "evaluate_pairs",
    "FROZEN_ENCODER",
    "FINETUNE_ENCODER",
    "PixelPairSet",
    "ImageSplit",
    "FinetunedModel",
    "finetune_image_encoder",
    "embed_image_split",
    "evaluate_finetuned",
    "ReferenceDiagnostics",
]

# --------------------------------------------------------------------------------------------------
# Training fresh heads
# --------------------------------------------------------------------------------------------------


@dataclass
class PairSet:
    """N image-text training pairs as features, with the optional learned soft similarity and lrs.

    A distilled set (RepBlend / LoRS: ``similarity`` = the learned S, ``lr_img`` / ``lr_txt`` = the
    learned inner learning rates η) or a coreset (S = None, i.e. identity targets). ``image_features``
    are image-*encoder* features ``[N, d_img]`` (synthetic images already passed through the frozen
    encoder), ``text_features`` are text embeddings ``[N, d_txt]``.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    similarity: torch.Tensor | None = None
    lr_img: float | None = None
    lr_txt: float | None = None

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

    def __len__(self) -> int:
        return self.image_features.shape[0]


@dataclass
class TrainedHeads:
    """What :func:`train_heads` returns.

    ``heads`` holds the best-by-validation state when a validation split was given (else the final
    state) and is in eval mode; ``best_epoch`` is that state's epoch (``epochs`` without validation).
    ``history`` has one entry per evaluated epoch:
    ``{"epoch": e, "validation": metrics or None, **callback_output}``. ``train_loss`` is the mean
    training loss of each epoch. ``diverged_epoch`` is the first epoch whose loss was not finite
    (training stopped there; later evaluations see the diverged heads and score 0).
    """

    heads: RetrievalHeads
    best_epoch: int
    history: list[dict[str, Any]]
    train_loss: list[float]
    diverged_epoch: int | None = None


def _default_eval_epochs(epochs: int) -> tuple[int, ...]:
    # Six evenly spaced evaluations, as the released LoRS/RepBlend evaluation (every epochs // 5).
    return tuple(sorted({round(i * epochs / 5) for i in range(6)}))


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
    *,
    embed_dim: int,
    loss: str = "wbce",
    lr: float | None = None,
    lr_img: float | None = None,
    lr_txt: float | None = None,
    epochs: int = 100,
    decay_epoch: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    temperature: float = 0.07,
    dropout: float = 0.1,
    eval_epochs: Sequence[int] | None = None,
    validation: FeatureSplit | None = None,
    callback: Callable[[int, RetrievalHeads], dict[str, Any] | None] | None = None,
    use_augmented_views: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> TrainedHeads:
    """Train fresh retrieval heads on frozen-encoder features and keep the best-by-validation state.

    METHOD.md, "Evaluation protocol" (LoRS Algorithm 2, ``evaluate_synset_with_similarity`` in the
    released code): SGD with momentum 0.9 and weight decay 5e-4, a separate lr per head, batch 128,
    τ = 0.07, the heads' dropout active while training.

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
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {list(_LOSSES)}, got {loss!r}")
    if isinstance(train, PairSet) and train.similarity is not None and loss == "infonce":
        raise ValueError("the PairSet has a soft similarity S but loss='infonce' ignores it; use loss='wbce' "
                         "or drop the similarity")
    if not isinstance(train, (PairSet, FeatureSplit)):
        raise TypeError(f"train must be a PairSet or a FeatureSplit, got {type(train).__name__}")
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    lr_img, lr_txt = _resolve_lrs(train, lr, lr_img, lr_txt)
    decay_epoch = epochs // 2 + 1 if decay_epoch is None else decay_epoch
    eval_epochs = _default_eval_epochs(epochs) if eval_epochs is None else tuple(sorted(set(eval_epochs)))
    if any(e < 0 or e > epochs for e in eval_epochs):
        raise ValueError(f"eval_epochs must lie in 0..{epochs}, got {list(eval_epochs)}")
    device = torch.device(train.image_features.device if device is None else device)

    sampler = _PairSampler(train, device, use_augmented_views)
    image_dim = sampler.images.shape[-1]
    text_dim = sampler.texts.shape[-1]
    generator = torch.Generator().manual_seed(seed)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        heads = RetrievalHeads(image_dim, text_dim, embed_dim, dropout=dropout).to(device)
        optimizer = torch.optim.SGD(
            [{"params": heads.image_head.parameters(), "lr": lr_img},
             {"params": heads.text_head.parameters(), "lr": lr_txt}],
            lr=lr_img, momentum=momentum, weight_decay=weight_decay,
        )
        base_lrs = [lr_img, lr_txt]

        history: list[dict[str, Any]] = []
        train_loss: list[float] = []
        best_score, best_epoch, best_state = float("-inf"), epochs, None
        diverged_epoch = None

        def evaluate(epoch: int) -> None:
            nonlocal best_score, best_epoch, best_state
            heads.eval()
            entry: dict[str, Any] = {"epoch": epoch, "validation": None}
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
        for epoch in tqdm(range(1, epochs + 1), desc="train heads", leave=False, disable=not progress):
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * (0.1 if epoch >= decay_epoch else 1.0)
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
                                  f"{lr_img}, lr_txt={lr_txt} are too large. Training stops; later evaluations "
                                  "score 0.", RuntimeWarning, stacklevel=2)
            if epoch in eval_epochs:
                evaluate(epoch)

    if best_state is not None:
        heads.load_state_dict(best_state)
    heads.eval()
    return TrainedHeads(heads=heads, best_epoch=best_epoch if validation is not None else epochs,
                        history=history, train_loss=train_loss, diverged_epoch=diverged_epoch)


# --------------------------------------------------------------------------------------------------
# Scoring a real split
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The protocol over seeds
# --------------------------------------------------------------------------------------------------


@dataclass
class SeedResult:
    """One seed of :func:`evaluate_pairs`.

    ``validation`` / ``test`` / ``diagnostics`` are at ``selected_epoch`` (best validation r_mean);
    ``test_selected_on_test`` is the best test r_mean over the evaluated epochs (what the released
    code reports; optimistic) at ``test_selected_epoch``. ``history`` has every evaluated epoch.
    """

    seed: int
    selected_epoch: int
    validation: dict[str, float]
    test: dict[str, float]
    diagnostics: dict[str, float]
    test_selected_epoch: int
    test_selected_on_test: dict[str, float]
    history: list[dict[str, Any]]
    train_loss: list[float]
    diverged_epoch: int | None = None


def _mean_std(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {key: {"mean": float(np.mean([r[key] for r in rows])), "std": float(np.std([r[key] for r in rows]))}
            for key in rows[0]}


@dataclass
class EvaluationResult:
    """Per-seed results of :func:`evaluate_pairs` and the settings they were made with."""

    seeds: list[SeedResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Mean and std over seeds: ``{"validation" | "test" | "test_selected_on_test" | "diagnostics":
        {name: {"mean", "std"}}}``.

        ``std`` is the population standard deviation (``numpy.std``, ddof=0), the spread of these
        seeds rather than an estimate for unseen ones; multiply by ``sqrt(n / (n - 1))`` for the
        sample std.
        """
        return {
            "validation": _mean_std([s.validation for s in self.seeds]),
            "test": _mean_std([s.test for s in self.seeds]),
            "test_selected_on_test": _mean_std([s.test_selected_on_test for s in self.seeds]),
            "diagnostics": _mean_std([s.diagnostics for s in self.seeds]),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-serialisable Python values (per-seed results, settings, summary)."""
        return {"summary": self.summary(), "settings": self.settings, "seeds": [asdict(s) for s in self.seeds]}


def evaluate_pairs(
    train: PairSet | FeatureSplit,
    validation: FeatureSplit,
    test: FeatureSplit,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    embed_dim: int,
    loss: str = "wbce",
    lr: float | None = None,
    lr_img: float | None = None,
    lr_txt: float | None = None,
    epochs: int = 100,
    decay_epoch: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    temperature: float = 0.07,
    dropout: float = 0.1,
    eval_epochs: Sequence[int] | None = None,
    use_augmented_views: bool = True,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Run the evaluation protocol over seeds: train heads, select the epoch on validation, report test.

    METHOD.md, "Evaluation protocol", with the honest selection: for each seed, :func:`train_heads`
    (same arguments, see there) evaluates validation and test at every ``eval_epochs`` entry; the
    reported test metrics and the :func:`modality_diagnostics` of the test embeddings are those of
    the epoch with the best validation r_mean. The test-selected numbers (best test r_mean, as the
    released code reports) are kept in ``test_selected_on_test`` for comparison only.

    Common calls: a distilled set ``PairSet(feats, text, S, lr_img=η_img, lr_txt=η_txt)`` with
    ``loss="wbce"``; a coreset ``PairSet(*selection.pairs(split))`` with ``loss="infonce", lr=0.1``
    or ``loss="wbce"`` and a smaller lr; full data ``train=train_split, loss="infonce", lr=0.1`` and
    fewer ``epochs``.
    """
    settings = {
        "embed_dim": embed_dim, "loss": loss, "lr": lr, "lr_img": lr_img, "lr_txt": lr_txt, "epochs": epochs,
        "decay_epoch": decay_epoch, "momentum": momentum, "weight_decay": weight_decay, "batch_size": batch_size,
        "temperature": temperature, "dropout": dropout,
        "eval_epochs": None if eval_epochs is None else list(eval_epochs),
        "use_augmented_views": use_augmented_views, "seeds": list(seeds),
        "num_train_pairs": len(train) if isinstance(train, PairSet) else train.num_images,
        "train_kind": "pairs" if isinstance(train, PairSet) else "full_split",
        "protocol": FROZEN_ENCODER,
    }
    if not seeds:
        raise ValueError("seeds must name at least one seed")

    def test_callback(epoch: int, heads: RetrievalHeads) -> dict[str, Any]:
        metrics, image_embeds, text_embeds = _split_metrics(heads, test, temperature)
        return {"test": metrics, "diagnostics": modality_diagnostics(image_embeds, text_embeds)}

    results = []
    for seed in tqdm(seeds, desc="seeds", leave=False, disable=not progress):
        trained = train_heads(
            train, embed_dim=embed_dim, loss=loss, lr=lr, lr_img=lr_img, lr_txt=lr_txt, epochs=epochs,
            decay_epoch=decay_epoch, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size,
            temperature=temperature, dropout=dropout, eval_epochs=eval_epochs, validation=validation,
            callback=test_callback, use_augmented_views=use_augmented_views, seed=seed, device=device,
            progress=progress,
        )
        results.append(_seed_result(seed, trained))
    return EvaluationResult(seeds=results, settings=settings)


def _seed_result(seed: int, trained: TrainedHeads | FinetunedModel) -> SeedResult:
    """One seed's result from a training run whose history holds validation, test and diagnostics entries."""
    if not trained.history:
        raise ValueError("eval_epochs is empty; nothing was evaluated")
    selected = next(h for h in trained.history if h["epoch"] == trained.best_epoch)
    on_test = max(trained.history, key=lambda h: h["test"]["r_mean"])  # first maximum on ties
    return SeedResult(
        seed=seed, selected_epoch=trained.best_epoch, validation=selected["validation"],
        test=selected["test"], diagnostics=selected["diagnostics"], test_selected_epoch=on_test["epoch"],
        test_selected_on_test=on_test["test"], history=trained.history, train_loss=trained.train_loss,
        diverged_epoch=trained.diverged_epoch,
    )


# --------------------------------------------------------------------------------------------------
# The asymmetric methods' own protocol: fine-tune the image encoder on the set's pixels
# --------------------------------------------------------------------------------------------------

#: ``EvaluationResult.settings["protocol"]`` of :func:`evaluate_pairs`: fresh heads on frozen-encoder features.
FROZEN_ENCODER = "frozen_encoder"
#: ``EvaluationResult.settings["protocol"]`` of :func:`evaluate_finetuned`: the image encoder is fine-tuned.
FINETUNE_ENCODER = "finetune_encoder"


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


@dataclass
class FinetunedModel:
    """What :func:`finetune_image_encoder` returns (the fields of :class:`TrainedHeads`, plus the encoder).

    ``image_encoder`` and ``heads`` hold the best-by-validation state (else the final one), in eval mode;
    ``heads.image_head`` is an ``nn.Identity`` unless an image head was trained.
    """

    image_encoder: torch.nn.Module
    heads: RetrievalHeads
    best_epoch: int
    history: list[dict[str, Any]]
    train_loss: list[float]
    diverged_epoch: int | None = None


def _encoder_network(image_encoder: torch.nn.Module) -> torch.nn.Module:
    """The network to copy: a FrozenImageEncoder's unfolded ``model`` (what the experts and the student train)."""
    return getattr(image_encoder, "model", image_encoder)


@torch.no_grad()
def embed_image_split(image_encoder: torch.nn.Module, heads: RetrievalHeads, split: ImageSplit, *,
                      batch_size: int = 256, chunk_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of a split for a model whose image encoder is trained: ``(image [M, d], text [C, d])``.

    Images go through ``image_encoder`` (in batches of ``batch_size``, without gradients) and then
    ``heads.image_head`` (the identity for the released asymmetric student); captions are the cached caption
    features through ``heads.text_head``. Both modules are run in eval mode and their modes restored.
    """
    modes = image_encoder.training, heads.training
    image_encoder.eval()
    heads.eval()
    device = next(heads.text_head.parameters()).device
    try:
        pixels = split.pixels()
        feats = torch.cat([image_encoder(pixels[i:i + batch_size].to(device)).float()
                           for i in range(0, len(pixels), batch_size)])
        images = heads.image_head(feats)
        captions = split.features.caption_features
        texts = torch.cat([heads.text_head(captions[i:i + chunk_size].to(device).float())
                           for i in range(0, len(captions), chunk_size)])
        return images, texts
    finally:
        image_encoder.train(modes[0])
        heads.train(modes[1])


def _image_split_metrics(image_encoder, heads, split: ImageSplit, temperature: float, batch_size: int):
    image_embeds, text_embeds = embed_image_split(image_encoder, heads, split, batch_size=batch_size)
    if not (bool(torch.isfinite(image_embeds).all()) and bool(torch.isfinite(text_embeds).all())):
        return dict.fromkeys(METRIC_NAMES, 0.0), image_embeds, text_embeds
    scores = similarity_logits(image_embeds, text_embeds, temperature)
    return retrieval_metrics(scores, split.features.caption_to_image), image_embeds, text_embeds


def finetune_image_encoder(
    train: PixelPairSet,
    image_encoder: torch.nn.Module,
    *,
    embed_dim: int | None = None,
    image_head: bool = False,
    loss: str = "wbce",
    lr: float | None = None,
    lr_img: float | None = None,
    lr_txt: float | None = None,
    epochs: int = 100,
    decay_epoch: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    temperature: float = 0.07,
    dropout: float = 0.1,
    eval_epochs: Sequence[int] | None = None,
    validation: ImageSplit | None = None,
    callback: Callable[[int, torch.nn.Module, RetrievalHeads], dict[str, Any] | None] | None = None,
    encode_batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> FinetunedModel:
    """Fine-tune a copy of the image encoder and a fresh text head on a set of pixel pairs (LoRS / MTT-VL).

    The asymmetric methods' own evaluation protocol, as their released ``epoch.py`` runs it
    (``evaluate_synset_with_similarity``, LoRS Algorithm 2): a *trainable copy* of ``image_encoder`` (a
    FrozenImageEncoder, whose unfolded ``model`` is copied, or any module mapping pixels to features; the
    original is not changed) and a fresh text head (and a fresh image head only with ``image_head=True``, the
    ablation's layout) are trained on ``train``'s pixels and text embeddings with SGD, momentum 0.9, weight
    decay 5e-4, the encoder (and image head) at ``lr_img`` and the text head at ``lr_txt`` (default: the set's
    learned η; ``lr`` sets both), ×0.1 from ``decay_epoch`` (default ``epochs // 2 + 1``), batch 128, wBCE
    against ``S[I][:, I]`` (identity when S is None) or InfoNCE, logits = cosine / ``temperature``. Without an
    image head the image embedding is the encoder's pooled feature, so ``embed_dim`` (default) is its width.

    BatchNorm: the encoder copy runs in **eval mode** throughout, i.e. with the pretrained running statistics
    (not updated) while its convolutions and BatchNorm affine weights are trained, and without its dropout /
    drop-path. That is the function the experts trained (``ExpertModel.train``) and the distillation student
    unrolled, so the pixels are judged by the model they were optimised for; training-mode BatchNorm would
    replace the pretrained statistics with those of ≤ 128 synthetic images. The released code calls
    ``net.train()``, which for its NFNet encoder (no BatchNorm, no drop-path by default) is the same function.
    The heads' dropout is active while training, as there.

    Evaluation epochs, the ``callback(epoch, image_encoder, heads)`` and the best-by-validation selection work as
    in :func:`train_heads`; ``validation`` is an :class:`ImageSplit` whose images are encoded by the encoder
    being trained (``encode_batch_size`` at a time, without gradients). Randomness comes from ``seed`` only; the
    global RNG state is restored afterwards.
    """
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {list(_LOSSES)}, got {loss!r}")
    if not isinstance(train, PixelPairSet):
        raise TypeError(f"train must be a PixelPairSet (the set's pixels), got {type(train).__name__}")
    if train.similarity is not None and loss == "infonce":
        raise ValueError("the PixelPairSet has a soft similarity S but loss='infonce' ignores it; use loss='wbce' "
                         "or drop the similarity")
    if epochs < 0 or batch_size < 1 or encode_batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch sizes >= 1, got {epochs}, {batch_size}, {encode_batch_size}")
    lr_img, lr_txt = _resolve_lrs(train, lr, lr_img, lr_txt)
    decay_epoch = epochs // 2 + 1 if decay_epoch is None else decay_epoch
    eval_epochs = _default_eval_epochs(epochs) if eval_epochs is None else tuple(sorted(set(eval_epochs)))
    if any(e < 0 or e > epochs for e in eval_epochs):
        raise ValueError(f"eval_epochs must lie in 0..{epochs}, got {list(eval_epochs)}")
    device = torch.device(train.pixel_values.device if device is None else device)
    pixels, texts = train.pixel_values.to(device), train.text_features.to(device)
    similarity = None if train.similarity is None else train.similarity.to(device)
    generator = torch.Generator().manual_seed(seed)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        encoder = copy.deepcopy(_encoder_network(image_encoder)).to(device).eval()
        for p in encoder.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            feature_dim = encoder(pixels[:1]).shape[-1]
        embed_dim = feature_dim if embed_dim is None else embed_dim
        heads = RetrievalHeads(feature_dim, texts.shape[-1], embed_dim, dropout=dropout,
                               image_head=image_head).to(device)
        optimizer = torch.optim.SGD(
            [{"params": [*encoder.parameters(), *heads.image_head.parameters()], "lr": lr_img},
             {"params": heads.text_head.parameters(), "lr": lr_txt}],
            lr=lr_img, momentum=momentum, weight_decay=weight_decay,
        )
        base_lrs = [lr_img, lr_txt]

        history: list[dict[str, Any]] = []
        train_loss: list[float] = []
        best_score, best_epoch, best_state = float("-inf"), epochs, None
        diverged_epoch = None

        def evaluate(epoch: int) -> None:
            nonlocal best_score, best_epoch, best_state
            entry: dict[str, Any] = {"epoch": epoch, "validation": None}
            if validation is not None:
                entry["validation"] = _image_split_metrics(encoder, heads, validation, temperature,
                                                           encode_batch_size)[0]
                if entry["validation"]["r_mean"] > best_score:
                    best_score, best_epoch = entry["validation"]["r_mean"], epoch
                    best_state = (copy.deepcopy(encoder.state_dict()), copy.deepcopy(heads.state_dict()))
            if callback is not None:
                entry.update(callback(epoch, encoder, heads) or {})
            history.append(entry)

        if 0 in eval_epochs:
            evaluate(0)
        for epoch in tqdm(range(1, epochs + 1), desc="fine-tune encoder", leave=False, disable=not progress):
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * (0.1 if epoch >= decay_epoch else 1.0)
            if diverged_epoch is None:
                heads.train()
                encoder.eval()  # BatchNorm statistics stay the pretrained ones (see the docstring)
                total, count = 0.0, 0
                order = torch.randperm(len(train), generator=generator).to(device)
                for start in range(0, len(train), batch_size):
                    idx = order[start:start + batch_size]
                    logits = similarity_logits(*heads(encoder(pixels[idx]), texts[idx]), temperature)
                    targets = None if similarity is None else similarity[idx][:, idx]
                    batch_loss = _batch_loss(loss, logits, targets)
                    optimizer.zero_grad(set_to_none=True)
                    batch_loss.backward()
                    optimizer.step()
                    total += float(batch_loss.detach()) * len(idx)
                    count += len(idx)
                train_loss.append(total / max(count, 1))
                if not np.isfinite(train_loss[-1]):
                    diverged_epoch = epoch
                    warnings.warn(f"encoder fine-tuning diverged at epoch {epoch} (loss {train_loss[-1]}); lr_img="
                                  f"{lr_img}, lr_txt={lr_txt} are too large. Training stops; later evaluations "
                                  "score 0.", RuntimeWarning, stacklevel=2)
            if epoch in eval_epochs:
                evaluate(epoch)

    if best_state is not None:
        encoder.load_state_dict(best_state[0])
        heads.load_state_dict(best_state[1])
    encoder.eval()
    heads.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return FinetunedModel(image_encoder=encoder, heads=heads,
                          best_epoch=best_epoch if validation is not None else epochs, history=history,
                          train_loss=train_loss, diverged_epoch=diverged_epoch)


def evaluate_finetuned(
    train: PixelPairSet,
    image_encoder: torch.nn.Module,
    validation: ImageSplit,
    test: ImageSplit,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    embed_dim: int | None = None,
    image_head: bool = False,
    loss: str = "wbce",
    lr: float | None = None,
    lr_img: float | None = None,
    lr_txt: float | None = None,
    epochs: int = 100,
    decay_epoch: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    temperature: float = 0.07,
    dropout: float = 0.1,
    eval_epochs: Sequence[int] | None = None,
    encode_batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """The asymmetric methods' own protocol over seeds: fine-tune encoder + text head, select on validation.

    :func:`finetune_image_encoder` per seed (same arguments, see there), scored on ``validation`` and ``test``
    (:class:`ImageSplit`: image embeddings are the fine-tuned encoder's features of the split's images, text
    embeddings the text head on the cached caption features) at every ``eval_epochs`` entry; the reported
    numbers are those of the best validation epoch, in the same :class:`EvaluationResult` shape as
    :func:`evaluate_pairs`, with ``settings["protocol"] = "finetune_encoder"``. Call it with a distilled set's
    ``PixelPairSet(syn.images, syn.text_embeddings, S, lr_img=η_img, lr_txt=η_txt)`` and the frozen encoder it
    was distilled with.
    """
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    settings = {
        "protocol": FINETUNE_ENCODER, "image_head": image_head, "encoder_batchnorm": "eval (pretrained statistics)",
        "embed_dim": embed_dim, "loss": loss, "lr": lr, "lr_img": lr_img, "lr_txt": lr_txt, "epochs": epochs,
        "decay_epoch": decay_epoch, "momentum": momentum, "weight_decay": weight_decay, "batch_size": batch_size,
        "temperature": temperature, "dropout": dropout,
        "eval_epochs": None if eval_epochs is None else list(eval_epochs), "seeds": list(seeds),
        "num_train_pairs": len(train), "train_kind": "pixels",
    }
    # The learning rates actually used (the set's learned η unless lr / lr_img / lr_txt were given).
    settings["encoder_lr"], settings["text_head_lr"] = _resolve_lrs(train, lr, lr_img, lr_txt)

    def test_callback(epoch: int, encoder: torch.nn.Module, heads: RetrievalHeads) -> dict[str, Any]:
        metrics, image_embeds, text_embeds = _image_split_metrics(encoder, heads, test, temperature,
                                                                  encode_batch_size)
        return {"test": metrics, "diagnostics": modality_diagnostics(image_embeds, text_embeds)}

    results = []
    for seed in tqdm(seeds, desc="seeds", leave=False, disable=not progress):
        trained = finetune_image_encoder(
            train, image_encoder, embed_dim=embed_dim, image_head=image_head, loss=loss, lr=lr, lr_img=lr_img,
            lr_txt=lr_txt, epochs=epochs, decay_epoch=decay_epoch, momentum=momentum, weight_decay=weight_decay,
            batch_size=batch_size, temperature=temperature, dropout=dropout, eval_epochs=eval_epochs,
            validation=validation, callback=test_callback, encode_batch_size=encode_batch_size, seed=seed,
            device=device, progress=progress,
        )
        settings["embed_dim"] = trained.heads.text_head.fc.out_features  # resolved (the encoder's width by default)
        results.append(_seed_result(seed, trained))
    return EvaluationResult(seeds=results, settings=settings)


# --------------------------------------------------------------------------------------------------
# Modality collapse measured on a set of pairs itself
# --------------------------------------------------------------------------------------------------


@dataclass
class ReferenceDiagnostics:
    """Sim / Gap of a set of pairs' own embeddings under one fixed reference model (RepBlend Figs. 1-2).

    METHOD.md, "Diagnostics of modality collapse": the paper measures the intra-modal similarity and
    the modality gap of the *distilled pairs*, not of real data seen through heads trained on them. Here
    the pairs' image-encoder features and text embeddings go through ``heads``, heads trained once on the
    full training data (so every set is seen through the same function), and
    :func:`modality_diagnostics` is taken over the N resulting embeddings. ``real_subset`` holds the
    same numbers for a random real subset of the same size: what an undistilled set looks like.
    """

    heads: RetrievalHeads
    real_subset: dict[str, float] = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, pairs: PairSet) -> dict[str, float]:
        """``{"sim_image", "sim_text", "gap"}`` of ``pairs`` under the reference heads."""
        was_training = self.heads.training
        self.heads.eval()
        device = next(self.heads.parameters()).device
        try:
            image, text = self.heads(pairs.image_features.to(device), pairs.text_features.to(device))
        finally:
            self.heads.train(was_training)
        return modality_diagnostics(image, text)
