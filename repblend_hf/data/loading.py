"""Load image-caption datasets into one schema: splits train / validation / test, columns
``image`` (``datasets.Image``), ``captions`` (list of str) and ``image_id`` (str).

DESIGN.md, "Schema of an image-text dataset". Sources, in the order :func:`load_image_text_dataset`
tries them:

1. ``"fashion-scenes"``: the embedded default, generated from Fashion-MNIST
   (:mod:`repblend_hf.data.fashion_scenes`).
2. A registered Hub layout (:data:`HUB_LAYOUTS`): ``"flickr30k"`` or ``"coco"`` (Karpathy splits),
   loaded with ``datasets.load_dataset(repo_id, ...)``. ``layout="flickr30k"`` with any other
   ``name_or_path`` (a local folder or a Hub mirror holding the same files) reads that copy instead.

   - ``flickr30k`` → ``nlphuji/flickr30k``. Its main branch only holds a loading script, which
     datasets ≥ 4 no longer runs, so the loader reads the Hub's Parquet export of it (revision
     ``refs/convert/parquet``, files ``TEST/test/*.parquet``): one split "test" with all 31,014
     images, one row per image, columns ``image`` (Image), ``caption`` (list of 5 str), ``sentids``
     (list of str), ``split`` ("train" / "val" / "test": the Karpathy split), ``img_id`` (str),
     ``filename`` (str). Rows are grouped by the ``split`` column: 29,000 / 1,014 / 1,000 images.
   - ``coco`` → ``bitmind/MS-COCO``: Parquet files ``data/{train,validation,test}-*.parquet`` with
     the Karpathy splits (train = Karpathy train + restval: 113,287 images; 5,000 validation;
     5,000 test) and embedded images, one row per *caption* (566,747 / 25,010 / 25,010 rows),
     columns ``image`` (Image), ``filepath``, ``filename``, ``imgid``, ``split``, ``sentids``
     (list of int), ``sentences`` (struct with ``raw``, ``tokens``, ``imgid``, ``sentid``),
     ``cocoid`` (int). Rows are grouped by ``cocoid``; the captions are ``sentences.raw``.
     (``yerevann/coco-karpathy`` has the same annotations but only image URLs;
     ``HuggingFaceM4/COCO`` is a loading script.)

3. A local folder with Karpathy / BLIP-style JSON annotations (:data:`KARPATHY_JSON_FILES`), read by
   :mod:`.karpathy_json` (the file layout, the image checks and the cache key are described there).
4. Anything else ``datasets.load_dataset`` reads (a Hub id or a local folder of data files), with
   ``column_mapping`` renaming its columns to the schema, e.g. ``{"img": "image", "sentences":
   "captions"}``. Dotted names reach into struct columns (``"sentences.raw"``). A caption column
   holding one string per row becomes a 1-element list; rows that share an ``image_id`` can be
   merged with ``group_by_image=True``; a missing ``image_id`` column becomes ``"<split>-<row>"``.
   Split names ``val`` / ``valid`` / ``dev`` count as ``validation``; no split is ever invented.

The loaders never rewrite image bytes: renaming and dropping columns is free, new caption / id
columns are added next to the memory-mapped images, and grouping is a ``select`` of rows.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from .fashion_scenes import FASHION_SCENES, load_fashion_scenes
from .karpathy_json import KARPATHY_JSON_FILES, find_json_files, load_karpathy_json
from .schema import SCHEMA_COLUMNS, SPLITS, as_caption_list

__all__ = [
    "FASHION_SCENES",
    "SPLITS",
    "HubLayout",
    "HUB_LAYOUTS",
    "KARPATHY_JSON_FILES",
    "load_image_text_dataset",
]

_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}


@dataclass(frozen=True)
class HubLayout:
    """Where a dataset lives on the Hub and how its files map onto the schema.

    ``column_mapping`` maps source columns (dotted for struct fields) to schema columns.
    ``splits`` maps each schema split to the native split it is read from; when the Karpathy split
    is a column instead, ``split_column`` names it and ``split_values`` gives its value per split.
    ``group_by_image`` merges rows that share an ``image_id`` (one row per caption on the Hub).
    """

    repo_id: str
    column_mapping: dict[str, str]
    revision: str | None = None
    data_files: dict[str, str] | None = None
    splits: dict[str, str] = field(default_factory=lambda: {split: split for split in SPLITS})
    split_column: str | None = None
    split_values: dict[str, str] | None = None
    group_by_image: bool = False


HUB_LAYOUTS: dict[str, HubLayout] = {
    "flickr30k": HubLayout(
        repo_id="nlphuji/flickr30k",
        revision="refs/convert/parquet",
        data_files={"test": "TEST/test/*.parquet"},
        column_mapping={"image": "image", "caption": "captions", "img_id": "image_id"},
        splits={"train": "test", "validation": "test", "test": "test"},
        split_column="split",
        split_values={"train": "train", "validation": "val", "test": "test"},
    ),
    "coco": HubLayout(
        repo_id="bitmind/MS-COCO",
        column_mapping={"image": "image", "sentences.raw": "captions", "cocoid": "image_id"},
        group_by_image=True,
    ),
}


def load_image_text_dataset(
    name_or_path: str,
    *,
    image_root: str | None = None,
    column_mapping: dict[str, str] | None = None,
    cache_dir: str | None = None,
    **kwargs,
) -> datasets.DatasetDict:
    """Load an image-caption dataset as a ``DatasetDict`` with splits train / validation / test and
    columns ``image`` (``datasets.Image``), ``captions`` (list of str) and ``image_id`` (str).

    Args:
        name_or_path: ``"fashion-scenes"``, a name in :data:`HUB_LAYOUTS` (``"flickr30k"``,
            ``"coco"``), a local folder with Karpathy-style JSON, or anything ``datasets.load_dataset``
            reads (Hub id or local folder).
        image_root: folder the image paths of Karpathy JSON annotations are relative to
            (default: the annotation folder).
        column_mapping: source column → schema column (``{"img": "image", "sentences": "captions"}``);
            for a Hub layout it overrides the layout's own mapping.
        cache_dir: the datasets cache folder (default: ``HF_DATASETS_CACHE``).
        **kwargs: per source. fashion-scenes: ``num_train``, ``num_validation``, ``num_test``,
            ``seed``, ``fashion_mnist_dir``. Hub layouts: ``layout`` (read another copy of a
            registered layout) and any ``datasets.load_dataset`` keyword (``token``, ``num_proc``,
            ...). Generic datasets: ``group_by_image`` and ``datasets.load_dataset`` keywords.
    """
    layout_name = kwargs.pop("layout", None)
    if name_or_path == FASHION_SCENES and layout_name is None:
        if column_mapping is not None or image_root is not None:
            raise ValueError(
                f"{FASHION_SCENES!r} is generated in the schema; column_mapping and image_root do not apply"
            )
        return load_fashion_scenes(cache_dir=cache_dir, **kwargs)
    if layout_name is not None or name_or_path in HUB_LAYOUTS:
        layout_name = layout_name or name_or_path
        if layout_name not in HUB_LAYOUTS:
            raise ValueError(f"Unknown layout {layout_name!r}; registered layouts: {sorted(HUB_LAYOUTS)}")
        layout = HUB_LAYOUTS[layout_name]
        source = layout.repo_id if name_or_path == layout_name else name_or_path
        return _load_hub_layout(source, layout, layout_name, column_mapping, cache_dir, kwargs)
    if os.path.isdir(name_or_path) and find_json_files(name_or_path):
        if column_mapping is not None:
            raise ValueError("column_mapping does not apply to Karpathy JSON folders (their keys are fixed)")
        return load_karpathy_json(name_or_path, image_root, cache_dir, **kwargs)
    return _load_generic(name_or_path, column_mapping, cache_dir, kwargs)


# --------------------------------------------------------------------------------------------
# Hub layouts and generic datasets
# --------------------------------------------------------------------------------------------


def _load_hub_layout(
    source: str, layout: HubLayout, layout_name: str, column_mapping: dict[str, str] | None, cache_dir, load_kwargs
) -> datasets.DatasetDict:
    try:
        raw = datasets.load_dataset(
            source, cache_dir=cache_dir, revision=layout.revision, data_files=layout.data_files, **load_kwargs
        )
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        raise ValueError(
            f"Could not load {source!r} for layout {layout_name!r} ({type(err).__name__}: {err}). Go online once "
            f"(it is cached afterwards), or pass a local copy with the same files: "
            f"load_image_text_dataset('/path/to/copy', layout={layout_name!r})"
        ) from err
    mapping = {**layout.column_mapping, **(column_mapping or {})}
    out = {}
    for split in SPLITS:
        native = layout.splits[split]
        if native not in raw:
            raise ValueError(
                f"{source!r} (layout {layout_name!r}) has no split {native!r}; splits present: {list(raw)}"
            )
        keep = None
        if layout.split_column is not None:
            if layout.split_column not in raw[native].column_names:
                raise ValueError(
                    f"{source!r} split {native!r} has no column {layout.split_column!r} (the Karpathy split that "
                    f"layout {layout_name!r} reads); columns present: {raw[native].column_names}"
                )
            values = _read_column(raw[native], layout.split_column, "split", f"{source!r} split {native!r}")
            wanted = layout.split_values[split]
            keep = [i for i, value in enumerate(values) if value == wanted]
            if not keep:
                raise ValueError(f"{source!r}: no row has {layout.split_column}={wanted!r} (the {split} split)")
        out[split] = _conform(
            raw[native],
            mapping,
            where=f"{source!r} (layout {layout_name!r}) split {native!r}",
            split=split,
            rows=keep,
            group_by_image=layout.group_by_image,
        )
    return datasets.DatasetDict(out)


def _load_generic(name_or_path: str, column_mapping, cache_dir, load_kwargs) -> datasets.DatasetDict:
    group_by_image = bool(load_kwargs.pop("group_by_image", False))
    raw = _load_dataset(name_or_path, cache_dir=cache_dir, **load_kwargs)
    if not isinstance(raw, datasets.DatasetDict):
        raise ValueError(f"{name_or_path!r} loaded as a single split; do not pass split=, all of {SPLITS} are needed")
    by_name = {_SPLIT_ALIASES.get(name, name): name for name in raw}
    missing = [split for split in SPLITS if split not in by_name]
    if missing:
        raise ValueError(
            f"{name_or_path!r} has splits {list(raw)} but needs {list(SPLITS)} ('val', 'valid' and 'dev' count "
            f"as 'validation'); missing: {missing}. Splits are never invented: create the missing split "
            f"(e.g. with Dataset.train_test_split) and save the dataset with all three."
        )
    mapping = dict(column_mapping or {})
    return datasets.DatasetDict(
        {
            split: _conform(
                raw[by_name[split]],
                mapping,
                where=f"{name_or_path!r} split {by_name[split]!r}",
                split=split,
                group_by_image=group_by_image,
            )
            for split in SPLITS
        }
    )


def _load_dataset(path: str, **kwargs) -> datasets.DatasetDict:
    """``datasets.load_dataset`` that names the accepted sources when ``path`` is not one of them."""
    try:
        return datasets.load_dataset(path, **kwargs)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        known = [FASHION_SCENES, *HUB_LAYOUTS]
        close = difflib.get_close_matches(path, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        json_names = ", ".join(name for names in KARPATHY_JSON_FILES.values() for name in names)
        raise ValueError(
            f"Unknown dataset {path!r}{hint}: not one of the built-in names {known}, not a local folder with "
            f"Karpathy-style JSON ({json_names}), and datasets.load_dataset could not load it "
            f"({type(err).__name__}: {err})"
        ) from err


def _check_mapping(mapping: dict[str, str]) -> None:
    wrong = {source: target for source, target in mapping.items() if target not in SCHEMA_COLUMNS}
    if wrong:
        raise ValueError(
            f"column_mapping maps source columns to schema columns {list(SCHEMA_COLUMNS)}, got {wrong}; "
            f"e.g. column_mapping={{'img': 'image', 'sentences': 'captions'}}"
        )


def _require_column(ds: datasets.Dataset, name: str, target: str, where: str) -> None:
    """Fail with the columns present and the column_mapping that fixes it when ``name`` is missing."""
    if name.split(".")[0] not in ds.column_names:
        raise ValueError(
            f"{where}: column {name!r} (for {target!r}) not found; columns present: {ds.column_names}. Pass "
            f"column_mapping={{'<column holding the {target}>': {target!r}}} to name the column that holds it."
        )


def _read_column(ds: datasets.Dataset, name: str, target: str, where: str) -> list:
    """The values of column ``name`` (dotted: a struct field) as a list, without decoding images."""
    _require_column(ds, name, target, where)
    top, *fields = name.split(".")
    array = ds.select_columns([top]).with_format("arrow")[:][top]
    for part in fields:
        if not pa.types.is_struct(array.type) or array.type.get_field_index(part) < 0:
            raise ValueError(f"{where}: column {name!r} not found: {top!r} has no field {part!r} (type {array.type})")
        array = pc.struct_field(array, part)
    return array.to_pylist()


def _conform(
    ds: datasets.Dataset,
    mapping: dict[str, str],
    *,
    where: str,
    split: str,
    rows: list[int] | None = None,
    group_by_image: bool = False,
) -> datasets.Dataset:
    """Bring one native split into the schema; ``rows`` keeps a subset (in order)."""
    _check_mapping(mapping)
    source_of = {target: source for source, target in mapping.items()}
    image_source = source_of.get("image", "image")
    caption_source = source_of.get("captions", "captions")
    _require_column(ds, image_source, "image", where)
    captions = _read_column(ds, caption_source, "captions", where)
    id_source = source_of.get("image_id", "image_id")
    if id_source in ds.column_names or "image_id" in source_of:
        ids = [str(value) for value in _read_column(ds, id_source, "image_id", where)]
    else:  # no id column: the row number is the id
        ids = [f"{split}-{i}" for i in range(len(ds))]
    captions = [as_caption_list(value, where, caption_source, i) for i, value in enumerate(captions)]
    rows = list(range(len(ds))) if rows is None else rows
    if group_by_image:
        first: dict[str, int] = {}
        merged: dict[str, list[str]] = {}
        for i in rows:
            first.setdefault(ids[i], i)
            merged.setdefault(ids[i], []).extend(captions[i])
        rows = list(first.values())
        for image_id, i in first.items():
            captions[i] = merged[image_id]

    out = ds.select_columns([image_source])
    if image_source != "image":
        out = out.rename_column(image_source, "image")
    feature = out.features["image"]
    if feature == datasets.Value("string"):
        out = out.cast_column("image", datasets.Image())
    elif not isinstance(feature, datasets.Image):
        raise ValueError(
            f"{where}: column {image_source!r} holds {feature}, not images (datasets.Image or file paths)"
        )
    out = out.add_column("captions", captions, feature=datasets.List(datasets.Value("string")))
    out = out.add_column("image_id", ids, feature=datasets.Value("string"))
    if rows != list(range(len(ds))):
        out = out.select(rows)
    return out
