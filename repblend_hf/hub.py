"""The Hub artefacts: cards rendered from ``hub_cards/`` templates, one-commit uploads, checked downloads.

DESIGN.md, "The Hub artefact": a distilled set is a Hub *dataset* repo holding the rows as Parquet
(``data/train-00000-of-00001.parquet``, what :meth:`SyntheticSet.save_pretrained` writes),
``config.json`` (the :class:`RepBlendConfig`, learned learning rates included) and a README card;
expert trajectories are a dataset repo of ``trajectories.json`` + ``expert_XXX.safetensors`` with a
shorter card. STYLE.md: cards are Jinja templates rendered through ``DatasetCard.from_template``,
filled from a card-data dataclass (as SetFit does for model cards), never built from strings.

Everything a push sends goes in **one commit** (:func:`commit_files`), so the repo is either at its
previous revision or holds the complete new artefact; a failed push raises a ``RuntimeError`` that
says which revision the repo is at and how to retry. Tokens are passed to ``huggingface_hub`` and
never logged or put in messages.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.resources
import json
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import DIAGNOSTIC_NAMES, METRIC_NAMES
from .version import __version__

__all__ = [
    "SYNTHETIC_SET_TAGS",
    "TRAJECTORIES_TAGS",
    "SyntheticSetCardData",
    "TrainingRecord",
    "TrajectoriesCardData",
    "render_synthetic_set_card",
    "render_trajectories_card",
    "framework_versions",
    "commit_files",
    "not_a_distilled_set_error",
    "check_distilled_set_config",
]

logger = logging.getLogger(__name__)

#: Tags every distilled-set card carries (``card_data={"tags": [...]}`` adds to them).
SYNTHETIC_SET_TAGS = ("dataset-distillation", "repblend", "multimodal", "image-text-retrieval")
#: Tags every expert-trajectories card carries.
TRAJECTORIES_TAGS = ("dataset-distillation", "repblend", "expert-trajectories", "multimodal")
#: Where the rows go in the repo; ``configs`` in the card points ``load_dataset`` at them (and away from
#: ``config.json``, which is the RepBlendConfig, not data).
DATA_FILES_PATTERN = "data/train-*"
#: Where ``SyntheticSet.push_to_hub(grid_image=...)`` puts the picture of the synthetic images.
GRID_IMAGE = "images/synthetic_grid.png"


def framework_versions() -> dict[str, str]:
    """Versions of the libraries that made an artefact (recorded in its card)."""
    versions = {"repblend_hf": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "datasets", "huggingface_hub"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@contextlib.contextmanager
def _template_path(name: str):
    # The templates' one home is the top-level hub_cards/; repblend_hf/hub_cards is a link to it, so a checkout (and
    # an editable install) reads them there and a wheel carries them as package data. importlib.resources finds them
    # either way.
    with importlib.resources.as_file(importlib.resources.files("repblend_hf") / "hub_cards" / name) as path:
        yield str(path)


def _merge_metadata(base: dict[str, Any], tags: tuple[str, ...], extra: dict[str, Any] | None) -> dict[str, Any]:
    """``base`` updated with the user's ``extra`` metadata; ``tags`` are kept, the user's added after them."""
    out = {**base, **(extra or {})}
    user_tags = (extra or {}).get("tags") or []
    out["tags"] = list(dict.fromkeys([*tags, *([user_tags] if isinstance(user_tags, str) else user_tags)]))
    return out


def _check_results(results: list[dict[str, Any]] | dict[str, Any]) -> list[dict[str, Any]]:
    """Check ``results.json`` records: ``method``, ``pairs`` and ``test[metric]["mean" / "std"]`` for each metric."""
    if isinstance(results, dict):
        results = [results]
    for i, record in enumerate(results):
        missing = [k for k in ("method", "pairs", "test") if k not in record]
        missing += [f"test[{m!r}]" for m in METRIC_NAMES
                    if "test" in record and not {"mean", "std"} <= set(record["test"].get(m, {}))]
        if missing:
            raise ValueError(f"results[{i}] lacks {missing}; pass records in the results.json schema: "
                             "{'method', 'pairs', 'test': {metric: {'mean', 'std'}}} with metrics "
                             f"{list(METRIC_NAMES)} (what repblend-evaluate writes)")
    return list(results)


@dataclass
class TrainingRecord:
    """How a set was trained, for its card: the run's hyperparameters and its validation curve.

    Filled during training by the trainer's :class:`~repblend_hf.trainers.callbacks.CardCallback` (as SetFit's
    ``ModelCardCallback`` fills its model card data) and kept on the :class:`~repblend_hf.SyntheticSet` as
    ``training_record``; :meth:`SyntheticSet.push_to_hub` puts it in the card. ``hyperparameters`` maps a
    ``DistillationArguments`` name to its value; ``curve`` has one ``{"step", metric: value, ...}`` row per
    evaluation (the validation metrics the trainer logs, without the ``eval_`` prefix).
    """

    hyperparameters: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)

    #: The columns of :attr:`curve`: the step and the validation retrieval metrics the trainer logs.
    CURVE_METRICS = ("r_mean", *(m for m in METRIC_NAMES if m != "r_mean"))

    def add_evaluation(self, step: int, metrics: dict[str, float], prefix: str = "eval_") -> None:
        """Add (or, for a step already in the curve, replace) the row of an evaluation at ``step``."""
        row = {"step": int(step), **{m: float(metrics[prefix + m]) for m in self.CURVE_METRICS
                                     if prefix + m in metrics}}
        if len(row) == 1:  # not a retrieval evaluation (e.g. no validation split): nothing to draw
            return
        self.curve = [r for r in self.curve if r["step"] != row["step"]] + [row]
        self.curve.sort(key=lambda r: r["step"])


@dataclass
class SyntheticSetCardData:
    """What the card of a distilled set says; :func:`render_synthetic_set_card` renders it.

    DESIGN.md, "The Hub artefact". ``config`` is ``RepBlendConfig.to_dict()`` (learned lrs included);
    ``results`` are records in the ``results.json`` schema (``method``, ``pairs``,
    ``test: {metric: {mean, std}}`` and optionally ``diagnostics: {sim_image | sim_text | gap: {mean, std}}`` and
    ``set_diagnostics: {sim_image | sim_text | gap: value}``, the pairs' own embeddings under the reference model),
    shown as a table beside the baselines; ``grid_image`` is the path in the repo of a picture of the
    synthetic images; ``metadata`` is extra YAML metadata for the card header (``license``,
    ``pretty_name``, more ``tags``, ...), which wins over the defaults except that tags add up.
    ``training`` is the run's :class:`TrainingRecord` (hyperparameters and validation curve), when known.
    """

    repo_id: str
    config: dict[str, Any]
    results: list[dict[str, Any]] | dict[str, Any] | None = None
    grid_image: str | None = None
    has_nearest_captions: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=framework_versions)
    training: TrainingRecord = field(default_factory=TrainingRecord)

    def __post_init__(self):
        if self.results is not None:
            self.results = _check_results(self.results)

    def card_metadata(self) -> dict[str, Any]:
        """The YAML header: license, tags, source dataset, size, and ``configs`` for ``load_dataset``."""
        n = self.config["num_pairs"]
        source = self.config.get("source_dataset")
        base = {
            "license": "other",
            "pretty_name": f"RepBlend distilled {source or 'image-text'} set ({n} pairs)",
            "size_categories": "n<1K" if n < 1000 else "1K<n<10K" if n < 10000 else "10K<n<100K",
            "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES_PATTERN}]}],
        }
        if source:
            base["source_datasets"] = [source]
        return _merge_metadata(base, SYNTHETIC_SET_TAGS, self.metadata)

    def template_kwargs(self) -> dict[str, Any]:
        """Variables of ``hub_cards/synthetic_set.md`` besides the metadata."""
        n = self.config["num_pairs"]
        rows = []
        for record in self.results or []:
            this = record["method"] in (self.config.get("method"), "distilled") and record["pairs"] == n
            rows.append({**record, "this": this, "has_diagnostics": all(
                k in (record.get("diagnostics") or {}) for k in DIAGNOSTIC_NAMES)})
        set_rows = [{"label": f"{r['method']} ({r['pairs']} pairs)" + (", this set" if r["this"] else
                                                                     ", random real subset" if r["method"] == "random"
                                                                     else ""), "diag": r["set_diagnostics"]}
                    for r in rows if all(k in (r.get("set_diagnostics") or {}) for k in DIAGNOSTIC_NAMES)]
        if not any(r["method"] == "random" for r in rows if r.get("set_diagnostics")):
            # No random-coreset row: the reference subset recorded with the set itself stands in for it.
            set_rows += [{"label": f"random real subset ({r['pairs']} pairs)", "diag": r["real_subset_diagnostics"]}
                         for r in rows if r["this"] and all(k in (r.get("real_subset_diagnostics") or {})
                                                            for k in DIAGNOSTIC_NAMES)]
        return {"repo_id": self.repo_id, "config": self.config, "results": rows, "metrics": list(METRIC_NAMES),
                "diagnostic_rows": [r for r in rows if r["has_diagnostics"]], "set_diagnostic_rows": set_rows,
                "grid_image": self.grid_image,
                "has_nearest_captions": self.has_nearest_captions, "versions": self.versions,
                "hyperparameters": self.training.hyperparameters, "curve": self.training.curve,
                "curve_metrics": [m for m in TrainingRecord.CURVE_METRICS
                                  if any(m in row for row in self.training.curve)]}


@dataclass
class TrajectoriesCardData:
    """What the card of pushed expert trajectories says; :func:`render_trajectories_card` renders it.

    METHOD.md, "Expert trajectories". ``metadata`` is the ``trajectories.json`` content,
    ``expert_indices`` the experts in the repo; ``card_metadata_extra`` is extra YAML metadata.
    """

    repo_id: str
    metadata: dict[str, Any]
    expert_indices: list[int]
    card_metadata_extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=framework_versions)

    def card_metadata(self) -> dict[str, Any]:
        """The YAML header: license, tags, source dataset; the viewer is off (the files are not tables)."""
        base = {"license": "other", "viewer": False,
                "pretty_name": f"RepBlend expert trajectories ({len(self.expert_indices)} experts)"}
        if self.metadata.get("dataset"):
            base["source_datasets"] = [str(self.metadata["dataset"])]
        return _merge_metadata(base, TRAJECTORIES_TAGS, self.card_metadata_extra)

    def template_kwargs(self) -> dict[str, Any]:
        """Variables of ``hub_cards/trajectories.md`` besides the metadata."""
        known = ("format_version", "branch_sizes", "num_epochs")
        return {"repo_id": self.repo_id, "num_experts": len(self.expert_indices),
                "expert_indices": self.expert_indices, "num_epochs": self.metadata["num_epochs"],
                "branch_sizes": self.metadata["branch_sizes"], "format_version": self.metadata.get("format_version"),
                "provenance": {k: v for k, v in self.metadata.items() if k not in known},
                "versions": self.versions}


def _render(template: str, metadata: dict[str, Any], kwargs: dict[str, Any]):
    from huggingface_hub import DatasetCard, DatasetCardData

    with _template_path(template) as path:
        return DatasetCard.from_template(DatasetCardData(**metadata), template_path=path, **kwargs)


def render_synthetic_set_card(data: SyntheticSetCardData):
    """The README of a distilled set (a ``huggingface_hub.DatasetCard``) from ``hub_cards/synthetic_set.md``."""
    return _render("synthetic_set.md", data.card_metadata(), data.template_kwargs())


def render_trajectories_card(data: TrajectoriesCardData):
    """The README of pushed expert trajectories from ``hub_cards/trajectories.md``."""
    return _render("trajectories.md", data.card_metadata(), data.template_kwargs())


# ----- upload ----------------------------------------------------------------------------------------------------


def commit_files(repo_id: str, files: dict[str, str | os.PathLike | bytes], *, token: str | None = None,
                 private: bool = False, commit_message: str, local_hint: str):
    """Add ``files`` (``{path_in_repo: local path or bytes}``) to the dataset repo ``repo_id`` in one commit.

    Creates the repo if needed; returns the ``CommitInfo`` (a ``str``, the commit URL, with ``.oid``).
    The commit names the revision it builds on (``parent_commit``), so a concurrent push fails rather
    than being silently overwritten. Any failure raises ``RuntimeError`` saying whether anything was
    committed, the revision the repo is at, and ``local_hint`` (what the caller's local data is and
    how to keep it).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    before = None
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        before = api.repo_info(repo_id, repo_type="dataset").sha
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=s if isinstance(s, bytes) else str(s))
                      for path, s in files.items()]
        info = api.create_commit(repo_id, operations, repo_type="dataset", commit_message=commit_message,
                                 parent_commit=before)
    except Exception as err:
        raise RuntimeError(f"push to {repo_id} failed: {_describe(err)}\n"
                           f"{_state_after_failure(api, repo_id, before)}; {local_hint}") from err
    logger.info("pushed %d files to %s (revision %s)", len(files), repo_id, info.oid)
    return info


