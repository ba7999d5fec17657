"""Checks that run before the long work: arguments against each other, against the data, the disk and checkpoints.

Encoding every split, training the experts and distilling take minutes to hours; an input that can be
judged before them is judged here, and the error names the problem and the setting that fixes it
(STYLE.md, "Errors say what was wrong and what to set"). ``repblend-distill`` calls
:func:`check_distill_run` first and :func:`check_distill_data` right after loading the dataset (before
encoding); ``repblend-evaluate`` does the same with :func:`check_evaluate_run` /
:func:`check_evaluate_data`. The checkpoint helpers these call are :mod:`repblend_hf.checkpoints`.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import PartialState
from safetensors import safe_open

from .checkpoints import (
    _expected_set_shapes,
    check_output_dir,
    check_resume,
    checkpoint_shapes,
    state_shapes_mismatch,
)
from .configuration import RepBlendConfig
from .stages import plan_stages, stage_epochs
from .synthetic import SyntheticSet
from .trajectories import ExpertTrajectories, expert_filename

__all__ = [
    "BASELINES",
    "check_expert_files",
    "check_distill_run",
    "check_distill_data",
    "check_evaluate_run",
    "check_evaluate_data",
]

logger = logging.getLogger(__name__)

#: What ``--baselines`` of repblend-distill accepts: the coreset methods and the full data.
BASELINES = ("random", "herding", "kcenter", "full")


class _Problems:
    """Collects every problem found, so that one run of the checks reports all of them at once."""

    def __init__(self):
        self.messages: list[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.messages.append(message)

    def raise_if_any(self, what: str) -> None:
        if len(self.messages) == 1:
            raise ValueError(self.messages[0])
        if self.messages:
            listed = "\n".join(f"  - {m}" for m in self.messages)
            raise ValueError(f"{len(self.messages)} problems with {what}:\n{listed}")


def _finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_expert_files(directory: str | os.PathLike) -> None:
    """Every ``expert_*.safetensors`` in ``directory`` must be readable; a damaged one is named with the fix."""
    for index in ExpertTrajectories.completed_experts(directory):
        path = Path(directory) / expert_filename(index)
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name).get_shape()
        except Exception as err:  # SafetensorError, OSError
            raise ValueError(f"expert file {path} is unreadable ({type(err).__name__}: {err}); it is truncated or "
                             "damaged. Delete it and run again: only that expert is retrained") from err


# ----- examples/distill.py -------------------------------------------------------------------------------------


def _check_baselines(problems: _Problems, baselines: str) -> None:
    for name in filter(None, (b.strip() for b in baselines.split(","))):
        close = difflib.get_close_matches(name, BASELINES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.check(name in BASELINES, f"unknown baseline {name!r} in --baselines{hint}; choose from "
                                          f"{', '.join(BASELINES)}, comma-separated ('' for none)")


def _image_feature_dim(name: str) -> int | None:
    """The pooled feature width of timm model ``name``, built on the meta device (no weights); None if unknown."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            return int(timm.create_model(name, pretrained=False, num_classes=0).num_features)
    except Exception:  # noqa: BLE001 - an unknown name is reported when the encoder is loaded
        return None


