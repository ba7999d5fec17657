"""RepBlendConfig: what a distilled set *is*, saved with it and loadable with ``from_pretrained``.

STYLE.md, "Practices": configuration is split by lifetime. This config describes the artefact
(encoders, head and similarity shape, number of pairs, τ, the student it was distilled for, the learned
inner learning rates) and records how it was made (method, blending β, inner loss, meta-gradient, segment
lengths, iterations); how a run goes lives in :mod:`repblend_hf.training_args`. The learned inner learning
rates η are ``inner_lr_img`` / ``inner_lr_txt`` here; ``lr_img`` / ``lr_txt`` of the arguments are the outer ones.
"""

from __future__ import annotations

import math
import os
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError, RemoteEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, PretrainedConfig

from .hub import check_distilled_set_config, not_a_distilled_set_error
from .version import __version__

__all__ = ["RepBlendConfig", "METHODS", "SIMILARITY_KINDS", "SYNTHETIC_SPACES"]

METHODS = ("repblend", "lors", "mtt_vl", "coreset")
SIMILARITY_KINDS = ("lowrank", "full", "none")
SYNTHETIC_SPACES = ("pixels", "features")
# Fields that record how a set was made (RepBlendConfig.record_distillation copies them from the run's arguments).
_RECORDED = ("method", "blend_beta", "distill_loss", "meta_gradient", "branch_normalization", "syn_steps",
             "expert_epochs", "max_start_epoch")


