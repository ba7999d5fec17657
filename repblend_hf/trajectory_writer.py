"""TrajectoryWriter: expert trajectories recorded epoch by epoch, each expert written atomically when complete.

METHOD.md, "Expert trajectories"; the layout on disk is :mod:`repblend_hf.trajectories`'.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._trajectory_files import _prepare_directory, _write_expert_file, expert_filename
from .trajectories import ExpertTrajectories

__all__ = ["TrajectoryWriter"]


class TrajectoryWriter:
    """Records experts epoch by epoch and writes each one atomically when its last epoch arrives.

    METHOD.md, "Expert trajectories". An expert trainer calls ``record(expert_idx, epoch,
    {branch: flat})`` for epochs 0 (before training), 1, ..., T in order; after epoch T the expert's
    snapshots go to ``expert_XXX.safetensors`` (temporary file, then ``os.replace``) and leave RAM.
    Until then they are held in memory only, so a killed run leaves no file for an unfinished expert
    and a resumed run (same directory, same metadata) skips :attr:`completed` experts. Several
    processes may write different experts into the same directory.
    """

    def __init__(self, directory: str | os.PathLike, metadata: Mapping[str, Any]):
        self.directory = Path(directory)
        self._layout = ExpertTrajectories(metadata)  # validates the metadata; holds no expert
        self.metadata = _prepare_directory(self.directory, self._layout.metadata)
        self._pending: dict[int, list[dict[str, torch.Tensor]]] = {}

    @property
    def completed(self) -> list[int]:
        """Indices of the experts already written to the directory (by this or an earlier run)."""
        return ExpertTrajectories.completed_experts(self.directory)

    @property
    def pending(self) -> dict[int, int]:
        """Experts being recorded: ``{expert_idx: number of snapshots recorded so far}``."""
        return {i: len(s) for i, s in self._pending.items()}

    def record(self, expert_idx: int, epoch: int, snapshots: Mapping[str, torch.Tensor]) -> Path | None:
        """Record one expert's flat parameters ``{branch: [P_branch]}`` after ``epoch`` (0 = before training).

        METHOD.md, "Expert trajectories". Epochs must arrive in order 0..T. Returns the file written
        when ``epoch`` is the last one (T), else ``None``.
        """
        if isinstance(expert_idx, bool) or not isinstance(expert_idx, int) or expert_idx < 0:
            raise ValueError(f"expert_idx must be an int >= 0, got {expert_idx!r}")
        if (self.directory / expert_filename(expert_idx)).exists():
            raise ValueError(f"expert {expert_idx} is already complete in {self.directory}; skip the experts in "
                             "TrajectoryWriter.completed when resuming, or use a new output directory")
        expected_epoch = len(self._pending.get(expert_idx, []))
        if epoch != expected_epoch:
            raise ValueError(f"expert {expert_idx}: got epoch {epoch} but expected epoch {expected_epoch}; record "
                             f"epochs 0 (before training) .. {self._layout.num_epochs} in order")
        if set(snapshots) != set(self._layout.branches):
            raise ValueError(f"snapshots name branches {sorted(snapshots)} but the trajectories store "
                             f"{list(self._layout.branches)}; pass one flat vector per branch of branch_sizes")
        row = {}
        for branch, size in self._layout.branch_sizes.items():
            flat = snapshots[branch]
            if flat.ndim != 1 or flat.numel() != size:
                raise ValueError(f"branch {branch!r} must be a flat vector of {size} parameters, got shape "
                                 f"{tuple(flat.shape)}; pass flatten_parameters(head) or fix branch_sizes")
            row[branch] = flat.detach().to("cpu", torch.float32).clone()
        self._pending.setdefault(expert_idx, []).append(row)
        if epoch < self._layout.num_epochs:
            return None
        rows = self._pending.pop(expert_idx)
        stacked = {b: torch.stack([r[b] for r in rows]) for b in self._layout.branches}
        return _write_expert_file(self.directory, expert_idx, stacked, self._layout.num_epochs)

    def discard(self, expert_idx: int) -> None:
        """Drop the unfinished snapshots of ``expert_idx`` (e.g. to restart it from epoch 0)."""
        self._pending.pop(expert_idx, None)
