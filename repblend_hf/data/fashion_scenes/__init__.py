"""The embedded default: "fashion-scenes", captioned scenes generated from Fashion-MNIST.

No captioned photo collection installs offline, so the default dataset is generated (DESIGN.md,
"The embedded default"). Each 64×64 RGB scene places 2-4 Fashion-MNIST garments, each tinted with
one of ten named colours, in distinct cells of a 3×3 grid on a dark, plain or lightly textured
background. Every scene gets five different captions that name items (with synonyms), colours and
positions in varied sentence forms; most captions pin down colour + item + position combinations,
so one class label is never enough to retrieve a scene. The split sizes mirror Flickr30K's shape
(10,000 / 1,000 / 1,000 by default).

Provenance. Test scenes use only the Fashion-MNIST test images (``t10k-*``). Train and validation
scenes use the Fashion-MNIST training images, split once into two disjoint pools (a fixed
permutation: the first sixth for validation, the rest for train). Each row records where its
garments come from: ``source`` ("train" / "t10k", the Fashion-MNIST file) and, per object,
``source_index`` (the index in that file), besides the public schema (``image``, ``captions``,
``image_id``).

Determinism and caching. Scene ``i`` of a split is drawn from its own generator seeded with
``(seed, split, i)``, so a tiny build is a prefix of the full one. Each split is built once with
``datasets.Dataset.from_generator`` and reused from the datasets cache: the cache key is a hash of
the generator (pickled by reference, so stable across processes) and its ``gen_kwargs``, which
carry :data:`GENERATOR_VERSION`. Bump that string whenever the output of this module changes.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*.gz``, IDX format) or, when those files are missing, from the
Hub dataset ``zalando-datasets/fashion_mnist``. Both hold the same images in the same order.

Modules: :mod:`.source` (Fashion-MNIST and the split pools), :mod:`.scenes` (layout and rendering),
:mod:`.captions` (the caption grammar, its word plumbing in :mod:`._writer`), :mod:`.cache` (a generated split
kept in the datasets cache) and :mod:`.vocabulary` (names, sizes, words and colours they share); the rows and the
dataset are built here. ``_generate_scenes`` stays in this module: ``datasets`` hashes it by reference
(module and name), so moving it would change the cache key of every fashion-scenes build made before.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import datasets
import numpy as np
from PIL import Image as PILImage

from ..schema import SCHEMA_FEATURES
from .cache import build_cached_split
from .captions import TEMPLATES, describe_scene
from .scenes import Scene, SceneObject, _render, _sample_scene
from .source import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_HUB_REPO, load_fashion_mnist, source_pools
from .vocabulary import (
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    DEFAULT_SIZES,
    FASHION_SCENES,
    GENERATOR_VERSION,
    POSITIONS,
    SPLIT_CODES,
    TEXTURES,
)

__all__ = [
    "FASHION_SCENES",
    "GENERATOR_VERSION",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_HUB_REPO",
    "CATEGORIES",
    "COLOURS",
    "POSITIONS",
    "TEMPLATES",
    "load_fashion_scenes",
    "load_fashion_mnist",
    "source_pools",
    "describe_scene",
    "build_cached_split",
    "Scene",
    "SceneObject",
]

_FEATURES = datasets.Features(
    {
        **SCHEMA_FEATURES,  # image, captions, image_id; then the provenance of each scene
        "objects": datasets.List(
            {
                "category": datasets.Value("string"),
                "colour": datasets.Value("string"),
                "position": datasets.Value("string"),
                "source_index": datasets.Value("int32"),
            }
        ),
        "background": datasets.Value("string"),
        "source": datasets.Value("string"),
    }
)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _generate_scenes(
    split: str, num_scenes: int, seed: int, fashion_mnist_dir: str | None, version: str
) -> Iterator[dict]:
    """Rows of one split. Module-level so ``datasets`` hashes it by reference (stable across processes)."""
    del version  # only part of the cache key
    part = "t10k" if split == "test" else "train"
    glyphs, labels = load_fashion_mnist(part, fashion_mnist_dir)
    # The pools only depend on the file sizes, read here from the file itself.
    _, pool = source_pools(len(labels), len(labels), seed)[split]
    by_category = [pool[labels[pool] == c] for c in range(len(CATEGORIES))]
    for i in range(num_scenes):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], i])
        scene = _sample_scene(rng, by_category)
        image = _render(scene, glyphs, rng)
        captions = [text for _, text in describe_scene(scene, rng)]
        yield {
            "image": {"bytes": _png(image), "path": None},
            "captions": captions,
            "image_id": f"{split}-{i:05d}",
            "objects": [
                {
                    "category": CATEGORIES[o.category],
                    "colour": COLOURS[o.colour][0],
                    "position": POSITIONS[o.cell][0],
                    "source_index": o.source_index,
                }
                for o in scene.objects
            ],
            "background": f"{TEXTURES[scene.texture]} {BACKGROUNDS[scene.background][0]}",
            "source": part,
        }


def load_fashion_scenes(
    *,
    num_train: int = DEFAULT_SIZES["train"],
    num_validation: int = DEFAULT_SIZES["validation"],
    num_test: int = DEFAULT_SIZES["test"],
    seed: int = 0,
    fashion_mnist_dir: str | None = None,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Build (first call) or load from the datasets cache (later calls) the fashion-scenes dataset.

    Columns: ``image`` (64×64 RGB PNG), ``captions`` (5 str), ``image_id`` (str, "train-00042"),
    ``objects`` (category, colour, position, source_index per garment), ``background``, ``source``.
    """
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    for split, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"num_{split} must be a positive int, got {size!r}")
    if fashion_mnist_dir is not None:
        fashion_mnist_dir = os.path.abspath(fashion_mnist_dir)
    splits = {}
    for split, size in sizes.items():
        gen_kwargs = {
            "split": split,
            "num_scenes": size,
            "seed": seed,
            "fashion_mnist_dir": fashion_mnist_dir,
            "version": GENERATOR_VERSION,
        }
        splits[split] = build_cached_split(_generate_scenes, gen_kwargs, _FEATURES, cache_dir, split)
    return datasets.DatasetDict(splits)
