"""How fresh heads are trained and scored on a set of pairs: :class:`EvaluationProtocol`, one value for every caller.

METHOD.md, "Evaluation protocol". :func:`~repblend_hf.evaluation.train_heads`,
:func:`~repblend_hf.evaluation.evaluate_pairs`, :func:`~repblend_hf.evaluation.finetune_image_encoder` and
:func:`~repblend_hf.evaluation.evaluate_finetuned` all take one; the keyword spelling (``lr=0.1, epochs=30``)
they still accept is a change of that value, so the recipe and its defaults are written down here once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EvaluationProtocol:
    """The training recipe of the evaluation protocol (LoRS Algorithm 2, ``evaluate_synset_with_similarity``).

    SGD with momentum 0.9 and weight decay 5e-4, a separate lr per head, ×0.1 from ``decay_epoch`` (default
    ``epochs // 2 + 1``, epoch 51 of 100; larger than ``epochs`` disables the decay), batch 128, τ = 0.07, the
    heads' dropout 0.1 active while training, evaluations at ``eval_epochs`` (default six evenly spaced: 0, 20,
    …, 100). Learning rates: ``lr_img`` / ``lr_txt`` if given, else ``lr`` for both heads, else the set's learned
    η. ``use_augmented_views`` only concerns full-split training (one random augmented view per image per epoch).
    """

    loss: str = "wbce"
    lr: float | None = None
    lr_img: float | None = None
    lr_txt: float | None = None
    epochs: int = 100
    decay_epoch: int | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    temperature: float = 0.07
    dropout: float = 0.1
    eval_epochs: Sequence[int] | None = None
    use_augmented_views: bool = True

    def __post_init__(self):
        if self.eval_epochs is not None:  # a tuple, so that the frozen value stays hashable and unchanged
            object.__setattr__(self, "eval_epochs", tuple(self.eval_epochs))

    def replace(self, **changes: Any) -> EvaluationProtocol:
        """A copy with ``changes`` (field names of this class) applied; ``None`` values are changes too."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"{unknown} are not settings of the evaluation protocol; its settings are "
                            f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes) if changes else self

    def settings(self) -> dict[str, Any]:
        """The recipe as ``results.json`` records it (``EvaluationResult.settings``), in that order.

        ``use_augmented_views`` is left out: it is recorded by the protocol that reads it
        (:func:`~repblend_hf.evaluation.evaluate_pairs`), not by the fine-tuned-encoder one.
        """
        return {
            "loss": self.loss, "lr": self.lr, "lr_img": self.lr_img, "lr_txt": self.lr_txt, "epochs": self.epochs,
            "decay_epoch": self.decay_epoch, "momentum": self.momentum, "weight_decay": self.weight_decay,
            "batch_size": self.batch_size, "temperature": self.temperature, "dropout": self.dropout,
            "eval_epochs": None if self.eval_epochs is None else list(self.eval_epochs),
        }


def resolve_protocol(protocol: EvaluationProtocol | None, overrides: dict[str, Any]) -> EvaluationProtocol:
    """``protocol`` (default :class:`EvaluationProtocol`) with the keyword ``overrides`` a caller passed."""
    if protocol is not None and not isinstance(protocol, EvaluationProtocol):
        raise TypeError(f"protocol must be an EvaluationProtocol, got {type(protocol).__name__}")
    return (protocol or EvaluationProtocol()).replace(**overrides)
