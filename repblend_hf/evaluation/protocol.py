"""The protocol over seeds (:func:`evaluate_pairs`), its results, and modality collapse measured on a set itself."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..features import FeatureSplit
from ..metrics import modality_diagnostics
from ..modeling import RetrievalHeads
from .heads import TrainedHeads, _split_metrics, train_heads
from .pairs import PairSet
from .recipe import EvaluationProtocol, resolve_protocol

if TYPE_CHECKING:
    from .finetune import FinetunedModel

#: ``EvaluationResult.settings["protocol"]`` of :func:`evaluate_pairs`: fresh heads on frozen-encoder features.
FROZEN_ENCODER = "frozen_encoder"
#: ``EvaluationResult.settings["protocol"]`` of :func:`evaluate_finetuned`: the image encoder is fine-tuned.
FINETUNE_ENCODER = "finetune_encoder"


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
    protocol: EvaluationProtocol | None = None,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    embed_dim: int,
    device: str | torch.device | None = None,
    progress: bool = False,
    on_trained: Callable[[int, TrainedHeads], None] | None = None,
    **overrides: Any,
) -> EvaluationResult:
    """Run the evaluation protocol over seeds: train heads, select the epoch on validation, report test.

    METHOD.md, "Evaluation protocol", with the honest selection: for each seed, :func:`train_heads`
    (same arguments, see there) evaluates validation and test at every ``eval_epochs`` entry; the
    reported test metrics and the :func:`modality_diagnostics` of the test embeddings are those of
    the epoch with the best validation r_mean. The test-selected numbers (best test r_mean, as the
    released code reports) are kept in ``test_selected_on_test`` for comparison only.

    The recipe is ``protocol`` (default :class:`EvaluationProtocol`) changed by ``overrides`` given as its
    field names. Common calls: a distilled set ``PairSet(feats, text, S, lr_img=η_img, lr_txt=η_txt)`` with
    ``loss="wbce"``; a coreset ``PairSet(*selection.pairs(split))`` with ``loss="infonce", lr=0.1``
    or ``loss="wbce"`` and a smaller lr; full data ``train=train_split, loss="infonce", lr=0.1`` and
    fewer ``epochs``. ``on_trained(seed, trained)`` sees each seed's :class:`TrainedHeads` (e.g. to keep
    its ``final_state``).
    """
    protocol = resolve_protocol(protocol, overrides)
    settings = {
        "embed_dim": embed_dim, **protocol.settings(),
        "use_augmented_views": protocol.use_augmented_views, "seeds": list(seeds),
        "num_train_pairs": len(train) if isinstance(train, PairSet) else train.num_images,
        "train_kind": "pairs" if isinstance(train, PairSet) else "full_split",
        "protocol": FROZEN_ENCODER,
    }
    if not seeds:
        raise ValueError("seeds must name at least one seed")

    def test_callback(epoch: int, heads: RetrievalHeads) -> dict[str, Any]:
        metrics, image_embeds, text_embeds = _split_metrics(heads, test, protocol.temperature)
        return {"test": metrics, "diagnostics": modality_diagnostics(image_embeds, text_embeds)}

    results = []
    for seed in tqdm(seeds, desc="seeds", leave=False, disable=not progress):
        trained = train_heads(train, protocol, embed_dim=embed_dim, validation=validation, callback=test_callback,
                              seed=seed, device=device, progress=progress)
        results.append(_seed_result(seed, trained))
        if on_trained is not None:
            on_trained(seed, trained)
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
