"""Encode an image-text dataset once with the frozen encoders and keep the features as columns.

DESIGN.md, "Data flow": every later stage (experts, distillation, evaluation) reads these cached
columns instead of running the encoders again. Columns added by :func:`encode_dataset`:

- ``image_features``: the image encoder's pooled feature of the eval-transformed image (d_img floats)
- ``text_features``: one text embedding per caption (list of d_txt-float lists)
- ``augmented_image_features``: optional, ``num_views`` features of train-time augmented views

:class:`FeatureSplit` turns one encoded split into dense tensors.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FeatureSplit", "IMAGE_FEATURES", "TEXT_FEATURES", "AUGMENTED_FEATURES"]

IMAGE_FEATURES = "image_features"
TEXT_FEATURES = "text_features"
AUGMENTED_FEATURES = "augmented_image_features"


@dataclass
class FeatureSplit:
    """One split's cached features as tensors.

    ``caption_to_image[c]`` is the row (image index) of caption ``c``; captions of one image are
    contiguous. ``augmented_image_features`` has shape ``[num_images, num_views, d_img]`` when the
    split was encoded with augmented views. ``fingerprint`` is the encoded ``Dataset``'s fingerprint
    (data, encoders and encoding options), which expert trajectories record.
    """

    image_features: torch.Tensor
    caption_features: torch.Tensor
    caption_to_image: torch.Tensor
    augmented_image_features: torch.Tensor | None = None
    captions: list[str] | None = None
    fingerprint: str | None = None

    @property
    def num_images(self) -> int:
        return self.image_features.shape[0]

    @property
    def num_captions(self) -> int:
        return self.caption_features.shape[0]

    def caption_offsets(self) -> torch.Tensor:
        """``offsets[i]:offsets[i+1]`` are the caption indices of image ``i`` (length num_images + 1)."""
        counts = torch.bincount(self.caption_to_image, minlength=self.num_images)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    @classmethod
    def from_dataset(cls, ds, with_captions: bool = False) -> FeatureSplit:
        """Build from a split encoded by :func:`encode_dataset` (a ``datasets.Dataset``)."""
        missing = [c for c in (IMAGE_FEATURES, TEXT_FEATURES) if c not in ds.column_names]
        if missing:
            raise ValueError(f"dataset has no column(s) {missing}; run repblend_hf.encode_dataset on it first "
                             f"(columns present: {ds.column_names})")
        table = ds.with_format("numpy", columns=[c for c in (IMAGE_FEATURES, TEXT_FEATURES, AUGMENTED_FEATURES)
                                                 if c in ds.column_names])
        image = torch.from_numpy(np.stack(table[IMAGE_FEATURES]).astype(np.float32))
        per_image = table[TEXT_FEATURES]
        caption_to_image = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, t in enumerate(per_image)])
        text = torch.from_numpy(np.concatenate([np.stack(t) for t in per_image]).astype(np.float32))
        augmented = None
        if AUGMENTED_FEATURES in ds.column_names:
            augmented = torch.from_numpy(np.stack([np.stack(v) for v in table[AUGMENTED_FEATURES]]).astype(np.float32))
        captions = [c for caps in ds["captions"] for c in caps] if with_captions else None
        return cls(image, text, caption_to_image, augmented, captions, getattr(ds, "_fingerprint", None))


def _encode_features(image_dim: int, text_dim: int, num_views: int):
    from datasets import List, Value

    features = {IMAGE_FEATURES: List(Value("float32"), length=image_dim),
                TEXT_FEATURES: List(List(Value("float32"), length=text_dim))}
    if num_views:
        features[AUGMENTED_FEATURES] = List(List(Value("float32"), length=image_dim), length=num_views)
    return features


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's and Python's global generators (timm's train transforms draw from ``random``), then restore."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def encode_dataset(dataset, image_encoder, text_encoder, *, num_views: int = 0,
                   view_splits: tuple[str, ...] = ("train",), batch_size: int = 64, map_batch_size: int = 512,
                   seed: int = 0, desc: str | None = None):
    """Add cached encoder features to a ``Dataset`` or every split of a ``DatasetDict``.

    DESIGN.md, "Data flow": ``Dataset.map`` (batched) adds :data:`IMAGE_FEATURES` (eval transform) and
    :data:`TEXT_FEATURES` (one embedding per caption); splits named in ``view_splits`` also get
    ``num_views`` train-time augmented views in :data:`AUGMENTED_FEATURES`, which the experts sample
    from. The map's fingerprint is derived from the input's fingerprint, both encoders' weights and the
    options, so a second call with the same encoders and data is a cache hit (for datasets backed by
    cache files, as every loader in :mod:`repblend_hf.data` returns). The encoders' fingerprints cover
    their weights, transforms (interpolation, normalisation, augmentation) and tokenizer; the local-folder
    loaders' fingerprints cover every image file's size and mtime.

    ``map_batch_size`` rows go to the encoders at a time: their captions are sorted by token count across
    the whole map batch (little padding), and both encoders run ``batch_size`` items per forward pass.
    """
    from datasets import DatasetDict, Features
    from datasets.fingerprint import Hasher

    if num_views < 0:
        raise ValueError(f"num_views must be >= 0, got {num_views}")
    if isinstance(dataset, DatasetDict):
        return DatasetDict({
            split: encode_dataset(ds, image_encoder, text_encoder, num_views=num_views if split in view_splits else 0,
                                  view_splits=view_splits, batch_size=batch_size, map_batch_size=map_batch_size,
                                  seed=seed, desc=f"Encoding {split}")
            for split, ds in dataset.items()
        })
    missing = [c for c in ("image", "captions") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"cannot encode: dataset has no column(s) {missing} (columns: {dataset.column_names}); "
                         "load it with repblend_hf.load_image_text_dataset(..., column_mapping={...})")

    def encode(batch, indices):
        out = {IMAGE_FEATURES: image_encoder.encode_images(batch["image"], batch_size=batch_size).numpy()}
        flat = [c for caps in batch["captions"] for c in caps]
        emb = text_encoder.encode_texts(flat, batch_size=batch_size).numpy()
        bounds = np.cumsum([0] + [len(caps) for caps in batch["captions"]])
        out[TEXT_FEATURES] = [emb[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        if num_views:
            # Views are a function of (seed, first row of the map batch): reproducible for a fixed map_batch_size.
            with _seeded(seed * 1_000_003 + indices[0]):
                views = [image_encoder.encode_images(batch["image"], train=True, batch_size=batch_size).numpy()
                         for _ in range(num_views)]
            out[AUGMENTED_FEATURES] = np.stack(views, axis=1)
        return out

    # v3: images go through data.images.to_rgb (16-bit images were clipped to white before).
    # v4: images through the BatchNorm-folded encoder, captions sorted across map batches of map_batch_size rows.
    fingerprint = Hasher.hash(["repblend_hf.encode_dataset/v4", dataset._fingerprint, image_encoder.fingerprint,
                               text_encoder.fingerprint, num_views, seed, batch_size, map_batch_size])
    features = Features({**dataset.features, **_encode_features(image_encoder.feature_dim, text_encoder.feature_dim,
                                                                num_views)})
    return dataset.map(encode, batched=True, batch_size=map_batch_size, with_indices=True, features=features,
                       new_fingerprint=fingerprint, desc=desc or "Encoding")
