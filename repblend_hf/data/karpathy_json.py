"""Local folders of Karpathy / BLIP-style JSON annotations (Flickr30K, COCO and their like) as schema splits.

``train.json`` is a list of ``{"image", "caption", "image_id"}`` rows, one per caption; ``val.json`` /
``test.json`` are lists of ``{"image", "caption": [...]}``, one per image (the BLIP names of
:data:`KARPATHY_JSON_FILES` are accepted too). Rows are grouped by image path; paths are relative to the folder or
to ``image_root``; a missing ``image_id`` is the image file name without extension. Images stay on disk (only their
paths are stored) and are checked whole (a truncated file fails, naming its path) once, when the split is first
built. The cache key covers the annotation file and every image file (size and mtime), so replacing an image
rebuilds the split and, through its fingerprint, the features. Annotation files must be UTF-8 JSON; empty captions
are refused with their row. :func:`~repblend_hf.data.load_image_text_dataset` calls :func:`load_karpathy_json`
for a folder where :func:`find_json_files` finds annotations.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import datasets

from .fashion_scenes import build_cached_split
from .images import check_image_file
from .schema import SCHEMA_FEATURES, SPLITS, as_caption_list

__all__ = ["KARPATHY_JSON_FILES", "find_json_files", "load_karpathy_json"]

# Part of the cache key of JSON-folder builds: bump when _generate_json_rows changes.
_JSON_LOADER_VERSION = "karpathy-json-v2"

# Accepted annotation file names per split, plain first, then the BLIP names.
KARPATHY_JSON_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train.json", "flickr30k_train.json", "coco_karpathy_train.json"),
    "validation": ("val.json", "validation.json", "flickr30k_val.json", "coco_karpathy_val.json"),
    "test": ("test.json", "flickr30k_test.json", "coco_karpathy_test.json"),
}


def find_json_files(directory: str) -> dict[str, list[str]]:
    """Per split, the accepted annotation files present in ``directory``."""
    found = {
        split: [f for f in names if os.path.isfile(os.path.join(directory, f))]
        for split, names in KARPATHY_JSON_FILES.items()
    }
    return {split: files for split, files in found.items() if files}


def load_karpathy_json(
    directory: str, image_root: str | None, cache_dir: str | None, **unexpected
) -> datasets.DatasetDict:
    if unexpected:
        raise TypeError(f"Unexpected keyword arguments for a Karpathy JSON folder: {sorted(unexpected)}")
    found = find_json_files(directory)
    for split in SPLITS:
        if split not in found:
            raise ValueError(
                f"{directory!r} has Karpathy-style annotations for {sorted(found)} but none for the {split} split; "
                f"expected one of {list(KARPATHY_JSON_FILES[split])}"
            )
        if len(found[split]) > 1:
            raise ValueError(f"{directory!r} has several {split} annotation files {found[split]}; keep one")
    root = os.path.abspath(image_root if image_root is not None else directory)
    out = {}
    for split in SPLITS:
        path = os.path.abspath(os.path.join(directory, found[split][0]))
        stat = os.stat(path)
        order, _ = _group_annotations(path)
        gen_kwargs = {
            "annotation_file": path,
            "image_root": root,
            # The cache key (and with it the features' fingerprint) follows the annotation file and every image
            # file through their sizes and mtimes, as datasets' folder builders do: replacing an image rebuilds.
            "stamp": (stat.st_size, stat.st_mtime_ns),
            "images_stamp": _images_stamp(path, root, order),
            "version": _JSON_LOADER_VERSION,
        }
        out[split] = build_cached_split(_generate_json_rows, gen_kwargs, SCHEMA_FEATURES, cache_dir, split)
    return datasets.DatasetDict(out)


def _image_path(key: str, image_root: str) -> str:
    return key if os.path.isabs(key) else os.path.join(image_root, key)


def _images_stamp(annotation_file: str, image_root: str, keys: list[str]) -> str:
    """A hash of every listed image file's path, size and mtime (a missing file raises, naming it)."""
    digest = hashlib.sha256()
    for key in keys:
        path = _image_path(key, image_root)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"Image file {path} listed in {annotation_file} does not exist; image paths are resolved against "
                f"{image_root} (set image_root= to the folder they are relative to)"
            ) from None
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_json(annotation_file: str):
    """The parsed annotation file; a decoding or syntax error names the file and where in it."""
    try:
        with open(annotation_file, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{annotation_file} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8 (JSON files must "
            "be UTF-8)"
        ) from err
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{annotation_file} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; fix the file "
            "(a Karpathy annotation file is a JSON list of {'image', 'caption'} objects)"
        ) from err


def _group_annotations(annotation_file: str) -> tuple[list[str], dict[str, dict]]:
    """Image keys in first-seen order, and per key its ``image_id`` and captions (rows of one image merged)."""
    entries = _read_json(annotation_file)
    if not isinstance(entries, list):
        raise ValueError(f"{annotation_file}: expected a JSON list of {{'image', 'caption'}} objects")
    order: list[str] = []
    grouped: dict[str, dict] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise ValueError(f"{annotation_file}: entry {i} needs keys 'image' and 'caption', got {entry!r}")
        captions = as_caption_list(entry["caption"], annotation_file, "caption", i)
        key = entry["image"]
        if key not in grouped:
            order.append(key)
            image_id = entry.get("image_id")
            if image_id is None:
                image_id = os.path.splitext(os.path.basename(key))[0]
            grouped[key] = {"image_id": str(image_id), "captions": []}
        grouped[key]["captions"].extend(captions)
    return order, grouped


def _generate_json_rows(
    annotation_file: str, image_root: str, stamp, images_stamp: str, version: str
) -> Iterator[dict]:
    """One row per image of a Karpathy / BLIP annotation file, each image file checked whole as it is listed."""
    del stamp, images_stamp, version  # only part of the cache key
    order, grouped = _group_annotations(annotation_file)
    for key in order:
        path = _image_path(key, image_root)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Image file {path} listed in {annotation_file} does not exist; image paths are resolved against "
                f"{image_root} (set image_root= to the folder they are relative to)"
            )
        try:
            check_image_file(path)
        except ValueError as err:
            raise ValueError(f"{err} (listed in {annotation_file})") from err.__cause__
        yield {"image": {"path": path, "bytes": None}, **grouped[key]}