def _describe(err: BaseException) -> str:
    """An exception and what caused it (huggingface_hub wraps e.g. a failed LFS upload's HTTP error)."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen and len(parts) < 3:
        seen.add(id(err))
        parts.append(f"{type(err).__name__}: {err}".strip())
        err = err.__cause__
    return "\n  caused by ".join(parts)


def _state_after_failure(api, repo_id: str, before: str | None) -> str:
    """What a failed push left on the Hub, checked again rather than assumed."""
    try:
        now = api.repo_info(repo_id, repo_type="dataset").sha
    except Exception:  # the Hub is unreachable or the repo was never created
        if before is None:
            return "Nothing was committed"
        return (f"The repo was at revision {before} before this push and could not be checked since; nothing is "
                "committed unless the commit request itself reached the Hub")
    if before is None or now == before:
        return f"Nothing was committed: the repo is unchanged at revision {now}"
    return (f"The repo moved from revision {before} to {now} meanwhile (another push, or this commit succeeded "
            "but its answer was lost): check it before retrying")


# ----- download checks -------------------------------------------------------------------------------------------


def not_a_distilled_set_error(repo_id: str, detail: str = "") -> ValueError:
    """The error for a repo that holds no repblend_hf distilled set."""
    return ValueError(f"{repo_id} is not a repblend_hf distilled set: no config.json with model_type 'repblend'"
                      f"{detail}; push one with SyntheticSet.push_to_hub, or load other datasets with "
                      "datasets.load_dataset")


def check_distilled_set_config(directory: str | os.PathLike, repo_id: str) -> None:
    """Raise :func:`not_a_distilled_set_error` unless ``directory/config.json`` is a RepBlendConfig."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise not_a_distilled_set_error(repo_id)
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise not_a_distilled_set_error(repo_id, " (its config.json is not a JSON object)") from None
    if model_type != "repblend":
        raise not_a_distilled_set_error(repo_id, f" (its config.json has model_type {model_type!r})")
