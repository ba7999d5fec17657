"""The trajectories a stage of a set distilled in stages matches (:mod:`repblend_hf.stages`).

The experts themselves (the first stage, and later ones with ``--stage_targets experts``, PTM-ST), or experts
conditioned on the earlier stages (``--stage_targets conditioned``, PDD: :func:`~.expert_trainer.
train_conditioned_experts`), each straightened into its shortcut line when the stage has a ``shortcut_epoch``
(PTM-ST's ``convexify.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..configuration import RepBlendConfig
from ..distillation import student_heads
from ..evaluation import EvaluationProtocol
from ..features import FeatureSplit
from ..modeling import branch_tensor_sizes
from ..stages import Stage, shortcut_trajectories, stage_epochs
from ..synthetic import SyntheticSet
from ..training_args import DistillationArguments, ExpertTrainingArguments
from ..trajectories import ExpertTrajectories
from .expert_trainer import train_conditioned_experts

__all__ = ["stage_targets"]

# What conditioned experts copy from the experts' metadata (the rest is theirs: the set they start from, ...).
_PROVENANCE = ("dataset", "image_encoder", "text_encoder", "image_size")


def stage_targets(stage: Stage, config: RepBlendConfig, trajectories: ExpertTrajectories,
                  previous: SyntheticSet | None, train: FeatureSplit, image_encoder,
                  expert_args: ExpertTrainingArguments, args: DistillationArguments,
                  stage_dir: str | Path) -> ExpertTrajectories:
    """The trajectories ``stage`` matches.

    ``trajectories`` are the run's experts; ``previous`` the set of the earlier stages (None for the first stage).
    With ``args.stage_targets == "conditioned"`` a later stage trains its own experts into ``stage_dir/experts``
    (reused when complete): each starts from heads trained on ``previous`` by the evaluation protocol (stage by
    stage) and trains ``stage_epochs`` epochs on ``train`` with ``expert_args``' recipe. ``image_encoder`` encodes a
    pixel set's images for that (and is the asymmetric student's encoder for a shortcut's tensor sizes).
    """
    stage_dir = Path(stage_dir)
    if stage.index > 0 and args.stage_targets == "conditioned":
        pairs = previous.pair_set(image_encoder, args.lr_min, args.lr_max,
                                  with_similarity=args.distill_loss == "wbce")
        protocol = EvaluationProtocol(loss=args.distill_loss, epochs=args.eval_head_epochs,
                                      temperature=previous.config.temperature)
        run_args = dataclasses.replace(expert_args, output_dir=str(stage_dir / "expert_runs"),
                                       num_train_epochs=stage_epochs(stage, args.expert_epochs))
        provenance = {k: v for k, v in trajectories.metadata.items() if k in _PROVENANCE}
        trajectories = train_conditioned_experts(train, pairs, protocol, run_args, str(stage_dir / "experts"),
                                                 metadata={**provenance, "conditioned_on": previous.fingerprint(),
                                                           "conditioned_stages": len(previous.config.stages)})
    if stage.shortcut_epoch is not None:
        encoder = image_encoder.model if config.matching == "asymmetric" else None
        trajectories = shortcut_trajectories(trajectories, stage.shortcut_epoch,
                                             branch_tensor_sizes(student_heads(config), encoder))
    return trajectories
