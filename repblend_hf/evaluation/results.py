"""What an evaluation over seeds returns: one :class:`SeedResult` per seed, gathered in an :class:`EvaluationResult`.

Both protocols fill the same shape: :func:`~repblend_hf.evaluation.evaluate_pairs` (fresh heads on frozen-encoder
features, ``settings["protocol"] = FROZEN_ENCODER``) and :func:`~repblend_hf.evaluation.evaluate_finetuned` (the
asymmetric methods' own protocol, ``FINETUNE_ENCODER``). This module imports neither, so each protocol builds on it
without importing the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["FROZEN_ENCODER", "FINETUNE_ENCODER", "SeedResult", "EvaluationResult", "TrainingRun", "seed_result"]

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


class TrainingRun(Protocol):
    """What one seed's training leaves behind for :func:`seed_result`: a ``TrainedHeads`` or a ``FinetunedModel``."""

    best_epoch: int
    history: list[dict[str, Any]]
    train_loss: list[float]
    diverged_epoch: int | None


def seed_result(seed: int, trained: TrainingRun) -> SeedResult:
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
