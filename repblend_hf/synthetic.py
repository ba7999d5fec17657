"""SyntheticSet: the learnable distilled image-text pairs, and their exact round trip to a Dataset.

METHOD.md, "Distillation loop": the learnable tensors are the synthetic images (normalised pixels),
the synthetic text embeddings (of the frozen text encoder), the learned soft similarity, and the two
inner learning rates η, here parametrised as log η so they stay positive. DESIGN.md, "The Hub
artefact": one row per pair with a viewable ``image`` (uint8 preview), the exact ``pixel_values``
(float32 ``Array3D``), the ``text_embedding``, the row's similarity factors and, when known, the
nearest real caption.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .configuration import RepBlendConfig
from .data.images import to_rgb
from .hub import (
    GRID_IMAGE,
    SyntheticSetCardData,
    TrainingRecord,
    check_distilled_set_config,
    commit_files,
    render_synthetic_set_card,
)
from .similarity import SoftSimilarity, build_similarity

__all__ = ["SyntheticSet"]

DATA_FILE = "data/train-00000-of-00001.parquet"


@contextlib.contextmanager
def _seeded_python_and_torch(seed: int):
    """Seed Python's and torch's global generators for the block, then restore both."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


class _InjectGradient(torch.autograd.Function):
    """``f(param) = 0`` whose gradient w.r.t. ``param`` is the given ``grad`` (times the incoming scalar).

    The trainer's backward of the outer iteration's meta-gradient. The earlier surrogate ``<param, grad> - <param,
    grad>`` cost two parameter-sized products and sums forward and one product backward, work that grows with N.
    """

    @staticmethod
    def forward(ctx, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.grad = grad
        return param.new_zeros(())

    @staticmethod
    def backward(ctx, scale: torch.Tensor):
        grad, ctx.grad = ctx.grad, None  # handed over, not copied, when the scale is 1 (no loss scaling)
        return (grad if bool(scale == 1) else grad * scale), None


class SyntheticSet(nn.Module):
    """The distilled set as an ``nn.Module`` of learnable tensors (the DistillationTrainer's model).

    Parameters: the images, ``text_embeddings`` [N, d_txt], the similarity module's parameters, and
    ``log_lr_img`` / ``log_lr_txt`` (η = exp(log η), clamped to bounds by :meth:`inner_lrs`). The images
    are ``pixel_values`` [N, 3, H, W] (normalised pixels, the paper's setting) or, for
    ``config.synthetic_space == "features"``, ``image_features`` [N, d_img]: vectors in the frozen image
    encoder's feature space, which only heads on that same encoder can use. :attr:`images` is whichever
    the set has. ``config`` describes what the set is and is saved alongside.
    """

    def __init__(self, config: RepBlendConfig, images: torch.Tensor | None = None,
                 text_embeddings: torch.Tensor | None = None):
        super().__init__()
        n = config.num_pairs
        self.config = config
        shape = self.image_shape(config)
        if images is None:
            images = torch.zeros(shape)
        if text_embeddings is None:
            text_embeddings = torch.zeros(n, config.text_dim)
        if tuple(images.shape) != shape:
            what = ("image_features must have shape {} (num_pairs, image_dim)" if config.synthetic_space == "features"
                    else "pixel_values must have shape {} (num_pairs, 3, image_size, image_size)")
            raise ValueError(what.format(shape) + f", got {tuple(images.shape)}")
        if tuple(text_embeddings.shape) != (n, config.text_dim):
            raise ValueError(f"text_embeddings must have shape {(n, config.text_dim)} (num_pairs, text_dim), "
                             f"got {tuple(text_embeddings.shape)}")
        setattr(self, self.image_parameter_name(config), nn.Parameter(images.detach().clone().float()))
        self.text_embeddings = nn.Parameter(text_embeddings.detach().clone().float())
        self.similarity: SoftSimilarity = build_similarity(config.similarity, n, rank=config.sim_rank,
                                                           alpha=config.sim_alpha)
        self.log_lr_img = nn.Parameter(torch.tensor(math.log(config.inner_lr_img)))
        self.log_lr_txt = nn.Parameter(torch.tensor(math.log(config.inner_lr_txt)))
        # How the set was trained (hyperparameters, validation curve): the trainer's CardCallback fills it.
        self.training_record = TrainingRecord()

    @staticmethod
    def image_parameter_name(config: RepBlendConfig) -> str:
        """``"image_features"`` for a feature-space set, else ``"pixel_values"``."""
        return "image_features" if config.synthetic_space == "features" else "pixel_values"

    @staticmethod
    def image_shape(config: RepBlendConfig) -> tuple[int, ...]:
        """The shape of the set's images: ``(N, image_dim)`` in feature space, else ``(N, 3, size, size)``."""
        if config.synthetic_space == "features":
            return (config.num_pairs, config.image_dim)
        return (config.num_pairs, 3, config.image_size, config.image_size)

    @property
    def images(self) -> nn.Parameter:
        """The learnable images: ``pixel_values`` or, in feature space, ``image_features``."""
        return getattr(self, self.image_parameter_name(self.config))

    @property
    def num_pairs(self) -> int:
        return self.config.num_pairs

    def inner_lrs(self, lr_min: float = 0.0, lr_max: float = math.inf) -> dict[str, torch.Tensor]:
        """The inner learning rates η per branch, ``exp(log η)`` clamped to ``[lr_min, lr_max]``."""
        lo = math.log(lr_min) if lr_min > 0 else -math.inf
        hi = math.log(lr_max)
        return {"image": self.log_lr_img.clamp(lo, hi).exp(), "text": self.log_lr_txt.clamp(lo, hi).exp()}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimiser group: ``images``, ``texts``, ``similarity``, ``lrs``."""
        return {"images": [self.images], "texts": [self.text_embeddings],
                "similarity": list(self.similarity.parameters()), "lrs": [self.log_lr_img, self.log_lr_txt]}

    def sync_config(self) -> RepBlendConfig:
        """Write the current learned learning rates into ``config`` (and its last stage's) and return it."""
        lrs = {k: v.detach() for k, v in self.inner_lrs().items()}
        self.config.inner_lr_img = float(lrs["image"])
        self.config.inner_lr_txt = float(lrs["text"])
        if self.config.stages:
            self.config.stages[-1].update(inner_lr_img=self.config.inner_lr_img, inner_lr_txt=self.config.inner_lr_txt)
        return self.config

    @torch.no_grad()
    def pair_set(self, encode=None, lr_min: float = 0.0, lr_max: float = math.inf, *, with_similarity: bool = True):
        """The set as the evaluation protocol's :class:`~repblend_hf.evaluation.PairSet` (on the CPU): image-encoder
        features, text embeddings, S (unless ``with_similarity`` is False: identity targets), the learned η clamped
        to ``[lr_min, lr_max]`` and, for a set distilled in stages, its :meth:`stage_schedule`.

        A pixel set's images go through ``encode`` (a frozen encoder, or an ``EncoderPass.encode``) in chunks of 256;
        a feature-space set's images are its features.
        """
        from .evaluation.pairs import PairSet

        images = self.images.detach()
        if self.config.synthetic_space == "features":
            feats = images
        elif encode is None:
            raise ValueError("a pixel set's images must go through the image encoder: pass encode=")
        else:
            feats = torch.cat([encode(chunk) for chunk in images.split(256)])
        lrs = self.inner_lrs(lr_min, lr_max)
        similarity = self.similarity().detach().cpu() if with_similarity else None
        return PairSet(feats.cpu(), self.text_embeddings.detach().cpu(), similarity, lr_img=float(lrs["image"]),
                       lr_txt=float(lrs["text"]), stages=self.stage_schedule(lr_min, lr_max))

    def stage_schedule(self, lr_min: float = 0.0, lr_max: float = math.inf) -> list | None:
        """How evaluation trains on the set, stage by stage: one :class:`~repblend_hf.evaluation.StagePhase` per stage
        of ``config.stages`` (None for a set of one stage), the last stage's η the live one (:meth:`inner_lrs`
        clamped to ``[lr_min, lr_max]``).

        A stage trains on every pair so far, or on its own pairs when its student did (``inner_pairs`` "stage"), for
        the recipe's epochs (no ``steps`` recorded: the first stage) or its student's ``steps``.
        """
        from .evaluation.pairs import StagePhase

        if not self.config.stages:
            return None
        lrs = {b: float(v.detach()) for b, v in self.inner_lrs(lr_min, lr_max).items()}
        schedule, end = [], 0
        for k, stage in enumerate(self.config.stages):
            start, end = end, end + stage["num_pairs"]
            last = k == len(self.config.stages) - 1
            schedule.append(StagePhase(start if stage.get("inner_pairs") == "stage" else 0, end,
                                       lrs["image"] if last else stage["inner_lr_img"],
                                       lrs["text"] if last else stage["inner_lr_txt"], stage.get("steps")))
        return schedule

    def fingerprint(self) -> str:
        """SHA-256 of the set's tensors (names and float32 values): the same set gives the same string anywhere."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def check_finite(self, action: str = "use") -> None:
        """Raise ``ValueError`` naming the tensors that hold NaN / inf (a non-finite set is never saved or used)."""
        bad = {name: int((~torch.isfinite(t)).sum()) for name, t in self.state_dict().items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())}
        if bad:
            counts = ", ".join(f"{n} ({k} values)" for n, k in bad.items())
            raise ValueError(f"cannot {action} this SyntheticSet: NaN/inf in {counts}. It comes from a diverged "
                             "distillation; resume from an earlier checkpoint with lower learning rates (--lr_img, "
                             "--lr_txt, --lr_sim, --lr_lr), or distil again")

    def forward(self, surrogate_grads: list[tuple[nn.Parameter, torch.Tensor]], loss: torch.Tensor) -> torch.Tensor:
        """A scalar whose value is ``loss`` and whose gradient w.r.t. each parameter is the given one.

        The DistillationTrainer computes the meta-gradient itself (TESLA or unrolled, then one pass
        through the encoder to the pixels); going through ``forward`` lets ``Trainer`` / accelerate
        run the usual backward (DDP averaging, grad scaling) on it.
        """
        out = loss.detach()
        for param, grad in surrogate_grads:
            out = out + _InjectGradient.apply(param, grad.detach())
        return out

    @classmethod
    def from_real(cls, config: RepBlendConfig, images, caption_features: torch.Tensor,
                  caption_offsets: torch.Tensor, image_encoder, seed: int = 0, *, init_transform: str = "eval",
                  image_features: torch.Tensor | None = None) -> SyntheticSet:
        """Initialise from N random real pairs (METHOD.md: "initialised from N random real training pairs").

        ``images`` is the train split's image column (PIL images), ``caption_features`` /
        ``caption_offsets`` its cached text embeddings (see ``FeatureSplit``); each chosen image is
        paired with one random caption's embedding. Pixels: the image goes through the encoder's
        ``init_transform``, ``"eval"`` (resize) or ``"train"`` (one random augmented view, as the released
        code does: its training set applies the train transform). Feature space: ``image_features`` are
        the split's cached features, ``[n, d_img]`` (eval transform) or ``[n, views, d_img]`` (the
        augmented views, one drawn at random per image for ``"train"``; ``"eval"`` needs the eval
        features). Everything random is drawn from ``seed``.
        """
        if init_transform not in ("eval", "train"):
            raise ValueError(f"init_transform must be 'eval' or 'train', got {init_transform!r}")
        g = torch.Generator().manual_seed(seed)
        n_real = len(caption_offsets) - 1
        if config.num_pairs > n_real:
            raise ValueError(f"num_pairs={config.num_pairs} exceeds the {n_real} training images; lower num_pairs")
        chosen = torch.randperm(n_real, generator=g)[: config.num_pairs]
        features_space = config.synthetic_space == "features"
        if features_space and image_features is None:
            raise ValueError("a feature-space set is initialised from cached features: pass image_features=")
        pixels, texts = [], []
        with _seeded_python_and_torch(seed):  # timm's train transform draws crops from Python's random
            for i in chosen.tolist():
                if features_space:
                    feats = image_features[i]
                    if feats.ndim == 2:  # views: one at random (train), or refuse to guess (eval)
                        if init_transform == "eval":
                            raise ValueError("init_transform='eval' needs the eval features [n, d_img], got views")
                        feats = feats[int(torch.randint(len(feats), (1,), generator=g))]
                    pixels.append(feats.float())
                else:
                    transform = (image_encoder.train_transform if init_transform == "train"
                                 else image_encoder.eval_transform)
                    pixels.append(transform(to_rgb(images[i])))
                lo, hi = int(caption_offsets[i]), int(caption_offsets[i + 1])
                texts.append(caption_features[lo + int(torch.randint(hi - lo, (1,), generator=g))])
            # The similarity's random factor L is drawn from the global generator: seeded here too, so that the
            # initial set is a function of `seed` alone (not of whatever consumed random numbers before).
            torch.manual_seed(seed)
            synthetic = cls(config, torch.stack(pixels), torch.stack(texts))
        synthetic.init_indices = chosen
        return synthetic

    # ----- Dataset round trip ---------------------------------------------------------------------------------

    def to_dataset(self, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                   nearest_captions: list[str] | None = None, previews: list | None = None):
        """One row per pair: ``image`` preview, the exact images, ``text_embedding``, similarity factors.

        Pixels: ``pixel_values`` (float32 ``Array3D``) and an ``image`` preview rendered from them with the
        encoder's normalisation ``mean`` / ``std``. Feature space: ``image_features`` (float32, d_img) and,
        when ``previews`` (PIL images, e.g. each row's nearest real training image) are given, those as
        ``image``: a hint for people, not the set's content.
        """
        from datasets import Array3D, Dataset, Features, Image, List, Value

        self.check_finite("export")  # save_pretrained and push_to_hub come through here
        n, s = self.num_pairs, self.config.image_size
        images = self.images.detach().cpu().float()
        rows = [self.similarity.row_factors(i) for i in range(n)]
        factor_names = sorted(rows[0]) if rows else []
        columns, features = {}, {}
        if self.config.synthetic_space == "features":
            if previews is not None:
                if len(previews) != n:
                    raise ValueError(f"previews has {len(previews)} images for {n} pairs")
                columns["image"], features["image"] = list(previews), Image()
            columns["image_features"] = images.numpy()
            features["image_features"] = List(Value("float32"), length=self.config.image_dim)
        else:
            columns["image"] = [self._preview(images[i], mean, std) for i in range(n)]
            columns["pixel_values"] = images.numpy()
            features["image"], features["pixel_values"] = Image(), Array3D(shape=(3, s, s), dtype="float32")
        columns["text_embedding"] = self.text_embeddings.detach().cpu().float().numpy()
        features["text_embedding"] = List(Value("float32"), length=self.config.text_dim)
        for k in factor_names:
            columns[f"similarity_{k}"] = [r[k].cpu().float().numpy() for r in rows]
            features[f"similarity_{k}"] = List(Value("float32"))
        if nearest_captions is not None:
            columns["nearest_caption"] = list(nearest_captions)
            features["nearest_caption"] = Value("string")
        return Dataset.from_dict(columns, features=Features(features))

    @staticmethod
    def _preview(pixels: torch.Tensor, mean, std):
        from PIL import Image as PILImage

        mean = torch.tensor(mean or (0.5, 0.5, 0.5)).view(3, 1, 1)
        std = torch.tensor(std or (0.5, 0.5, 0.5)).view(3, 1, 1)
        img = (pixels * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        return PILImage.fromarray(img)

    @classmethod
    def from_dataset(cls, dataset, config: RepBlendConfig) -> SyntheticSet:
        """Rebuild the exact tensors from :meth:`to_dataset`'s rows (bit-exact float32)."""
        needed = [cls.image_parameter_name(config), "text_embedding"]
        missing = [c for c in needed if c not in dataset.column_names]
        if missing:
            raise ValueError(f"this dataset is not a distilled set: it lacks column(s) {missing} "
                             f"(columns: {dataset.column_names}); expected a repblend_hf SyntheticSet export")
        if len(dataset) != config.num_pairs:
            raise ValueError(f"dataset has {len(dataset)} rows but config.num_pairs is {config.num_pairs}")
        table = dataset.with_format("numpy")
        images = np.asarray(table[cls.image_parameter_name(config)], dtype=np.float32)
        synthetic = cls(config, torch.from_numpy(images),
                        torch.from_numpy(np.asarray(table["text_embedding"], dtype=np.float32)))
        factor_columns = sorted(c for c in dataset.column_names if c.startswith("similarity_"))
        expected = sorted(f"similarity_{name}" for name, _ in synthetic.similarity.named_parameters())
        if factor_columns != expected:  # else the learned S would be silently dropped (or never loaded)
            raise ValueError(f"the config and the rows disagree: config.json says similarity={config.similarity!r}, "
                             f"which stores columns {expected or '(none)'}, but the rows have "
                             f"{factor_columns or 'no similarity columns'}; set similarity (and sim_rank) in "
                             "config.json to what made the rows, or save the set again with save_pretrained")
        if factor_columns:
            rows = [{c[len("similarity_"):]: torch.from_numpy(np.asarray(table[i][c], dtype=np.float32))
                     for c in factor_columns} for i in range(len(dataset))]
            synthetic.similarity.load_row_factors(rows)
        synthetic.check_finite("load")
        return synthetic

    def save_pretrained(self, directory: str | os.PathLike, mean=None, std=None,
                        nearest_captions: list[str] | None = None, previews: list | None = None) -> Path:
        """Write ``config.json`` (learned lrs included) and the rows as Parquet, a layout ``load_dataset`` reads."""
        directory = Path(directory)
        (directory / "data").mkdir(parents=True, exist_ok=True)
        self.sync_config().save_pretrained(directory)
        self.to_dataset(mean, std, nearest_captions, previews).to_parquet(str(directory / DATA_FILE))
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike) -> SyntheticSet:
        """A saved set from a local folder (:meth:`from_pretrained`) or, when no such folder exists, from a Hub dataset
        repo id (:meth:`from_hub`): what ``repblend-evaluate --distilled_set`` and ``--initial_stages`` take."""
        return cls.from_pretrained(path) if Path(path).is_dir() else cls.from_hub(str(path))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SyntheticSet:
        """Load a set written by :meth:`save_pretrained` from a local directory."""
        from datasets import Dataset

        directory = Path(directory)
        if not (directory / "config.json").is_file() or not (directory / DATA_FILE).is_file():
            raise ValueError(f"{directory} is not a saved distilled set: expected config.json and {DATA_FILE}")
        config = RepBlendConfig.from_pretrained(directory)
        return cls.from_dataset(Dataset.from_parquet(str(directory / DATA_FILE)), config)

    # ----- Hub ------------------------------------------------------------------------------------------------

    def card_data(self, repo_id: str, *, results: list[dict] | dict | None = None, grid_image: str | None = None,
                  has_nearest_captions: bool = False, metadata: dict | None = None) -> SyntheticSetCardData:
        """What this set's card says (:class:`~repblend_hf.hub.SyntheticSetCardData`): its config, the ``results``,
        and the ``training_record`` a trainer filled (hyperparameters, validation curve); see :meth:`push_to_hub`."""
        return SyntheticSetCardData(repo_id, self.sync_config().to_dict(), results=results, grid_image=grid_image,
                                    has_nearest_captions=has_nearest_captions, metadata=dict(metadata or {}),
                                    training=self.training_record)

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool = False,
                    commit_message: str = "Upload distilled set with repblend_hf", card_data: dict | None = None,
                    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                    nearest_captions: list[str] | None = None, results: list[dict] | dict | None = None,
                    previews: list | None = None,
                    grid_image: str | os.PathLike | None = None) -> str:
        """Push the set as a Hub dataset repo, in one commit: the rows, ``config.json`` and a rendered card.

        DESIGN.md, "The Hub artefact". The rows and ``config.json`` are what :meth:`save_pretrained`
        writes (``mean`` / ``std`` / ``nearest_captions`` as there); the README comes from
        ``hub_cards/synthetic_set.md`` with ``results`` (one ``results.json`` record or a list of
        them: the table beside the baselines, and modality diagnostics when present), ``grid_image``
        (a PNG of the synthetic images, uploaded as ``images/synthetic_grid.png``), ``card_data``
        (extra YAML metadata such as ``license`` or ``pretty_name``; tags add to the defaults) and the
        ``training_record`` a trainer filled (the run's hyperparameters and validation curve).
        Creates the repo if needed (``private`` applies then).
        Returns the commit URL (a ``huggingface_hub.CommitInfo``; ``.oid`` is the new revision). A
        failed push leaves the repo at its previous revision and raises ``RuntimeError`` saying so.
        """
        import tempfile

        if grid_image is not None and (not Path(grid_image).is_file() or Path(grid_image).suffix.lower() != ".png"):
            raise ValueError(f"grid_image must be an existing .png file, got {str(grid_image)!r}")
        card = self.card_data(repo_id, results=results, grid_image=GRID_IMAGE if grid_image is not None else None,
                              has_nearest_captions=nearest_captions is not None, metadata=card_data)
        readme = str(render_synthetic_set_card(card)).encode()
        with tempfile.TemporaryDirectory(prefix="repblend-push-") as staging:
            self.save_pretrained(staging, mean, std, nearest_captions, previews)
            files = {"config.json": Path(staging) / "config.json", DATA_FILE: Path(staging) / DATA_FILE,
                     "README.md": readme}
            if grid_image is not None:
                files[GRID_IMAGE] = Path(grid_image)
            return commit_files(repo_id, files, token=token, private=private, commit_message=commit_message,
                                local_hint="this SyntheticSet in memory is untouched: retry the push, or keep it "
                                           "with save_pretrained(directory)")

    @classmethod
    def from_hub(cls, repo_id: str, revision: str | None = None, token: str | None = None) -> SyntheticSet:
        """Download a set pushed with :meth:`push_to_hub` and rebuild its exact tensors (bit-exact float32).

        DESIGN.md, "The Hub artefact". Fetches only ``config.json`` and ``data/*.parquet`` of the
        dataset repo (``revision``: a branch or a revision id), then :meth:`from_pretrained`.
        """
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, repo_type="dataset", revision=revision, token=token,
                                  allow_patterns=["config.json", "data/*.parquet"])
        check_distilled_set_config(local, repo_id)
        if not (Path(local) / DATA_FILE).is_file():
            raise ValueError(f"{repo_id} has a RepBlendConfig but not the rows file {DATA_FILE}; it was not pushed "
                             "with SyntheticSet.push_to_hub (push the set again with it)")
        return cls.from_pretrained(local)
