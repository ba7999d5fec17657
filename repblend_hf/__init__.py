"""repblend_hf: RepBlend multimodal dataset distillation, Hugging Face native."""

__version__ = "0.1.0"

from .losses import info_nce, trajectory_matching_loss, weighted_bce
from .modeling import ProjectionHead, RetrievalHeads

__all__ = [
    "__version__",
    "info_nce",
    "weighted_bce",
    "trajectory_matching_loss",
    "ProjectionHead",
    "RetrievalHeads",
]
