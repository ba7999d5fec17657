"""Trainers: ``transformers.Trainer`` subclasses for the expert and distillation stages."""

from .distillation_trainer import DistillationTrainer
from .expert_trainer import ExpertModel, ExpertTrainer, train_experts

__all__ = ["DistillationTrainer", "ExpertModel", "ExpertTrainer", "train_experts"]
