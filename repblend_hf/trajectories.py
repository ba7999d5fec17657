"""Expert trajectories ("buffers"): safetensors storage, resumable writing, lazy segment sampling.

METHOD.md, "Expert trajectories" (MTT, Cazenavette et al. 2022; MTT-VL / LoRS / RepBlend): E experts
are trained on the real data and the flat parameter vector of every matched branch is saved at epoch
0 (before training) and after each of the T epochs, i.e. T + 1 snapshots per expert. Distillation
then samples a segment (an expert, a start epoch and the snapshot ``expert_epochs`` later) to match.

On disk a set of trajectories is one directory::

    trajectories.json              metadata (JSON, see below)
    expert_000.safetensors         one tensor per branch, named after it, shaped [T + 1, P_branch]
    expert_001.safetensors         ...

``trajectories.json`` holds ``format_version``, ``branch_sizes`` (``{branch: P_branch}``, in matching
order) and ``num_epochs`` (T), which are required, plus anything the expert trainer adds. By convention
it adds the head configuration and provenance under these keys, which compatibility errors quote:
``image_encoder``, ``text_encoder``, ``image_dim``, ``text_dim``, ``embed_dim``, ``dataset``,
``num_experts``. Branch names are free: RepBlend's symmetric experts store ``"image"`` and ``"text"``
(the two heads); the asymmetric LoRS / MTT-VL experts store e.g. ``"image_encoder"`` and ``"text"``.
Snapshots are stored as float32. No pickles anywhere.

Each expert file is written atomically (a temporary file in the same directory, then ``os.replace``)
once the expert is complete, so a run that is killed keeps its finished experts and leaves no
partial file; :meth:`ExpertTrajectories.completed_experts` lists them so a resumed run skips them.

Loading is lazy: :meth:`ExpertTrajectories.load` reads only the JSON and the safetensors headers;
:meth:`ExpertTrajectories.sample_segment` then reads just the two sampled rows of each branch with
``safe_open(...).get_slice``. An expert of the embedded default is ~70 MB and of the paper's
settings up to ~1.6 GB, and there are 8-20 of them, so nothing loads whole experts into RAM unless
asked (:meth:`ExpertTrajectories.expert_snapshots`). The file plumbing (names, metadata, atomic writes) is
:mod:`repblend_hf._trajectory_files`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._trajectory_files import (
    _EXPERT_FILE,
    TRAJECTORIES_FORMAT_VERSION,
    TRAJECTORIES_METADATA_NAME,
    _normalise_metadata,
    _open_expert,
    _prepare_directory,
    _write_expert_file,
    expert_filename,
)
from .hub import TrajectoriesCardData, commit_files, render_trajectories_card

__all__ = [
    "TRAJECTORIES_FORMAT_VERSION",
    "TRAJECTORIES_METADATA_NAME",
    "expert_filename",
    "TrajectorySegment",
    "ExpertTrajectories",
]

logger = logging.getLogger(__name__)

# Metadata keys quoted in compatibility errors, when present.
_PROVENANCE_KEYS = ("image_encoder", "text_encoder", "image_dim", "text_dim", "embed_dim", "dataset")


@dataclass(frozen=True, eq=False)
class TrajectorySegment:
    """One sampled piece of an expert trajectory: the start θ⁰ and the target θ* to match.

    METHOD.md, "Distillation loop", step 1 (MTT): ``start_params`` are the expert's flat branch
    parameters at ``start_epoch`` and ``target_params`` those at ``target_epoch`` =
    ``start_epoch + expert_epochs``, both ``{branch: 1-D float32 tensor}``.
    """

    expert_index: int
    start_epoch: int
    start_params: dict[str, torch.Tensor]
    target_params: dict[str, torch.Tensor]
    target_epoch: int


class ExpertTrajectories:
    """The snapshots of E experts (T + 1 per expert and branch), in memory or lazily on disk.

    METHOD.md, "Expert trajectories" (MTT buffers; RepBlend stores both heads, LoRS / MTT-VL the
    image encoder and the text head). Build one with ``ExpertTrajectories(metadata)`` and
    :meth:`add_expert`, then :meth:`save`; or write experts epoch by epoch with
    :class:`~repblend_hf.trajectory_writer.TrajectoryWriter`; read a directory back with :meth:`load` (lazy:
    experts stay on disk and only sampled snapshots are read). ``metadata`` needs ``branch_sizes`` and ``num_epochs``
    (see the module docstring); everything else in it is kept as given.
    """

    def __init__(self, metadata: Mapping[str, Any]):
        self.metadata: dict[str, Any] = _normalise_metadata(metadata)
        # expert index → snapshots in memory ({branch: [T+1, P]}) or the file that holds them.
        self._experts: dict[int, dict[str, torch.Tensor] | Path] = {}

    # --- description -------------------------------------------------------------------------------------------

    @property
    def num_epochs(self) -> int:
        """T, the number of training epochs per expert (there are T + 1 snapshots: epoch 0 .. T)."""
        return self.metadata["num_epochs"]

    @property
    def branches(self) -> tuple[str, ...]:
        """Names of the stored branches, in matching order (e.g. ``("image", "text")``)."""
        return tuple(self.metadata["branch_sizes"])

    @property
    def branch_sizes(self) -> dict[str, int]:
        """Number of parameters of each branch's flat vector."""
        return dict(self.metadata["branch_sizes"])

    @property
    def expert_indices(self) -> list[int]:
        """Indices of the experts held, sorted (gaps are possible after an interrupted run)."""
        return sorted(self._experts)

    def __len__(self) -> int:
        return len(self._experts)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(experts={len(self)}, num_epochs={self.num_epochs}, "
                f"branch_sizes={self.branch_sizes})")

    # --- building ----------------------------------------------------------------------------------------------

    def _check_snapshots(self, snapshots: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if set(snapshots) != set(self.branches):
            raise ValueError(f"snapshots name branches {sorted(snapshots)} but the trajectories store "
                             f"{list(self.branches)}; pass one tensor per branch of metadata['branch_sizes']")
        out = {}
        for branch, size in self.branch_sizes.items():
            t = snapshots[branch]
            expected = (self.num_epochs + 1, size)
            if tuple(t.shape) != expected:
                raise ValueError(f"snapshots of branch {branch!r} have shape {tuple(t.shape)} but num_epochs="
                                 f"{self.num_epochs} and branch_sizes[{branch!r}]={size} need {expected} "
                                 "(one row per epoch 0..T)")
            out[branch] = t.detach().to("cpu", torch.float32).contiguous()
        return out

    def add_expert(self, snapshots: Mapping[str, torch.Tensor], expert_index: int | None = None) -> int:
        """Add one complete expert, ``{branch: tensor [T + 1, P_branch]}``, held in memory.

        METHOD.md, "Expert trajectories": row ``e`` is the branch's flat parameters after epoch ``e``
        (row 0: before training). ``expert_index`` defaults to one past the largest held; the index
        used is returned.
        """
        if expert_index is None:
            expert_index = max(self._experts, default=-1) + 1
        if expert_index in self._experts:
            raise ValueError(f"expert {expert_index} is already held; pass another expert_index or leave it None")
        self._experts[expert_index] = self._check_snapshots(snapshots)
        return expert_index

    # --- reading -----------------------------------------------------------------------------------------------

    def _source(self, expert_index: int) -> dict[str, torch.Tensor] | Path:
        if expert_index not in self._experts:
            raise KeyError(f"no expert {expert_index}; the trajectories hold experts {self.expert_indices}")
        return self._experts[expert_index]

    def _read_epochs(self, expert_index: int, epochs: list[int]) -> list[dict[str, torch.Tensor]]:
        for epoch in epochs:
            if not 0 <= epoch <= self.num_epochs:
                raise ValueError(f"epoch {epoch} is outside the stored snapshots 0..{self.num_epochs}")
        source = self._source(expert_index)
        if isinstance(source, dict):
            return [{b: source[b][e].clone() for b in self.branches} for e in epochs]
        with _open_expert(source) as f:
            slices = {b: f.get_slice(b) for b in self.branches}
            # A row of get_slice is a view into the memory-mapped file; the clone owns just that row,
            # so the mapping is released here rather than kept alive by the segment.
            return [{b: slices[b][e].clone() for b in self.branches} for e in epochs]

    def snapshot(self, expert_index: int, epoch: int) -> dict[str, torch.Tensor]:
        """The flat parameters ``{branch: [P_branch]}`` of one expert after ``epoch`` (0 = before training).

        METHOD.md, "Expert trajectories". Reads only that row from disk for loaded trajectories.
        """
        return self._read_epochs(expert_index, [epoch])[0]

    @property
    def nbytes(self) -> int:
        """Bytes of every snapshot of every expert held (float32), in memory or on disk."""
        return len(self) * (self.num_epochs + 1) * sum(self.branch_sizes.values()) * 4

    def to(self, device: torch.device | str) -> ExpertTrajectories:
        """A copy holding every expert's snapshots in memory on ``device`` (this one is unchanged).

        Sampling a segment then reads from ``device`` itself: on a GPU no snapshot crosses from host memory
        each iteration (with ``nfnet_l0``'s 2304-d heads a segment's two snapshots are 57 MB, 38 pageable
        copies and 19 ms an iteration on an H200, ``benchmarks/results/speed_cuda_nfnet_l0_profile.md``).
        """
        moved = type(self)(self.metadata)
        for index in self.expert_indices:
            moved._experts[index] = {b: t.to(device) for b, t in self.expert_snapshots(index).items()}
        return moved

    def on_device_if_fits(self, device: torch.device | str, free_bytes: int | None = None) -> ExpertTrajectories:
        """:meth:`to` ``device`` when it is an accelerator and all snapshots take at most a quarter of its free
        memory (``free_bytes``; default: what ``torch.cuda.mem_get_info`` says); else ``self``, read lazily.

        On a CPU the snapshots stay where they are (memory-mapped files: nothing to gain from a copy).
        """
        device = torch.device(device)
        if device.type == "cpu":
            return self
        if free_bytes is None:
            free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        if self.nbytes > free_bytes // 4:
            logger.info("expert trajectories (%.1f GB) stay in host memory: more than a quarter of the %.1f GB free "
                        "on %s", self.nbytes / 1e9, free_bytes / 1e9, device)
            return self
        return self.to(device)

    def expert_snapshots(self, expert_index: int) -> dict[str, torch.Tensor]:
        """All snapshots of one expert, ``{branch: [T + 1, P_branch]}`` (reads the whole file if on disk).

        METHOD.md, "Expert trajectories".
        """
        source = self._source(expert_index)
        if isinstance(source, dict):
            return {b: t.clone() for b, t in source.items()}
        with _open_expert(source) as f:
            return {b: f.get_tensor(b) for b in self.branches}

    def sample_segment(
        self,
        expert_epochs: int,
        max_start_epoch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        min_start_epoch: int = 0,
    ) -> TrajectorySegment:
        """Sample an expert uniformly, ``start ~ U{min_start_epoch .. max_start_epoch − 1}`` and ``target = start +
        expert_epochs``.

        METHOD.md, "Distillation loop", step 1 (MTT); ``min_start_epoch`` > 0 is a later window (PTM-ST's stages, the
        released Flickr-500 ``min_start_epoch``). Randomness comes only from ``generator`` (a CPU generator; torch's
        default one when ``None``). Only the two sampled snapshots are read; they are returned on ``device``
        (default: CPU).
        """
        for name, value in (("expert_epochs", expert_epochs), ("max_start_epoch", max_start_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(min_start_epoch, bool) or not isinstance(min_start_epoch, int) or not (
                0 <= min_start_epoch < max_start_epoch):
            raise ValueError(f"min_start_epoch must be an int in 0..max_start_epoch - 1 = {max_start_epoch - 1}, got "
                             f"{min_start_epoch!r}")
        if max_start_epoch - 1 + expert_epochs > self.num_epochs:
            raise ValueError(f"the latest start epoch (max_start_epoch - 1 = {max_start_epoch - 1}) plus "
                             f"expert_epochs ({expert_epochs}) exceeds the {self.num_epochs} epochs of these "
                             "trajectories; lower max_start_epoch or expert_epochs so that "
                             f"max_start_epoch - 1 + expert_epochs <= {self.num_epochs}, "
                             "or train experts for more epochs")
        if not self._experts:
            raise ValueError("these trajectories hold no expert; train experts first (repblend-distill trains them, "
                             "or repblend_hf.trainers.train_experts) or point to a directory with completed "
                             "expert_*.safetensors files")
        indices = self.expert_indices
        expert_index = indices[int(torch.randint(len(indices), (1,), generator=generator).item())]
        window = max_start_epoch - min_start_epoch
        start = min_start_epoch + int(torch.randint(window, (1,), generator=generator).item())
        target = start + expert_epochs
        start_params, target_params = self._read_epochs(expert_index, [start, target])
        if device is not None:
            start_params = {b: t.to(device) for b, t in start_params.items()}
            target_params = {b: t.to(device) for b, t in target_params.items()}
        return TrajectorySegment(expert_index=expert_index, start_epoch=start, start_params=start_params,
                                 target_params=target_params, target_epoch=target)

    def check_compatible(self, expected_sizes: Mapping[str, int]) -> None:
        """Raise a ``ValueError`` unless the stored branches and sizes equal ``expected_sizes``.

        METHOD.md, "Expert trajectories" and "Model": the matched parameters must be those of the
        heads being distilled for (``{branch: number of parameters}``, e.g. from
        ``flatten_parameters(head).numel()``). A size mismatch usually means the trajectories were
        made with another encoder (input dim) or ``embed_dim``; a name mismatch, that they come from
        the asymmetric LoRS / MTT-VL experts (or vice versa).
        """
        made_with = ", ".join(f"{k}={self.metadata[k]!r}" for k in _PROVENANCE_KEYS if k in self.metadata)
        made_with = f" (the trajectories were made with {made_with})" if made_with else ""
        if set(expected_sizes) != set(self.branches):
            raise ValueError(f"the expert trajectories store branches {list(self.branches)} but the model matches "
                             f"{sorted(expected_sizes)}{made_with}; symmetric RepBlend trajectories store the two "
                             "heads, asymmetric LoRS / MTT-VL ones the image encoder: train experts for this "
                             "method or point to matching trajectories")
        for branch, size in self.branch_sizes.items():
            if expected_sizes[branch] != size:
                raise ValueError(f"branch {branch!r} of the expert trajectories has {size} parameters but the "
                                 f"model's has {expected_sizes[branch]}: the trajectories were likely made with "
                                 f"another encoder or embed_dim{made_with}; set the encoders and embed_dim to "
                                 "theirs, or train new experts for this setting")

    # --- storage -----------------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``trajectories.json`` and one ``expert_XXX.safetensors`` per expert into ``directory``.

        METHOD.md, "Expert trajectories". Each expert file is written atomically. Refuses a directory
        that already holds trajectories with other metadata. Returns the directory.
        """
        directory = Path(directory)
        _prepare_directory(directory, self.metadata)
        for index in self.expert_indices:
            source = self._experts[index]
            if isinstance(source, Path) and source.resolve() == (directory / expert_filename(index)).resolve():
                continue
            _write_expert_file(directory, index, self.expert_snapshots(index), self.num_epochs)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ExpertTrajectories:
        """Open a trajectories directory lazily: reads the JSON and the safetensors headers only.

        METHOD.md, "Expert trajectories". Every completed expert file is checked against the
        metadata (branch names and shapes) here, so a bad file fails now rather than mid-distillation.
        """
        directory = Path(directory)
        meta_path = directory / TRAJECTORIES_METADATA_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: {directory} is not an expert trajectories directory; "
                                    "train experts first (repblend-distill trains them, or "
                                    "repblend_hf.trainers.train_experts) or pass the directory they were saved to")
        trajectories = cls(json.loads(meta_path.read_text()))
        expected = {b: [trajectories.num_epochs + 1, n] for b, n in trajectories.branch_sizes.items()}
        for index in cls.completed_experts(directory):
            path = directory / expert_filename(index)
            with _open_expert(path) as f:
                shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
            if shapes != expected:
                raise ValueError(f"{path} holds tensors {shapes} but {TRAJECTORIES_METADATA_NAME} says {expected}; "
                                 "the file belongs to other trajectories: remove it or retrain that expert")
            trajectories._experts[index] = path
        planned = trajectories.metadata.get("num_experts")
        if isinstance(planned, int) and len(trajectories) < planned:
            logger.warning("%s holds %d of the %d planned experts (the expert run was interrupted?); using those",
                           directory, len(trajectories), planned)
        return trajectories

    @staticmethod
    def completed_experts(directory: str | os.PathLike) -> list[int]:
        """Indices of the experts whose file is complete in ``directory`` (sorted; ``[]`` if none or no directory).

        METHOD.md, "Expert trajectories". A resumed expert run skips these; files only appear once an
        expert is complete, so an interrupted expert is simply absent.
        """
        directory = Path(directory)
        if not directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _EXPERT_FILE.match(p.name)))

    # --- Hub ---------------------------------------------------------------------------------------------------

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool = False,
                    commit_message: str = "Upload expert trajectories with repblend_hf",
                    card_data: dict | None = None) -> str:
        """Push the trajectories as a Hub dataset repo, in one commit: the files of :meth:`save` and a card.

        DESIGN.md, "The Hub artefact" (so others can skip the expert stage). Experts held as files are
        uploaded from where they are; experts held in memory are written to a temporary directory
        first. The README comes from ``hub_cards/trajectories.md``; ``card_data`` adds YAML metadata.
        Returns the commit URL (``.oid`` is the new revision); a failed push leaves the repo at its
        previous revision and raises ``RuntimeError`` saying so.
        """
        if not self._experts:
            raise ValueError("these trajectories hold no expert; add experts (add_expert / TrajectoryWriter) first")
        card = TrajectoriesCardData(repo_id, self.metadata, self.expert_indices, dict(card_data or {}))
        files: dict[str, Path | bytes] = {
            TRAJECTORIES_METADATA_NAME: (json.dumps(self.metadata, indent=2) + "\n").encode(),
            "README.md": str(render_trajectories_card(card)).encode(),
        }
        with tempfile.TemporaryDirectory(prefix="repblend-push-") as staging:
            for index in self.expert_indices:
                source = self._experts[index]
                files[expert_filename(index)] = (source if isinstance(source, Path) else
                                                 _write_expert_file(Path(staging), index, source, self.num_epochs))
            return commit_files(repo_id, files, token=token, private=private, commit_message=commit_message,
                                local_hint="the local trajectories are untouched: retry the push")

    @classmethod
    def from_hub(cls, repo_id: str, revision: str | None = None, token: str | None = None) -> ExpertTrajectories:
        """Download trajectories pushed with :meth:`push_to_hub` and open them with :meth:`load` (lazily).

        DESIGN.md, "The Hub artefact". Fetches ``trajectories.json`` and every ``expert_*.safetensors``
        of the dataset repo (``revision``: a branch or a revision id) into the Hub cache.
        """
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, token=token,
                                       allow_patterns=[TRAJECTORIES_METADATA_NAME, "expert_*.safetensors"]))
        if not (local / TRAJECTORIES_METADATA_NAME).is_file():
            raise ValueError(f"{repo_id} holds no repblend_hf expert trajectories: no {TRAJECTORIES_METADATA_NAME}; "
                             "push them with ExpertTrajectories.push_to_hub")
        return cls.load(local)
