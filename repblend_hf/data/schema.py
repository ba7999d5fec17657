"""The schema every image-text dataset is loaded into (DESIGN.md, "Schema of an image-text dataset").

Splits ``train`` / ``validation`` / ``test``; columns ``image`` (``datasets.Image``), ``captions`` (list of
str) and ``image_id`` (str). The loaders (:mod:`.loading`) conform every source to it; the embedded default
(:mod:`.fashion_scenes`) adds its provenance columns after these.
"""

from __future__ import annotations

import datasets

__all__ = ["SPLITS", "SCHEMA_COLUMNS", "SCHEMA_FEATURES", "as_caption_list"]

SPLITS = ("train", "validation", "test")
SCHEMA_COLUMNS = ("image", "captions", "image_id")
SCHEMA_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "captions": datasets.List(datasets.Value("string")),
        "image_id": datasets.Value("string"),
    }
)


def as_caption_list(value, where: str, column: str, row: int) -> list[str]:
    """A row's captions as the schema holds them, a non-empty list of non-empty strings (one string: a 1-element
    list); anything else fails, naming ``where``, the ``column`` and the ``row``."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        if not all(v.strip() for v in value):  # an empty caption would be encoded and trained on as a real one
            raise ValueError(
                f"{where}: row {row} of caption column {column!r} has an empty caption ({list(value)!r}); fill it in "
                "or drop it from the row"
            )
        return list(value)
    raise ValueError(
        f"{where}: row {row} of caption column {column!r} is {value!r}; expected a string or a list of strings"
    )
