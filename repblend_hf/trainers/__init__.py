"""Trainers: ``transformers.Trainer`` subclasses for the expert and distillation stages."""

from .distillation_trainer import DistillationTrainer, NonFiniteError
from .expert_trainer import ExpertModel, ExpertTrainer, train_conditioned_experts, train_experts
from .stage_targets import stage_targets

__all__ = ["DistillationTrainer", "NonFiniteError", "ExpertModel", "ExpertTrainer", "train_experts",
           "train_conditioned_experts", "stage_targets"]