def check_distill_run(data_args, set_args, args) -> str | None:
    """Check a distillation run's arguments, output dir, experts folder and checkpoint before anything is encoded.

    ``data_args`` / ``set_args`` / ``args`` are examples/distill.py's DataArguments, SetArguments and
    DistillationArguments. Raises one ``ValueError`` listing every problem found; returns the checkpoint the
    run will resume from (None for a fresh start). Must be called before ``Trainer`` is built (with
    ``--overwrite_output_dir`` it deletes the old checkpoints, on the main process).
    """
    p = _Problems()
    n = set_args.num_pairs
    p.check(isinstance(n, int) and n >= 1, f"num_pairs must be >= 1, got {n}; set --num_pairs to the number of "
                                           "synthetic pairs (e.g. 99)")
    if args.similarity == "lowrank" and isinstance(n, int) and n >= 1:
        p.check(1 <= set_args.sim_rank <= n, f"sim_rank ({set_args.sim_rank}) must be in 1..num_pairs ({n}) for the "
                                             "low-rank similarity; lower --sim_rank or use --similarity full")
    p.check(set_args.embed_dim >= 1, f"embed_dim must be >= 1, got {set_args.embed_dim}")
    for name in ("temperature", "sim_alpha"):
        value = getattr(set_args, name)
        p.check(_finite_positive(value), f"{name} must be a finite number > 0, got {value}; set --{name}")
    p.check(set_args.num_experts >= 1, f"num_experts must be >= 1, got {set_args.num_experts}; set --num_experts")
    epochs = set_args.expert_train_epochs
    p.check(epochs >= 1, f"expert_train_epochs must be >= 1, got {epochs}; set --expert_train_epochs")
    latest = args.max_start_epoch - 1 + args.expert_epochs
    p.check(epochs < 1 or latest <= epochs,
            f"the latest segment ends at epoch max_start_epoch - 1 + expert_epochs = {args.max_start_epoch - 1} + "
            f"{args.expert_epochs} = {latest}, beyond the {epochs} epochs the experts are trained for; lower "
            "--max_start_epoch or --expert_epochs, or raise --expert_train_epochs")
    stages = _check_stages(p, set_args, args, epochs)
    init_epoch = getattr(args, "similarity_init_epoch", None)
    p.check(init_epoch is None or 0 <= init_epoch <= epochs,
            f"similarity_init_epoch ({init_epoch}) must be one of the experts' epochs 0..{epochs}; lower it or raise "
            "--expert_train_epochs")
    p.check(set_args.eval_seeds >= 1, f"eval_seeds must be >= 1, got {set_args.eval_seeds}; the final table needs at "
                                      "least one evaluation seed")
    p.check(set_args.full_data_seeds >= 1 or "full" not in set_args.baselines.split(","),
            f"full_data_seeds must be >= 1, got {set_args.full_data_seeds}; or leave 'full' out of --baselines")
    _check_baselines(p, set_args.baselines)
    if data_args.dataset_kwargs:
        try:
            extra = json.loads(data_args.dataset_kwargs)
            p.check(isinstance(extra, dict),
                    f"--dataset_kwargs must be a JSON object, got {data_args.dataset_kwargs!r}")
        except ValueError as err:
            p.messages.append(f"--dataset_kwargs is not valid JSON ({err}): {data_args.dataset_kwargs!r}")
    p.check(data_args.image_size >= 1, f"image_size must be >= 1, got {data_args.image_size}")
    if not p.messages:  # the remaining config checks (RepBlendConfig is what the set will be)
        try:
            RepBlendConfig(image_size=data_args.image_size, image_dim=1, text_dim=1, embed_dim=set_args.embed_dim,
                           num_pairs=n, temperature=set_args.temperature, similarity=args.similarity,
                           sim_rank=set_args.sim_rank, sim_alpha=set_args.sim_alpha, method=args.method,
                           inner_lr_img=args.lr_init, inner_lr_txt=args.lr_init)
        except ValueError as err:
            p.messages.append(str(err))
    if not p.messages and args.matching == "asymmetric" and not getattr(args, "asymmetric_image_head", False):
        width = _image_feature_dim(data_args.image_encoder)
        p.check(width is None or set_args.embed_dim == width,
                f"asymmetric matching (--method {args.method}) builds the student as the released LoRS / MTT-VL code "
                f"does: the image encoder's pooled feature is the image embedding, so the text head outputs its "
                f"width: set --embed_dim {width} ({data_args.image_encoder}'s feature width; got "
                f"{set_args.embed_dim}), or --asymmetric_image_head true for the ablation with an image head")

    out = Path(args.output_dir)
    trajectory_dir = Path(set_args.trajectory_dir or out / "experts")
    stage_dirs = [out / f"stage_{k + 1}" for k in range(len(stages))] if len(stages) > 1 else []
    for directory in [out, *stage_dirs]:
        try:
            check_output_dir(directory, resume_from_checkpoint=args.resume_from_checkpoint,
                             overwrite_output_dir=getattr(args, "overwrite_output_dir", False), remove_stale=False)
        except ValueError as err:
            p.messages.append(str(err))
    finished = [d / "synthetic_set" for d in stage_dirs if (d / "synthetic_set").is_dir()]
    if finished and args.resume_from_checkpoint is None and not getattr(args, "overwrite_output_dir", False):
        names = ", ".join(map(str, finished))
        p.messages.append(f"--output_dir {out} holds the finished stages of an earlier run ({names}); pass "
                          "--resume_from_checkpoint latest to continue that run, or --overwrite_output_dir true to "
                          "start over and delete them (or choose another --output_dir)")
    if stage_dirs and args.resume_from_checkpoint not in (None, "latest"):
        p.messages.append(f"a run in stages resumes each stage from its own folder: pass --resume_from_checkpoint "
                          f"latest, not {args.resume_from_checkpoint}")
    if trajectory_dir.exists() and not trajectory_dir.is_dir():
        p.messages.append(f"--trajectory_dir {trajectory_dir} is a file, not a directory; pass a directory")
    elif trajectory_dir.is_dir():
        try:
            check_expert_files(trajectory_dir)
        except ValueError as err:
            p.messages.append(str(err))
    resume = None
    if not p.messages and not stage_dirs:
        try:
            resume = check_resume(out, args.resume_from_checkpoint)
        except ValueError as err:
            p.messages.append(str(err))
    if resume is not None:
        expected = _expected_set_shapes(n, data_args.image_size, args.similarity, set_args.sim_rank,
                                        set_args.sim_alpha, getattr(set_args, "synthetic_space", "pixels"))
        mismatch = state_shapes_mismatch(checkpoint_shapes(resume), expected,
                                         {"text_embeddings": [1], "image_features": [1]})
        if mismatch:
            p.messages.append(f"{resume} was made with other settings than this run ({'; '.join(mismatch)}); resume "
                              "with that run's --num_pairs, --image_size, --synthetic_space, --similarity and "
                              "--sim_rank, or start over with --overwrite_output_dir true or another --output_dir")
    p.raise_if_any("the arguments")
    if args.resume_from_checkpoint is None and getattr(args, "overwrite_output_dir", False):
        state = PartialState()
        if state.is_main_process:
            for directory in [out, *stage_dirs]:
                check_output_dir(directory, overwrite_output_dir=True)
            for path in finished:
                logger.warning("--overwrite_output_dir: deleting %s of an earlier run", path)
                shutil.rmtree(path)
        state.wait_for_everyone()
    return resume


