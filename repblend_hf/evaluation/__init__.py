"""The evaluation protocol: train fresh heads on a small set of pairs, then retrieve on a real split.

METHOD.md, "Evaluation protocol": fresh projection heads (encoders frozen, features given) are trained
on the synthetic or coreset pairs with SGD (lr = the learned η per head, momentum 0.9, weight decay
5e-4, ×0.1 halfway, batch 128, wBCE against the learned soft similarity S), and scored by image→text
and text→image recall@K on the real test split. The released code reports the best of several test
evaluations; here the epoch is selected on the validation split and the test-selected number is kept
only for comparison (:meth:`EvaluationResult.summary`).

The pieces compose: :func:`retrieval_metrics` and :func:`modality_diagnostics` are pure functions of
scores / embeddings; :class:`EvaluationProtocol` is the training recipe every function below takes;
:func:`train_heads` trains one seed; :func:`evaluate_pairs` runs the protocol
over seeds and aggregates (``settings["protocol"] = "frozen_encoder"``, the protocol shared by every set).

The asymmetric methods (LoRS, MTT-VL) are evaluated by their authors another way: the image encoder is
fine-tuned with a fresh text head on the set's *pixels* (their ``epoch.py``).
:func:`finetune_image_encoder` / :func:`evaluate_finetuned` are that protocol (``"finetune_encoder"``); its
inputs are the set as a :class:`PixelPairSet` and the real splits as :class:`ImageSplit` (images plus the
encoder's eval transform, and the cached caption features).

Modules: :mod:`.pairs` (the inputs), :mod:`.recipe` (the protocol's settings), :mod:`.heads` (training fresh
heads, scoring a split), :mod:`.results` (what either protocol returns over seeds), :mod:`.protocol` (over seeds,
diagnostics on a set itself) and :mod:`.finetune` (the asymmetric methods' protocol); the metrics themselves are
:mod:`repblend_hf.metrics`.
"""

from ..metrics import METRIC_NAMES, RECALL_KS, modality_diagnostics, retrieval_metrics
from .finetune import FinetunedModel, embed_image_split, evaluate_finetuned, finetune_image_encoder
from .heads import TrainedHeads, embed_split, score_split, train_heads
from .pairs import ImageSplit, PairSet, PixelPairSet, StagePhase
from .protocol import ReferenceDiagnostics, evaluate_pairs
from .recipe import EvaluationProtocol
from .results import FINETUNE_ENCODER, FROZEN_ENCODER, EvaluationResult, SeedResult

__all__ = [
    "RECALL_KS",
    "METRIC_NAMES",
    "retrieval_metrics",
    "modality_diagnostics",
    "PairSet",
    "StagePhase",
    "EvaluationProtocol",
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
