"""Checkpoints of a distillation run: which ones are intact, their tensors' shapes, the output folder and resume.

What ``--resume_from_checkpoint latest`` and the :class:`~repblend_hf.trainers.DistillationTrainer`'s resume rely on
(:func:`last_complete_checkpoint`, :func:`checkpoint_problem`, :func:`state_shapes_mismatch`), and the decisions a run
makes about an output folder that already holds checkpoints (:func:`check_output_dir`, :func:`check_resume`); the
checks of a whole run's inputs, which call these, are :mod:`repblend_hf.checks`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from safetensors import safe_open

from .similarity import build_similarity

__all__ = ["checkpoint_problem", "last_complete_checkpoint", "checkpoint_shapes", "state_shapes_mismatch",
           "check_output_dir", "check_resume"]

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` (a Trainer ``checkpoint-N`` folder) cannot be resumed from, or None when it is intact.

    Trainer writes ``trainer_state.json`` last, so a run killed while saving leaves a checkpoint without it (or
    with a truncated one). Beyond that, every file is read whole: ``model.safetensors`` must parse, and the
    ``torch.save`` files (``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``, ``training_args.bin``, zip
    archives) must pass their CRC checks, so a truncated or damaged file is named here and not in a bare
    ``SafetensorError`` / ``RuntimeError`` half-way through the resume.
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError:
        return f"{path / 'trainer_state.json'} is missing (the run stopped while saving this checkpoint)"
    except (OSError, ValueError) as err:
        return f"{path / 'trainer_state.json'} is unreadable or truncated ({err})"
    match = _CHECKPOINT.fullmatch(path.name)
    if match and state.get("global_step") != int(match.group(1)):
        return (f"{path / 'trainer_state.json'} says global_step={state.get('global_step')} but the folder is step "
                f"{match.group(1)}")
    weights = path / "model.safetensors"
    if not weights.is_file():
        return f"{weights} is missing"
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():
                f.get_slice(name).get_shape()
    except Exception as err:  # SafetensorError, OSError
        return f"{weights} is truncated or damaged ({type(err).__name__}: {err})"
    for file in sorted(path.iterdir()):
        if file.suffix not in (".pt", ".pth", ".bin"):
            continue
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"{file} is truncated or damaged ({type(err).__name__}: {err})"
        if bad is not None:
            return f"{file} is damaged (its member {bad} fails the CRC check)"
    return None


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that was written completely and is intact, or None.

    Trainer writes a checkpoint's files one after another and ``trainer_state.json`` last, so a run
    killed while saving leaves a ``checkpoint-N`` without it (or with a truncated one);
    ``transformers.trainer_utils.get_last_checkpoint`` would pick that one, this skips it. A checkpoint
    whose files are truncated or damaged (:func:`checkpoint_problem`) is skipped too,
    with a warning naming the file, so ``--resume_from_checkpoint latest`` falls back to the previous one.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in output_dir.iterdir()
                    if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))), reverse=True)
    for _, path in steps:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("skipping checkpoint %s: %s", path, problem)
    return None


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a checkpoint's ``model.safetensors`` (reads the header only)."""
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def state_shapes_mismatch(saved: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]],
                          free_dims: Mapping[str, Sequence[int]] | None = None) -> list[str]:
    """The differences between two ``{name: shape}`` maps, as readable lines (empty when they agree).

    ``free_dims`` names dimensions not to compare (e.g. ``{"text_embeddings": [1]}`` when the text encoder's
    width is not known yet).
    """
    free_dims = free_dims or {}
    lines = []
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing:
        lines.append(f"this run needs {missing}, which the checkpoint lacks")
    if extra:
        lines.append(f"the checkpoint holds {extra}, which this run does not have")
    for name in sorted(set(saved) & set(expected)):
        a, b = tuple(saved[name]), tuple(expected[name])
        free = set(free_dims.get(name, ()))
        if len(a) != len(b) or any(x != y for i, (x, y) in enumerate(zip(a, b)) if i not in free):
            lines.append(f"{name} has shape {list(a)} in the checkpoint but {list(b)} in this run")
    return lines


def _expected_set_shapes(num_pairs: int, image_size: int, similarity: str, sim_rank: int, sim_alpha: float,
                         synthetic_space: str = "pixels") -> dict[str, tuple[int, ...]]:
    """The SyntheticSet state-dict shapes a run's settings give (encoder widths left as 0: the encoders give them)."""
    sim = build_similarity(similarity, num_pairs, rank=sim_rank, alpha=sim_alpha)
    images = ({"image_features": (num_pairs, 0)} if synthetic_space == "features"
              else {"pixel_values": (num_pairs, 3, image_size, image_size)})
    return {**images, "text_embeddings": (num_pairs, 0), "log_lr_img": (), "log_lr_txt": (),
            **{f"similarity.{k}": tuple(v.shape) for k, v in sim.state_dict().items()}}


# ----- output directory and resume ----------------------------------------------------------------------------


def check_output_dir(output_dir: str | os.PathLike, *, resume_from_checkpoint: str | None = None,
                     overwrite_output_dir: bool = False, remove_stale: bool = True) -> None:
    """``output_dir`` must be a directory this process can write to; checkpoints in it need a decision.

    Without ``--resume_from_checkpoint``, checkpoints of an earlier run would be silently replaced (and the
    Trainer's rotation would delete them): that stops here, offering ``--resume_from_checkpoint latest`` or
    ``--overwrite_output_dir``. With ``overwrite_output_dir`` the old ``checkpoint-N`` folders are deleted
    (when ``remove_stale``; the other files are overwritten as the run writes them).
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file, not a directory; pass a directory path (created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"--output_dir {out} is not a writable directory ({type(err).__name__}: {err}); pass a "
                         "directory you can write to") from err
    checkpoints = sorted((p for p in out.iterdir() if p.is_dir() and _CHECKPOINT.fullmatch(p.name)),
                         key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints or resume_from_checkpoint is not None:
        return
    names = ", ".join(p.name for p in checkpoints)
    if not overwrite_output_dir:
        raise ValueError(f"--output_dir {out} already holds checkpoints of an earlier run ({names}); starting from "
                         "scratch would replace them. Pass --resume_from_checkpoint latest to continue that run, or "
                         "--overwrite_output_dir true to start over and delete them (or choose another --output_dir)")
    if remove_stale:
        for path in checkpoints:
            logger.warning("--overwrite_output_dir: deleting %s of an earlier run", path)
            shutil.rmtree(path)


def check_resume(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> str | None:
    """The checkpoint a run will resume from (``latest``: the newest intact one), checked; None for a fresh start.

    A damaged checkpoint given by path stops here, naming the file, and offers the newest intact one; ``latest``
    skips damaged checkpoints with a warning (:func:`last_complete_checkpoint`).
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return last_complete_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {path}: no such checkpoint folder; pass 'latest' (the newest "
                         f"intact checkpoint in --output_dir) or a checkpoint-N folder")
    problem = checkpoint_problem(path)
    if problem is not None:
        intact = last_complete_checkpoint(path.parent)
        offer = (f"the newest intact checkpoint is {intact}: pass --resume_from_checkpoint latest to use it"
                 if intact else "no intact checkpoint is left in that folder: start again without "
                                "--resume_from_checkpoint (and with --overwrite_output_dir)")
        raise ValueError(f"cannot resume from {path}: {problem}; {offer}")
    return str(path)