def _check_stages(p: _Problems, set_args, args, expert_train_epochs: int) -> list:
    """The run's stages (``--stage_pairs`` and the per-stage options), each problem added to ``p``."""
    if not isinstance(set_args.num_pairs, int) or set_args.num_pairs < 1:
        return []  # already reported
    try:
        stages = plan_stages(set_args.num_pairs, getattr(set_args, "stage_pairs", None), max_steps=args.max_steps,
                             max_start_epoch=args.max_start_epoch, stage_steps=args.stage_steps,
                             stage_min_start_epoch=args.stage_min_start_epoch,
                             stage_max_start_epoch=args.stage_max_start_epoch, shortcut_epoch=args.shortcut_epoch)
    except ValueError as err:
        p.messages.append(str(err))
        return []
    if len(stages) > 1:
        p.check(args.matching == "symmetric",
                "--stage_pairs distils a set in stages for the symmetric student (RepBlend's heads); the asymmetric "
                "methods (LoRS / MTT-VL) evaluate by fine-tuning the encoder, which has no staged protocol here: drop "
                "--stage_pairs or use --method repblend")
    for stage in stages:
        if stage.index == 0 or args.stage_targets == "experts":
            needed = stage_epochs(stage, args.expert_epochs)
            p.check(expert_train_epochs < 1 or needed <= expert_train_epochs,
                    f"stage {stage.index + 1} needs experts of {needed} epochs (its latest start "
                    f"{stage.max_start_epoch - 1} + expert_epochs {args.expert_epochs}, or its shortcut_epoch), "
                    f"beyond the {expert_train_epochs} epochs the experts are trained for; raise "
                    "--expert_train_epochs or lower the stage's window")
    return stages


def check_distill_data(dataset, set_args) -> None:
    """Check the loaded dataset (a DatasetDict, before encoding) against the run: enough images for the pairs."""
    p = _Problems()
    for split in ("train", "validation", "test"):
        p.check(len(dataset[split]) > 0, f"the {split} split of the dataset is empty; every split needs images")
    n_train = len(dataset["train"])
    p.check(set_args.num_pairs <= n_train,
            f"num_pairs={set_args.num_pairs} exceeds the {n_train} training images (the set is initialised from "
            f"real pairs); lower --num_pairs to at most {n_train}")
    p.raise_if_any("the dataset")


# ----- examples/evaluate.py ------------------------------------------------------------------------------------


def check_evaluate_run(args) -> None:
    """Check examples/evaluate.py's EvaluateArguments before the dataset is encoded: output dir, protocol, the set.

    A ``--distilled_set`` is loaded once here (local folder or Hub repo), so a missing, damaged or non-finite
    set stops before the encoding.
    """
    p = _Problems()
    p.check(args.seeds >= 1, f"--seeds must be >= 1, got {args.seeds}")
    p.check(args.pairs >= 1, f"--pairs must be >= 1, got {args.pairs}")
    p.check(args.embed_dim >= 1, f"--embed_dim must be >= 1, got {args.embed_dim}")
    if args.lr is not None:
        p.check(_finite_positive(args.lr), f"--lr must be a finite number > 0, got {args.lr}")
    if args.epochs is not None:
        p.check(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    if args.loss is not None:
        p.check(args.loss in ("infonce", "wbce"), f"--loss must be 'infonce' or 'wbce', got {args.loss!r}")
    out = Path(args.output_dir)
    try:
        check_output_dir(out)
    except ValueError as err:
        p.messages.append(str(err))
    if not p.messages and args.method == "distilled":
        path = args.distilled_set
        try:
            SyntheticSet.from_pretrained(path) if Path(path).is_dir() else SyntheticSet.from_hub(path)
        except (ValueError, OSError) as err:  # not a set, damaged, non-finite, or no such folder / repo
            where = "" if Path(path).is_dir() else "no such local folder, and as a Hub dataset repo: "
            p.messages.append(f"--distilled_set {path}: {where}{type(err).__name__}: {err}")
    p.raise_if_any("the arguments")


def check_evaluate_data(dataset, args) -> None:
    """Check the loaded dataset against examples/evaluate.py's arguments: a coreset needs enough images."""
    n_train = len(dataset["train"])
    if args.method in ("random", "herding", "kcenter") and args.pairs > n_train:
        raise ValueError(f"--pairs {args.pairs} exceeds the {n_train} training images; lower --pairs to at most "
                         f"{n_train} (or use --method full)")
