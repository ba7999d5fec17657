"""repblend_hf: RepBlend multimodal dataset distillation, Hugging Face native.

The public names below are the library's API; ``repblend_hf.trainers`` holds the Trainer subclasses.
"""

from .configuration import RepBlendConfig
from .coresets import CoresetSelection, select_coreset
from .data import load_image_text_dataset
from .encoders import FrozenImageEncoder, FrozenTextEncoder, load_image_encoder, load_text_encoder
from .evaluation import EvaluationProtocol, PairSet, evaluate_pairs, train_heads
from .features import FeatureSplit, encode_dataset
from .losses import info_nce, trajectory_matching_loss, weighted_bce
from .metrics import modality_diagnostics, retrieval_metrics
from .modeling import ProjectionHead, RetrievalHeads
from .similarity import build_similarity
from .synthetic import SyntheticSet
from .training_args import DistillationArguments, ExpertTrainingArguments
from .trajectories import ExpertTrajectories
from .version import __version__

__all__ = [
    "__version__",
    "RepBlendConfig",
    "DistillationArguments",
    "ExpertTrainingArguments",
    "SyntheticSet",
    "ExpertTrajectories",
    "load_image_text_dataset",
    "load_image_encoder",
    "load_text_encoder",
    "FrozenImageEncoder",
    "FrozenTextEncoder",
    "encode_dataset",
    "FeatureSplit",
    "retrieval_metrics",
    "modality_diagnostics",
    "train_heads",
    "evaluate_pairs",
    "EvaluationProtocol",
    "PairSet",
    "select_coreset",
    "CoresetSelection",
    "build_similarity",
    "info_nce",
    "weighted_bce",
    "trajectory_matching_loss",
    "ProjectionHead",
    "RetrievalHeads",
]


def __getattr__(name: str):
    # The trainers import transformers.Trainer (heavy); load them on first use only.
    if name in ("DistillationTrainer", "ExpertTrainer", "train_experts"):
        from . import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module 'repblend_hf' has no attribute {name!r}")
