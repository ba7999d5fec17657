"""The on-disk layout of expert trajectories: names, the metadata file, atomic expert files (see
:mod:`repblend_hf.trajectories` for the layout itself); plumbing shared by ``ExpertTrajectories`` and
``TrajectoryWriter``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

#: Version of the on-disk layout; bump it when the layout changes incompatibly.
TRAJECTORIES_FORMAT_VERSION = 1
#: Name of the metadata file inside a trajectories directory.
TRAJECTORIES_METADATA_NAME = "trajectories.json"

_EXPERT_FILE = re.compile(r"^expert_(\d+)\.safetensors$")
# Metadata keys that may differ when a run is resumed (e.g. to add experts).
_RESUMABLE_KEYS = ("num_experts",)


def expert_filename(expert_index: int) -> str:
    """File name of one expert's snapshots inside a trajectories directory (``expert_007.safetensors``)."""
    return f"expert_{expert_index:03d}.safetensors"


def _normalise_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the required keys and return a JSON round-tripped copy with ``format_version`` set."""
    try:
        meta = json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"trajectory metadata must be JSON-serialisable (str, numbers, lists, dicts): {err}") from err
    version = meta.get("format_version", TRAJECTORIES_FORMAT_VERSION)
    if not isinstance(version, int) or version > TRAJECTORIES_FORMAT_VERSION:
        raise ValueError(f"trajectories have format_version {version!r} but this repblend_hf reads up to "
                         f"{TRAJECTORIES_FORMAT_VERSION}; upgrade repblend_hf")
    meta["format_version"] = TRAJECTORIES_FORMAT_VERSION
    sizes = meta.get("branch_sizes")
    if (not isinstance(sizes, dict) or not sizes
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes.values())):
        raise ValueError("trajectory metadata needs 'branch_sizes', a non-empty dict {branch: number of parameters} "
                         f"with positive ints, e.g. {{'image': 657920, 'text': 459264}}; got {sizes!r}")
    epochs = meta.get("num_epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"trajectory metadata needs 'num_epochs', the number of training epochs T >= 1 "
                         f"(T + 1 snapshots per expert); got {epochs!r}")
    return meta


@contextlib.contextmanager
def _open_expert(path: Path):
    """``safe_open`` that names the file when it is truncated or damaged (safetensors' own error does not)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise ValueError(f"expert file {path} is unreadable ({type(err).__name__}: {err}); it is truncated or "
                         "damaged. Delete it and run again: train_experts retrains the missing expert and keeps the "
                         "others") from err


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_expert_file(
    directory: Path, expert_index: int, snapshots: dict[str, torch.Tensor], num_epochs: int
) -> Path:
    """Write one complete expert atomically: temporary file in ``directory``, fsync, ``os.replace``."""
    path = directory / expert_filename(expert_index)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        header = {"format_version": str(TRAJECTORIES_FORMAT_VERSION), "expert_index": str(expert_index),
                  "num_epochs": str(num_epochs)}
        save_file({b: t.detach().to("cpu").contiguous() for b, t in snapshots.items()}, tmp, metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _prepare_directory(directory: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Create ``directory`` and write its metadata, refusing to mix with trajectories of other settings."""
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / TRAJECTORIES_METADATA_NAME
    if meta_path.exists():
        existing = _normalise_metadata(json.loads(meta_path.read_text()))
        keys = (set(existing) | set(metadata)) - set(_RESUMABLE_KEYS)
        differing = sorted(k for k in keys if existing.get(k) != metadata.get(k))
        if differing:
            changes = "; ".join(f"{k}: {_short(existing.get(k))} there, {_short(metadata.get(k))} now"
                                for k in differing)
            why = ""
            if "epoch_definition" in differing and existing.get("epoch_definition") is None:
                why = (" These experts were trained with the old epoch definition (one pass over the images, one "
                       "random caption each; repblend_hf < 0.2): an expert epoch is now one pass over the (image, "
                       "caption) pairs, as in the authors' code, so their segments would be ~5x too short.")
            raise ValueError(f"{directory} already holds expert trajectories made with other settings "
                             f"({changes}).{why} Delete that directory (or pass another --trajectory_dir / "
                             "--output_dir) to train new experts, or run with the settings that made them to reuse "
                             "them")
    _atomic_write_bytes(meta_path, (json.dumps(metadata, indent=2, sort_keys=False) + "\n").encode())
    return metadata


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
