"""The schema every image-text dataset is loaded into (DESIGN.md, "Schema of an image-text dataset").

Splits ``train`` / ``validation`` / ``test``; columns ``image`` (``datasets.Image``), ``captions`` (list of
str) and ``image_id`` (str). The loaders (:mod:`.loading`) conform every source to it; the embedded default
(:mod:`.fashion_scenes`) adds its provenance columns after these.
"""

from __future__ import annotations

import datasets

__all__ = ["SPLITS", "SCHEMA_COLUMNS", "SCHEMA_FEATURES"]

SPLITS = ("train", "validation", "test")
SCHEMA_COLUMNS = ("image", "captions", "image_id")
SCHEMA_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "captions": datasets.List(datasets.Value("string")),
        "image_id": datasets.Value("string"),
    }
)
