"""Encode an image-text dataset once with the frozen encoders and keep the features as columns.

DESIGN.md, "Data flow": every later stage (experts, distillation, evaluation) reads these cached
columns instead of running the encoders again. Columns added by :func:`encode_dataset`:

- ``image_features``: the image encoder's pooled feature of the eval-transformed image (d_img floats)
- ``text_features``: one text embedding per caption (list of d_txt-float lists)
- ``augmented_image_features``: optional, ``num_views`` features of train-time augmented views

:class:`FeatureSplit` turns one encoded split into dense tensors.
"""

from __future__ import annotations

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
    split was encoded with augmented views.
    """

    image_features: torch.Tensor
    caption_features: torch.Tensor
    caption_to_image: torch.Tensor
    augmented_image_features: torch.Tensor | None = None
    captions: list[str] | None = None

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
    def from_dataset(cls, ds, with_captions: bool = False) -> "FeatureSplit":
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
        return cls(image, text, caption_to_image, augmented, captions)
