"""RepBlendConfig: what a distilled set *is*, saved with it and loadable with ``from_pretrained``.

STYLE.md, "Practices": configuration is split by lifetime. This config describes the artefact
(encoders, head and similarity shape, number of pairs, τ, the method that made it and, after
distillation, the learned inner learning rates); how a run was done lives in
:mod:`repblend_hf.training_args`.
"""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig

from .hub import check_distilled_set_config, not_a_distilled_set_error
from .version import __version__

__all__ = ["RepBlendConfig", "METHODS", "SIMILARITY_KINDS", "SYNTHETIC_SPACES"]

METHODS = ("repblend", "lors", "mtt_vl", "coreset")
SIMILARITY_KINDS = ("lowrank", "full", "none")
SYNTHETIC_SPACES = ("pixels", "features")


class RepBlendConfig(PretrainedConfig):
    """Configuration of a distilled image-text set (RepBlend, arXiv 2505.14705).

    Fields are declared as annotated class attributes (transformers 5 configs are dataclasses).
    Defaults are the embedded default (EfficientNet-Lite0 + all-MiniLM-L6-v2 at 64 px, 99 pairs);
    the paper used ``nfnet_l0`` + ``bert-base-uncased`` at 224 px with ``embed_dim`` 2304.
    ``lr_img`` / ``lr_txt`` hold the learned inner learning rates η, which evaluation uses as the
    heads' learning rates. ``matching`` records what the distillation's student trained, which fixes the set's
    own evaluation protocol: ``"symmetric"`` (RepBlend) the two heads on the frozen encoder, ``"asymmetric"``
    (LoRS / MTT-VL) the image encoder and the text head (and an image head with ``asymmetric_image_head``,
    an ablation); without an image head the text head outputs the encoder's width, ``embed_dim ==
    image_dim``. ``synthetic_space`` is ``"pixels"`` (the paper: images any model can take) or
    ``"features"`` (the images are vectors of ``image_encoder``'s feature space at ``image_size``; they
    train heads on that frozen encoder and transfer to no other).
    """

    model_type = "repblend"

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
    lr_img: float = 0.1
    lr_txt: float = 0.1
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
            (self.lr_img > 0 and self.lr_txt > 0,
             f"lr_img and lr_txt (learned inner learning rates) must be > 0, got {self.lr_img}, {self.lr_txt}"),
        ]
        nonfinite = [k for k in ("temperature", "sim_alpha", "lr_img", "lr_txt")
                     if not math.isfinite(getattr(self, k))]
        checks.append((not nonfinite, f"{', '.join(nonfinite)} must be finite, got "
                                      f"{', '.join(str(getattr(self, k)) for k in nonfinite)}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.repblend_version is None:
            self.repblend_version = __version__

    @classmethod
    def from_hub(cls, repo_id: str, *, revision: str | None = None, token: str | None = None,
                 **kwargs) -> RepBlendConfig:
        """Load the config of a distilled set pushed with ``SyntheticSet.push_to_hub`` (a Hub *dataset* repo).

        DESIGN.md, "The Hub artefact". ``from_pretrained(repo_id)`` looks in *model* repos only
        (transformers 5.x passes no ``repo_type`` down to the download), so this fetches ``config.json``
        from the dataset repo and hands its folder to ``from_pretrained`` (``kwargs`` go there too).
        """
        import os

        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            path = hf_hub_download(repo_id, "config.json", repo_type="dataset", revision=revision, token=token)
        except RemoteEntryNotFoundError:
            raise not_a_distilled_set_error(repo_id) from None
        check_distilled_set_config(os.path.dirname(path), repo_id)
        return cls.from_pretrained(os.path.dirname(path), **kwargs)


AutoConfig.register("repblend", RepBlendConfig)