class RepBlendConfig(PretrainedConfig):
    """Configuration of a distilled image-text set (RepBlend, arXiv 2505.14705).

    Fields are declared as annotated class attributes (transformers 5 configs are dataclasses).
    Defaults are the embedded default (EfficientNet-Lite0 + all-MiniLM-L6-v2 at 64 px, 99 pairs);
    the paper used ``nfnet_l0`` + ``bert-base-uncased`` at 224 px with ``embed_dim`` 2304.
    ``inner_lr_img`` / ``inner_lr_txt`` hold the learned inner learning rates η, which evaluation uses as the
    heads' learning rates (``lr_img`` / ``lr_txt``, their earlier names, are read as aliases, so older
    ``config.json`` files load). ``matching`` records what the distillation's student trained, which fixes the set's
    own evaluation protocol: ``"symmetric"`` (RepBlend) the two heads on the frozen encoder, ``"asymmetric"``
    (LoRS / MTT-VL) the image encoder and the text head (and an image head with ``asymmetric_image_head``,
    an ablation); without an image head the text head outputs the encoder's width, ``embed_dim ==
    image_dim``. ``synthetic_space`` is ``"pixels"`` (the paper: images any model can take) or
    ``"features"`` (the images are vectors of ``image_encoder``'s feature space at ``image_size``; they
    train heads on that frozen encoder and transfer to no other).

    How the set was made is recorded by the distillation (:meth:`record_distillation`): ``method``,
    ``blend_beta`` (0: no blending), ``distill_loss``, ``meta_gradient``, ``branch_normalization``,
    ``syn_steps``, ``expert_epochs``, ``max_start_epoch`` and ``iterations``; None where nothing recorded it
    (a hand-made set, a coreset, a set saved before they were recorded).

    A set distilled in stages (:mod:`repblend_hf.stages`) lists them in ``stages``, in order, one dict each: its
    ``num_pairs`` (the set's rows, stage after stage; they add up to ``num_pairs``), its learned ``inner_lr_img`` /
    ``inner_lr_txt`` (those of the last stage are also the set's ``inner_lr_*``) and how it was distilled
    (``iterations``, ``min_start_epoch``, ``max_start_epoch``, ``targets``, ``shortcut_epoch``). Evaluation trains on
    the stages in order (``SyntheticSet.stage_schedule``). None: a set of one stage.
    """

    model_type = "repblend"
    attribute_map = {"lr_img": "inner_lr_img", "lr_txt": "inner_lr_txt"}

    image_encoder: str = "tf_efficientnet_lite0"
    text_encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    text_pooling: str = "mean"
    image_size: int = 64
    image_dim: int = 1280
    text_dim: int = 384
    embed_dim: int = 512
    num_pairs: int = 99
    synthetic_space: str = "pixels"
    temperature: float = 0.07
    similarity: str = "lowrank"
    sim_rank: int = 10
    sim_alpha: float = 3.0
    method: str = "repblend"
    matching: str = "symmetric"
    asymmetric_image_head: bool = False
    inner_lr_img: float = 0.1
    inner_lr_txt: float = 0.1
    blend_beta: float | None = None
    distill_loss: str | None = None
    meta_gradient: str | None = None
    branch_normalization: str | None = None
    syn_steps: int | None = None
    expert_epochs: int | None = None
    max_start_epoch: int | None = None
    iterations: int | None = None
    stages: list[dict] | None = None
    source_dataset: str | None = None
    repblend_version: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        checks = [
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (self.similarity in SIMILARITY_KINDS,
             f"similarity must be one of {SIMILARITY_KINDS}, got {self.similarity!r}"),
            (self.synthetic_space in SYNTHETIC_SPACES,
             f"synthetic_space must be one of {SYNTHETIC_SPACES}, got {self.synthetic_space!r}"),
            (self.text_pooling in ("cls", "mean"), f"text_pooling must be 'cls' or 'mean', got {self.text_pooling!r}"),
            (self.num_pairs > 0, f"num_pairs must be > 0, got {self.num_pairs}"),
            (self.image_size > 0, f"image_size must be > 0, got {self.image_size}"),
            (min(self.image_dim, self.text_dim, self.embed_dim) > 0,
             f"image_dim, text_dim, embed_dim must be > 0, got {self.image_dim}, {self.text_dim}, {self.embed_dim}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.similarity != "lowrank" or 0 < self.sim_rank <= self.num_pairs,
             f"sim_rank must be in 1..num_pairs ({self.num_pairs}) for a low-rank similarity, got {self.sim_rank}; "
             "use similarity='full' for a full-rank matrix"),
            (self.sim_alpha > 0, f"sim_alpha must be > 0, got {self.sim_alpha}"),
            (self.matching in ("symmetric", "asymmetric"),
             f"matching must be 'symmetric' or 'asymmetric', got {self.matching!r}"),
            (not self.asymmetric_image_head or self.matching == "asymmetric",
             "asymmetric_image_head=True describes an asymmetric student; set matching='asymmetric' or drop it"),
            (self.matching != "asymmetric" or self.asymmetric_image_head or self.embed_dim == self.image_dim,
             f"matching='asymmetric' without an image head uses the image encoder's {self.image_dim}-d feature as "
             f"the image embedding, so the text head outputs that width: set embed_dim={self.image_dim} (got "
             f"{self.embed_dim}), or asymmetric_image_head=True"),
            (self.inner_lr_img > 0 and self.inner_lr_txt > 0,
             f"inner_lr_img and inner_lr_txt (the learned inner learning rates η) must be > 0, got "
             f"{self.inner_lr_img}, {self.inner_lr_txt}"),
            (self.blend_beta is None or self.blend_beta >= 0, f"blend_beta must be >= 0, got {self.blend_beta}"),
        ]
        if self.stages is not None:
            checks += self._stage_checks()
        nonfinite = [k for k in ("temperature", "sim_alpha", "inner_lr_img", "inner_lr_txt")
                     if not math.isfinite(getattr(self, k))]
        checks.append((not nonfinite, f"{', '.join(nonfinite)} must be finite, got "
                                      f"{', '.join(str(getattr(self, k)) for k in nonfinite)}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.repblend_version is None:
            self.repblend_version = __version__

    def _stage_checks(self) -> list[tuple[bool, str]]:
        stages = self.stages
        if not isinstance(stages, list) or not stages or not all(isinstance(st, dict) for st in stages):
            return [(False, f"stages must be a non-empty list of dicts (one per stage) or None, got {stages!r}")]
        sizes = [st.get("num_pairs") for st in stages]
        checks = [(all(isinstance(n, int) and n > 0 for n in sizes) and sum(sizes) == self.num_pairs,
                   f"the stages' num_pairs {sizes} must be positive and add up to num_pairs={self.num_pairs}")]
        for k, st in enumerate(stages):
            lrs = (st.get("inner_lr_img"), st.get("inner_lr_txt"))
            checks.append((all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in lrs),
                           f"stage {k + 1}'s inner_lr_img / inner_lr_txt (its learned η) must be finite numbers > 0, "
                           f"got {lrs}"))
        return checks

    def record_distillation(self, args: Any, iterations: int | None = None) -> RepBlendConfig:
        """Record how the set is made: the method and its settings from ``args`` (a ``DistillationArguments``).

        Called by the :class:`~repblend_hf.trainers.DistillationTrainer` when it is built (its
        ``RecordIterations`` callback then keeps ``iterations`` current), so that ``config.json`` and the card of
        a no-blend, LoRS or MTT-VL set say what it is. Returns the config.
        """
        for name in _RECORDED:
            setattr(self, name, getattr(args, name))
        if iterations is not None:
            self.iterations = int(iterations)
        return self

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, repo_type: str | None = None,
                        **kwargs) -> RepBlendConfig:
        """Load a config from a local folder, a Hub model repo, or the dataset repo of a pushed set.

        DESIGN.md, "The Hub artefact": ``SyntheticSet.push_to_hub`` makes a *dataset* repo, where transformers'
        own loading does not look (it passes no ``repo_type`` to the download). With ``repo_type=None`` a name
        that is neither a local folder nor a model repo holding a ``config.json`` is looked up as a dataset
        repo; ``repo_type="dataset"`` goes there directly and ``"model"`` never does. ``revision``, ``token``
        and ``cache_dir`` apply to either download; other ``kwargs`` go to ``PretrainedConfig.from_pretrained``.
        """
        if repo_type not in (None, "model", "dataset"):
            raise ValueError(f"repo_type must be None, 'model' or 'dataset', got {repo_type!r}")
        name = str(pretrained_model_name_or_path)
        if repo_type != "dataset":
            try:
                return super().from_pretrained(name, **kwargs)
            except OSError as err:
                if repo_type == "model" or os.path.exists(name):
                    raise
                model_error = err
        if repo_type is None:
            try:
                validate_repo_id(name)
            except HFValidationError:
                raise model_error from None  # no folder and no repo id either: transformers' own message
        download = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir") if k in kwargs}
        try:
            path = hf_hub_download(name, "config.json", repo_type="dataset", **download)
        except RemoteEntryNotFoundError:
            raise not_a_distilled_set_error(name) from None
        except OSError as err:
            if repo_type == "dataset":
                raise
            raise OSError(f"{name} is not a local folder, and neither a model repo nor a dataset repo of that id "
                          f"holds a config.json (as a model repo: {model_error}; as a dataset repo: {err})") from err
        check_distilled_set_config(os.path.dirname(path), name)
        return super().from_pretrained(os.path.dirname(path), **kwargs)

    @classmethod
    def from_hub(cls, repo_id: str, *, revision: str | None = None, token: str | None = None,
                 **kwargs) -> RepBlendConfig:
        """The config of a distilled set pushed with ``SyntheticSet.push_to_hub``: its Hub *dataset* repo.

        ``from_pretrained(repo_id, repo_type="dataset", ...)``; kept because the cards of earlier sets name it.
        """
        return cls.from_pretrained(repo_id, repo_type="dataset", revision=revision, token=token, **kwargs)


AutoConfig.register("repblend", RepBlendConfig)
